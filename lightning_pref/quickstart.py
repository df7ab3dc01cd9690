"""``make quickstart``: Diffusion-DPO on the toy world, on CPU, in a few minutes, and whether it aligned.

1. Samples preference pairs from the toy base model and labels them with the toy reward (once; reused), and
   a few pairs on the held-out prompts for the drift check.
2. Runs ``lightning-pref fit --config examples/quickstart.yaml`` (checkpoint, metrics, before/after grid) and
   draws its training curves.
3. Compares the tuned model with the base on held-out prompts from identical noise
   ([`lightning_pref.toy.evaluation`][lightning_pref.toy.evaluation]) and says in one line whether the run aligned: the win rate, the
   reward before -> after, and how far the winners' error drifted.

    python -m lightning_pref.quickstart [--seed 1]      # or: make quickstart SEED=1
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from lightning_pref.cli import PreferenceCLI, quiet_libraries
from lightning_pref.plotting import find_metrics, plot_training_curves

OUTPUT = Path("outputs/quickstart")
CONFIG = Path("examples/quickstart.yaml")
PAIRS = 512  # candidate pairs of training data (near-ties are dropped)
HELDOUT_PAIRS = 64  # candidate pairs on the held-out prompts, for the drift check
EVAL_SEEDS = 32  # initial-noise seeds per held-out prompt: 128 samples


def prepare_data(out: Path) -> None:
    from lightning_pref.toy.preferences import HELDOUT_PROMPTS, generate_toy_preferences, sampled_from

    for name, pairs, prompts, seed in (("data", PAIRS, None, 0), ("heldout", HELDOUT_PAIRS, HELDOUT_PROMPTS, 1)):
        if not sampled_from(out / name):
            if (out / name).exists():
                print(f"{out / name} was sampled from another toy base model: sampling it again.", flush=True)
                shutil.rmtree(out / name)
            print(f"Sampling {pairs} candidate pairs from the toy base model into {out / name} ...", flush=True)
            options = {"prompts": prompts} if prompts else {}
            counts = generate_toy_preferences(out / name, pairs, seed=seed, progress=True, **options)["counts"]
            print(f"  {counts['written']} pairs written, {counts['ties_dropped']} near-ties dropped", flush=True)


def main(args: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0, help="training seed (noise, data order); the data stay the same")
    options = parser.parse_args(args)
    if not CONFIG.exists():
        sys.exit(f"{CONFIG} not found: run the quickstart from the repository root (`make quickstart`).")
    quiet_libraries()
    prepare_data(OUTPUT)
    seed = str(options.seed)
    cli = PreferenceCLI(
        args=[
            "fit",
            "--config",
            str(CONFIG),
            "--seed_everything",
            seed,
            "--model.init_args.seed",
            seed,
            "--data.init_args.seed",
            seed,
        ]
    )

    from lightning_pref.toy.evaluation import evaluate_against_base, verdict

    print("\nComparing the tuned model with the base on the held-out prompts ...", flush=True)
    result = evaluate_against_base(cli.model.eval().backbone, None, EVAL_SEEDS, OUTPUT / "heldout", progress=True)
    result["seed"] = options.seed
    (OUTPUT / "alignment.json").write_text(json.dumps(result, indent=2))
    metrics = find_metrics(OUTPUT / "lightning_logs")
    curves = plot_training_curves(metrics, OUTPUT / "curves.png")
    print()
    print(f"checkpoint:  {cli.trainer.checkpoint_callback.last_model_path}")  # last-v1.ckpt beside an earlier run's
    print(f"metrics:     {metrics}")
    print(f"curves:      {curves}")
    print(f"samples:     {OUTPUT / 'samples' / 'before_after.png'} (top: before, bottom: after)")
    print(f"alignment:   {OUTPUT / 'alignment.json'} ({4 * EVAL_SEEDS} held-out samples)")
    print(verdict(result))


if __name__ == "__main__":
    main()

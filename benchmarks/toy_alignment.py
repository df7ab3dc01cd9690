"""Does a method actually align a model? Fine-tune the toy base model and measure the reward it gains.

For each training seed the method trains through the same CLI and config a user would run
(``examples/toy/<method>.yaml``), on toy preference data sampled from the base model and labelled by
``ToyPreferenceReward`` (warm colours, right shape). Then base and tuned model sample the held-out prompts
from identical initial noise, and the script reports:

* the mean reward of base and tuned samples, and of its two parts (warmth, shape agreement);
* the win rate of tuned over base (same prompt, same noise; ties count one half);
* the mean win rate over training seeds with a 95% t-interval over seeds.

    python benchmarks/toy_alignment.py --method diffusion_dpo            # one method, 3 seeds
    python benchmarks/toy_alignment.py --all                             # every method; writes docs/benchmarks.md
    python benchmarks/toy_alignment.py --table                           # the table from saved summaries
    python benchmarks/toy_alignment.py --method diffusion_dpo --seeds 0 --eval-seeds 8 --max-steps 5   # smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from pathlib import Path

import torch

from lightning_pref.cli import PreferenceCLI, quiet_libraries
from lightning_pref.rewards import ShapeAgreementReward, WarmthReward
from lightning_pref.toy.preferences import HELDOUT_PROMPTS, ToyPreferenceReward, generate_toy_preferences, sample_images

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "examples" / "toy"
TABLE_START, TABLE_END = "<!-- toy-alignment:start -->", "<!-- toy-alignment:end -->"
# Two-sided 95% Student t quantiles by degrees of freedom.
T_QUANTILE = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def methods() -> list[str]:
    return sorted(path.stem for path in CONFIGS.glob("*.yaml"))


def toy_data(out_root: Path, pairs: int, pretrained: str | None) -> Path:
    """Preference shards shared by every method and seed (generated once, then reused)."""
    data = out_root / f"data-{pairs}"
    if not (data / "info.json").exists():
        info = generate_toy_preferences(data, pairs, pipeline=pretrained, seed=0)
        print(f"toy data: {info['counts']}")
    return data


def train(method: str, seed: int, data: Path, run_dir: Path, args: argparse.Namespace) -> tuple[torch.nn.Module, float]:
    cli_args = [
        "--config", str(CONFIGS / f"{method}.yaml"),
        "--seed_everything", str(seed),
        "--model.init_args.seed", str(seed),
        "--data.init_args.seed", str(seed),
        "--data.init_args.train_shards", f"{data}/*.tar",
        "--trainer.default_root_dir", str(run_dir),
        "--trainer.logger", "lightning.pytorch.loggers.CSVLogger",
        "--trainer.logger.save_dir", str(run_dir),
        "--trainer.enable_checkpointing", "false",
        "--trainer.enable_progress_bar", "false",
    ]
    if args.max_steps is not None:
        cli_args += ["--trainer.max_steps", str(args.max_steps)]
    if args.pretrained is not None:
        cli_args += ["--model.init_args.backbone.init_args.pretrained", args.pretrained]
    start = time.perf_counter()
    cli = PreferenceCLI(args=["fit", *cli_args])
    return cli.model, time.perf_counter() - start


@torch.no_grad()
def evaluate(module, eval_seeds: int) -> dict:
    """Base vs tuned on the held-out prompts, from identical initial noise.

    The base is loaded afresh from the pipeline the run started from: reference-free methods (MaPO) keep no
    copy of it, and a method whose reference moves must not be compared with its own reference.
    """
    module.eval()
    prompts = [prompt for prompt in HELDOUT_PROMPTS for _ in range(eval_seeds)]
    seeds = [10_000 + i for _ in HELDOUT_PROMPTS for i in range(eval_seeds)]
    tuned = sample_images(module.backbone, prompts, seeds)
    base = sample_images(type(module.backbone)(module.backbone.pretrained), prompts, seeds)
    reward = ToyPreferenceReward("warm")
    tuned_reward, base_reward = reward.score(tuned, prompts), reward.score(base, prompts)
    wins = (tuned_reward > base_reward).float() + 0.5 * (tuned_reward == base_reward).float()
    parts = {}
    for part in (WarmthReward(), ShapeAgreementReward()):
        parts[f"base_{part.name}"] = part.score(base, prompts).mean().item()
        parts[f"tuned_{part.name}"] = part.score(tuned, prompts).mean().item()
    return {"base_reward": base_reward.mean().item(), "tuned_reward": tuned_reward.mean().item(), "win_rate": wins.mean().item(), **parts}


def interval(values: list[float]) -> tuple[float, float, float]:
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, math.nan, math.nan
    half = T_QUANTILE.get(len(values) - 1, 1.96) * statistics.stdev(values) / math.sqrt(len(values))
    return mean, mean - half, mean + half


def run_method(method: str, args: argparse.Namespace) -> dict:
    data = toy_data(args.out, args.pairs, args.pretrained)
    runs = []
    for seed in args.seeds:
        module, seconds = train(method, seed, data, args.out / method / f"seed{seed}", args)
        result = evaluate(module, args.eval_seeds)
        result.update(seed=seed, train_seconds=seconds)
        print(json.dumps(result))
        runs.append(result)
    mean, low, high = interval([run["win_rate"] for run in runs])
    summary = {
        "method": method,
        "runs": runs,
        "win_rate": mean,
        "win_rate_ci": [low, high],
        **{key: statistics.fmean(run[key] for run in runs) for key in runs[0] if key not in ("seed", "win_rate")},
    }
    (args.out / method).mkdir(parents=True, exist_ok=True)
    (args.out / method / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def table(summaries: list[dict], command: str) -> str:
    lines = [
        f"Command: `{command}`",
        "",
        "| method | win rate vs base (95% CI over seeds) | reward base -> tuned | warmth base -> tuned | shape agreement base -> tuned | train s / seed |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for s in summaries:
        low, high = s["win_rate_ci"]
        lines.append(
            f"| {s['method']} | {100 * s['win_rate']:.1f}% [{100 * low:.1f}, {100 * high:.1f}] "
            f"| {s['base_reward']:.3f} -> {s['tuned_reward']:.3f} "
            f"| {s['base_warmth']:.3f} -> {s['tuned_warmth']:.3f} "
            f"| {s['base_shape_agreement']:.3f} -> {s['tuned_shape_agreement']:.3f} | {s['train_seconds']:.0f} |"
        )
    return "\n".join(lines)


def write_table(markdown: str, path: Path) -> None:
    text = path.read_text()
    start, end = text.index(TABLE_START) + len(TABLE_START), text.index(TABLE_END)
    path.write_text(text[:start] + "\n" + markdown + "\n" + text[end:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", choices=methods(), help="a config in examples/toy/")
    parser.add_argument("--all", action="store_true", help="every method, then rewrite the table in docs/benchmarks.md")
    parser.add_argument(
        "--table", action="store_true", help="rewrite the table in docs/benchmarks.md from the summaries earlier runs saved"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds")
    parser.add_argument("--eval-seeds", type=int, default=64, help="initial-noise seeds per held-out prompt")
    parser.add_argument("--pairs", type=int, default=1024, help="candidate pairs of toy preference data")
    parser.add_argument("--max-steps", type=int, default=None, help="override the config's step budget")
    parser.add_argument("--pretrained", default=None, help="another base pipeline (default: the committed toy model)")
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "toy_alignment")
    args = parser.parse_args()
    if not (args.method or args.all or args.table):
        parser.error("give --method NAME, --all or --table")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 2)))
    quiet_libraries()
    if args.table:
        saved = [args.out / method / "summary.json" for method in methods()]
        missing = [str(path) for path in saved if not path.exists()]
        if missing:
            parser.error(f"no saved summary for {', '.join(missing)}: run --method NAME for each first")
        summaries = [json.loads(path.read_text()) for path in saved]
    else:
        summaries = [run_method(method, args) for method in (methods() if args.all else [args.method])]
    command = "--all" if args.all or args.table else f"--method {args.method}"
    markdown = table(summaries, f"python benchmarks/toy_alignment.py {command}")
    print(markdown)
    if args.all or args.table:
        write_table(markdown, REPO / "docs" / "benchmarks.md")


if __name__ == "__main__":
    main()

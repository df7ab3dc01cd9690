"""What making pairs during training costs: a step of SSPO, SPIN-Diffusion and online DPO over a Diffusion-DPO step.

Each method trains through its own toy config (``examples/toy/<method>.yaml``: the same model, batch, sampler
steps and guidance the toy benchmark uses), a few steps at a time, on one thread, the methods interleaved over
``--repeats`` rounds in one process so drifting machine load hits all alike. A step's time includes its
generation: SSPO's reference samples and online DPO's candidates are made inside the step; SPIN-Diffusion makes
one loser per real winner at the start of each iteration, and that time is spread over the iteration's steps.
The real-winner set is sized so SPIN generates as many losers per training step as its toy config does (1024
winners for an iteration of 70 steps: about 15 losers a step).

Prints each method's step time over Diffusion-DPO's in the same round, per round and their mean (the rounds
run at different machine loads; a ratio within one round is steadier than a median over rounds).

    python benchmarks/method_step_cost.py [--steps 12] [--repeats 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "examples" / "toy"
METHODS = ("diffusion_dpo", "sspo", "spin_diffusion", "online_dpo")


class StepTimer(pl.Callback):
    """Each training step's wall time, and the time SPIN-Diffusion spends starting its iterations."""

    def __init__(self):
        self.steps: list[float] = []
        self.iterations: list[float] = []

    def on_fit_start(self, trainer, pl_module):
        start_iteration = getattr(pl_module, "start_iteration", None)
        if start_iteration is None:
            return

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return start_iteration(*args, **kwargs)
            finally:
                self.iterations.append(time.perf_counter() - start)

        pl_module.start_iteration = timed

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps.append(time.perf_counter() - self.start)


def step_seconds(method: str, steps: int, data: dict[str, Path], out: Path) -> float:
    """The median step time of ``steps`` steps of the method's toy config (generation included), first step dropped."""
    from lightning_pref.cli import PreferenceCLI

    timer = StepTimer()
    args = [  # run=False: no subcommand, the fit is called below
        "--config",
        str(CONFIGS / f"{method}.yaml"),
        "--trainer.max_steps",
        str(steps),
        "--trainer.logger",
        "false",
        "--trainer.enable_checkpointing",
        "false",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.default_root_dir",
        str(out / method),
    ]
    if method == "spin_diffusion":
        args += ["--model.init_args.steps_per_iteration", str(steps), "--model.init_args.num_iterations", "1"]
    if method in ("sspo", "spin_diffusion"):
        args += ["--data.init_args.train_shards", f"{data['real']}/*.tar"]
    elif method != "online_dpo":
        args += ["--data.init_args.train_shards", f"{data['pairs']}/*.tar"]
    cli = PreferenceCLI(args=args, run=False)
    cli.trainer.callbacks.append(timer)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    step = statistics.median(timer.steps[1:])
    return step + sum(timer.iterations) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12, help="training steps per method and round")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved rounds")
    args = parser.parse_args()

    from lightning_pref.cli import quiet_libraries
    from lightning_pref.toy.preferences import generate_toy_preferences, generate_toy_winners

    torch.set_num_threads(1)
    quiet_libraries()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        data = {"pairs": out / "pairs", "real": out / "real"}
        generate_toy_preferences(data["pairs"], 2 * 16 * args.steps, seed=0)  # twice Diffusion-DPO's 16 pairs a step
        generate_toy_winners(data["real"], args.steps * 1024 // 70, seed=0)  # SPIN: 1024 winners per 70-step iteration
        times: dict[str, list[float]] = {method: [] for method in METHODS}
        for repeat in range(args.repeats):
            order = METHODS if repeat % 2 == 0 else tuple(reversed(METHODS))
            for method in order:
                times[method].append(step_seconds(method, args.steps, data, out / f"round{repeat}"))
                print(f"round {repeat}: {method} {1000 * times[method][-1]:.0f} ms/step", file=sys.stderr, flush=True)
    print(
        f"step time over Diffusion-DPO's in the same round ({args.repeats} rounds of {args.steps} steps, toy configs, "
        "one thread); rounds differ in machine load, the ratio within a round less:"
    )
    for method in METHODS[1:]:
        ratios = [ours / dpo for ours, dpo in zip(times[method], times["diffusion_dpo"])]
        pairs = yaml.safe_load((CONFIGS / f"{method}.yaml").read_text())["data"]["init_args"]["batch_size"]
        per_round = ", ".join(f"{ratio:.2f}" for ratio in ratios)
        print(
            f"  {method:15s} {statistics.mean(ratios):5.2f} x Diffusion-DPO (rounds: {per_round}; {pairs} pairs a step)"
        )


if __name__ == "__main__":
    main()

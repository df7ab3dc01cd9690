"""Does a method align a model, and does it beat Diffusion-DPO? Fine-tune the toy base model and measure.

For each training seed the method trains through the same CLI and config a user would run
(``examples/toy/<method>.yaml``) on the data its DataModule reads: toy preference pairs sampled from the base
model and labelled by ``ToyPreferenceReward`` (warm colours, right shape), or, for the methods that pair a
real image with a generated one (SSPO, SPIN-Diffusion), real winners rendered in the preferred colours
(``lightning-pref data toy --real``). Then (:mod:`lightning_pref.toy.evaluation`):

* base and tuned model sample the held-out prompts from identical initial noise: the win rate of tuned over
  base, the mean reward and its two parts (warmth, shape agreement);
* the drift: tuned over base denoising error on held-out preference pairs, winners and losers; a run whose
  winners' error rose by more than 25% is flagged as collapsed.

Each row: the mean over training seeds with a 95% t-interval, and the paired difference from Diffusion-DPO's
win rate on the same seeds with its own 95% t-interval (a method trained on other data than the toy pairs is
compared with Diffusion-DPO on that data: ``SAME_DATA_BASELINE``). A personalized method (PPD, two users on
``lightning-pref data toy --users`` pairs) is measured per user (:func:`lightning_pref.toy.users.evaluate_users_against_base`):
user 0 (warm, the table's reward) fills the row, and each other user's win rate under their own reward goes below
the table. Every seed trains at once, in its own process with one
thread (``--jobs``): five single-thread processes share two cores better than rounds of two, since a second
thread speeds one seed up only about 1.4 times.
Every summary records the commit and a hash of the library's code, the benchmark and the method's config;
the table refuses to mix rows whose code differs, and rows whose config changed since they ran.

    python benchmarks/toy_alignment.py --method diffusion_dpo            # one method, 5 seeds
    python benchmarks/toy_alignment.py --all                             # every method; writes docs/benchmarks.md
    python benchmarks/toy_alignment.py --table                           # the table from saved summaries
    python benchmarks/toy_alignment.py --method diffusion_dpo --name pilot --set model.init_args.lr 3e-5
    python benchmarks/toy_alignment.py --method diffusion_dpo --seeds 0 1 --eval-seeds 2 --pairs 16 --heldout-pairs 8 --max-steps 2   # smoke
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from intervals import t_interval

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "examples" / "toy"
BASELINE = "diffusion_dpo"
#: the Diffusion-DPO row trained on the same data as a method that does not train on the toy pairs as they are
SAME_DATA_BASELINE = {"adaptive_dpo": "diffusion_dpo_noisy_labels", "ppd": "diffusion_dpo_two_users"}
TABLE_START, TABLE_END = "<!-- toy-alignment:start -->", "<!-- toy-alignment:end -->"


def methods() -> list[str]:
    return sorted(path.stem for path in CONFIGS.glob("*.yaml"))


def config(method: str) -> dict:
    import yaml

    return yaml.safe_load((CONFIGS / f"{method}.yaml").read_text())


def data_class(method: str) -> str:
    """The name of the DataModule class a method's toy config trains with."""
    return config(method)["data"]["class_path"].rsplit(".", 1)[-1]


def inversion_store(args: argparse.Namespace) -> Path | None:
    """Where a row's seeds share their inversions, if its config keeps them on disk (Inversion-DPO's
    ``inversion_cache_dir``): in the row's directory, emptied when the row starts, so every row starts cold."""
    if "inversion_cache_dir" not in config(args.method)["model"]["init_args"]:
        return None
    return args.out / args.name / "inversions"


def baseline_of(method: str) -> str:
    return SAME_DATA_BASELINE.get(method, BASELINE)


def code_hash() -> str:
    """SHA-256 (first 12 hex digits) of the library's sources and weights and of this script and its statistics."""
    files = sorted(p for p in (REPO / "lightning_pref").rglob("*") if p.suffix in (".py", ".json", ".safetensors"))
    digest = hashlib.sha256()
    script = Path(__file__).resolve()
    for path in [*files, script, script.with_name("intervals.py")]:
        digest.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def config_sha256(method: str) -> str:
    """SHA-256 (first 12 hex digits) of a method's toy config as it is now."""
    return hashlib.sha256((CONFIGS / f"{method}.yaml").read_bytes()).hexdigest()[:12]


def commit() -> str:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "lightning_pref", "benchmarks", "examples"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+uncommitted" if dirty else "")


# ------------------------------------------------------------------------------------------ shared inputs
def shared_inputs(args: argparse.Namespace) -> dict[str, Path]:
    """Training pairs, held-out pairs and the base model's held-out samples: made once, reused by every run (and
    two-user pairs when ``args.method`` trains on them). The libraries load only when something is missing."""
    paths = {
        "train": args.out / f"data-{args.pairs}",
        "real": args.out / f"real-{args.pairs}",
        "users": args.out / f"users-{args.pairs}",
        "heldout": args.out / f"heldout-{args.heldout_pairs}",
        "base_samples": args.out / f"base-samples-{args.eval_seeds}.safetensors",
    }
    wanted = [name for name in paths if name != "users" or data_class(args.method) == "UserPreferenceDataModule"]
    missing = [
        name for name in wanted if not (paths[name] / "info.json" if paths[name].is_dir() else paths[name]).exists()
    ]
    if not missing:
        return paths

    import torch
    from safetensors.torch import save_file

    from lightning_pref.backbones import StableDiffusionBackbone
    from lightning_pref.toy import BASE_MODEL_PATH
    from lightning_pref.toy.evaluation import heldout_samples
    from lightning_pref.toy.preferences import (
        HELDOUT_PROMPTS,
        generate_toy_preferences,
        generate_toy_winners,
        sample_images,
    )
    from lightning_pref.toy.users import generate_two_user_preferences

    if "train" in missing:
        info = generate_toy_preferences(paths["train"], args.pairs, pipeline=args.pretrained, seed=0, progress=True)
        print(f"training pairs: {info['counts']}", flush=True)
    if "real" in missing:
        info = generate_toy_winners(paths["real"], args.pairs, seed=0)
        print(f"real winners: {info['counts']}", flush=True)
    if "users" in missing:
        info = generate_two_user_preferences(
            paths["users"], args.pairs, pipeline=args.pretrained, seed=0, progress=True
        )
        print(f"two-user pairs: {info['counts']}", flush=True)
    if "heldout" in missing:
        info = generate_toy_preferences(
            paths["heldout"],
            args.heldout_pairs,
            pipeline=args.pretrained,
            prompts=HELDOUT_PROMPTS,
            seed=1,
            progress=True,
        )
        print(f"held-out pairs: {info['counts']}", flush=True)
    if "base_samples" in missing:
        base = StableDiffusionBackbone(str(args.pretrained or BASE_MODEL_PATH)).eval()
        prompts, seeds = heldout_samples(args.eval_seeds)
        with torch.no_grad():
            save_file({"images": sample_images(base, prompts, seeds, progress="base samples")}, paths["base_samples"])
    return paths


# ------------------------------------------------------------------------------------ one seed (worker)
def training_data(method: str, paths: dict[str, Path]) -> list[str]:
    """What a method's config trains on: real winners for an ``UnpairedDataModule`` or a ``SelfPlayDataModule``,
    two-user pairs for a ``UserPreferenceDataModule``, nothing for a ``PromptDataModule`` (online pairs from the
    prompts its config lists), else the toy pairs."""
    data = data_class(method)
    if data == "PromptDataModule":
        return []
    shards = {"UnpairedDataModule": "real", "SelfPlayDataModule": "real", "UserPreferenceDataModule": "users"}
    return ["--data.init_args.train_shards", f"{paths[shards.get(data, 'train')]}/*.tar"]


def train_and_evaluate(args: argparse.Namespace, seed: int) -> dict:
    """Train one seed through the CLI and evaluate it (runs in a worker process)."""
    import torch
    from safetensors.torch import load_file

    from lightning_pref.cli import PreferenceCLI, quiet_libraries
    from lightning_pref.methods.ppd import PPD
    from lightning_pref.toy.evaluation import evaluate_against_base
    from lightning_pref.toy.users import evaluate_users_against_base

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 1)))
    quiet_libraries()
    paths = shared_inputs(args)
    run_dir = args.out / args.name / f"seed{seed}"
    cli_args = [
        "--config",
        str(CONFIGS / f"{args.method}.yaml"),
        "--seed_everything",
        str(seed),
        "--model.init_args.seed",
        str(seed),
        "--data.init_args.seed",
        str(seed),
        *training_data(args.method, paths),
        *(["--model.init_args.inversion_cache_dir", str(store)] if (store := inversion_store(args)) else []),
        "--trainer.default_root_dir",
        str(run_dir),
        "--trainer.logger",
        "lightning.pytorch.loggers.CSVLogger",
        "--trainer.logger.save_dir",
        str(run_dir),
        "--trainer.enable_checkpointing",
        "false",
        "--trainer.enable_progress_bar",
        "false",
    ]
    if args.max_steps is not None:
        cli_args += ["--trainer.max_steps", str(args.max_steps)]
    if args.pretrained is not None:
        cli_args += ["--model.init_args.backbone.init_args.pretrained", args.pretrained]
    for key, value in args.set:
        cli_args += [f"--{key}", value]
    start = time.perf_counter()
    module = PreferenceCLI(args=["fit", *cli_args]).model
    trained = time.perf_counter()
    module.eval()
    base_images = load_file(paths["base_samples"])["images"]
    if isinstance(module, PPD):
        result = evaluate_users_against_base(module, base_images, args.eval_seeds, paths["heldout"])
    else:
        result = evaluate_against_base(module.backbone, base_images, args.eval_seeds, paths["heldout"])
    return {"seed": seed, **result, "train_seconds": trained - start, "eval_seconds": time.perf_counter() - trained}


def worker_command(args: argparse.Namespace, seed: int) -> list[str]:
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker-seed",
        str(seed),
        "--method",
        args.method,
        "--name",
        args.name,
        "--eval-seeds",
        str(args.eval_seeds),
        "--pairs",
        str(args.pairs),
        "--heldout-pairs",
        str(args.heldout_pairs),
        "--out",
        str(args.out),
    ]
    if args.max_steps is not None:
        command += ["--max-steps", str(args.max_steps)]
    if args.pretrained is not None:
        command += ["--pretrained", args.pretrained]
    for key, value in args.set:
        command += ["--set", key, value]
    return command


def run_method(args: argparse.Namespace) -> dict:
    """Every seed of one method, ``--jobs`` at a time, each in its own process; saves the summary. The row's time
    leaves out the shared inputs it made first (``shared_inputs_seconds``), which every later row reuses."""
    start = time.perf_counter()
    shared_inputs(args)
    made = time.perf_counter()
    row_dir = args.out / args.name
    row_dir.mkdir(parents=True, exist_ok=True)
    if (store := inversion_store(args)) is not None:
        shutil.rmtree(store, ignore_errors=True)
    runs = []
    threads = str(max(1, (os.cpu_count() or 1) // args.jobs))
    for first in range(0, len(args.seeds), args.jobs):  # rounds of `jobs` seeds (by default one round of all)
        launched = []
        for seed in args.seeds[first : first + args.jobs]:
            log = (row_dir / f"seed{seed}.log").open("w")
            process = subprocess.Popen(
                worker_command(args, seed),
                env={**os.environ, "OMP_NUM_THREADS": threads},
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPO,
            )
            launched.append((seed, process, log))
        for seed, process, log in launched:
            process.wait()
            log.close()
            if process.returncode != 0:
                tail = (row_dir / f"seed{seed}.log").read_text()[-3000:]
                raise RuntimeError(f"{args.name} seed {seed} failed (exit {process.returncode}):\n{tail}")
            run = json.loads((row_dir / f"seed{seed}.json").read_text())
            print(json.dumps(run), flush=True)
            runs.append(run)
    runs.sort(key=lambda run: run["seed"])
    summary = {
        "method": args.method,
        "name": args.name,
        "commit": commit(),
        "code": code_hash(),
        "config_sha256": config_sha256(args.method),
        "overrides": args.set,
        "settings": {
            "pairs": args.pairs,
            "heldout_pairs": args.heldout_pairs,
            "eval_seeds_per_prompt": args.eval_seeds,
            "max_steps": args.max_steps,
            "jobs": args.jobs,
            "pretrained": args.pretrained,
        },
        "shared_inputs_seconds": made - start,
        "wall_seconds": time.perf_counter() - made,
        "runs": runs,
    }
    (row_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


# ------------------------------------------------------------------------------------------------ table
def row_statistics(summary: dict, baseline: dict | None) -> dict:
    runs = summary["runs"]
    stats = {key: statistics.fmean(run[key] for run in runs) for key in runs[0] if key not in ("seed", "collapsed")}
    stats["win_rate_ci"] = t_interval([run["win_rate"] for run in runs])
    stats["collapsed"] = sum(run["collapsed"] for run in runs)
    stats["seeds"] = len(runs)
    stats["vs_baseline"] = None
    if baseline is not None and baseline["name"] != summary["name"]:
        theirs = {run["seed"]: run["win_rate"] for run in baseline["runs"]}
        shared = [run for run in runs if run["seed"] in theirs]
        if len(shared) >= 2:
            stats["vs_baseline"] = t_interval([run["win_rate"] - theirs[run["seed"]] for run in shared])
    return stats


def percent_interval(values: tuple[float, float, float], signed: bool = False) -> str:
    mean, low, high = (100 * value for value in values)
    sign = "+" if signed else ""
    return f"{mean:{sign}.1f} [{low:{sign}.1f}, {high:{sign}.1f}]"


def table(summaries: list[dict], command: str) -> str:
    codes = {summary["code"] for summary in summaries}
    if len(codes) > 1:
        rows = ", ".join(f"{s['name']}: {s['code']} ({s['commit']})" for s in summaries)
        raise SystemExit(f"the saved rows come from different code ({rows}): rerun the stale rows with --method NAME.")
    changed = [
        s["name"]
        for s in summaries
        if s["name"] == s["method"] and not s["overrides"] and s["config_sha256"] != config_sha256(s["method"])
    ]
    if changed:
        raise SystemExit(
            f"the toy config of {', '.join(changed)} changed since its row ran (examples/toy/NAME.yaml): "
            "rerun each with --method NAME."
        )
    by_name = {summary["name"]: summary for summary in summaries}
    first = summaries[0]
    lines = [
        f"Command: `{command}` (code {first['code']}, commit {first['commit']}; {first['settings']['pairs']} candidate "
        f"pairs; {4 * first['settings']['eval_seeds_per_prompt']} held-out samples per seed)",
        "",
        "| method | seeds | win rate vs base, % (95% CI) | vs Diffusion-DPO on the same data, points (95% CI) "
        "| reward base -> tuned "
        "| warmth | shape agreement | held-out error change, winners / losers | collapsed | s / row |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    per_user = []
    for summary in summaries:
        baseline_name = baseline_of(summary["method"])
        stats = row_statistics(summary, by_name.get(baseline_name))
        versus = (
            "(baseline)"
            if summary["name"] == BASELINE
            else (percent_interval(stats["vs_baseline"], signed=True) if stats["vs_baseline"] else "n/a")
        )
        if stats["vs_baseline"] and baseline_name != BASELINE:
            versus += f" (vs {baseline_name})"
        per_user += user_lines(summary)
        lines.append(
            f"| {summary['name']} | {stats['seeds']} | {percent_interval(stats['win_rate_ci'])} | {versus} "
            f"| {stats['base_reward']:.3f} -> {stats['tuned_reward']:.3f} "
            f"| {stats['base_warmth']:.2f} -> {stats['tuned_warmth']:.2f} "
            f"| {stats['base_shape_agreement']:.2f} -> {stats['tuned_shape_agreement']:.2f} "
            f"| {100 * stats['winner_error_change']:+.1f}% / {100 * stats['loser_error_change']:+.1f}% "
            f"| {stats['collapsed']} of {stats['seeds']} | {summary['wall_seconds']:.0f} |"
        )
    rows, shared = (sum(summary[key] for summary in summaries) for key in ("wall_seconds", "shared_inputs_seconds"))
    lines += ["", f"Rows: {rows / 60:.0f} min in all, and {shared / 60:.0f} min making the inputs they share."]
    return "\n".join(lines + ([""] + per_user if per_user else []))


def user_lines(summary: dict) -> list[str]:
    """For a per-user row, one line per user after the first: their win rate under their own reward."""
    runs = summary["runs"]
    keys = sorted(key for key in runs[0] if key.endswith("_win_rate") and not key.startswith("user0_"))
    return [
        f"* {summary['name']}, {key.removesuffix('_win_rate').replace('_', ' (')} user): win rate vs base under "
        f"that user's reward {percent_interval(t_interval([run[key] for run in runs]))}%, warmth "
        f"{statistics.fmean(run['base_warmth'] for run in runs):.2f} -> "
        f"{statistics.fmean(run[key.split('_')[0] + '_warmth'] for run in runs):.2f}"
        for key in keys
    ]


def write_table(markdown: str, path: Path) -> None:
    text = path.read_text()
    start, end = text.index(TABLE_START) + len(TABLE_START), text.index(TABLE_END)
    path.write_text(text[:start] + "\n" + markdown + "\n" + text[end:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", choices=methods(), help="a config in examples/toy/")
    parser.add_argument("--all", action="store_true", help="every method, then rewrite the table in docs/benchmarks.md")
    parser.add_argument(
        "--table", action="store_true", help="rewrite the table in docs/benchmarks.md from saved summaries"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="training seeds")
    parser.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="seeds trained at once, sharing the cores (default: every seed, one thread each)",
    )
    parser.add_argument("--eval-seeds", type=int, default=64, help="initial-noise seeds per held-out prompt")
    parser.add_argument("--pairs", type=int, default=1024, help="candidate pairs of toy preference data")
    parser.add_argument("--heldout-pairs", type=int, default=128, help="candidate pairs on held-out prompts (drift)")
    parser.add_argument("--max-steps", type=int, default=None, help="override the config's step budget")
    parser.add_argument("--pretrained", default=None, help="another base pipeline (default: the committed toy model)")
    parser.add_argument(
        "--set",
        nargs=2,
        action="append",
        default=[],
        metavar=("KEY", "VALUE"),
        help="a CLI override for a pilot (e.g. model.init_args.lr 3e-5); use with --name",
    )
    parser.add_argument("--name", default=None, help="where the summary goes (default: the method's name)")
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "toy_alignment")
    parser.add_argument(
        "--docs", type=Path, default=REPO / "docs" / "benchmarks.md", help="the page whose table --all/--table rewrite"
    )
    parser.add_argument("--worker-seed", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.out = args.out.resolve()
    args.name = args.name or args.method
    args.jobs = args.jobs or len(args.seeds)
    if args.set and args.name == args.method:
        parser.error("--set changes the method's config: give the pilot its own --name")
    if args.worker_seed is not None:
        result = train_and_evaluate(args, args.worker_seed)
        (args.out / args.name / f"seed{args.worker_seed}.json").write_text(json.dumps(result))
        return
    if not (args.method or args.all or args.table):
        parser.error("give --method NAME, --all or --table")
    if args.table:
        saved = [args.out / method / "summary.json" for method in methods()]
        missing = [str(path) for path in saved if not path.exists()]
        if missing:
            parser.error(f"no saved summary for {', '.join(missing)}: run --method NAME for each first")
        summaries = [json.loads(path.read_text()) for path in saved]
    else:
        summaries = []
        for method in methods() if args.all else [args.method]:
            args.method, args.name = method, (args.name if not args.all else method)
            summaries.append(run_method(args))
    if args.table or args.all:
        markdown = table(summaries, "python benchmarks/toy_alignment.py --all")
        write_table(markdown, args.docs)
    else:
        baselines = [args.out / name / "summary.json" for name in dict.fromkeys([BASELINE, baseline_of(args.method)])]
        saved = [json.loads(path.read_text()) for path in baselines if path.exists() and path.parent.name != args.name]
        same_code = [s for s in saved if s["code"] == summaries[0]["code"]]
        markdown = table(same_code + summaries, f"python benchmarks/toy_alignment.py --method {args.method}")
    print(markdown)


if __name__ == "__main__":
    main()

"""Training curves from a run's ``metrics.csv`` (Lightning's ``CSVLogger``) to one PNG.

    lightning-pref plot outputs/quickstart                   # the newest metrics.csv under the directory
    lightning-pref plot run/metrics.csv --out curves.png --metrics train/loss train/kl

Each panel draws the logged values (thin) and their exponential moving average (thick, ``smoothing``: the
weight of the past, as in TensorBoard); a series of fewer than 10 points is drawn as its points. By default the panels are those of a preference run whose metrics
exist in the file: the loss, the implicit accuracy, the implicit reward margin, the policy's error change
against the reference on winners and losers (below zero: the policy denoises them better than the
reference), and the sample reward logged by [`SampleGrid`][lightning_pref.callbacks.SampleGrid].
"""

from __future__ import annotations

import argparse
import csv
import math
from pathlib import Path

from lightning_pref.errors import ConfigError, DataError, MissingFileError

#: Default panels: a title and the metrics it draws (each panel is drawn when one of its metrics was logged).
PANELS = (
    ("loss", ("train/loss", "val/loss")),
    ("implicit accuracy", ("train/implicit_acc", "val/implicit_acc")),
    ("implicit reward margin", ("train/reward_margin", "val/reward_margin")),
    ("error change vs reference", ("train/winner_error_change", "train/loser_error_change")),
    ("sample reward", ("samples/reward",)),
)
MIN_SMOOTHED = 10  # series with fewer points are drawn as points, unsmoothed


def find_metrics(path: Path) -> Path:
    """``path`` itself if it is a file, else the most recently written ``metrics.csv`` below it."""
    if path.is_file():
        return path
    found = sorted(path.rglob("metrics.csv"), key=lambda p: p.stat().st_mtime) if path.is_dir() else []
    if not found:
        raise MissingFileError(f"{path}: no metrics.csv there; pass a run directory or a CSVLogger metrics.csv.")
    return found[-1]


def read_metrics(path: Path) -> dict[str, list[tuple[int, float]]]:
    """Every numeric column of a ``CSVLogger`` file as ``(step, value)`` points, in file order (rows leave a
    metric's cell empty when it was not logged at that step; non-finite values are dropped)."""
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or "step" not in rows[0]:
        raise DataError(f"{path}: not a CSVLogger metrics file (no 'step' column).")
    series: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        step = row.pop("step")
        for name, cell in row.items():
            try:
                value = float(cell)
            except (TypeError, ValueError):
                continue
            if step and math.isfinite(value) and name != "epoch":
                series.setdefault(name, []).append((int(float(step)), value))
    return series


def moving_average(values: list[float], smoothing: float) -> list[float]:
    """Exponential moving average, bias-corrected so that the first value is kept (``smoothing`` in [0, 1))."""
    average, weight, out = 0.0, 0.0, []
    for value in values:
        average = smoothing * average + (1 - smoothing) * value
        weight = smoothing * weight + (1 - smoothing)
        out.append(average / weight)
    return out


def plot_training_curves(
    metrics_csv: str | Path,
    out: str | Path,
    metrics: list[str] | None = None,
    smoothing: float = 0.8,
) -> Path:
    """Draw the curves of ``metrics_csv`` to ``out`` (PNG); ``metrics``: one panel per named column instead of
    the default panels. Returns ``out``."""
    if not 0 <= smoothing < 1:
        raise ConfigError(f"smoothing={smoothing}: use a value in [0, 1) (0: no smoothing).")
    series = read_metrics(Path(metrics_csv))
    if metrics:
        unknown = [name for name in metrics if name not in series]
        if unknown:
            raise DataError(f"{metrics_csv}: no values for {unknown}; logged: {sorted(series)}.")
        panels = [(name, (name,)) for name in metrics]
    else:
        panels = [(title, names) for title, names in PANELS if any(name in series for name in names)]
        if not panels:
            raise DataError(
                f"{metrics_csv}: none of the default metrics were logged; choose with --metrics from {sorted(series)}."
            )

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(3, len(panels))
    rows = math.ceil(len(panels) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.0 * rows), squeeze=False)
    for axis, (title, names) in zip(axes.flat, panels):
        for name in names:
            if name not in series:
                continue
            steps, values = zip(*series[name])
            if len(values) < MIN_SMOOTHED:  # a few points (the sample reward before and after): as they are
                axis.plot(steps, values, marker="o", label=name)
                continue
            (raw,) = axis.plot(steps, values, linewidth=0.6, alpha=0.35)
            axis.plot(steps, moving_average(list(values), smoothing), color=raw.get_color(), label=name)
        axis.set_title(title)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
        axis.legend(fontsize="small")
    for axis in list(axes.flat)[len(panels) :]:
        axis.set_visible(False)
    figure.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=100)
    plt.close(figure)
    return out


def plot_main(argv: list[str]) -> None:
    """``lightning-pref plot``."""
    parser = argparse.ArgumentParser(prog="lightning-pref plot", description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a run directory (its newest metrics.csv) or a metrics.csv")
    parser.add_argument("--out", type=Path, default=None, help="PNG to write (default: curves.png beside the CSV)")
    parser.add_argument("--metrics", nargs="+", default=None, help="columns to draw, one panel each")
    parser.add_argument("--smoothing", type=float, default=0.8, help="moving-average weight of the past, [0, 1)")
    args = parser.parse_args(argv)
    metrics_csv = find_metrics(args.run)
    out = plot_training_curves(
        metrics_csv, args.out or metrics_csv.with_name("curves.png"), args.metrics, args.smoothing
    )
    print(f"{out} (from {metrics_csv})")

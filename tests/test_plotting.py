"""Training curves: reading CSVLogger files, the moving average, the panels drawn, the command."""

import os

import pytest
from PIL import Image

from lightning_pref.cli import main as cli_main
from lightning_pref.errors import ConfigError, DataError, MissingFileError
from lightning_pref.plotting import find_metrics, moving_average, plot_training_curves, read_metrics

HEADER = "epoch,samples/reward,step,train/implicit_acc,train/loss,train/reward_margin,train/winner_error_change"


def write_metrics(path, steps=12):
    """A CSVLogger file: the sample reward at steps 0 and ``steps``, training metrics at every step, one NaN."""
    rows = [HEADER, ",1.5,0,,,,"]
    rows += [
        f"0,,{step},0.{step % 10},{1 / step},{step / 10},{'nan' if step == 3 else -step / 1000}"
        for step in range(1, steps + 1)
    ]
    rows.append(f",1.7,{steps},,,,")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(rows) + "\n")
    return path


def test_every_numeric_column_is_read_as_step_value_points_without_empty_or_non_finite_cells(tmp_path):
    series = read_metrics(write_metrics(tmp_path / "metrics.csv", steps=4))
    assert set(series) == {
        "samples/reward",
        "train/implicit_acc",
        "train/loss",
        "train/reward_margin",
        "train/winner_error_change",
    }
    assert series["samples/reward"] == [(0, 1.5), (4, 1.7)]
    assert series["train/loss"] == [(1, 1.0), (2, 0.5), (3, 1 / 3), (4, 0.25)]
    assert [step for step, _ in series["train/winner_error_change"]] == [1, 2, 4]  # the NaN at step 3 is dropped


def test_the_moving_average_keeps_the_first_value_and_is_bias_corrected():
    assert moving_average([3.0, 3.0, 3.0], 0.9) == pytest.approx([3.0, 3.0, 3.0])
    # 0.5: averages 0, 1 over weights 0.5, 0.75
    assert moving_average([0.0, 2.0], 0.5) == pytest.approx([0.0, 4 / 3])
    assert moving_average([1.0, 5.0], 0.0) == [1.0, 5.0]


def test_default_panels_are_those_logged_and_named_metrics_get_one_panel_each(tmp_path):
    metrics = write_metrics(tmp_path / "metrics.csv")
    # loss, accuracy, margin, error change, sample reward: 3 columns x 2 rows of 4.2 x 3.0 inches at 100 dpi
    assert Image.open(plot_training_curves(metrics, tmp_path / "all.png")).size == (1260, 600)
    assert Image.open(plot_training_curves(metrics, tmp_path / "one.png", ["train/loss"])).size == (420, 300)
    with pytest.raises(DataError, match=r"no values for \['train/kl'\]; logged: \['samples/reward'"):
        plot_training_curves(metrics, tmp_path / "x.png", ["train/kl"])
    with pytest.raises(ConfigError, match="smoothing=1.0"):
        plot_training_curves(metrics, tmp_path / "x.png", smoothing=1.0)


def test_a_file_without_the_default_metrics_names_its_columns(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text("step,train/kl\n1,0.5\n")
    with pytest.raises(DataError, match=r"choose with --metrics from \['train/kl'\]"):
        plot_training_curves(path, tmp_path / "x.png")
    (tmp_path / "other.csv").write_text("a,b\n1,2\n")
    with pytest.raises(DataError, match="no 'step' column"):
        read_metrics(tmp_path / "other.csv")


def test_a_run_directory_resolves_to_its_newest_metrics_file(tmp_path):
    older = write_metrics(tmp_path / "lightning_logs" / "version_10" / "metrics.csv")
    newer = write_metrics(tmp_path / "lightning_logs" / "version_2" / "metrics.csv")
    os.utime(older, (1_000_000, 1_000_000))  # version_10 sorts after version_2 by name, but was written first
    assert find_metrics(tmp_path) == newer
    assert find_metrics(older) == older
    with pytest.raises(MissingFileError, match="no metrics.csv there"):
        find_metrics(tmp_path / "missing")


def test_the_plot_command_writes_curves_beside_the_csv(tmp_path, capsys):
    metrics = write_metrics(tmp_path / "run" / "version_0" / "metrics.csv")
    cli_main(["plot", str(tmp_path / "run")])
    assert (metrics.parent / "curves.png").exists()
    assert f"from {metrics}" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["plot", str(tmp_path / "nowhere")])
    assert exit_info.value.code == 2
    assert "nowhere: no metrics.csv there" in capsys.readouterr().err

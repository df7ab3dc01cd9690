"""``make quickstart`` end to end, shrunk: data sampled, a fit, the evaluation, and a closing printout whose
paths are the files the run wrote -- also when an earlier run's checkpoint is still there."""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from lightning_pref import quickstart
from lightning_pref.toy import BASE_MODEL_PATH

REPO = Path(__file__).resolve().parents[1]


def shrunk_config(path: Path) -> None:
    """The quickstart config at two steps, a checkpoint every step and a two-step sample grid."""
    config = yaml.safe_load(path.read_text())
    config["trainer"]["max_steps"] = 2
    checkpoint, grid = config["trainer"]["callbacks"]
    checkpoint["init_args"]["every_n_train_steps"] = 1
    grid["init_args"]["num_inference_steps"] = 2
    config["model"]["init_args"]["backbone"]["init_args"]["pretrained"] = str(BASE_MODEL_PATH)
    config["model"]["init_args"]["warmup_steps"] = 1
    config["data"]["init_args"]["batch_size"] = 2
    path.write_text(yaml.safe_dump(config))


def test_quickstart_prints_the_files_this_run_wrote(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "examples").mkdir()
    shutil.copy(REPO / quickstart.CONFIG, tmp_path / quickstart.CONFIG)
    shrunk_config(tmp_path / quickstart.CONFIG)
    monkeypatch.setattr(quickstart, "PAIRS", 8)
    monkeypatch.setattr(quickstart, "HELDOUT_PAIRS", 4)
    monkeypatch.setattr(quickstart, "EVAL_SEEDS", 1)
    earlier = tmp_path / quickstart.OUTPUT / "checkpoints" / "last.ckpt"
    earlier.parent.mkdir(parents=True)
    earlier.write_bytes(b"an earlier run's checkpoint")

    quickstart.main(["--seed", "1"])

    lines = capsys.readouterr().out.splitlines()
    printed = dict(line.split(":", 1) for line in lines if line.split(":", 1)[0] in {"checkpoint", "samples"})
    checkpoint = Path(printed["checkpoint"].strip())
    assert checkpoint.name == "last-v1.ckpt" and checkpoint.stat().st_size > 1000
    assert earlier.read_bytes() == b"an earlier run's checkpoint"
    assert Path(printed["samples"].split(" (")[0].strip()).is_file()
    result = yaml.safe_load((tmp_path / quickstart.OUTPUT / "alignment.json").read_text())
    assert result["seed"] == 1 and result["samples"] == 4
    assert "tuned beats base on" in lines[-1]

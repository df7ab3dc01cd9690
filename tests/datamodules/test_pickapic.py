"""The Pick-a-Pic converter on parquet files made in the real schema."""

import io
import json
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers.shards import read_samples
from PIL import Image

from lightning_pref.datamodules import PreferenceDataModule
from lightning_pref.datamodules.pickapic import convert_pickapic
from lightning_pref.errors import DataError, MissingFileError


def jpeg(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((16, 16, 3), value, dtype=np.uint8)).save(buffer, format="JPEG")
    return buffer.getvalue()


def row(caption, label_0, jpg_0=None, jpg_1=None, **extra):
    return {
        "caption": caption,
        "jpg_0": jpg_0 or jpeg(250),
        "jpg_1": jpg_1 or jpeg(10),
        "label_0": label_0,
        "label_1": 1 - label_0,
        "has_label": True,
        "are_different": True,
        "user_id": 7,
        "ranking_id": 100,
        "best_image_uid": "u0",
        "image_0_uid": "u0",
        "image_1_uid": "u1",
        "model_0": "sdxl",
        "model_1": "sd15",
        "created_at": "2023-05-01",
        "num_example_per_prompt": 1,
        **extra,
    }


@pytest.fixture
def parquet_dir(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    rows = [
        row("image 0 wins", 1.0),
        row("image 1 wins", 0.0, jpg_0=jpeg(10), jpg_1=jpeg(250)),  # swapped: the winner must come first
        row("a tie", 0.5),
        row("corrupt winner", 1.0, jpg_0=jpeg(250)[:40]),  # a truncated JPEG
        row("no label", 1.0, has_label=False),
    ]
    pq.write_table(pa.Table.from_pylist(rows), source / "train-0.parquet")
    pq.write_table(pa.Table.from_pylist(rows[:0], schema=pa.Table.from_pylist(rows).schema), source / "train-1.parquet")
    return source


def test_winner_first_ties_dropped_corrupt_skipped_and_counted(parquet_dir, tmp_path):
    totals = convert_pickapic(parquet_dir, tmp_path / "out")
    assert totals == {
        "rows": 5,
        "written": 2,
        "ties_dropped": 1,
        "unlabelled": 1,
        "identical": 0,
        "corrupt": 1,
        "rejected_labels": 0,
        "rejected_captions": 0,
    }
    samples = read_samples(tmp_path / "out")
    metadata = [json.loads(sample["json"]) for sample in samples]
    assert [m["caption"] for m in metadata] == ["image 0 wins", "image 1 wins"]
    assert [m["swapped"] for m in metadata] == [False, True]
    assert metadata[1]["user_id"] == 7 and metadata[1]["image_1_uid"] == "u1"
    for sample in samples:  # the bright image won both times; bytes are the originals
        assert sample["winner.jpg"] == jpeg(250) and sample["loser.jpg"] == jpeg(10)
    batch = next(
        iter(
            PreferenceDataModule(
                f"{tmp_path}/out/*.tar", val_shards=f"{tmp_path}/out/*.tar", batch_size=2, num_workers=0
            ).val_dataloader()
        )
    )
    assert (batch["pixels_w"] > batch["pixels_l"]).all()


@pytest.mark.parametrize("ties, written", [("keep", 3), ("coin_flip", 3)])
def test_tie_policies(parquet_dir, tmp_path, ties, written):
    totals = convert_pickapic(parquet_dir, tmp_path / ties, ties=ties)
    assert totals["written"] == written and totals["ties_dropped"] == 0
    tie = [json.loads(s["json"]) for s in read_samples(tmp_path / ties) if json.loads(s["json"])["tie"]]
    assert len(tie) == 1


def test_rerun_skips_finished_files(parquet_dir, tmp_path):
    out = tmp_path / "out"
    first = convert_pickapic(parquet_dir, out)
    (out / "train-0-000000.tar").write_bytes(b"")  # a finished file is not redone ...
    assert convert_pickapic(parquet_dir, out) == first
    assert (out / "train-0-000000.tar").read_bytes() == b""
    (out / "train-0-000000.tar").unlink()  # ... an interrupted one is: its .partial folder is replaced
    (out / "train-0.done.json").unlink()
    (out / "train-0.partial").mkdir()
    (out / "train-0.partial" / "train-0-000000.tar").write_bytes(b"half a shard")
    assert convert_pickapic(parquet_dir, out) == first
    assert len(read_samples(out)) == 2
    assert sorted(path.name for path in out.iterdir()) == ["train-0-000000.tar", "train-0.done.json"]


def test_a_shard_the_file_did_not_write_is_never_overwritten(parquet_dir, tmp_path):
    out = tmp_path / "out"
    convert_pickapic(parquet_dir, out)
    (out / "train-0.done.json").unlink()  # the shard is no longer known to be train-0.parquet's
    with pytest.raises(
        DataError, match=r"train-0-000000.tar exists but was not written for .*train-0.parquet: move it out"
    ):
        convert_pickapic(parquet_dir, out)
    assert len(read_samples(out)) == 2
    (out / "train-0-000000.tar").unlink()  # moved away: the rerun publishes the finished conversion it kept
    assert convert_pickapic(parquet_dir, out)["written"] == 2
    assert sorted(path.name for path in out.iterdir()) == ["train-0-000000.tar", "train-0.done.json"]


def test_missing_column_is_a_clear_error(tmp_path):
    pq.write_table(pa.Table.from_pylist([{"caption": "x", "jpg_0": b"", "label_0": 1.0}]), tmp_path / "bad.parquet")
    with pytest.raises(DataError, match=r"bad.parquet lacks the Pick-a-Pic column\(s\) \['jpg_1', 'label_1'\]"):
        convert_pickapic(tmp_path / "bad.parquet", tmp_path / "out")


def test_no_parquet_is_a_clear_error(tmp_path):
    with pytest.raises(MissingFileError, match="No parquet file"):
        convert_pickapic(tmp_path / "nothing-*.parquet", tmp_path / "out")


def test_command_line(parquet_dir, tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "lightning_pref.cli",
            "data",
            "pickapic",
            "--source",
            str(parquet_dir),
            "--out",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1])["written"] == 2


def test_a_command_that_keeps_nothing_fails_in_one_line(tmp_path):
    pq.write_table(pa.Table.from_pylist([row("a tie", 0.5)]), tmp_path / "ties.parquet")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "lightning_pref.cli",
            "data",
            "pickapic",
            "--source",
            str(tmp_path / "ties.parquet"),
            "--out",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "ties.parquet kept no pair (1 row(s), of which 1 ties_dropped): --ties keep" in result.stderr
    assert list((tmp_path / "out").iterdir()) == []

"""Converters from tables of files: image folders + CSV/JSON, VideoAlign CSVs, VideoDPO directories."""

import csv
import json

import numpy as np
import pytest
from helpers.shards import read_samples
from PIL import Image

from lightning_pref.data_commands import data_main
from lightning_pref.datamodules import PreferenceDataModule, VideoPreferenceDataModule
from lightning_pref.datamodules.media import encode_video
from lightning_pref.datamodules.pairs import PairColumns, convert_pair_table, convert_videodpo
from lightning_pref.errors import DataError, MissingFileError


def write_csv(path, rows):
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


@pytest.fixture
def image_folder(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for name, value in [("bright.jpg", 250), ("dark.png", 5)]:
        Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(folder / name)
    (folder / "broken.png").write_bytes(b"not an image")
    return folder


def test_ordered_json_table_of_images(image_folder, tmp_path):
    rows = [
        {"winner": "bright.jpg", "loser": "dark.png", "caption": "light", "user_id": 3},
        {"winner": "bright.jpg", "loser": "missing.png", "caption": "gone"},
        {"winner": "broken.png", "loser": "dark.png", "caption": "broken"},
    ]
    (image_folder / "pairs.json").write_text(json.dumps(rows))
    counts = convert_pair_table(image_folder / "pairs.json", tmp_path / "out")
    assert counts == {"rows": 3, "written": 1, "ties_dropped": 0, "unreadable": 2, "rejected_captions": 0}
    (sample,) = read_samples(tmp_path / "out")
    assert sample["winner.jpg"] == (image_folder / "bright.jpg").read_bytes()  # copied, not re-encoded
    metadata = json.loads(sample["json"])
    assert metadata["caption"] == "light" and metadata["user_id"] == 3 and metadata["winner_file"] == "bright.jpg"
    batch = next(
        iter(
            PreferenceDataModule(
                str(tmp_path / "out"), batch_size=1, num_workers=0, batches_per_epoch=1
            ).train_dataloader()
        )
    )
    assert batch["user_id"].tolist() == [3] and (batch["pixels_w"] > batch["pixels_l"]).all()


def test_labelled_csv_with_a_root_and_the_command_line(image_folder, tmp_path, capsys):
    write_csv(
        tmp_path / "pairs.csv",
        [
            {"image_0": "dark.png", "image_1": "bright.jpg", "prompt": "b wins", "choice": "B"},
            {"image_0": "bright.jpg", "image_1": "dark.png", "prompt": "a wins", "choice": "a"},
            {"image_0": "bright.jpg", "image_1": "dark.png", "prompt": "a tie", "choice": "same"},
        ],
    )
    data_main(
        [
            "pairs",
            "--table",
            str(tmp_path / "pairs.csv"),
            "--root",
            str(image_folder),
            "--out",
            str(tmp_path / "out"),
            "--first-column",
            "image_0",
            "--second-column",
            "image_1",
            "--label-column",
            "choice",
        ]
    )
    assert json.loads(capsys.readouterr().out) == {
        "rows": 3,
        "written": 2,
        "ties_dropped": 1,
        "unreadable": 0,
        "rejected_captions": 0,
    }
    samples = read_samples(tmp_path / "out")
    assert [json.loads(s["json"])["swapped"] for s in samples] == [True, False]
    assert all(s["winner.jpg"] == (image_folder / "bright.jpg").read_bytes() for s in samples)


def test_table_errors_name_the_column_and_the_fix(image_folder, tmp_path):
    write_csv(tmp_path / "bad.csv", [{"a": "bright.jpg", "b": "dark.png", "caption": "x", "label": "C"}])
    with pytest.raises(DataError, match=r"no column\(s\) \['winner', 'loser'\].*--first-column"):
        convert_pair_table(tmp_path / "bad.csv", tmp_path / "out", image_folder)
    with pytest.raises(DataError, match=r"bad.csv, row 0: label=.C.: use A .* B .* or same"):
        convert_pair_table(
            tmp_path / "bad.csv",
            tmp_path / "out",
            image_folder,
            columns=PairColumns(first="a", second="b", label="label"),
        )
    with pytest.raises(MissingFileError, match="check --root"):  # the files are not in tmp_path itself
        convert_pair_table(tmp_path / "bad.csv", tmp_path / "out", tmp_path, columns=PairColumns(winner="a", loser="b"))


def clip(value, num_frames=6):
    return encode_video(np.full((num_frames, 16, 16, 3), value, np.uint8), fps=8)


def test_videoalign_csv(tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    for name, value in [("1_A", 200), ("1_B", 20), ("2_A", 20), ("2_B", 200), ("3_A", 100), ("3_B", 100)]:
        (videos / f"{name}.mp4").write_bytes(clip(value))
    write_csv(
        tmp_path / "train.csv",
        [  # the VideoAlign training CSV, plus an Overall column as in VideoGen-RewardBench
            {
                "path_A": f"videos/{i}_A.mp4",
                "path_B": f"./videos/{i}_B.mp4",
                "prompt": f"clip {i}",
                "VQ": "A",
                "MQ": "B",
                "TA": "same",
                "Overall": overall,
                "fps_A": 8.0,
                "num_frames_A": 6,
                "fps_B": 8.0,
                "num_frames_B": 6,
            }
            for i, overall in [(1, "A"), (2, "B"), (3, "same")]
        ],
    )
    data_main(["video-pairs", "--source", str(tmp_path / "train.csv"), "--out", str(tmp_path / "out")])
    samples = read_samples(tmp_path / "out")
    assert [json.loads(s["json"])["caption"] for s in samples] == ["clip 1", "clip 2"]  # the tie is dropped
    assert json.loads(samples[1]["json"])["swapped"] and json.loads(samples[1]["json"])["MQ"] == "B"
    data = VideoPreferenceDataModule(
        str(tmp_path / "out"), val_shards=str(tmp_path / "out"), num_frames=4, batch_size=2, num_workers=0
    )
    batch = next(iter(data.val_dataloader()))
    assert batch["pixels_w"].shape == (2, 3, 4, 16, 16) and (batch["pixels_w"] > batch["pixels_l"]).all()
    with pytest.raises(DataError, match="--label-column"):
        data_main(
            [
                "video-pairs",
                "--source",
                str(tmp_path / "train.csv"),
                "--out",
                str(tmp_path / "x"),
                "--label-column",
                "Overal",
            ]
        )


def test_videodpo_directory(tmp_path):
    (tmp_path / "winvideos").mkdir()
    (tmp_path / "losevideos").mkdir()
    videos, pairs = [], []
    for i in range(2):
        for folder, value in [("winvideos", 200), ("losevideos", 20)]:
            (tmp_path / folder / f"{i:06d}.mp4").write_bytes(clip(value))
            videos.append(
                {
                    "basic": {"clip_duration": 0.75, "clip_path": f"{folder}/{i:06d}.mp4", "globalidx": i},
                    "misc": {"frame_caption": [f"prompt {i}"]},
                }
            )
        pairs.append({"video1": 2 * i, "video2": 2 * i + 1, "label": 0, "frame_caption": f"prompt {i}", "score": 0.9})
    (tmp_path / "metadata.json").write_text(json.dumps(videos))
    (tmp_path / "pair.json").write_text(json.dumps(pairs))
    counts = convert_videodpo(tmp_path, tmp_path / "out")
    assert counts["written"] == 2
    samples = read_samples(tmp_path / "out")
    assert samples[0]["winner.mp4"] == (tmp_path / "winvideos" / "000000.mp4").read_bytes()
    assert json.loads(samples[1]["json"])["score"] == 0.9
    with pytest.raises(MissingFileError, match="metadata.json is missing: a VideoDPO directory holds"):
        convert_videodpo(tmp_path / "winvideos", tmp_path / "x")

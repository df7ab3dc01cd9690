"""Unpaired data: single images or videos with prompts and labels, also taken out of preference shards."""

import numpy as np
import pytest
import torch
import webdataset as wds
from safetensors.torch import save as save_safetensors

from lightning_pref.datamodules import UnpairedDataModule, write_preference_shards, write_unpaired_shards
from lightning_pref.datamodules.media import encode_video

WHITE, BLACK = np.full((8, 8, 3), 255, np.uint8), np.zeros((8, 8, 3), np.uint8)


def test_unpaired_images_with_labels(tmp_path):
    write_unpaired_shards(
        [
            {"image": WHITE, "caption": "good", "label": 1},
            {"image": BLACK, "caption": "bad", "label": 0, "user_id": "alice"},
            {"image": WHITE, "caption": "unlabelled"},
        ],
        tmp_path,
    )
    data = UnpairedDataModule(str(tmp_path), val_shards=str(tmp_path), batch_size=3, num_workers=0)
    batch = next(iter(data.val_dataloader()))
    assert batch["pixels"].shape == (3, 3, 8, 8)
    assert batch["label"].tolist() == [1, 0, 1] and batch["prompt"] == ["good", "bad", "unlabelled"]
    assert batch["user_id"][0] == -1 and batch["user_id"][1] >= 0  # a string id maps to a stable integer


def test_unpaired_videos(tmp_path):
    (tmp_path / "c.mp4").write_bytes(encode_video(np.zeros((6, 16, 16, 3), np.uint8), fps=8))
    write_unpaired_shards([{"video": tmp_path / "c.mp4", "caption": "a clip"}], tmp_path / "shards")
    data = UnpairedDataModule(
        str(tmp_path / "shards"), val_shards=str(tmp_path / "shards"), num_frames=4, num_workers=0
    )
    assert next(iter(data.val_dataloader()))["pixels"].shape == (1, 3, 4, 16, 16)


@pytest.mark.parametrize("source, labels", [("winners", [1, 1]), ("pairs", [1, 0, 1, 0])])
def test_samples_out_of_preference_shards(tmp_path, source, labels):
    write_preference_shards([{"winner": WHITE, "loser": BLACK, "caption": f"pair {i}"} for i in range(2)], tmp_path)
    data = UnpairedDataModule(str(tmp_path), val_shards=str(tmp_path), source=source, batch_size=4, num_workers=0)
    batch = next(iter(data.val_dataloader()))
    assert batch["label"].tolist() == labels
    assert all(
        bool(image.mean() > 0) == bool(label) for image, label in zip(batch["pixels"], batch["label"])
    )  # winners are white
    assert len(set(batch["key"])) == len(labels)


def test_precomputed_pairs_split_into_labelled_latents(tmp_path):
    with wds.TarWriter(str(tmp_path / "latents-000000.tar")) as sink:
        for i in range(2):
            tensors = {
                "latents_w": torch.full((4, 2, 2), 1.0),
                "latents_l": torch.full((4, 2, 2), -1.0),
                "encoder_hidden_states": torch.ones(3, 5),
            }
            sink.write({"__key__": f"k{i}", "json": {"caption": "x"}, "latents.safetensors": save_safetensors(tensors)})
    data = UnpairedDataModule(str(tmp_path), val_shards=str(tmp_path), source="pairs", batch_size=4, num_workers=0)
    batch = next(iter(data.val_dataloader()))
    assert batch["latents"][:, 0, 0, 0].tolist() == [1.0, -1.0, 1.0, -1.0] and batch["label"].tolist() == [1, 0, 1, 0]
    assert batch["encoder_hidden_states"].shape == (4, 3, 5) and "pixels" not in batch


def test_unknown_source_is_a_clear_error():
    with pytest.raises(ValueError, match="source='losers'"):
        UnpairedDataModule("x/*.tar", source="losers")

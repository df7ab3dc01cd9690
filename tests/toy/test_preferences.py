import json
import tarfile

import pytest

from lightning_pref.datamodules import PreferenceDataModule
from lightning_pref.toy.preferences import HELDOUT_PROMPTS, TRAIN_PROMPTS, ToyPreferenceReward, generate_toy_preferences


def read_metadata(out_dir):
    records = []
    for shard in sorted(out_dir.glob("*.tar")):
        with tarfile.open(shard) as tar:
            records += [
                json.load(tar.extractfile(member)) for member in tar.getmembers() if member.name.endswith(".json")
            ]
    return records


def test_heldout_prompts_are_not_trained_on():
    assert set(HELDOUT_PROMPTS).isdisjoint(TRAIN_PROMPTS)
    assert len(TRAIN_PROMPTS) == 12


def test_generated_pairs_are_labelled_by_the_reward(tiny_pixel, tmp_path):
    info = generate_toy_preferences(
        tmp_path, 24, pipeline=tiny_pixel, users=("warm", "cool"), label_noise=0.25, tie_threshold=0.0, seed=3
    )
    counts = info["counts"]
    records = read_metadata(tmp_path)
    assert counts["written"] + counts["ties_dropped"] == 24
    assert len(records) == counts["written"] > 0
    assert {record["preference"] for record in records} == {"warm", "cool"}
    assert all(record["caption"] in TRAIN_PROMPTS for record in records)
    for record in records:
        better = record["reward_winner"] >= record["reward_loser"]
        assert better != record["label_flipped"] or record["reward_winner"] == record["reward_loser"]
    assert counts["flipped"] == sum(record["label_flipped"] for record in records) > 0
    assert json.loads((tmp_path / "info.json").read_text())["counts"] == counts
    batch = next(
        iter(
            PreferenceDataModule(
                f"{tmp_path}/*.tar", batch_size=4, num_workers=0, batches_per_epoch=1
            ).train_dataloader()
        )
    )
    assert batch["pixels_w"].shape == (4, 3, 8, 8)


def test_same_seed_same_data(tiny_pixel, tmp_path):
    first = generate_toy_preferences(tmp_path / "a", 8, pipeline=tiny_pixel, seed=1)
    second = generate_toy_preferences(tmp_path / "b", 8, pipeline=tiny_pixel, seed=1)
    assert first["counts"] == second["counts"]
    assert read_metadata(tmp_path / "a") == read_metadata(tmp_path / "b")


def test_bad_options_are_clear_errors(tiny_pixel, tmp_path):
    with pytest.raises(ValueError, match="label_noise"):
        generate_toy_preferences(tmp_path, 4, pipeline=tiny_pixel, label_noise=0.7)
    with pytest.raises(ValueError, match="preference='hot'"):
        ToyPreferenceReward("hot")

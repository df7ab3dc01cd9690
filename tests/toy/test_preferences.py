import json
import shutil
import tarfile

import pytest
import torch

from lightning_pref.datamodules import PreferenceDataModule
from lightning_pref.errors import ConfigError
from lightning_pref.toy.preferences import (
    HELDOUT_PROMPTS,
    TRAIN_PROMPTS,
    ToyPreferenceReward,
    generate_toy_preferences,
    sampled_from,
)


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


def test_cached_pairs_go_stale_when_the_model_they_were_sampled_from_changes(tiny_pixel, tmp_path):
    model = shutil.copytree(tiny_pixel, tmp_path / "model")
    generate_toy_preferences(tmp_path / "pairs", 4, pipeline=model)
    assert sampled_from(tmp_path / "pairs", model) and not sampled_from(tmp_path / "absent", model)
    weights = next(model.glob("unet/*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-1] + bytes([weights.read_bytes()[-1] ^ 1]))  # one bit of one weight
    assert not sampled_from(tmp_path / "pairs", model)


def test_bad_options_are_clear_errors(tiny_pixel, tmp_path):
    with pytest.raises(ValueError, match="label_noise"):
        generate_toy_preferences(tmp_path, 4, pipeline=tiny_pixel, label_noise=0.7)
    with pytest.raises(ValueError, match="preference='hot'"):
        ToyPreferenceReward("hot")


def real_winner_batch(directory, size):
    from lightning_pref.datamodules import UnpairedDataModule

    data = UnpairedDataModule(str(directory / "*.tar"), batch_size=size, num_workers=0, shuffle_buffer=0)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    order = sorted(range(size), key=lambda i: batch["key"][i])
    return batch["pixels"][order], [batch["prompt"][i] for i in order], batch["label"][order]


def test_real_winners_are_the_named_shape_in_a_preferred_colour(tmp_path):
    from lightning_pref.rewards import ShapeAgreementReward, WarmthReward
    from lightning_pref.toy.preferences import generate_toy_winners

    info = generate_toy_winners(tmp_path / "real", 48, seed=3)
    assert info["counts"] == {"written": 48}
    pixels, prompts, labels = real_winner_batch(tmp_path / "real", 48)
    images = (pixels + 1) / 2
    assert set(prompts) <= set(TRAIN_PROMPTS) and labels.eq(1).all()
    # the rewards that label the toy pairs rate every real winner warm and the right shape
    assert WarmthReward().score(images, prompts).min() > 0.75
    assert ShapeAgreementReward().score(images, prompts).mean() > 0.9
    assert generate_toy_winners(tmp_path / "again", 48, seed=3) == info
    again_pixels, again_prompts, _ = real_winner_batch(tmp_path / "again", 48)
    assert again_prompts == prompts and torch.equal(again_pixels, pixels)
    with pytest.raises(ConfigError, match="preference='hot'"):
        generate_toy_winners(tmp_path / "bad", 4, preference="hot")

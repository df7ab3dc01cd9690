"""The image preference DataModule: batches, augmentation, label noise, user groups, skipped samples."""

import logging

import numpy as np
import pytest
import torch
from helpers.shards import append_members
from helpers.training import trainer as make_trainer

from lightning_pref.datamodules import PickAPicDataModule, PreferenceDataModule, write_preference_shards
from lightning_pref.datamodules.media import Geometry
from lightning_pref.errors import DataError
from lightning_pref.methods import DiffusionDPO
from lightning_pref.seeding import unit_hash

WHITE, BLACK = np.full((8, 8, 3), 255, dtype=np.uint8), np.zeros((8, 8, 3), dtype=np.uint8)


def white_wins(num, **metadata):
    return [
        {"winner": WHITE, "loser": BLACK, "caption": f"pair {i}", **{k: v(i) for k, v in metadata.items()}}
        for i in range(num)
    ]


def test_streams_fixed_batch_count_with_pixels_in_range(tiny_shards):
    data = PreferenceDataModule(
        f"{tiny_shards}/*.tar", batch_size=4, num_workers=0, shuffle_buffer=8, batches_per_epoch=5
    )
    batches = list(data.train_dataloader())
    assert len(batches) == 5
    batch = batches[0]
    assert batch["pixels_w"].shape == batch["pixels_l"].shape == (4, 3, 16, 16)
    assert batch["pixels_w"].min() >= -1 and batch["pixels_w"].max() <= 1
    assert all(prompt.startswith("a red cat") for prompt in batch["prompt"])
    assert batch["user_id"].tolist() == [-1] * 4
    assert set(batch) == {"pixels_w", "pixels_l", "prompt", "key", "user_id", "label_flipped"}  # no bookkeeping
    assert data.skipped_samples == 0
    assert not batch["label_flipped"].any()


def test_winner_is_first_and_round_trips_exactly(tmp_path):
    write_preference_shards(white_wins(1), tmp_path)
    data = PreferenceDataModule(f"{tmp_path}/*.tar", val_shards=f"{tmp_path}/*.tar", batch_size=1, num_workers=0)
    batch = next(iter(data.val_dataloader()))
    assert torch.all(batch["pixels_w"] == 1) and torch.all(batch["pixels_l"] == -1)
    assert batch["prompt"] == ["pair 0"]


def test_pair_gets_the_same_crop_and_flip():
    from PIL import Image

    gradient = Image.fromarray(np.tile(np.arange(24, dtype=np.uint8)[None, :, None] * 10, (16, 1, 3)))
    geometry, rng = Geometry(resolution=8, random_crop=True, random_flip=True), np.random.default_rng(0)
    crops = [geometry([gradient, gradient.copy()], rng) for _ in range(20)]
    for winner, loser in crops:
        torch.testing.assert_close(winner, loser)
        assert winner.shape == (3, 8, 8)
    assert len({tuple(winner[0, 0].tolist()) for winner, _ in crops}) > 2  # crops and flips do vary


def test_non_square_resolution_covers_and_crops(tmp_path):
    write_preference_shards(
        [{"winner": np.zeros((20, 40, 3), np.uint8), "loser": np.zeros((30, 30, 3), np.uint8), "caption": "x"}],
        tmp_path,
    )
    data = PreferenceDataModule(str(tmp_path), val_shards=str(tmp_path), resolution=(8, 12), num_workers=0)
    batch = next(iter(data.val_dataloader()))
    assert batch["pixels_w"].shape == batch["pixels_l"].shape == (1, 3, 8, 12)


def test_label_noise_flips_the_same_pairs_every_epoch(tmp_path):
    write_preference_shards(white_wins(40), tmp_path, samples_per_shard=10)
    data = PreferenceDataModule(
        str(tmp_path), batch_size=8, num_workers=0, batches_per_epoch=10, label_noise=0.3, seed=5
    )
    loader = data.train_dataloader()
    seen = {}
    for _ in range(2):  # two epochs: different orders, same flips
        for batch in loader:
            for key, flipped, winner in zip(batch["key"], batch["label_flipped"].tolist(), batch["pixels_w"]):
                assert flipped == bool(winner.mean() < 0)  # a flipped pair has the black image first
                assert seen.setdefault(key, flipped) == flipped
    assert len(seen) > 30  # resampled shards: most pairs within 160 draws
    assert 0.1 < np.mean(list(seen.values())) < 0.5
    assert all(flipped == (unit_hash("label-noise", 5, key) < 0.3) for key, flipped in seen.items())
    val = PreferenceDataModule(str(tmp_path), val_shards=str(tmp_path), num_workers=0, label_noise=0.3)
    assert not any(batch["label_flipped"].any() for batch in val.val_dataloader())


def test_stored_flips_are_reported_and_user_ids_and_metadata_reach_the_batch(tmp_path):
    write_preference_shards(
        white_wins(4, user_id=lambda i: i % 2, label_flipped=lambda i: i == 0, score=lambda i: 0.5 + i), tmp_path
    )
    data = PreferenceDataModule(
        str(tmp_path), val_shards=str(tmp_path), batch_size=4, num_workers=0, metadata_fields=["score"]
    )
    batch = next(iter(data.val_dataloader()))
    assert batch["label_flipped"].tolist() == [True, False, False, False]
    assert batch["user_id"].tolist() == [0, 1, 0, 1]
    torch.testing.assert_close(batch["score"], torch.tensor([0.5, 1.5, 2.5, 3.5]))


def test_users_per_batch_groups_pairs_of_few_users(tmp_path):
    write_preference_shards(white_wins(60, user_id=lambda i: i % 5), tmp_path, samples_per_shard=20)
    data = PreferenceDataModule(
        str(tmp_path), batch_size=6, users_per_batch=2, num_workers=0, batches_per_epoch=8, shuffle_buffer=20
    )
    for batch in data.train_dataloader():
        users = batch["user_id"].tolist()
        assert len(users) == 6 and users[:3] == [users[0]] * 3 and users[3:] == [users[3]] * 3
    with pytest.raises(ValueError, match="must divide batch_size"):
        PreferenceDataModule(str(tmp_path), batch_size=6, users_per_batch=4)


def test_pickapic_defaults():
    data = PickAPicDataModule("pickapic/*.tar")
    assert (data.resolution, data.random_crop, data.random_flip) == (512, False, True)


def test_corrupt_samples_are_skipped_logged_and_counted(tmp_path, caplog):
    write_preference_shards(white_wins(3), tmp_path)
    shard = next(tmp_path.glob("*.tar"))
    append_members(
        shard,
        [  # a pair whose winner is not an image, and one missing its loser
            ("bad1.winner.png", b"not a png"),
            ("bad1.loser.png", b"x"),
            ("bad1.json", b'{"caption": "c"}'),
            ("bad2.winner.png", shard.read_bytes()[:0]),
            ("bad2.json", b'{"caption": "d"}'),
        ],
    )
    data = PreferenceDataModule(str(shard), val_shards=str(shard), batch_size=1, num_workers=0)
    prompts = [batch["prompt"][0] for batch in data.val_dataloader()]
    assert prompts == ["pair 0", "pair 1", "pair 2"]
    messages = [record.message for record in caplog.records if record.message.startswith("skipped")]
    assert len(messages) == 2 and data.skipped_samples == 2
    assert "sample 'bad1'" in messages[0] and "winner.png does not decode" in messages[0]
    assert "sample 'bad2'" in messages[1] and "no 'loser.<png|jpg|webp|mp4|...>' field" in messages[1]


def test_skips_are_counted_across_worker_processes(tmp_path):
    for name in ("a", "b"):
        write_preference_shards(white_wins(4), tmp_path, prefix=name)
        append_members(
            tmp_path / f"{name}-000000.tar", [(f"{name}bad.winner.png", b"x"), (f"{name}bad.json", b'{"caption": "c"}')]
        )
    data = PreferenceDataModule(str(tmp_path), val_shards=str(tmp_path), batch_size=2, num_workers=2)
    batches = list(data.loader(data.val_shards, False, num_workers=2))  # one worker per shard
    assert sum(len(batch["key"]) for batch in batches) == 8
    assert data.skipped_samples == 2


def test_a_stream_of_only_bad_samples_fails_clearly(tmp_path):
    write_preference_shards([{"winner": WHITE, "loser": b"broken", "caption": "x"}] * 5, tmp_path)
    data = PreferenceDataModule(str(tmp_path), num_workers=0, max_consecutive_skips=20, batches_per_epoch=1)
    with pytest.raises(DataError, match="the last 20 samples were all skipped"):
        next(iter(data.train_dataloader()))


def test_truncated_shard_and_missing_field_do_not_stop_training(tmp_path, sd_backbone, caplog):
    pairs = [
        {"winner": np.full((16, 16, 3), i * 10, np.uint8), "loser": BLACK, "caption": "a red cat"} for i in range(16)
    ]
    write_preference_shards(pairs, tmp_path, samples_per_shard=8)
    first, second = sorted(tmp_path.glob("*.tar"))
    data = second.read_bytes()
    second.write_bytes(data[: len(data) // 2 + 100])  # cut mid-member
    append_members(first, [("nolos.winner.png", b"x"), ("nolos.json", b'{"caption": "c"}')])
    datamodule = PreferenceDataModule(
        str(tmp_path), batch_size=4, num_workers=0, shuffle_buffer=4, batches_per_epoch=6, seed=1
    )
    trainer = make_trainer(tmp_path, 6)
    with caplog.at_level(logging.WARNING):
        trainer.fit(DiffusionDPO(sd_backbone), datamodule=datamodule)
    assert trainer.global_step == 6
    messages = [record.message for record in caplog.records if record.message.startswith("skipped")]
    assert any("the rest of shard" in m and second.name in m and "ReadError" in m for m in messages)
    assert any("sample 'nolos'" in m and "no 'loser" in m for m in messages)
    assert datamodule.skipped_samples == len(messages) >= 2


def test_missing_shards_are_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="No shard matches"):
        PreferenceDataModule(f"{tmp_path}/nothing-*.tar", num_workers=0).train_dataloader()
    with pytest.raises(FileNotFoundError, match="do not exist"):
        PreferenceDataModule(f"{tmp_path}/pairs-{{000000..000002}}.tar", num_workers=0).train_dataloader()

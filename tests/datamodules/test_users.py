"""Pairs of many users: user ids and precomputed embeddings in the batch, bad fields skipped by name, the
embedding writer, the two-user toy pairs and the toy command's two users."""

import io
import json
import logging

import numpy as np
import pytest
import torch
import webdataset as wds
from safetensors.torch import save as save_safetensors

from lightning_pref.data_commands import data_main
from lightning_pref.datamodules.shards import encode_image
from lightning_pref.datamodules.users import UserPreferenceDataModule, embed_users, write_user_embeddings
from lightning_pref.errors import DataError
from lightning_pref.rewards import WarmthReward
from lightning_pref.toy.users import TWO_USERS, write_rendered_user_pairs
from lightning_pref.users import UserEncoder

WHITE, BLACK = np.full((8, 8, 3), 255, dtype=np.uint8), np.zeros((8, 8, 3), dtype=np.uint8)


def npy(array):
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def write_pairs(path, rows):
    """One shard of white-over-black pairs; each row gives the json's extra fields and the extra members."""
    with wds.TarWriter(str(path / "pairs-000000.tar")) as sink:
        for index, (fields, members) in enumerate(rows):
            sample = {"__key__": f"pair-{index:03d}", "json": {"caption": f"pair {index}", **fields}}
            sink.write({**sample, "winner.png": encode_image(WHITE), "loser.png": encode_image(BLACK), **members})


def embedding(user):
    return np.full((2, 3), float(user), dtype=np.float32) + np.arange(3, dtype=np.float32)


def read_all(path, **options):
    data = UserPreferenceDataModule(str(path), val_shards=str(path), batch_size=64, num_workers=0, **options)
    return data, next(iter(data.val_dataloader()))


def test_batches_hold_each_pairs_user_and_embedding(tmp_path):
    write_pairs(tmp_path, [({"user_id": user}, {"user_embedding.npy": npy(embedding(user))}) for user in (3, 0, 3)])
    data, batch = read_all(tmp_path)
    assert batch["user_id"].tolist() == [3, 0, 3] and batch["user_embedding"].dtype == torch.float32
    assert torch.equal(batch["user_embedding"], torch.from_numpy(np.stack([embedding(u) for u in (3, 0, 3)])))
    assert batch["pixels_w"].shape == (3, 3, 8, 8) and (batch["pixels_w"] == 1).all()
    assert data.skipped_samples == 0


def test_precomputed_latents_carry_their_embedding_too(tmp_path):
    latents = {
        "latents_w": torch.ones(4, 2, 2),
        "latents_l": torch.zeros(4, 2, 2),
        "encoder_hidden_states": torch.ones(3, 8),
    }
    with wds.TarWriter(str(tmp_path / "latents-000000.tar")) as sink:
        sink.write(
            {
                "__key__": "pair-0",
                "json": {"caption": "a cat", "user_id": 1},
                "latents.safetensors": save_safetensors(latents),
                "user_embedding.npy": npy(embedding(1)),
            }
        )
    _, batch = read_all(tmp_path)
    assert torch.equal(batch["latents_w"][0], latents["latents_w"]) and batch["user_id"].tolist() == [1]
    assert torch.equal(batch["user_embedding"][0], torch.from_numpy(embedding(1)))


def test_pairs_with_a_bad_user_field_are_skipped_naming_it(tmp_path, caplog):
    good = ({"user_id": 1}, {"user_embedding.npy": npy(embedding(1))})
    rows = [
        good,
        ({}, {}),
        ({"user_id": -2}, {}),
        ({"user_id": 1}, {"user_embedding.npy": b"not numpy"}),
        ({"user_id": 1}, {"user_embedding.npy": npy(np.zeros((2, 3), dtype=np.int64))}),
        ({"user_id": 1}, {"user_embedding.npy": npy(np.zeros((1, 2, 3), dtype=np.float32))}),
        good,
    ]
    write_pairs(tmp_path, rows)
    with caplog.at_level(logging.WARNING):
        data, batch = read_all(tmp_path)
    assert batch["key"] == ["pair-000", "pair-006"] and data.skipped_samples == 5
    reasons = [record.getMessage() for record in caplog.records if "skipped" in record.getMessage()]
    assert sum("no 'user_id' >= 0" in reason for reason in reasons) == 2
    assert sum("'user_embedding.npy' does not load" in reason for reason in reasons) == 1
    assert any("int64 array of shape (2, 3)" in reason for reason in reasons)
    assert any("float32 array of shape (1, 2, 3)" in reason for reason in reasons)


def test_requiring_embeddings_skips_pairs_without_one_and_fails_when_none_has_one(tmp_path):
    write_pairs(tmp_path, [({"user_id": 0}, {})] * 5)
    _, batch = read_all(tmp_path)  # not required: the pairs come without the field
    assert "user_embedding" not in batch and batch["user_id"].tolist() == [0] * 5
    with pytest.raises(DataError, match="no 'user_embedding.npy'"):
        read_all(tmp_path, user_embeddings=True, max_consecutive_skips=5)


class ColorEncoder(UserEncoder):
    """A user's embedding from their examples: the mean over examples of preferred minus dispreferred mean colour."""

    tokens, dim = 1, 3

    def encode(self, examples):
        def mean_color(image):
            return torch.tensor(np.asarray(image), dtype=torch.float32).mean(dim=(0, 1)) / 255

        return torch.stack([mean_color(e.preferred) - mean_color(e.dispreferred) for e in examples]).mean(0)[None]


def test_the_writer_adds_each_users_embedding_from_a_seeded_choice_of_their_pairs(tmp_path):
    write_rendered_user_pairs(tmp_path / "pairs", num_pairs=16, samples_per_shard=8)
    embeddings = embed_users(str(tmp_path / "pairs"), ColorEncoder(), examples_per_user=3, seed=5)
    assert sorted(embeddings) == [0, 1] and embeddings[0].shape == (1, 3)
    red_minus_blue = embeddings[0][0, 0] - embeddings[0][0, 2]
    assert red_minus_blue > 0 > embeddings[1][0, 0] - embeddings[1][0, 2]  # user 0 prefers warm, user 1 cool
    assert not np.array_equal(embed_users(str(tmp_path / "pairs"), ColorEncoder(), 3, seed=6)[0], embeddings[0])

    counts = write_user_embeddings(
        str(tmp_path / "pairs"), tmp_path / "users", ColorEncoder(), examples_per_user=3, seed=5
    )
    assert counts == {"users": 2, "written": 16, "without_user": 0}
    assert sorted(path.name for path in (tmp_path / "users").glob("*.tar")) == sorted(
        path.name for path in (tmp_path / "pairs").glob("*.tar")
    )
    _, batch = read_all(tmp_path / "users", user_embeddings=True)
    assert len(batch["key"]) == 16
    for row, user in enumerate(batch["user_id"].tolist()):
        assert torch.equal(batch["user_embedding"][row], torch.from_numpy(embeddings[user]))


def test_rendered_two_user_pairs_differ_in_colour_only_and_follow_each_users_preference(tmp_path):
    info = write_rendered_user_pairs(tmp_path, num_pairs=40, seed=3)
    assert info["counts"] == {"written": 40} and json.loads((tmp_path / "info.json").read_text()) == info
    data, batch = read_all(tmp_path)
    users = batch["user_id"]
    assert set(users.tolist()) == {0, 1}
    winners, losers = ((batch[name] + 1) / 2 for name in ("pixels_w", "pixels_l"))
    warmth = WarmthReward()
    winner_warmth, loser_warmth = warmth.score(winners, batch["prompt"]), warmth.score(losers, batch["prompt"])
    assert ((winner_warmth > loser_warmth) == (users == 0)).all()  # user 0 (warm) prefers the warmer image
    same = (winners == losers).all(dim=1)
    assert same[:, 0, 0].all() and (same.flatten(1).float().mean(1) > 0.5).all()  # same background, same layout


def test_the_toy_command_gives_the_bare_users_flag_the_two_users(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(
        "lightning_pref.toy.preferences.generate_toy_preferences",
        lambda out, pairs, **options: calls.append(options["users"]) or {"counts": {}},
    )
    data_main(["toy", "--out", str(tmp_path), "--users"])
    data_main(["toy", "--out", str(tmp_path), "--users", "cool"])
    data_main(["toy", "--out", str(tmp_path)])
    assert calls == [list(TWO_USERS), ["cool"], ["warm"]] and TWO_USERS == ("warm", "cool")

"""Hostile inputs to the streaming DataModules and to the training step: tars, media, latents, batch options.

Every case builds its input in ``tmp_path`` and asserts one exact outcome, with no hang (each stream case
must end within seconds): a clear error (its ``lightning_pref.errors`` class and a message naming the shard,
field or option), a counted skip (the sample is left out and ``skipped_samples`` says so), or correct
handling. The classes of input covered:

* shards with no sample: every shard an empty tar (what a converter that kept nothing used to write), an
  empty shard that would be a worker's only one, one sample for three workers, a file that is not a tar;
* samples that cannot be used: corrupt images, a key holding a dot (webdataset cuts it), a caption that is
  not a string, a ``label_flipped`` or ``label`` flag that is not a boolean, every sample bad;
* precomputed tensors: a NaN or an infinity in a latent or an embedding (skipped: one would turn every
  weight NaN in a step), latents with the wrong channel count, embeddings of another text encoder;
* media of the wrong kind or size for the backbone: videos for an image model, a resolution the UNet
  cannot take;
* batch and stream options: ``batch_size`` 0 or negative, negative workers, ``batches_per_epoch`` 0, a
  bad ``resolution``.
"""

from __future__ import annotations

import io
import json
import logging
import tarfile

import numpy as np
import pytest
import torch
from helpers.training import trainer as make_trainer
from safetensors.torch import save as save_safetensors

from lightning_pref.datamodules import PreferenceDataModule, UnpairedDataModule, write_preference_shards
from lightning_pref.datamodules.shards import encode_image
from lightning_pref.errors import ConfigError, DataError
from lightning_pref.methods import DiffusionDPO

WHITE = np.full((16, 16, 3), 255, np.uint8)
BLACK = np.zeros((16, 16, 3), np.uint8)


def write_tar(path, members):
    """A tar of ``(name, bytes)`` members, written as-is (keys and all)."""
    with tarfile.open(path, "w") as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return path


def pair_members(key, caption="a cat", **metadata):
    return [
        (f"{key}.winner.png", encode_image(WHITE)),
        (f"{key}.loser.png", encode_image(BLACK)),
        (f"{key}.json", json.dumps({"caption": caption, **metadata}).encode()),
    ]


def first_batch(path, **options):
    options = {"batch_size": 2, "num_workers": 0, "batches_per_epoch": 1, "shuffle_buffer": 0, **options}
    data = PreferenceDataModule(str(path), **options)
    return data, next(iter(data.train_dataloader()))


def fit_steps(module, data, tmp_path, steps=2):
    trainer = make_trainer(tmp_path, steps)
    trainer.fit(module, datamodule=data)
    return trainer


# ------------------------------------------------------------------------------------- no sample at all
def test_every_shard_empty_fails_before_any_worker_starts(tmp_path):
    for name in ("a.tar", "b.tar"):
        write_tar(tmp_path / name, [])
    with pytest.raises(DataError, match=r"every shard of .* is empty \(2 shard\(s\)"):
        PreferenceDataModule(str(tmp_path), num_workers=2).train_dataloader()


def test_a_worker_whose_only_shards_are_empty_is_refused(tmp_path):
    write_tar(tmp_path / "a.tar", pair_members("k0"))
    write_tar(tmp_path / "b.tar", [])
    with pytest.raises(DataError, match=r"consumer\(s\) \[1\] .* would get only empty ones"):
        PreferenceDataModule(str(tmp_path), num_workers=2).train_dataloader()


@pytest.mark.parametrize("num_workers", [0, 3])
def test_a_stream_whose_passes_read_nothing_fails_fast(tmp_path, num_workers):
    """One sample for three workers: two of them would wait forever for a sample of their share."""
    write_tar(tmp_path / "a.tar", pair_members("only"))
    (tmp_path / "b.tar").write_bytes(b"not a tar at all" * 64)  # unreadable: skipped (counted) on every pass
    data = PreferenceDataModule(
        str(tmp_path), batch_size=1, num_workers=num_workers, batches_per_epoch=4, shuffle_buffer=0
    )
    if num_workers == 0:  # one consumer: it reads the one good sample, then every pass finds the bad shard only
        assert len(list(data.train_dataloader())) == 4
        return
    with pytest.raises(DataError, match="read no sample"):
        list(data.train_dataloader())


def test_every_sample_bad_fails_with_the_reasons(tmp_path):
    write_tar(
        tmp_path / "a.tar",
        [
            member
            for i in range(6)
            for member in [
                (f"k{i}.winner.png", b"broken"),
                (f"k{i}.loser.png", b"x"),
                (f"k{i}.json", b'{"caption": "c"}'),
            ]
        ],
    )
    data = PreferenceDataModule(str(tmp_path), num_workers=1, batches_per_epoch=1, max_consecutive_skips=5)
    with pytest.raises(DataError, match=r"the last 5 samples were all skipped .*winner.png does not decode"):
        next(iter(data.train_dataloader()))


# ------------------------------------------------------------------------------------- counted skips
@pytest.mark.parametrize(
    ("members", "reason"),
    [
        (
            [
                ("img.v2.0000.winner.png", encode_image(WHITE)),
                ("img.v2.0000.loser.png", encode_image(BLACK)),
                ("img.v2.0000.json", b'{"caption": "dots"}'),
            ],
            "the key holds a dot",
        ),
        (pair_members("list", caption=["a", "red"]), "its caption is a list, not a string"),
        (pair_members("flag", label_flipped="maybe"), "'label_flipped' is 'maybe', not true or false"),
        (
            [
                ("torn.winner.png", encode_image(WHITE)[:40]),
                ("torn.loser.png", encode_image(BLACK)),
                ("torn.json", b'{"caption": "c"}'),
            ],
            "winner.png does not decode",
        ),
    ],
    ids=["dotted-key", "list-caption", "bad-flag", "truncated-image"],
)
def test_unusable_samples_are_skipped_counted_and_named(tmp_path, caplog, members, reason):
    write_tar(tmp_path / "a.tar", members + pair_members("good0") + pair_members("good1"))
    with caplog.at_level(logging.WARNING):
        data, batch = first_batch(tmp_path)
    assert batch["key"] == ["good0", "good1"]
    assert data.skipped_samples == 1
    assert any(reason in record.message for record in caplog.records)


def test_string_flags_read_as_booleans(tmp_path):
    write_tar(tmp_path / "a.tar", pair_members("f", label_flipped="false") + pair_members("t", label_flipped="True"))
    _, batch = first_batch(tmp_path)
    assert batch["label_flipped"].tolist() == [False, True]
    write_preference_shards([{"winner": WHITE, "loser": BLACK, "caption": "c", "label": "0"}], tmp_path / "unpaired")
    unpaired = UnpairedDataModule(
        str(tmp_path / "unpaired"), source="winners", batch_size=1, num_workers=0, batches_per_epoch=1
    )
    assert next(iter(unpaired.train_dataloader()))["label"].tolist() == [1]


# ------------------------------------------------------------------------------------ precomputed tensors
def latent_members(key, **tensors):
    return [(f"{key}.latents.safetensors", save_safetensors(tensors)), (f"{key}.json", b'{"caption": "c"}')]


@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
@pytest.mark.parametrize("field", ["latents_w", "encoder_hidden_states"])
def test_a_non_finite_precomputed_tensor_is_skipped_and_training_stays_finite(tmp_path, sd_backbone, field, poison):
    good = {
        "latents_w": torch.randn(4, 8, 8),
        "latents_l": torch.randn(4, 8, 8),
        "encoder_hidden_states": torch.randn(77, 32),
    }
    members = [member for i in range(6) for member in latent_members(f"ok{i}", **{k: v + i for k, v in good.items()})]
    poisoned = dict(good)
    poisoned[field] = good[field].clone()
    poisoned[field][0, 0] = poison
    write_tar(tmp_path / "a.tar", latent_members("poison", **poisoned) + members)
    data = PreferenceDataModule(str(tmp_path), batch_size=2, num_workers=0, batches_per_epoch=3, shuffle_buffer=0)
    module = DiffusionDPO(sd_backbone, finetune="full", lr=1e-3)
    fit_steps(module, data, tmp_path, steps=3)
    assert data.skipped_samples == 1
    assert all(torch.isfinite(value).all() for value in module.denoiser.state_dict().values())


def test_latents_of_another_model_are_refused_by_channel_count(tmp_path, sd_backbone):
    write_tar(
        tmp_path / "a.tar",
        latent_members(
            "k",
            latents_w=torch.randn(16, 8, 8),
            latents_l=torch.randn(16, 8, 8),
            encoder_hidden_states=torch.randn(77, 32),
        ),
    )
    data = PreferenceDataModule(str(tmp_path), batch_size=1, num_workers=0, batches_per_epoch=1)
    with pytest.raises(DataError, match="have 16 channels, but StableDiffusionBackbone's denoiser takes 4"):
        fit_steps(DiffusionDPO(sd_backbone), data, tmp_path, steps=1)


def test_embeddings_of_another_text_encoder_are_refused_by_width(tmp_path, sd_backbone):
    write_tar(
        tmp_path / "a.tar",
        latent_members(
            "k",
            latents_w=torch.randn(4, 8, 8),
            latents_l=torch.randn(4, 8, 8),
            encoder_hidden_states=torch.randn(77, 768),
        ),
    )
    data = PreferenceDataModule(str(tmp_path), batch_size=1, num_workers=0, batches_per_epoch=1)
    with pytest.raises(
        DataError, match="'encoder_hidden_states' is 768 wide, but StableDiffusionBackbone's denoiser takes 32"
    ):
        fit_steps(DiffusionDPO(sd_backbone), data, tmp_path, steps=1)


# ----------------------------------------------------------------------------- media the model cannot take
def test_videos_for_an_image_model_and_a_resolution_the_unet_cannot_take(sd_backbone):
    module = DiffusionDPO(sd_backbone)
    videos = {"pixels_w": torch.zeros(1, 3, 4, 16, 16), "pixels_l": torch.zeros(1, 3, 4, 16, 16), "prompt": ["a"]}
    with pytest.raises(
        DataError, match=r"are videos \(1, 3, 4, 16, 16\), but StableDiffusionBackbone trains on images"
    ):
        module.prepare_pairs(videos, None)
    odd = {"pixels_w": torch.zeros(1, 3, 14, 14), "pixels_l": torch.zeros(1, 3, 14, 14), "prompt": ["a"]}
    with pytest.raises(
        DataError, match=r"needs sides divisible by 4: set the DataModule's `resolution` \(a multiple of 4 pixels\)"
    ):
        module.prepare_pairs(odd, None)


# ---------------------------------------------------------------------------------------- options
@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"batch_size": 0}, "batch_size=0: use a whole number >= 1"),
        ({"batch_size": -4}, "batch_size=-4"),
        ({"num_workers": -1}, "num_workers=-1"),
        ({"batches_per_epoch": 0}, "batches_per_epoch=0"),
        ({"resolution": -5}, "resolution=-5"),
        ({"resolution": [0, 512]}, "resolution=\\[0, 512\\]"),
        ({"users_per_batch": 3, "batch_size": 4}, "users_per_batch=3 must divide batch_size=4"),
    ],
)
def test_stream_options_are_checked_at_construction(tmp_path, options, message):
    with pytest.raises(ConfigError, match=message):
        PreferenceDataModule(str(tmp_path / "*.tar"), **options)

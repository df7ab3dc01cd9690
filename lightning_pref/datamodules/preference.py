"""Preference pairs streamed from webdataset shards (the pair format of [`shards`][lightning_pref.datamodules.shards]).

A batch of ``B`` pairs holds:

* ``pixels_w``, ``pixels_l``: ``(B, 3, H, W)`` images (or ``(B, 3, F, H, W)`` videos) in [-1, 1], or, from
  precomputed shards, ``latents_w``, ``latents_l`` and the prompt tensors (e.g. ``encoder_hidden_states``);
* ``prompt`` (list of str), ``key`` (list of str), ``user_id`` (long, ``-1`` when the json has none);
* ``label_flipped`` (bool): the pair's order disagrees with its source labels: flipped by ``label_noise``,
  or stored flipped (``label_flipped`` in the json, e.g. toy data made with label noise), not both;
* any ``metadata_fields``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from lightning_pref.batch import KEY, LABEL_FLIPPED, swap_roles
from lightning_pref.datamodules.media import MediaDecoder
from lightning_pref.datamodules.shards import PAIR_ROLES
from lightning_pref.datamodules.streaming import SampleDecoder, ShardDataModule, parse_flag
from lightning_pref.errors import ConfigError
from lightning_pref.seeding import unit_hash


class PairDecoder(SampleDecoder):
    """A raw pair to its tensors, with seeded label flips that depend on the sample key alone."""

    def __init__(self, media: MediaDecoder, metadata_fields=(), label_noise: float = 0.0, seed: int = 0):
        super().__init__(media, metadata_fields)
        self.label_noise = label_noise
        self.seed = seed

    def flips(self, key: str) -> bool:
        """Whether ``label_noise`` flips this pair: the same on every epoch, rank, worker and run."""
        return self.label_noise > 0 and unit_hash("label-noise", self.seed, key) < self.label_noise

    def __call__(self, sample: dict[str, Any], rng: np.random.Generator) -> list[dict[str, Any]]:
        metadata = self.metadata(sample)
        out = {**self.media(sample, PAIR_ROLES, rng), **self.common(sample, metadata)}
        flipped = self.flips(out[KEY])
        if flipped:
            out = swap_roles(out)
        out[LABEL_FLIPPED] = flipped != parse_flag("label_flipped", metadata.get("label_flipped", False))
        return [out]


class PreferenceDataModule(ShardDataModule):
    """Preference pairs (images, videos or precomputed latents) streamed from webdataset shards.

    Training streams with resampling, split by rank and worker, through a shuffle buffer, and yields exactly
    ``batches_per_epoch`` batches on every rank. Winner and loser get the same crop, flip and (videos) frame
    window. Corrupt samples are skipped, logged and counted (``skipped_samples``). Caption dropout is the
    training module's job (``caption_dropout``), not the data's.

    Args:
        train_shards: shard paths: a glob (``data/*.tar``), a directory, a brace pattern or URLs.
        label_noise: fraction of training pairs whose winner and loser are swapped, for noisy-label
            experiments (Adaptive-DPO). Which pairs is decided by a hash of ``(seed, key)``, so every epoch,
            rank and run flips the same ones; validation is never flipped.
        **kwargs: the streaming options of [`ShardDataModule`][lightning_pref.datamodules.streaming.ShardDataModule]
            (``val_shards``, ``batch_size``, ``num_workers``, ``resolution``, ``random_crop``, ``random_flip``,
            ``shuffle_buffer``, ``batches_per_epoch``, ``seed``, video frame sampling, ``users_per_batch``,
            ``metadata_fields``).
    """

    def __init__(self, train_shards: str, *, label_noise: float = 0.0, **kwargs):
        super().__init__(train_shards, **kwargs)
        if not 0.0 <= label_noise <= 1.0:
            raise ConfigError(f"label_noise={label_noise}: use a fraction in [0, 1].")
        self.label_noise = label_noise

    def sample_decoder(self, train: bool) -> PairDecoder:
        return PairDecoder(
            self.media_decoder(train), self.metadata_fields, self.label_noise if train else 0.0, self.seed
        )


class PickAPicDataModule(PreferenceDataModule):
    """``PreferenceDataModule`` with Diffusion-DPO's Pick-a-Pic defaults: 512 px, centre crop, random
    horizontal flip (shards from ``lightning-pref data pickapic``). Every option can still be overridden."""

    def __init__(
        self, train_shards: str, *, resolution: int | tuple[int, int] | None = 512, random_flip: bool = True, **kwargs
    ):
        super().__init__(train_shards, resolution=resolution, random_flip=random_flip, **kwargs)

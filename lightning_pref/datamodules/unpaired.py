"""Single images or videos with prompts: SFT-style data (SPIN-Diffusion, SSPO) and good/bad labels (KTO).

Reads unpaired shards (``image.<ext>`` or ``video.<ext>`` + ``json``, see
[`shards`][lightning_pref.datamodules.shards]) or takes samples out of preference shards:

* ``source="unpaired"``: unpaired shards; ``label`` from the json (1 desirable, 0 undesirable; 1 when absent);
* ``source="winners"``: the winner of every pair, label 1 (SPIN-Diffusion and SSPO train on Pick-a-Pic
  winners and generate their own losers);
* ``source="pairs"``: winner (label 1) and loser (label 0) of every pair as two samples (Diffusion-KTO on
  paired data). They enter the shuffle buffer together, so they usually share a batch.

A batch holds ``pixels`` (``(B, 3, H, W)`` or ``(B, 3, F, H, W)`` in [-1, 1]) or precomputed ``latents`` and
prompt tensors, ``label`` (long), ``prompt``, ``key``, ``user_id`` and any ``metadata_fields``.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np

from lightning_pref.batch import KEY, LABEL, LOSER, WINNER, split_roles
from lightning_pref.datamodules.media import MediaDecoder
from lightning_pref.datamodules.shards import PAIR_ROLES
from lightning_pref.datamodules.streaming import SampleDecoder, ShardDataModule, parse_flag
from lightning_pref.errors import ConfigError

Source = Literal["unpaired", "winners", "pairs"]


class UnpairedDecoder(SampleDecoder):
    """A raw sample to one (``unpaired``, ``winners``) or two (``pairs``) labelled samples."""

    def __init__(self, media: MediaDecoder, metadata_fields=(), source: Source = "unpaired"):
        super().__init__(media, metadata_fields)
        self.source = source
        self.outputs_per_sample = 2 if source == "pairs" else 1

    def __call__(self, sample: dict[str, Any], rng: np.random.Generator) -> list[dict[str, Any]]:
        metadata = self.metadata(sample)
        common = self.common(sample, metadata)
        if self.source == "unpaired":
            role = "video" if any(name.startswith("video.") for name in sample) else "image"
            return [
                {**self.media(sample, {role: ""}, rng), **common, LABEL: int(parse_flag(LABEL, metadata.get(LABEL, 1)))}
            ]
        if self.source == "winners":
            return [{**self.media(sample, {"winner": ""}, rng), **common, LABEL: 1}]
        winner, loser, shared = split_roles(self.media(sample, PAIR_ROLES, rng))  # shared: precomputed prompt tensors
        return [  # the winner is desirable, the loser not
            {**own, **shared, **common, KEY: common[KEY] + suffix, LABEL: label}
            for own, suffix, label in ((winner, WINNER, 1), (loser, LOSER, 0))
        ]


class UnpairedDataModule(ShardDataModule):
    """Single images or videos with prompts, streamed like the preference data.

    Args:
        train_shards: shard paths: a glob (``data/*.tar``), a directory, a brace pattern or URLs.
        source: ``unpaired`` (unpaired shards), ``winners`` (winners of preference shards) or ``pairs``
            (both images of each pair, labelled 1 and 0).
        **kwargs: the streaming options of [`ShardDataModule`][lightning_pref.datamodules.streaming.ShardDataModule].
    """

    def __init__(self, train_shards: str, *, source: Source = "unpaired", **kwargs):
        super().__init__(train_shards, **kwargs)
        if source not in ("unpaired", "winners", "pairs"):
            raise ConfigError(f"source={source!r}: choose 'unpaired', 'winners' or 'pairs'.")
        self.source = source

    def sample_decoder(self, train: bool) -> UnpairedDecoder:
        return UnpairedDecoder(self.media_decoder(train), self.metadata_fields, self.source)

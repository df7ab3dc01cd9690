"""Where a step's pairs come from, independent of which loss trains on them.

Offline pairs come from shards (a pair batch from a DataModule). A [`PairSource`][lightning_pref.pair_sources.PairSource]
makes them during training instead: given a batch of prompts, it returns a pair batch of the library's schema
([`lightning_pref.batch`][lightning_pref.batch]), usually with generated ``latents_w`` and ``latents_l``. Any
pairwise method takes one as its ``pair_source`` option, so every pairwise loss of the library runs on offline
shards or on pairs made while training.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import nn

from lightning_pref.seeding import PairRandomness

if TYPE_CHECKING:
    from lightning_pref.methods.base import PreferenceDiffusionModule


class PairSource(nn.Module):
    """Interface: turn a training batch into a pair batch. A module, so what it holds (a reward model) follows
    the LightningModule's device; frozen, so it is never trained nor written to a checkpoint."""

    def pairs(self, module: PreferenceDiffusionModule, batch: dict[str, Any], random: PairRandomness) -> dict[str, Any]:
        """The pair batch the step trains on. ``random`` holds the step's per-row streams of ``batch``."""
        raise NotImplementedError

"""Online Diffusion-DPO: Diffusion-DPO on pairs sampled and ranked by a reward while training."""

from __future__ import annotations

from typing import Any

from lightning_pref.errors import ConfigError
from lightning_pref.methods.diffusion_dpo import DiffusionDPO
from lightning_pref.pair_sources import RewardRankedPairs


class OnlineDPO(DiffusionDPO):
    """Diffusion-DPO (Wallace et al., CVPR 2024, arXiv 2311.12908, Eq. 14) whose pairs are made during training.

    Each step: for every prompt of the batch, ``K`` candidates from the policy (or the reference), scored by a
    reward; the best against the worst is a pair; near-ties are dropped
    ([`RewardRankedPairs`][lightning_pref.pair_sources.RewardRankedPairs]); then the Diffusion-DPO loss on those
    pairs, as offline. This is the sampling loop of flow_grpo, verl-omni and Flow-Factory with a preference loss
    in place of the policy gradient; ``reference_update_every`` is flow_grpo's ``ref_update_step``.

    Every pairwise method takes the same ``pair_source`` (DMPO, DPO-C&M, ...); this class only makes it required.

    Args:
        pair_source: a [`RewardRankedPairs`][lightning_pref.pair_sources.RewardRankedPairs]; the data are prompt
            batches ([`PromptDataModule`][lightning_pref.datamodules.prompts.PromptDataModule]).
        **kwargs: the options of [`DiffusionDPO`][lightning_pref.methods.diffusion_dpo.DiffusionDPO].
    """

    def __init__(self, *args: Any, pair_source: RewardRankedPairs, **kwargs: Any):
        if not isinstance(pair_source, RewardRankedPairs):
            raise ConfigError(
                f"OnlineDPO needs pair_source: lightning_pref.pair_sources.RewardRankedPairs, got "
                f"{type(pair_source).__name__}; for offline pairs use lightning_pref.methods.DiffusionDPO."
            )
        super().__init__(*args, pair_source=pair_source, **kwargs)

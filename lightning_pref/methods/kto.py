"""Diffusion-KTO: alignment from per-sample good/bad labels, no pairs needed.

Li et al., "Aligning Diffusion Models by Optimizing Human Utility", arXiv 2404.04465 ``[code]``,
METHODS.md "Beyond the seeds".
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_pref.batch import LABEL
from lightning_pref.errors import DataError
from lightning_pref.losses.common import implicit_reward_margin, pairwise_metrics
from lightning_pref.losses.kto import check_kto_weights, kto_loss
from lightning_pref.methods.base import PreferenceDiffusionModule
from lightning_pref.methods.step import SampleErrors
from lightning_pref.strategies import mean_across_ranks


class DiffusionKTO(PreferenceDiffusionModule):
    """Diffusion-KTO ``[code]``. Per step, for samples with labels ``y`` (desirable or not):

    1. the implicit reward ``g = err_ref - err_theta`` of each sample;
    2. the reference point ``z = clamp(mean(g), 0)``, detached and averaged over all ranks;
    3. ``L = mean(w_y * (1 - sigmoid(s_y * beta * (g - z))))``, ``s_y = +1`` desirable, ``-1`` undesirable.

    Data, either layout:

    * unpaired batches of [`UnpairedDataModule`][lightning_pref.datamodules.unpaired.UnpairedDataModule] (``pixels`` or
      ``latents``, ``label``): each sample gets its own timestep and noise (the paper's setting);
    * preference batches (``pixels_w``/``pixels_l`` or latents): *two labelled samples per pair*, the winner
      desirable, the loser undesirable, sharing the pair's timestep and noise (the base module's noising),
      which leaves each sample's loss unbiased.

    Args:
        beta: 1000 (the official code; no 0.5 factor).
        desirable_weight, undesirable_weight: ``w_y`` (1 and 1).
        **kwargs: the options of [`PreferenceDiffusionModule`][lightning_pref.methods.base.PreferenceDiffusionModule].
    """

    pairwise = False
    takes_unpaired_samples = True

    def __init__(
        self,
        *args: Any,
        beta: float = 1000.0,
        desirable_weight: float = 1.0,
        undesirable_weight: float = 1.0,
        **kwargs: Any,
    ):
        check_kto_weights(desirable_weight, undesirable_weight)
        super().__init__(*args, beta=beta, **kwargs)
        self.desirable_weight = desirable_weight
        self.undesirable_weight = undesirable_weight

    def compute_loss(self, errors: SampleErrors, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        if errors.num_pairs is None:  # unpaired samples carry their own labels
            if LABEL not in batch:
                raise DataError(
                    f"DiffusionKTO got an unpaired batch without 'label' (it has {sorted(batch)}): give the "
                    "DataModule labelled samples (UnpairedDataModule reads 'label' from each sample's json)."
                )
            return self.labelled_loss(errors.policy, errors.reference, batch[LABEL].to(errors.policy.device).bool())
        desirable = (
            torch.arange(len(errors.policy), device=errors.policy.device) < errors.num_pairs
        )  # [winners; losers]
        loss, metrics = self.labelled_loss(errors.policy, errors.reference, desirable)
        margin = implicit_reward_margin(*errors.as_args(), beta=self.beta)
        return loss, {**pairwise_metrics(margin, *errors.as_args()), **metrics}

    def labelled_loss(self, policy: Tensor, reference: Tensor, desirable: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """[`kto_loss`][lightning_pref.losses.kto_loss] with the reference point averaged over all ranks."""
        reference_point = mean_across_ranks((reference - policy).detach().mean()).clamp(min=0)
        return kto_loss(
            policy, reference, desirable, self.beta, reference_point, self.desirable_weight, self.undesirable_weight
        )

"""DMPO: Diffusion-DPO's margin driven to a target by the reverse KL of two Bernoullis.

Li, Xu, Han, Dang, Ermon, arXiv 2507.07510 ``[secondary]``: the loss as in a third-party implementation (the
Diffusion-SDPO authors' training script), METHODS.md section 3.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from lightning_pref.losses.dmpo import check_dmpo_alpha, dmpo_loss
from lightning_pref.methods.base import PreferenceDiffusionModule
from lightning_pref.methods.step import SampleErrors


class DMPO(PreferenceDiffusionModule):
    """DMPO: ``L = KL(Bernoulli(sigmoid(u)) || Bernoulli(1 - alpha))`` on Diffusion-DPO's margin ``u``.

    The gradient vanishes at ``u = logit(1 - alpha)`` and pushes ``u`` back when it overshoots, so the
    preference margin stops growing once the target is met.

    Args:
        alpha: target dispreference rate, in ``[1e-6, 1)`` (0.01).
        **kwargs: the options of [`PreferenceDiffusionModule`][lightning_pref.methods.base.PreferenceDiffusionModule];
            ``beta`` in Diffusion-DPO units (third-party settings: SD1.5 2000, SDXL 6000).
    """

    def __init__(self, *args: Any, alpha: float = 0.01, **kwargs: Any):
        check_dmpo_alpha(alpha)
        super().__init__(*args, **kwargs)
        self.alpha = alpha

    def compute_loss(self, errors: SampleErrors, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        return dmpo_loss(*errors.as_args(), beta=self.beta, alpha=self.alpha)

"""Diffusion-DPO (Wallace et al., CVPR 2024, arXiv 2311.12908): the baseline every other method varies."""

from __future__ import annotations

from typing import Any, Literal

from torch import Tensor

from lightning_pref.errors import ConfigError
from lightning_pref.losses.common import check_preference_loss_options
from lightning_pref.losses.diffusion_dpo import diffusion_dpo_loss
from lightning_pref.methods.base import PreferenceDiffusionModule
from lightning_pref.methods.step import SampleErrors


class DiffusionDPO(PreferenceDiffusionModule):
    """Diffusion-DPO ``[paper]`` ``[code]``: ``L = -log sigmoid(-(beta/2) (D_theta - D_ref))`` (Eq. 14).

    Args:
        loss_type: ``sigmoid`` (the paper), ``hinge`` or ``ipo`` on the same implicit reward margin.
        label_smoothing: conservative DPO's label-noise rate (``sigmoid`` only).
        **kwargs: the options of [`PreferenceDiffusionModule`][lightning_pref.methods.base.PreferenceDiffusionModule].

    The paper's recipe: beta 2000 (SD1.5) / 5000 (SDXL), 2048 pairs per step, lr 1e-8 x 2048 via
    ``scale_lr``, warm-up 500 / 200, caption dropout 0.2, gradient clipping 1.0 (a Trainer option).
    """

    reports_gradient_factor = True  # with loss_type "sigmoid", which the constructor checks under auto_beta

    def __init__(
        self,
        *args: Any,
        loss_type: Literal["sigmoid", "hinge", "ipo"] = "sigmoid",
        label_smoothing: float = 0.0,
        **kwargs: Any,
    ):
        check_preference_loss_options(loss_type, label_smoothing)
        if kwargs.get("auto_beta") and loss_type != "sigmoid":
            raise ConfigError(
                f"auto_beta steers the mean sigmoid(-u) of the sigmoid loss, and loss_type={loss_type!r} has none: "
                "remove auto_beta or use loss_type 'sigmoid'."
            )
        super().__init__(*args, **kwargs)
        self.loss_type = loss_type
        self.label_smoothing = label_smoothing

    def compute_loss(self, errors: SampleErrors, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        return diffusion_dpo_loss(
            *errors.as_args(), beta=self.beta, kind=self.loss_type, label_smoothing=self.label_smoothing
        )

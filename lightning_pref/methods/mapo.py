"""MaPO: reference-free preference optimization (no reference model, no reference forward).

Hong, Paul, Lee, Rasul, Thorne, Jeong, "Margin-aware Preference Optimization for Aligning Diffusion Models
without Reference", arXiv 2406.06424 ``[code]`` (the official mapo-t2i/mapo code), METHODS.md "Beyond the seeds".
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from lightning_pref.losses.mapo import check_mapo_options, mapo_loss
from lightning_pref.methods.base import PreferenceDiffusionModule
from lightning_pref.methods.step import SampleErrors


class MaPO(PreferenceDiffusionModule):
    """MaPO ``[code]``. Per step, one policy forward over ``[winners; losers]`` and nothing else:

    ``L = mean(err_theta(w)) - beta * mean(log sigmoid(T (f(err_theta(w)) - f(err_theta(l)))))``,
    ``f(e) = s e / (exp(s e) - 1)``.

    ``uses_reference = False``: no frozen copy is built under ``finetune: full`` and no reference forward
    runs under LoRA, so a step costs about half of Diffusion-DPO's forwards.

    Args:
        beta: the margin term's weight ``beta_m`` (0.1; *not* in Diffusion-DPO units).
        error_scale: ``s`` (0.5; ``snr_value`` in the official code).
        margin_scale: ``T``; ``None`` uses the process's number of training timesteps (1000), as the code does.
        **kwargs: the options of [`PreferenceDiffusionModule`][lightning_pref.methods.base.PreferenceDiffusionModule].
    """

    uses_reference = False

    def __init__(
        self, *args: Any, beta: float = 0.1, error_scale: float = 0.5, margin_scale: float | None = None, **kwargs: Any
    ):
        check_mapo_options(error_scale, margin_scale)
        super().__init__(*args, beta=beta, **kwargs)
        self.error_scale = error_scale
        self.margin_scale = margin_scale if margin_scale is not None else float(self.process.num_train_timesteps)

    def compute_loss(self, errors: SampleErrors, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        return mapo_loss(errors.policy_w, errors.policy_l, self.beta, self.error_scale, self.margin_scale)

"""DPO-C&M: Diffusion-DPO on the timesteps where the model's reverse step is trustworthy.

Yang, Tan, Wang, Zhou, Li, arXiv 2505.21893 (the "SDPO"/"SIPO" paper) ``[secondary]`` ``[reconstructed]``: no code
was obtainable; METHODS.md section 2 records the confirmed facts and the reconstruction implemented here.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from lightning_pref.errors import ConfigError
from lightning_pref.losses.dpo_clip_mask import dpo_clip_mask_loss
from lightning_pref.losses.importance import check_importance_options
from lightning_pref.methods.importance import ImportanceWeightedModule
from lightning_pref.methods.step import SampleErrors


class DPOClipMask(ImportanceWeightedModule):
    """DPO-C&M ``[secondary]`` ``[reconstructed]``. Per step:

    1. importance weights ``w_w, w_l`` of each pair's shared timestep, from the policy's errors
       (``log w_t = -c_t * err_theta``, stop-gradient; see
       [`ImportanceWeightedModule`][lightning_pref.methods.importance.ImportanceWeightedModule]);
    2. the mask ``m = 1[w_w >= tau] * 1[w_l >= tau]``;
    3. ``L = -sum(m * log sigmoid(u)) / max(sum(m), 1)``, ``u`` optionally clipped to ``[-margin_clip, margin_clip]``.

    The paper's optional restriction of training times to an informative range is the backbone's
    ``timestep_range`` option. With the default per-element KL the weights stay near 1 beyond the first steps
    and the mask drops almost nothing; ``calibrate_kl_scale_at: 0.1`` scales the KL so that the mask drops the
    timesteps below ``t ~ 100``, where the paper's weights are low (measured once, on the first batch; see
    [`ImportanceWeightedModule`][lightning_pref.methods.importance.ImportanceWeightedModule]) ``[reconstructed]``.

    Args:
        mask_threshold: ``tau`` (0.9; must be set: the mask is the method).
        margin_clip: symmetric clip of ``u`` (``None``: none) ``[reconstructed]``.
        **kwargs: the importance-weight options of
            [`ImportanceWeightedModule`][lightning_pref.methods.importance.ImportanceWeightedModule] (``kl_reduction``,
            ``kl_scale``, ``calibrate_kl_scale_at``, ``weight_estimator``, ``importance_step``) and the options of
            [`PreferenceDiffusionModule`][lightning_pref.methods.base.PreferenceDiffusionModule] (``beta`` in
            Diffusion-DPO units).
    """

    def __init__(self, *args: Any, mask_threshold: float = 0.9, margin_clip: float | None = None, **kwargs: Any):
        if mask_threshold is None:
            raise ConfigError(
                "DPOClipMask needs a mask_threshold (0.9 in the paper); without a mask it is DiffusionDPO."
            )
        check_importance_options(margin_clip=margin_clip)
        super().__init__(*args, mask_threshold=mask_threshold, **kwargs)
        self.margin_clip = margin_clip

    def compute_loss(self, errors: SampleErrors, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        weight_w, weight_l = self.importance_weights(errors)
        loss, metrics = dpo_clip_mask_loss(
            *errors.as_args(),
            weight_w,
            weight_l,
            beta=self.beta,
            mask_threshold=self.mask_threshold,
            margin_clip=self.margin_clip,
        )
        return loss, {**metrics, **self.weight_metrics(errors, weight_w, weight_l)}

"""SDPO / SIPO: importance-sampled Diffusion-DPO.

Yang, Tan, Wang, Zhou, Li, arXiv 2505.21893 ("SDPO: Importance-Sampled DPO" in v1, "SIPO: Stabilized and
Improved Preference Optimization" in v3) ``[secondary]`` ``[reconstructed]``: no code was obtainable; METHODS.md
section 2 records the confirmed facts and the reconstruction implemented here. Not to be confused with the
unrelated Diffusion-SDPO (arXiv 2511.03317), which is this library's ``loser_safeguard`` option.
"""

from __future__ import annotations

from typing import Any, Literal

from torch import Tensor

from lightning_pref.losses.importance import check_importance_options
from lightning_pref.losses.sdpo import sdpo_loss
from lightning_pref.methods.importance import ImportanceWeightedModule
from lightning_pref.methods.step import SampleErrors


class SDPO(ImportanceWeightedModule):
    """SDPO / SIPO ``[secondary]`` ``[reconstructed]``. Per step:

    1. importance weights ``w_w, w_l`` of each pair's shared timestep (stop-gradient; see
       [`ImportanceWeightedModule`][lightning_pref.methods.importance.ImportanceWeightedModule]), clipped:
       ``wc = clip(w, 1 - eps, 1 + eps)``;
    2. ``inside`` (default): ``u_IS = -(beta/2) [wc_w (err_theta(w) - err_ref(w)) - wc_l (err_theta(l) - err_ref(l))]``,
       ``L = -mean(m * log sigmoid(u_IS))``; ``outside``: ``L = -mean(m * clip(w_w w_l) * log sigmoid(u))``;
       ``m`` is DPO-C&M's mask (``mask_threshold: null`` drops it).

    Args:
        clip_eps: ``eps`` of the clip (0.2, a guess).
        weight_placement: ``inside`` or ``outside`` the log-sigmoid.
        beta: KL strength, in Diffusion-DPO units here; the paper uses much smaller values than
            Diffusion-DPO in its own units (see the docs page).
        **kwargs: the importance-weight options of
            [`ImportanceWeightedModule`][lightning_pref.methods.importance.ImportanceWeightedModule]
            (``mask_threshold`` 0.9, ``kl_reduction``, ``kl_scale``, ``calibrate_kl_scale_at``, ``weight_estimator``,
            ``importance_step``) and those of
            [`PreferenceDiffusionModule`][lightning_pref.methods.base.PreferenceDiffusionModule].
    """

    def __init__(
        self,
        *args: Any,
        clip_eps: float = 0.2,
        weight_placement: Literal["inside", "outside"] = "inside",
        **kwargs: Any,
    ):
        check_importance_options(clip_eps=clip_eps, placement=weight_placement)
        super().__init__(*args, **kwargs)
        self.clip_eps = clip_eps
        self.weight_placement = weight_placement

    def compute_loss(self, errors: SampleErrors, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        weight_w, weight_l = self.importance_weights(errors)
        loss, metrics = sdpo_loss(
            *errors.as_args(),
            weight_w,
            weight_l,
            beta=self.beta,
            clip_eps=self.clip_eps,
            mask_threshold=self.mask_threshold,
            placement=self.weight_placement,
        )
        return loss, {**metrics, **self.weight_metrics(errors, weight_w, weight_l)}


#: The v3 name of the same method.
SIPO = SDPO

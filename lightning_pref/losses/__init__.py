"""Preference losses as pure functions: per-sample denoising errors in, ``(loss, metrics)`` out.

No Lightning, no models: every function here can be checked by hand on a few numbers. The errors are
``err = mean over non-batch dims of (prediction - target)^2`` in fp32, one per sample; the notation is that of
METHODS.md, "Shared notation" (see [`common`][lightning_pref.losses.common]).

One module per method, named as the method's module in ``lightning_pref.methods`` (``methods/dmpo.py`` trains
with ``losses/dmpo.py``, tested in ``tests/losses/test_dmpo.py``):

| module | holds |
| --- | --- |
| [`common`][lightning_pref.losses.common] | the implicit reward margin ``u``, the loss of a margin, the metrics every pairwise method logs |
| [`diffusion_dpo`][lightning_pref.losses.diffusion_dpo] | Diffusion-DPO, the baseline |
| [`importance`][lightning_pref.losses.importance] | what DPO-C&M and SDPO share: mask, clipped weight, timestep buckets, options |
| [`dpo_clip_mask`][lightning_pref.losses.dpo_clip_mask] | DPO-C&M |
| [`sdpo`][lightning_pref.losses.sdpo] | SDPO / SIPO |
| [`dmpo`][lightning_pref.losses.dmpo] | DMPO |
| [`see_dpo`][lightning_pref.losses.see_dpo] | SEE-DPO's entropy regulariser (the base module's ``entropy_gamma``, for any pairwise loss) |
| [`kto`][lightning_pref.losses.kto] | Diffusion-KTO (unpaired) |
| [`mapo`][lightning_pref.losses.mapo] | MaPO (reference-free) |
| [`sspo`][lightning_pref.losses.sspo] | SSPO's Self-Sampling Regularization |
| [`inversion_dpo`][lightning_pref.losses.inversion_dpo] | Inversion-DPO |
| [`adaptive_dpo`][lightning_pref.losses.adaptive_dpo] | Adaptive-DPO: minority metric, weight and margin |
| [`safeguard`][lightning_pref.losses.safeguard] | the loser-gradient safeguard (the base module's ``loser_safeguard``) |

Options are checked once, by the ``check_*`` function next to each loss, which the method's constructor calls;
the loss functions themselves do not re-check them on every step. Every name is importable from here.
"""

from lightning_pref.losses.adaptive_dpo import (
    AdaptiveLossKind,
    MarginKind,
    MinorityMetric,
    WeightKind,
    adaptive_dpo_loss,
    check_adaptive_dpo_options,
    minority_margin,
    minority_metric,
    minority_weight,
)
from lightning_pref.losses.common import (
    PreferenceLossKind,
    check_preference_loss_options,
    error_metrics,
    implicit_reward_margin,
    margin_metrics,
    pairwise_metrics,
    preference_loss,
    win_fraction,
)
from lightning_pref.losses.diffusion_dpo import diffusion_dpo_loss
from lightning_pref.losses.dmpo import check_dmpo_alpha, dmpo_loss
from lightning_pref.losses.dpo_clip_mask import dpo_clip_mask_loss
from lightning_pref.losses.importance import (
    ImportanceWeightPlacement,
    calibrated_kl_scale,
    check_importance_options,
    clipped_weight,
    importance_mask,
    timestep_bucket_means,
)
from lightning_pref.losses.inversion_dpo import InversionSign, check_inversion_sign, inversion_dpo_loss
from lightning_pref.losses.kto import check_kto_weights, kto_loss
from lightning_pref.losses.mapo import bounded_likelihood, check_mapo_options, mapo_loss
from lightning_pref.losses.safeguard import (
    SafeguardScope,
    check_safeguard_options,
    loser_gradient_scale,
    scale_gradient,
)
from lightning_pref.losses.sdpo import sdpo_loss
from lightning_pref.losses.see_dpo import check_entropy_gamma, entropy_regularized_reference
from lightning_pref.losses.sspo import SftBranch, SwitchMode, check_sspo_options, sspo_loss

__all__ = [
    "AdaptiveLossKind",
    "MarginKind",
    "MinorityMetric",
    "WeightKind",
    "adaptive_dpo_loss",
    "check_adaptive_dpo_options",
    "minority_margin",
    "minority_metric",
    "minority_weight",
    "SftBranch",
    "SwitchMode",
    "check_sspo_options",
    "sspo_loss",
    "ImportanceWeightPlacement",
    "InversionSign",
    "PreferenceLossKind",
    "SafeguardScope",
    "bounded_likelihood",
    "calibrated_kl_scale",
    "check_dmpo_alpha",
    "check_entropy_gamma",
    "check_importance_options",
    "check_inversion_sign",
    "check_kto_weights",
    "check_mapo_options",
    "check_preference_loss_options",
    "check_safeguard_options",
    "clipped_weight",
    "diffusion_dpo_loss",
    "dmpo_loss",
    "dpo_clip_mask_loss",
    "entropy_regularized_reference",
    "error_metrics",
    "implicit_reward_margin",
    "importance_mask",
    "inversion_dpo_loss",
    "kto_loss",
    "loser_gradient_scale",
    "mapo_loss",
    "margin_metrics",
    "pairwise_metrics",
    "preference_loss",
    "scale_gradient",
    "sdpo_loss",
    "timestep_bucket_means",
    "win_fraction",
]

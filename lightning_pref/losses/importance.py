"""What DPO-C&M and SDPO share: the importance mask, the clipped weight, per-timestep metrics, their options.

Yang et al., arXiv 2505.21893 ``[secondary]`` ``[reconstructed]``, METHODS.md section 2. The importance weights
``w_t = p_theta(x_{t-1} | x_t) / q(x_{t-1} | x_t, x0)`` themselves come from the noise process
([`log_importance_weight`][lightning_pref.processes.NoiseProcess.log_importance_weight]), computed per step by
[`ImportanceWeightedModule`][lightning_pref.methods.importance.ImportanceWeightedModule]; here they are plain
tensors of shape ``(B,)``, one per branch.
"""

from __future__ import annotations

import math
from typing import Literal

from torch import Tensor

from lightning_pref.errors import ConfigError

ImportanceWeightPlacement = Literal["inside", "outside"]


def check_importance_options(
    mask_threshold: float | None = None,
    clip_eps: float | None = None,
    margin_clip: float | None = None,
    placement: str = "inside",
) -> None:
    """Raise a ``ConfigError`` for importance-weighting options out of range (DPO-C&M, SDPO); ``None`` skips
    an option.

    Example:
        >>> from lightning_pref.losses import check_importance_options
        >>> check_importance_options(mask_threshold=0.9, clip_eps=0.2)   # in range: nothing happens
        >>> check_importance_options(clip_eps=1.0)
        Traceback (most recent call last):
        lightning_pref.errors.ConfigError: clip_eps=1.0: weights clip to [1 - eps, 1 + eps]; use eps in (0, 1) (default 0.2).
    """
    if mask_threshold is not None and not 0.0 <= mask_threshold <= 1.0:
        raise ConfigError(
            f"mask_threshold={mask_threshold}: the expected importance weight lies in [0, 1]; use a threshold "
            "in [0, 1] (0.9 in the paper), or null for no mask."
        )
    if clip_eps is not None and not 0.0 < clip_eps < 1.0:
        raise ConfigError(f"clip_eps={clip_eps}: weights clip to [1 - eps, 1 + eps]; use eps in (0, 1) (default 0.2).")
    if margin_clip is not None and margin_clip <= 0:
        raise ConfigError(f"margin_clip={margin_clip}: use a positive bound on |u|, or null for no clipping.")
    if placement not in ("inside", "outside"):
        raise ConfigError(f"weight_placement={placement!r}: choose 'inside' or 'outside'.")


def importance_mask(weight_w: Tensor, weight_l: Tensor, threshold: float) -> Tensor:
    """DPO-C&M's mask ``m = 1[w_w >= tau] * 1[w_l >= tau]``: a pair counts only if both weights are high enough.

    Args:
        weight_w, weight_l: importance weights of winners and losers, each of shape ``(B,)``.
        threshold: ``tau`` (0.9 in the paper).

    Returns:
        ``m`` as floats, shape ``(B,)``.

    Example:
        >>> import torch
        >>> from lightning_pref.losses import importance_mask
        >>> importance_mask(torch.tensor([0.95, 0.5, 1.0]), torch.tensor([0.9, 1.0, 0.89]), threshold=0.9)
        tensor([1., 0., 0.])
    """
    return ((weight_w >= threshold) & (weight_l >= threshold)).float()


def calibrated_kl_scale(coefficient: float, typical_error: float, threshold: float) -> float:
    """The KL scale ``k`` at which a typical sample's importance weight equals the mask threshold at one time
    ``[reconstructed]``.

    ``log w_t = -k * c_t * err``; asking ``exp(-k * c_t* * e_typ) = tau`` at the chosen time ``t*`` gives
    ``k = -log(tau) / (c_t* * e_typ)``. ``k`` is the number of independent elements the KL counts (1: the
    per-element KL of ``kl_reduction: mean``; the latent's size: ``sum``), the one constant of the weight that
    neither the process nor the model fixes (see
    [`ImportanceWeightedModule`][lightning_pref.methods.importance.ImportanceWeightedModule] for why one
    crossing is pinned, not two).

    Args:
        coefficient: ``c_t*`` of the process at ``t*``
            ([`importance_coefficient`][lightning_pref.processes.NoiseProcess.importance_coefficient]), finite and
            positive.
        typical_error: ``e_typ``, the mean squared prediction error at ``t*`` (reduced as the weights reduce it).
        threshold: ``tau`` in ``(0, 1)``.

    Returns:
        ``k``, a positive float.

    Example:
        >>> from lightning_pref.losses.importance import calibrated_kl_scale
        >>> scale = calibrated_kl_scale(coefficient=0.01, typical_error=0.15, threshold=0.9)
        >>> round(scale, 2), round(math.exp(-scale * 0.01 * 0.15), 6)   # the typical weight at t* is tau
        (70.24, 0.9)
    """
    return -math.log(threshold) / (coefficient * typical_error)


def clipped_weight(weight: Tensor, clip_eps: float) -> Tensor:
    """``stopgrad(clip(w, 1 - eps, 1 + eps))``: SDPO's (and PPO's) clipped importance weight.

    Args:
        weight: importance weights, any shape.
        clip_eps: ``eps``, in ``(0, 1)``.

    Returns:
        The clipped weights, detached, of ``weight``'s shape.

    Example:
        >>> import torch
        >>> from lightning_pref.losses import clipped_weight
        >>> clipped_weight(torch.tensor([0.5, 1.1, 3.0]), clip_eps=0.2)
        tensor([0.8000, 1.1000, 1.2000])
    """
    return weight.detach().clamp(1 - clip_eps, 1 + clip_eps)


def timestep_bucket_means(values: Tensor, time_fraction: Tensor, name: str, num_buckets: int = 10) -> dict[str, Tensor]:
    """Mean of ``values`` per bucket of process time, for the buckets present in the batch.

    Args:
        values: one number per pair, ``(B,)``.
        time_fraction: each pair's time as a fraction of the schedule (0 = clean), ``(B,)``.
        name: the metric's name; keys read ``{name}_t0.3-0.4``.
        num_buckets: equal-width buckets of [0, 1].

    Returns:
        One detached scalar per bucket present.

    Example:
        >>> import torch
        >>> from lightning_pref.losses import timestep_bucket_means
        >>> timestep_bucket_means(torch.tensor([1.0, 3.0, 5.0]), torch.tensor([0.05, 0.01, 0.95]), "w")
        {'w_t0.0-0.1': tensor(2.), 'w_t0.9-1.0': tensor(5.)}
    """
    values = values.detach().float()
    index = (time_fraction.detach().float().to(values.device) * num_buckets).long().clamp(0, num_buckets - 1)
    width = 1.0 / num_buckets
    return {
        f"{name}_t{b * width:.1f}-{(b + 1) * width:.1f}": values[index == b].mean() for b in index.unique().tolist()
    }

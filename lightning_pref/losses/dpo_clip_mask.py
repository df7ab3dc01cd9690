"""DPO-C&M's loss: Diffusion-DPO on the timesteps whose importance weight is high enough for both branches."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from lightning_pref.losses.common import implicit_reward_margin, pairwise_metrics
from lightning_pref.losses.importance import importance_mask


def dpo_clip_mask_loss(
    policy_w: Tensor,
    policy_l: Tensor,
    ref_w: Tensor,
    ref_l: Tensor,
    weight_w: Tensor,
    weight_l: Tensor,
    beta: float,
    mask_threshold: float = 0.9,
    margin_clip: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """DPO-C&M ``[secondary]`` ``[reconstructed]`` (Yang et al., arXiv 2505.21893), METHODS.md section 2.

    ``m = 1[w_w >= tau] * 1[w_l >= tau]``,
    ``L = -sum_pairs(m * log sigmoid(clip(u))) / max(sum_pairs m, 1)``,

    with Diffusion-DPO's margin ``u`` and the mask of
    [`importance_mask`][lightning_pref.losses.importance_mask]. ``mask_threshold`` and ``margin_clip`` are
    checked once, by [`check_importance_options`][lightning_pref.losses.check_importance_options] (the
    method's constructor calls it), not on every call.

    Args:
        policy_w, policy_l, ref_w, ref_l: per-sample errors, each ``(B,)``.
        weight_w, weight_l: importance weights ``w_t`` of the two branches, ``(B,)``
            ([`log_importance_weight`][lightning_pref.processes.NoiseProcess.log_importance_weight]); used as a
            mask only.
        beta: KL strength (Diffusion-DPO units).
        mask_threshold: ``tau`` (0.9 in the paper). A batch with every pair masked has loss 0.
        margin_clip: optional symmetric clip of ``u`` to ``[-c, c]`` (no gradient beyond it) ``[reconstructed]``.

    Returns:
        The loss; [`pairwise_metrics`][lightning_pref.losses.pairwise_metrics] (on the unclipped ``u``) plus
        ``masked_fraction``.

    Example:
        >>> import torch
        >>> from lightning_pref.losses import dpo_clip_mask_loss
        >>> errors = torch.tensor([0.1, 0.1]), torch.tensor([0.3, 0.3]), torch.tensor([0.2, 0.2]), torch.tensor([0.2, 0.2])
        >>> loss, metrics = dpo_clip_mask_loss(*errors, torch.tensor([0.95, 0.5]), torch.ones(2), beta=10.0)
        >>> round(loss.item(), 4), metrics["masked_fraction"].item()   # only the first pair counts: -log sigmoid(1)
        (0.3133, 0.5)
    """
    margin = implicit_reward_margin(policy_w, policy_l, ref_w, ref_l, beta)
    clipped = margin if margin_clip is None else margin.clamp(-margin_clip, margin_clip)
    mask = importance_mask(weight_w, weight_l, mask_threshold)
    loss = -(mask * F.logsigmoid(clipped)).sum() / mask.sum().clamp(min=1)
    metrics = pairwise_metrics(margin, policy_w, policy_l, ref_w, ref_l)
    return loss, {**metrics, "masked_fraction": 1 - mask.mean()}

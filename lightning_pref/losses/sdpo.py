"""SDPO / SIPO's loss: Diffusion-DPO with clipped importance weights on the log-likelihood-ratio terms."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_pref.losses.common import implicit_reward_margin, pairwise_metrics
from lightning_pref.losses.importance import ImportanceWeightPlacement, clipped_weight, importance_mask


def sdpo_loss(
    policy_w: Tensor,
    policy_l: Tensor,
    ref_w: Tensor,
    ref_l: Tensor,
    weight_w: Tensor,
    weight_l: Tensor,
    beta: float,
    clip_eps: float = 0.2,
    mask_threshold: float | None = 0.9,
    placement: ImportanceWeightPlacement = "inside",
) -> tuple[Tensor, dict[str, Tensor]]:
    """SDPO / SIPO, importance-sampled DPO ``[secondary]`` ``[reconstructed]`` (Yang et al., arXiv 2505.21893),
    METHODS.md section 2.

    With ``wc = stopgrad(clip(w, 1 - eps, 1 + eps))`` ([`clipped_weight`][lightning_pref.losses.clipped_weight])
    and the mask ``m`` of [`importance_mask`][lightning_pref.losses.importance_mask]:

    * ``inside`` (default): ``u_IS = -(beta/2) [wc_w (err_theta(w) - err_ref(w)) - wc_l (err_theta(l) - err_ref(l))]``,
      ``L = -mean_pairs(m * log sigmoid(u_IS))``;
    * ``outside``: ``L = -mean_pairs(m * stopgrad(clip(w_w * w_l, 1 - eps, 1 + eps)) * log sigmoid(u))``.

    ``clip_eps``, ``mask_threshold`` and ``placement`` are checked once, by
    [`check_importance_options`][lightning_pref.losses.check_importance_options] (the method's constructor
    calls it), not on every call.

    Args:
        policy_w, policy_l, ref_w, ref_l: per-sample errors, each ``(B,)``.
        weight_w, weight_l: importance weights ``w_t``, ``(B,)``.
        beta: KL strength; the paper's values are much smaller than Diffusion-DPO's (see the docs page).
        clip_eps: clip range ``eps`` (0.2, a guess).
        mask_threshold: ``tau`` of the mask; ``None`` for no mask.
        placement: where the weights act, ``inside`` or ``outside`` the log-sigmoid.

    Returns:
        The loss; [`pairwise_metrics`][lightning_pref.losses.pairwise_metrics] of the margin the loss uses
        (``u_IS`` inside, ``u`` outside) plus ``masked_fraction`` and ``clipped_fraction`` (the fraction of
        weights at a clip bound).

    Example:
        >>> import torch
        >>> from lightning_pref.losses import sdpo_loss
        >>> errors = torch.tensor([0.1]), torch.tensor([0.3]), torch.tensor([0.2]), torch.tensor([0.2])
        >>> loss, metrics = sdpo_loss(*errors, torch.tensor([0.5]), torch.tensor([1.0]), beta=10.0, mask_threshold=None)
        >>> round(metrics["reward_margin"].item(), 4)   # -5 * (0.8 * (-0.1) - 1.0 * 0.1) = 0.9
        0.9
    """
    if placement == "inside":
        clipped_w, clipped_l = clipped_weight(weight_w, clip_eps), clipped_weight(weight_l, clip_eps)
        margin = -0.5 * beta * (clipped_w * (policy_w - ref_w) - clipped_l * (policy_l - ref_l))
        per_pair = -F.logsigmoid(margin)
        weights = torch.cat([weight_w, weight_l])
    else:
        margin = implicit_reward_margin(policy_w, policy_l, ref_w, ref_l, beta)
        per_pair = -clipped_weight(weight_w * weight_l, clip_eps) * F.logsigmoid(margin)
        weights = weight_w * weight_l
    mask = torch.ones_like(per_pair) if mask_threshold is None else importance_mask(weight_w, weight_l, mask_threshold)
    loss = (mask * per_pair).mean()
    at_bound = ((weights.detach() - 1).abs() >= clip_eps).float().mean()
    metrics = pairwise_metrics(margin, policy_w, policy_l, ref_w, ref_l)
    return loss, {**metrics, "masked_fraction": 1 - mask.mean(), "clipped_fraction": at_bound}

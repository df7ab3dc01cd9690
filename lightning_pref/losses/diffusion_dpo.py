"""Diffusion-DPO's loss (Wallace et al., CVPR 2024, arXiv 2311.12908): the baseline every other loss varies."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_pref.losses.common import PreferenceLossKind, implicit_reward_margin, pairwise_metrics, preference_loss


def diffusion_dpo_loss(
    policy_w: Tensor,
    policy_l: Tensor,
    ref_w: Tensor,
    ref_l: Tensor,
    beta: float,
    kind: PreferenceLossKind = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Diffusion-DPO ``[paper]`` ``[code]`` (Wallace et al., CVPR 2024, arXiv 2311.12908, Eq. 14), METHODS.md section 1.

    ``L = mean_pairs -log sigmoid(-(beta/2) * ((err_theta(w) - err_theta(l)) - (err_ref(w) - err_ref(l))))``

    ``kind`` and ``label_smoothing`` are checked once, by
    [`check_preference_loss_options`][lightning_pref.losses.check_preference_loss_options] (the method's
    constructor calls it), not on every call.

    Args:
        policy_w, policy_l, ref_w, ref_l: per-sample errors, each of shape ``(B,)``.
        beta: KL strength, in the official code's units (2000 for SD1.5, 5000 for SDXL).
        kind: ``sigmoid`` (the paper), ``hinge`` or ``ipo``; see
            [`preference_loss`][lightning_pref.losses.preference_loss].
        label_smoothing: cDPO's assumed label-noise rate, ``sigmoid`` only.

    Returns:
        The scalar loss and the metrics of [`pairwise_metrics`][lightning_pref.losses.pairwise_metrics]; with
        ``kind="sigmoid"`` also ``gradient_factor``, the mean ``sigmoid(-u)`` (what ``auto_beta`` steers:
        [`AutoBeta`][lightning_pref.beta.AutoBeta]).

    Example:
        >>> import torch
        >>> from lightning_pref.losses import diffusion_dpo_loss
        >>> errors = torch.tensor([0.10]), torch.tensor([0.30]), torch.tensor([0.20]), torch.tensor([0.20])
        >>> loss, metrics = diffusion_dpo_loss(*errors, beta=10.0)
        >>> round(loss.item(), 4), round(metrics["reward_margin"].item(), 4)   # u = -5 * (-0.2) = 1
        (0.3133, 1.0)
    """
    margin = implicit_reward_margin(policy_w, policy_l, ref_w, ref_l, beta)
    loss = preference_loss(margin, beta, kind, label_smoothing).mean()
    metrics = pairwise_metrics(margin, policy_w, policy_l, ref_w, ref_l)
    if kind == "sigmoid":
        metrics["gradient_factor"] = torch.sigmoid(-margin.detach()).mean()
    return loss, metrics

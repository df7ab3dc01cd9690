"""DMPO's loss: Diffusion-DPO's margin driven to a target by the reverse KL of two Bernoullis."""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor

from lightning_pref.errors import ConfigError
from lightning_pref.losses.common import implicit_reward_margin, pairwise_metrics


def check_dmpo_alpha(alpha: float) -> None:
    """Raise a ``ConfigError`` unless ``1e-6 <= alpha < 1``: DMPO needs ``0 < alpha < 1``, and not so small
    that ``log(alpha)`` swamps the loss.

    Example:
        >>> from lightning_pref.losses import check_dmpo_alpha
        >>> check_dmpo_alpha(0.01)   # the default: nothing happens
    """
    if not 1e-6 <= alpha < 1.0:
        raise ConfigError(
            f"alpha={alpha}: DMPO's target is Bernoulli(1 - alpha), so alpha must lie in [1e-6, 1) -- alpha <= 0 "
            "turns the loss into an unbounded -log sigmoid(u) and tiny values make log(alpha) blow up. Use e.g. "
            "alpha: 0.01 (the default)."
        )


def dmpo_loss(
    policy_w: Tensor, policy_l: Tensor, ref_w: Tensor, ref_l: Tensor, beta: float, alpha: float = 0.01
) -> tuple[Tensor, dict[str, Tensor]]:
    """DMPO ``[secondary]`` (Li et al., arXiv 2507.07510), METHODS.md section 3; the loss as in a third-party
    implementation (the Diffusion-SDPO authors' training script).

    The KL of Bernoulli(p) from Bernoulli(q), ``p = sigmoid(u)``, ``q = 1 - alpha``, averaged over pairs:

    ``L = p (log p - log q) + (1 - p) (log(1 - p) - log(1 - q))``,

    computed stably with ``log p = -softplus(-u)`` and ``log(1 - p) = -softplus(u)``. Its derivative is
    ``dL/du = p (1 - p) (u - logit(q))``: zero at ``u = logit(1 - alpha)``, which pulls ``u`` up to that
    target and pushes it back when it overshoots (unlike ``-log sigmoid(u)``, which always pushes up).
    ``alpha`` is checked once, by [`check_dmpo_alpha`][lightning_pref.losses.check_dmpo_alpha] (the method's
    constructor calls it), not on every call.

    Args:
        policy_w, policy_l, ref_w, ref_l: per-sample errors, each ``(B,)``.
        beta: KL strength (Diffusion-DPO units; third-party settings: SD1.5 2000, SDXL 6000).
        alpha: the target's dispreference rate, in ``[1e-6, 1)`` (default 0.01).

    Returns:
        The loss; [`pairwise_metrics`][lightning_pref.losses.pairwise_metrics] plus ``mean_p`` and its target
        ``target_p = 1 - alpha``.

    Example:
        >>> import torch
        >>> from lightning_pref.losses import dmpo_loss
        >>> loss, metrics = dmpo_loss(*(torch.zeros(1),) * 4, beta=1.0, alpha=0.5)   # p = q = 1/2
        >>> loss.item(), metrics["mean_p"].item()
        (0.0, 0.5)
    """
    margin = implicit_reward_margin(policy_w, policy_l, ref_w, ref_l, beta)
    log_p, log_not_p = -F.softplus(-margin), -F.softplus(margin)
    p = log_p.exp()
    per_pair = p * (log_p - math.log1p(-alpha)) + (1 - p) * (log_not_p - math.log(alpha))
    metrics = pairwise_metrics(margin, policy_w, policy_l, ref_w, ref_l)
    return per_pair.mean(), {**metrics, "mean_p": p.detach().mean(), "target_p": margin.new_tensor(1 - alpha)}

"""MaPO's loss: reference-free, the winner's denoising loss plus a margin on the policy's own errors."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_pref.errors import ConfigError
from lightning_pref.losses.common import margin_metrics


def check_mapo_options(error_scale: float, margin_scale: float | None) -> None:
    """Raise a ``ConfigError`` unless ``s`` (``error_scale``) and ``T`` (``margin_scale``; ``None``: chosen by
    the method) are positive.

    Example:
        >>> from lightning_pref.losses import check_mapo_options
        >>> check_mapo_options(0.5, None)   # the defaults: nothing happens
    """
    if error_scale <= 0 or (margin_scale is not None and margin_scale <= 0):
        raise ConfigError(f"error_scale={error_scale}, margin_scale={margin_scale}: use positive values.")


def bounded_likelihood(error: Tensor, error_scale: float = 0.5) -> Tensor:
    """MaPO's score of a sample, ``f(e) = s e / (exp(s e) - 1)``: 1 at zero error, falling to 0 as it grows.

    The official code's (bounded) stand-in for the log-odds of the likelihood ``exp(-s e)``; exact and
    differentiable at ``e = 0`` (a series there).

    Args:
        error: per-sample errors, any shape.
        error_scale: ``s``, positive.

    Returns:
        ``f(error)``, of ``error``'s shape.

    Example:
        >>> import torch
        >>> from lightning_pref.losses import bounded_likelihood
        >>> bounded_likelihood(torch.tensor([0.0, 2.0]), error_scale=1.0)   # 1, then 2 / (e^2 - 1)
        tensor([1.0000, 0.3130])
    """
    x = error_scale * error
    small = x.abs() < 1e-4
    safe = torch.where(small, torch.ones_like(x), x)
    return torch.where(small, 1 - x / 2 + x * x / 12, safe / torch.expm1(safe))


def mapo_loss(
    policy_w: Tensor,
    policy_l: Tensor,
    beta: float = 0.1,
    error_scale: float = 0.5,
    margin_scale: float = 1000.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """MaPO ``[code]`` (Hong et al., arXiv 2406.06424; the official mapo-t2i/mapo code, ``utils.compute_loss``),
    METHODS.md "Beyond the seeds".

    Reference-free: the winner's denoising loss plus a margin term on the policy's errors alone,

    ``L = mean(err_theta(w)) - beta * mean(log sigmoid(T * (f(err_theta(w)) - f(err_theta(l)))))``,

    with ``f`` of [`bounded_likelihood`][lightning_pref.losses.bounded_likelihood] (``s`` = ``error_scale``,
    ``snr_value`` in the official code, 0.5) and ``T = margin_scale`` (the number of training timesteps in the
    official code, 1000). ``error_scale`` and ``margin_scale`` are checked once, by
    [`check_mapo_options`][lightning_pref.losses.check_mapo_options] (the method's constructor calls it), not
    on every call.

    Args:
        policy_w, policy_l: per-sample errors of the policy, each ``(B,)``.
        beta: the margin term's weight ``beta_m`` (0.1; *not* Diffusion-DPO's units).
        error_scale: ``s``.
        margin_scale: ``T``.

    Returns:
        The loss; [`margin_metrics`][lightning_pref.losses.margin_metrics] of ``T (f_w - f_l)`` plus
        ``policy_mse``, ``winner_mse``, ``loser_mse``, ``sft_loss`` and ``margin_loss`` (the two terms of ``L``).

    Example:
        >>> import torch
        >>> from lightning_pref.losses import mapo_loss
        >>> loss, metrics = mapo_loss(torch.tensor([0.2]), torch.tensor([0.2]))   # a tie: 0.2 + 0.1 log 2
        >>> round(loss.item(), 4), metrics["implicit_acc"].item()
        (0.2693, 0.5)
    """
    margin = margin_scale * (bounded_likelihood(policy_w, error_scale) - bounded_likelihood(policy_l, error_scale))
    sft_loss = policy_w.mean()
    margin_loss = -beta * F.logsigmoid(margin).mean()
    return sft_loss + margin_loss, {
        **margin_metrics(margin),
        "policy_mse": torch.cat([policy_w, policy_l]).detach().mean(),
        "winner_mse": policy_w.detach().mean(),
        "loser_mse": policy_l.detach().mean(),
        "sft_loss": sft_loss.detach(),
        "margin_loss": margin_loss.detach(),
    }

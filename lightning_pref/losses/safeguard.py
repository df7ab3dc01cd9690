"""The loser-gradient safeguard (Diffusion-SDPO, Fu et al., arXiv 2511.03317): a plug-in for any pairwise loss.

The base module's ``loser_safeguard`` option
([`PreferenceDiffusionModule`][lightning_pref.methods.base.PreferenceDiffusionModule]) scales the gradient of
the loser's error by [`loser_gradient_scale`][lightning_pref.losses.loser_gradient_scale] with
[`scale_gradient`][lightning_pref.losses.scale_gradient]; the loss value is unchanged.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from lightning_pref.errors import ConfigError

SafeguardScope = Literal["batch", "pair"]


def check_safeguard_options(mu: float, scope: str) -> None:
    """Raise a ``ConfigError`` for a safeguard margin or scope out of range.

    Example:
        >>> from lightning_pref.losses import check_safeguard_options
        >>> check_safeguard_options(0.9, "sample")
        Traceback (most recent call last):
        lightning_pref.errors.ConfigError: safeguard_scope='sample': choose 'batch' (the official code) or 'pair'.
    """
    if not 0.0 <= mu <= 1.0:
        raise ConfigError(f"safeguard_mu={mu}: use a value in [0, 1] (0.9 in the authors' scripts).")
    if scope not in ("batch", "pair"):
        raise ConfigError(f"safeguard_scope={scope!r}: choose 'batch' (the official code) or 'pair'.")


def loser_gradient_scale(
    residual_w: Tensor,
    residual_l: Tensor,
    mu: float = 0.9,
    scope: SafeguardScope = "batch",
    sample_weight: Tensor | None = None,
) -> Tensor:
    """The loser-gradient safeguard's ``lambda`` ``[code]`` (Diffusion-SDPO, Fu et al., arXiv 2511.03317).

    ``g_w``, ``g_l`` are the gradients of the winner's and the loser's denoising error with respect to the
    model *output* (``2 (prediction - target) / N``, times the process's error weight). Scaling the loser
    branch's gradient by

    ``lambda = clamp((1 - mu) |g_w|^2 / (g_l . g_w), 0, 1)`` if ``g_l . g_w > 0``, else 1,

    keeps the winner's error from rising to first order (output-space approximation: winner and loser outputs
    share coordinates): the update moves the output by ``-eta c (g_w - lambda g_l)``, which changes the
    winner's error by ``-eta c (|g_w|^2 - lambda g_l . g_w) <= -eta c mu |g_w|^2 <= 0``. ``mu`` and ``scope``
    are checked once, by [`check_safeguard_options`][lightning_pref.losses.check_safeguard_options] (the base
    module's constructor calls it), not on every call.

    Args:
        residual_w, residual_l: ``prediction - target`` of winners and losers, ``(B, ...)``.
        mu: safety margin in [0, 1] (0.9 in the authors' scripts).
        scope: ``batch`` (the official code: one lambda from the batch-mean errors, as the sums over the whole
            micro-batch) or ``pair`` (one lambda per pair; the guarantee then holds pair by pair, for any
            positive per-pair loss weights).
        sample_weight: the process's per-pair error weight (min-SNR etc.), ``(B,)``; ``None`` for 1.

    Returns:
        ``lambda`` per pair, ``(B,)``, detached (all equal under ``batch``).

    Example:
        >>> import torch
        >>> from lightning_pref.losses import loser_gradient_scale
        >>> loser_gradient_scale(torch.tensor([[1.0, 0.0]]), torch.tensor([[2.0, 0.0]]), mu=0.5)   # 0.5 * 1 / 2
        tensor([0.2500])
    """
    g_w, g_l = residual_w.detach().flatten(1).float(), residual_l.detach().flatten(1).float()
    if sample_weight is not None:
        weight = sample_weight.detach().float().to(g_w.device).unsqueeze(1)
        g_w, g_l = g_w * weight, g_l * weight
    dims = (1,) if scope == "pair" else (0, 1)
    winner_norm, alignment = (g_w * g_w).sum(dims), (g_l * g_w).sum(dims)
    scale = torch.where(alignment > 0, (1 - mu) * winner_norm / alignment, torch.ones_like(alignment))
    return scale.clamp(0, 1).expand(g_w.shape[0]).clone()


def scale_gradient(value: Tensor, scale: Tensor) -> Tensor:
    """``value`` in the forward pass; its gradient multiplied by ``scale`` (broadcast) in the backward pass.

    Args:
        value: any tensor.
        scale: broadcastable to ``value``; detached here.

    Returns:
        A tensor equal to ``value``.

    Example:
        >>> import torch
        >>> from lightning_pref.losses import scale_gradient
        >>> x = torch.tensor([2.0], requires_grad=True)
        >>> (scale_gradient(x, torch.tensor([0.5])) ** 2).sum().backward(); x.grad   # 0.5 * 2x
        tensor([2.])
    """
    return value.detach() + scale.detach() * (value - value.detach())

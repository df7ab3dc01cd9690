"""Diffusion-KTO's loss: alignment from per-sample good/bad labels, no pairs needed."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_pref.errors import ConfigError
from lightning_pref.losses.common import win_fraction


def check_kto_weights(desirable_weight: float, undesirable_weight: float) -> None:
    """Raise a ``ConfigError`` for a negative label weight ``w_y``.

    Example:
        >>> from lightning_pref.losses import check_kto_weights
        >>> check_kto_weights(1.0, -1.0)
        Traceback (most recent call last):
        lightning_pref.errors.ConfigError: desirable_weight=1.0, undesirable_weight=-1.0: use weights >= 0.
    """
    if desirable_weight < 0 or undesirable_weight < 0:
        raise ConfigError(
            f"desirable_weight={desirable_weight}, undesirable_weight={undesirable_weight}: use weights >= 0."
        )


def kto_loss(
    policy: Tensor,
    reference: Tensor,
    desirable: Tensor,
    beta: float,
    reference_point: Tensor | None = None,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Diffusion-KTO ``[code]`` (Li et al., arXiv 2404.04465), METHODS.md "Beyond the seeds".

    Unpaired: each sample carries its own label. With the implicit reward ``g = err_ref - err_theta`` and the
    reference point ``z = clamp(mean(g), 0)`` (detached; averaged over all ranks by the module):

    ``L = mean_samples( w_y * (1 - sigmoid(s_y * beta * (g - z))) )``, ``s_y = +1`` desirable, ``-1`` undesirable.

    The weights are checked once, by [`check_kto_weights`][lightning_pref.losses.check_kto_weights] (the
    method's constructor calls it), not on every call.

    Args:
        policy, reference: per-sample errors ``err_theta``, ``err_ref``, ``(N,)``.
        desirable: labels, ``(N,)`` bool (or 0/1).
        beta: 1000 in the official code (no 0.5 factor).
        reference_point: ``z``; ``None`` computes it from this batch.
        desirable_weight, undesirable_weight: ``w_y`` (both 1 in the official code).

    Returns:
        The loss and ``reference_point``, ``kto_acc`` (fraction with ``s_y (g - z) > 0``, ties one half:
        [`win_fraction`][lightning_pref.losses.win_fraction]), ``policy_mse``, ``reference_mse``, and
        ``desirable_reward`` / ``undesirable_reward`` (mean ``g`` per label, for the labels present).

    Example:
        >>> import torch
        >>> from lightning_pref.losses import kto_loss
        >>> loss, metrics = kto_loss(torch.tensor([0.1, 0.3]), torch.tensor([0.2, 0.2]), torch.tensor([True, False]), beta=10.0)
        >>> round(loss.item(), 4), metrics["reference_point"].item()   # g = [0.1, -0.1], z = 0: 1 - sigmoid(1)
        (0.2689, 0.0)
    """
    desirable = desirable.bool()
    reward = reference - policy
    if reference_point is None:
        reference_point = reward.detach().mean().clamp(min=0)
    sign = desirable.float() * 2 - 1
    logit = sign * beta * (reward - reference_point.detach())
    weight = torch.where(desirable, desirable_weight, undesirable_weight)
    loss = (weight * (1 - torch.sigmoid(logit))).mean()
    reward = reward.detach()
    metrics = {
        "reference_point": reference_point.detach(),
        "kto_acc": win_fraction(logit.detach()),
        "policy_mse": policy.detach().mean(),
        "reference_mse": reference.detach().mean(),
    }
    for name, chosen in (("desirable_reward", desirable), ("undesirable_reward", ~desirable)):
        if chosen.any():  # a batch may hold one label only
            metrics[name] = reward[chosen].mean()
    return loss, metrics

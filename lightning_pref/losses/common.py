"""What every pairwise loss shares: the implicit reward margin, the loss of a margin, and the logged metrics.

Notation (METHODS.md, "Shared notation"): for ``B`` pairs, each pair sharing one timestep and one noise draw,
``policy_w``, ``policy_l`` are the policy's per-sample errors ``err_theta`` of winner and loser and ``ref_w``,
``ref_l`` the frozen reference's on the same noisy inputs, each of shape ``(B,)``. Then
``D_theta = policy_w - policy_l``, ``D_ref = ref_w - ref_l`` and the implicit reward margin is
``u = -(beta / 2) * (D_theta - D_ref)``.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_pref.errors import ConfigError

PreferenceLossKind = Literal["sigmoid", "hinge", "ipo"]


def implicit_reward_margin(policy_w: Tensor, policy_l: Tensor, ref_w: Tensor, ref_l: Tensor, beta: float) -> Tensor:
    """Diffusion-DPO's inside term ``u = -(beta/2) * ((policy_w - policy_l) - (ref_w - ref_l))`` ``[paper]`` ``[code]``.

    Wallace et al. 2024 (arXiv 2311.12908), Eq. 14, with the ``T * omega(lambda_t)`` factor folded into
    ``beta`` as in the official code.

    Args:
        policy_w, policy_l, ref_w, ref_l: per-sample errors, each of shape ``(B,)``.
        beta: KL strength, in the official code's units.

    Returns:
        ``u``, shape ``(B,)``: positive where the policy prefers the winner more than the reference does.

    Example:
        >>> import torch
        >>> from lightning_pref.losses import implicit_reward_margin
        >>> errors = torch.tensor([0.1]), torch.tensor([0.3]), torch.tensor([0.2]), torch.tensor([0.2])
        >>> implicit_reward_margin(*errors, beta=10.0)   # -5 * (-0.2 - 0)
        tensor([1.0000])
    """
    return -0.5 * beta * ((policy_w - policy_l) - (ref_w - ref_l))


def check_preference_loss_options(kind: str, label_smoothing: float = 0.0) -> None:
    """Raise a ``ConfigError`` for an unknown loss kind or a label smoothing it cannot take: the options of
    [`preference_loss`][lightning_pref.losses.preference_loss].

    Example:
        >>> from lightning_pref.losses import check_preference_loss_options
        >>> check_preference_loss_options("hinge", label_smoothing=0.1)
        Traceback (most recent call last):
        lightning_pref.errors.ConfigError: label_smoothing applies to loss kind 'sigmoid' only, not 'hinge'.
    """
    if kind not in ("sigmoid", "hinge", "ipo"):
        raise ConfigError(f"Unknown preference loss kind {kind!r}: choose one of 'sigmoid', 'hinge', 'ipo'.")
    if not 0.0 <= label_smoothing < 0.5:
        raise ConfigError(f"label_smoothing={label_smoothing}: use a value in [0, 0.5).")
    if label_smoothing and kind != "sigmoid":
        raise ConfigError(f"label_smoothing applies to loss kind 'sigmoid' only, not {kind!r}.")


def preference_loss(
    margin: Tensor,
    beta: float,
    kind: PreferenceLossKind = "sigmoid",
    label_smoothing: float = 0.0,
) -> Tensor:
    """Per-pair loss of an implicit reward margin ``u``.

    * ``sigmoid`` (Diffusion-DPO, Eq. 14): ``-log sigmoid(u)``; with ``label_smoothing = e`` the
      conservative form (cDPO) ``-(1 - e) log sigmoid(u) - e log sigmoid(-u)``.
    * ``hinge`` (SLiC): ``relu(1 - u)``.
    * ``ipo`` (Azar et al. 2023): ``(u / beta - 1 / (2 beta))^2``, the squared distance of the
      log-likelihood-ratio margin ``u / beta`` from ``1 / (2 beta)``.

    The options are checked once, by
    [`check_preference_loss_options`][lightning_pref.losses.check_preference_loss_options] (the method's
    constructor calls it), not on every call.

    Args:
        margin: ``u``, shape ``(B,)``.
        beta: KL strength (used by ``ipo`` only).
        kind: ``sigmoid``, ``hinge`` or ``ipo``.
        label_smoothing: cDPO's assumed label-noise rate in ``[0, 0.5)``, ``sigmoid`` only.

    Returns:
        The loss of each pair, shape ``(B,)``.

    Example:
        >>> import torch
        >>> from lightning_pref.losses import preference_loss
        >>> preference_loss(torch.tensor([0.0]), beta=1.0)   # log 2
        tensor([0.6931])
    """
    if kind == "sigmoid":
        return -(1 - label_smoothing) * F.logsigmoid(margin) - label_smoothing * F.logsigmoid(-margin)
    if kind == "hinge":
        return F.relu(1 - margin)
    return (margin / beta - 1 / (2 * beta)) ** 2


def win_terms(score: Tensor, other: Tensor | float = 0.0) -> Tensor:
    """Per element, 1 where ``score > other``, 1/2 on a tie, else 0: the terms
    [`win_fraction`][lightning_pref.losses.win_fraction] averages (kept apart to be averaged across ranks)."""
    return (score > other).float() + 0.5 * (score == other).float()


def win_fraction(score: Tensor, other: Tensor | float = 0.0) -> Tensor:
    """The fraction of ``score > other``, ties (``score == other``) counting one half.

    The one accuracy of the library: ``implicit_acc`` (margins against 0), Diffusion-KTO's ``kto_acc`` and
    the toy evaluation's win rate of tuned over base rewards.

    Args:
        score: one number per pair or sample, shape ``(N,)``.
        other: what ``score`` is compared with: a number (0, the sign of a margin) or a tensor of ``score``'s shape.

    Returns:
        A scalar in ``[0, 1]``, without gradient.

    Example:
        >>> import torch
        >>> from lightning_pref.losses import win_fraction
        >>> win_fraction(torch.tensor([2.0, 0.0, -1.0, 3.0]))   # (1 + 1/2 + 0 + 1) / 4
        tensor(0.6250)
    """
    return win_terms(score, other).mean()


def margin_metrics(margin: Tensor) -> dict[str, Tensor]:
    """``implicit_acc`` ([`win_fraction`][lightning_pref.losses.win_fraction] of ``u``: the fraction of
    ``u > 0``, ties count one half) and ``reward_margin`` (mean ``u``), detached scalars.

    Args:
        margin: ``u``, shape ``(B,)``.

    Returns:
        ``{"implicit_acc": ..., "reward_margin": ...}``.

    Example:
        >>> import torch
        >>> from lightning_pref.losses import margin_metrics
        >>> margin_metrics(torch.tensor([1.0, 0.0, -0.5, 2.0]))
        {'implicit_acc': tensor(0.6250), 'reward_margin': tensor(0.6250)}
    """
    margin = margin.detach()
    return {"implicit_acc": win_fraction(margin), "reward_margin": margin.mean()}


def error_metrics(policy_w: Tensor, policy_l: Tensor, ref_w: Tensor, ref_l: Tensor) -> dict[str, Tensor]:
    """The error half of [`pairwise_metrics`][lightning_pref.losses.pairwise_metrics], detached scalars.

    ``policy_mse`` and ``reference_mse`` (over winners and losers), and ``winner_error_change`` and
    ``loser_error_change``, ``mean(err_theta - err_ref)`` per branch: both rising at once means the policy is
    getting worse at everything while the margin improves.

    Args:
        policy_w, policy_l, ref_w, ref_l: per-sample errors, each of shape ``(B,)``.

    Returns:
        The four metrics by name.

    Example:
        >>> import torch
        >>> from lightning_pref.losses import error_metrics
        >>> errors = torch.tensor([0.1]), torch.tensor([0.3]), torch.tensor([0.2]), torch.tensor([0.2])
        >>> {name: round(value.item(), 4) for name, value in error_metrics(*errors).items()}
        {'policy_mse': 0.2, 'reference_mse': 0.2, 'winner_error_change': -0.1, 'loser_error_change': 0.1}
    """
    return {
        "policy_mse": torch.cat([policy_w, policy_l]).detach().mean(),
        "reference_mse": torch.cat([ref_w, ref_l]).detach().mean(),
        "winner_error_change": (policy_w - ref_w).detach().mean(),
        "loser_error_change": (policy_l - ref_l).detach().mean(),
    }


def pairwise_metrics(
    margin: Tensor, policy_w: Tensor, policy_l: Tensor, ref_w: Tensor, ref_l: Tensor
) -> dict[str, Tensor]:
    """The metrics every pairwise method logs: [`margin_metrics`][lightning_pref.losses.margin_metrics] of
    ``u`` and [`error_metrics`][lightning_pref.losses.error_metrics] of the errors (all detached scalars).

    Args:
        margin: ``u``, shape ``(B,)``.
        policy_w, policy_l, ref_w, ref_l: per-sample errors, each of shape ``(B,)``.

    Returns:
        ``implicit_acc``, ``reward_margin``, ``policy_mse``, ``reference_mse``, ``winner_error_change``,
        ``loser_error_change``.

    Example:
        >>> import torch
        >>> from lightning_pref.losses import implicit_reward_margin, pairwise_metrics
        >>> errors = torch.tensor([0.1]), torch.tensor([0.3]), torch.tensor([0.2]), torch.tensor([0.2])
        >>> metrics = pairwise_metrics(implicit_reward_margin(*errors, beta=10.0), *errors)
        >>> len(metrics), metrics["implicit_acc"].item(), round(metrics["winner_error_change"].item(), 4)
        (6, 1.0, -0.1)
    """
    return {**margin_metrics(margin), **error_metrics(policy_w, policy_l, ref_w, ref_l)}

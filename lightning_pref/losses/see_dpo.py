"""SEE-DPO's self-entropy regulariser, as shifted reference errors that every pairwise loss accepts unchanged."""

from __future__ import annotations

from torch import Tensor

from lightning_pref.errors import ConfigError


def check_entropy_gamma(gamma: float) -> None:
    """Raise a ``ConfigError`` unless SEE-DPO's ``gamma`` is non-negative (0 turns the regulariser off).

    Example:
        >>> from lightning_pref.losses import check_entropy_gamma
        >>> check_entropy_gamma(-1.0)
        Traceback (most recent call last):
        lightning_pref.errors.ConfigError: entropy_gamma=-1.0: use gamma >= 0 (gamma / beta in 0.05..0.5 to start; 0 = off).
    """
    if gamma < 0:
        raise ConfigError(f"entropy_gamma={gamma}: use gamma >= 0 (gamma / beta in 0.05..0.5 to start; 0 = off).")


def entropy_regularized_reference(
    policy_w: Tensor, policy_l: Tensor, ref_w: Tensor, ref_l: Tensor, beta: float, gamma: float
) -> tuple[Tensor, Tensor]:
    """SEE-DPO's self-entropy regulariser as reference errors ``[secondary]`` ``[reconstructed]`` (Shekhar et al.,
    TMLR 2025, arXiv 2411.04712), METHODS.md section 7.

    The objective ``E[r] - beta KL(p || p_ref) + gamma H(p)`` turns the margin into
    ``u_SEE = -(1/2) [(beta + gamma) D_theta - beta D_ref] = u - (gamma/2) D_theta``. Every pairwise loss
    gets that margin, unchanged in code, from the shifted reference errors returned here,
    ``err_ref' = err_ref - (gamma / beta) err_theta`` (they carry the policy's gradient). In SDPO's
    weighted margin the shift makes the entropy term importance-weighted too. ``gamma`` is checked once, by
    [`check_entropy_gamma`][lightning_pref.losses.check_entropy_gamma] (the base module's constructor calls
    it), not on every call.

    Args:
        policy_w, policy_l, ref_w, ref_l: per-sample errors, each ``(B,)``.
        beta: the KL strength of the loss the errors go to.
        gamma: the entropy weight, ``>= 0``, in ``beta``'s units.

    Returns:
        The shifted reference errors ``(ref_w', ref_l')``, each ``(B,)``.

    Example:
        >>> import torch
        >>> from lightning_pref.losses import entropy_regularized_reference, implicit_reward_margin
        >>> policy_w, policy_l, ref_w, ref_l = torch.tensor([[0.1], [0.3], [0.2], [0.2]])
        >>> shifted = entropy_regularized_reference(policy_w, policy_l, ref_w, ref_l, beta=10.0, gamma=5.0)
        >>> implicit_reward_margin(policy_w, policy_l, *shifted, beta=10.0)   # 1 - 2.5 * (-0.2)
        tensor([1.5000])
    """
    ratio = gamma / beta
    return ref_w - ratio * policy_w, ref_l - ratio * policy_l

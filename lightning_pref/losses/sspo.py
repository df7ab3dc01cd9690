"""SSPO's Self-Sampling Regularization (Zhang et al., arXiv 2410.05255, v1 "SePPO"), METHODS.md section 9.

``[secondary]``: read from summaries of the paper, not from its code; every detail they leave open
(``mode``, ``sft_branch``) is an option.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_pref.errors import ConfigError
from lightning_pref.losses.common import pairwise_metrics

SwitchMode = Literal["switch", "sign"]
SftBranch = Literal["anchored", "mse"]


def check_sspo_options(mode: str, sft_branch: str) -> None:
    """Raise a ``ConfigError`` for options [`sspo_loss`][lightning_pref.losses.sspo.sspo_loss] cannot take.

    Example:
        >>> from lightning_pref.losses.sspo import check_sspo_options
        >>> check_sspo_options("sign", "mse")
        Traceback (most recent call last):
        lightning_pref.errors.ConfigError: sft_branch='mse' applies to mode 'switch' only: mode 'sign' trains every sample on the reference-anchored term (use sft_branch='anchored').
    """
    if mode not in ("switch", "sign"):
        raise ConfigError(f"mode={mode!r}: choose 'switch' (the default) or 'sign' (SePPO v1).")
    if sft_branch not in ("anchored", "mse"):
        raise ConfigError(f"sft_branch={sft_branch!r}: choose 'anchored' (the default) or 'mse'.")
    if sft_branch == "mse" and mode != "switch":
        raise ConfigError(
            "sft_branch='mse' applies to mode 'switch' only: mode 'sign' trains every sample on the "
            "reference-anchored term (use sft_branch='anchored')."
        )


def sspo_loss(
    policy_w: Tensor,
    policy_ref: Tensor,
    ref_w: Tensor,
    ref_ref: Tensor,
    beta: float,
    mode: SwitchMode = "switch",
    sft_branch: SftBranch = "anchored",
) -> tuple[Tensor, dict[str, Tensor]]:
    """Self-Sampling Regularization ``[secondary]`` (SSPO, arXiv 2410.05255), METHODS.md section 9.

    For a winner ``w`` from the data and the reference sample ``x_ref`` the reference (a replayed snapshot)
    generated for its prompt, sharing one timestep and noise:

    * ``Delta_w = err_theta(w) - err_ref(w)`` and ``Delta_ref = err_theta(x_ref) - err_ref(x_ref)``;
    * ``Delta_w > 0`` (the snapshot denoises the winner better than the policy) presumes ``x_ref`` a winner too:
      the sample is *switched*;
    * ``L = -log sigmoid(u)``, ``u = -(beta/2) (Delta_w - s Delta_ref)``, with

      * ``mode="switch"`` (default): ``s = 1[Delta_w <= 0]``: Diffusion-DPO with ``x_ref`` as the loser, and for
        a switched sample (``s = 0``) the reference-anchored SFT-like term ``-log sigmoid(-(beta/2) Delta_w)``,
        or with ``sft_branch="mse"`` plain ``err_theta(w)`` instead;
      * ``mode="sign"`` (SePPO v1): ``s = +1`` if ``Delta_w <= 0``, ``-1`` if switched (both errors pushed down).

    The mean over samples. ``sft_branch="mse"`` puts ``err_theta(w)`` (weight 1) beside terms whose gradient is
    about ``beta / 4`` per unit error: its scale is a guess of this library. Options are checked once, by
    [`check_sspo_options`][lightning_pref.losses.sspo.check_sspo_options].

    Args:
        policy_w, policy_ref, ref_w, ref_ref: per-sample errors of the policy and the reference on the winners and
            on the reference samples, each ``(B,)``.
        beta: KL strength, in Diffusion-DPO's units.
        mode: ``switch`` or ``sign``.
        sft_branch: ``anchored`` or ``mse`` (``switch`` only).

    Returns:
        The scalar loss; [`pairwise_metrics`][lightning_pref.losses.pairwise_metrics] of ``u`` (the reference samples
        in the losers' place) and ``switched_fraction``, the fraction of samples with ``Delta_w > 0`` (switched to
        the SFT term in ``switch`` mode, given ``s = -1`` in ``sign`` mode).

    Example:
        >>> import torch
        >>> from lightning_pref.losses.sspo import sspo_loss
        >>> policy_w, policy_ref = torch.tensor([0.1, 0.3]), torch.tensor([0.3, 0.2])
        >>> ref_w, ref_ref = torch.tensor([0.2, 0.2]), torch.tensor([0.2, 0.4])
        >>> loss, metrics = sspo_loss(policy_w, policy_ref, ref_w, ref_ref, beta=10.0)
        >>> metrics["switched_fraction"].item()   # Delta_w = (-0.1, +0.1): the second sample is switched
        0.5
        >>> round(metrics["reward_margin"].item(), 4)   # u = -5 (-0.1 - 0.1) = 1 and -5 (0.1 - 0 * -0.2) = -0.5
        0.25
    """
    delta_w, delta_ref = policy_w - ref_w, policy_ref - ref_ref
    switched = delta_w > 0
    if mode == "switch":
        s = (~switched).to(delta_w.dtype)
    else:
        s = torch.where(switched, -1.0, 1.0).to(delta_w.dtype)
    margin = -0.5 * beta * (delta_w - s * delta_ref)
    losses = -F.logsigmoid(margin)
    if sft_branch == "mse":
        losses = torch.where(switched, policy_w, losses)
    metrics = pairwise_metrics(margin, policy_w, policy_ref, ref_w, ref_ref)
    return losses.mean(), {**metrics, "switched_fraction": switched.float().mean()}

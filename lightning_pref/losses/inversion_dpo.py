"""Inversion-DPO's loss (Li et al., ACM MM 2025, arXiv 2507.11554): a DPO margin over the steps of a DDIM inversion.

METHODS.md section 4, ``[code]`` (the authors' ``train_ddim.py``). Each pair is compared on ``K`` steps of the
reference's DDIM inversion of its winner and of its loser (all ``N`` steps in the released code), and the steps are
weighted by ``1 / (2 abar_t)``, the weight of the released code (from 0.5 at ``t = 0`` to about 59 at ``t = 948`` on
SD's schedule: the noisiest steps dominate).
"""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from torch import Tensor

from lightning_pref.errors import ConfigError
from lightning_pref.losses.common import pairwise_metrics

InversionSign = Literal["dpo", "code"]


def check_inversion_sign(sign: str) -> None:
    """Raise a ``ConfigError`` for a ``sign`` that
    [`inversion_dpo_loss`][lightning_pref.losses.inversion_dpo.inversion_dpo_loss] does not know.

    Example:
        >>> from lightning_pref.losses.inversion_dpo import check_inversion_sign
        >>> check_inversion_sign("paper")
        Traceback (most recent call last):
        lightning_pref.errors.ConfigError: sign='paper': choose 'dpo' (Diffusion-DPO's) or 'code' (the released code's).
    """
    if sign not in ("dpo", "code"):
        raise ConfigError(f"sign={sign!r}: choose 'dpo' (Diffusion-DPO's) or 'code' (the released code's).")


def inversion_dpo_loss(
    policy_w: Tensor,
    policy_l: Tensor,
    ref_w: Tensor,
    ref_l: Tensor,
    alphas_cumprod: Tensor,
    beta: float,
    sign: InversionSign = "dpo",
) -> tuple[Tensor, dict[str, Tensor]]:
    """Inversion-DPO ``[code]`` (Li et al., ACM MM 2025, arXiv 2507.11554; METHODS.md section 4).

    With the errors of pair ``b`` at its ``K`` inversion steps ``k`` (timestep ``t_k``):

        D_b = (1 / K) sum_k (1 / (2 abar_{t_k})) [(policy_w - ref_w) - (policy_l - ref_l)]_{b,k}

    * ``sign="dpo"``: ``L = -log sigmoid(-(beta/2) D)``, Diffusion-DPO's sign (Wallace et al. 2024, Eq. 14): with
      ``K = 1`` and ``abar = 1/2`` it is [`diffusion_dpo_loss`][lightning_pref.losses.diffusion_dpo_loss];
    * ``sign="code"``: ``L = -log sigmoid(+(beta/2) D)``, the released code (``inside_term = 0.5 * diff *
      beta_dpo``, ``loss = -logsigmoid(inside_term)``), where the errors are ``|e_theta - e_ref|^2`` against the
      reference's own inversion noise and the reference errors are 0.

    The margin ``u`` is the sigmoid's argument, so ``implicit_acc`` is the fraction of pairs the loss already
    favours, as the released code logs it. ``sign`` is checked once, by
    [`check_inversion_sign`][lightning_pref.losses.inversion_dpo.check_inversion_sign].

    Args:
        policy_w, policy_l, ref_w, ref_l: per-sample errors at each trained step, each ``(B, K)``.
        alphas_cumprod: ``abar_t`` of each pair's trained steps, ``(B, K)``.
        beta: KL strength in the released code's units (``beta_dpo``; 2000 in its SDXL script).
        sign: ``dpo`` or ``code``.

    Returns:
        The scalar loss and the metrics of [`pairwise_metrics`][lightning_pref.losses.pairwise_metrics] (the error
        metrics averaged over pairs and steps, unweighted).

    Example:
        >>> import torch
        >>> from lightning_pref.losses.inversion_dpo import inversion_dpo_loss
        >>> policy_w, policy_l = torch.tensor([[0.1, 0.3]]), torch.tensor([[0.2, 0.2]])
        >>> zeros, abar = torch.zeros(1, 2), torch.tensor([[0.5, 0.25]])   # step weights 1 and 2: D = 0.05
        >>> loss, metrics = inversion_dpo_loss(policy_w, policy_l, zeros, zeros, abar, beta=20.0, sign="code")
        >>> round(loss.item(), 4), round(metrics["reward_margin"].item(), 4)   # u = +10 * 0.05
        (0.4741, 0.5)
        >>> round(inversion_dpo_loss(policy_w, policy_l, zeros, zeros, abar, beta=20.0)[0].item(), 4)   # u = -0.5
        0.9741
    """
    step_weight = 1 / (2 * alphas_cumprod.float())
    difference = (step_weight * ((policy_w - ref_w) - (policy_l - ref_l))).mean(1)
    margin = (0.5 if sign == "code" else -0.5) * beta * difference
    loss = -F.logsigmoid(margin).mean()
    return loss, pairwise_metrics(margin, policy_w.flatten(), policy_l.flatten(), ref_w.flatten(), ref_l.flatten())

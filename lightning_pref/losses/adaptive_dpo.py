"""Adaptive-DPO's minority-aware loss (Zhang et al., arXiv 2503.16921), METHODS.md section 5 ``[code]``.

Several "annotators", the policy and EMAs of it, each give their implicit logit ``h_m = D_ref - D_m`` on a pair.
Pairs on whose label they agree with little confidence or stability score a high minority metric ``u_min``.
Those pairs get a low weight and a lower margin in a DPO loss. All of it follows the authors' released
training script (``dpo_train_un.py``); where this library departs from it, the docstring says so.

Units: the logit is ``beta * h`` with **no 0.5 factor**, so Adaptive-DPO's ``beta`` (1000 in its recipe) is half
of this library's Diffusion-DPO ``beta`` for the same sharpness. ``beta = 1000`` here is Diffusion-DPO's
``beta = 2000``, the SD1.5 paper value, and the logged ``reward_margin`` is ``beta * h``.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_pref.errors import ConfigError, DataError
from lightning_pref.losses.common import implicit_reward_margin, pairwise_metrics

WeightKind = Literal["linear", "quadratic"]
MarginKind = Literal["quadratic", "linear", "none"]
AdaptiveLossKind = Literal["sigmoid", "ipo"]


def check_adaptive_dpo_options(
    rho: float = 15.0,
    weight_intercept: float = 1.0,
    weight_scale: float = 10.0,
    weighting: str = "linear",
    margin: str = "quadratic",
    loss_type: str = "sigmoid",
    ipo_beta: float = 100.0,
) -> None:
    """Raise a ``ConfigError`` naming the first option of
    [`adaptive_dpo_loss`][lightning_pref.losses.adaptive_dpo.adaptive_dpo_loss] it cannot take.

    Example:
        >>> from lightning_pref.losses.adaptive_dpo import check_adaptive_dpo_options
        >>> check_adaptive_dpo_options(rho=0.0)
        Traceback (most recent call last):
        lightning_pref.errors.ConfigError: rho=0.0: use a number > 0 (15 in Adaptive-DPO).
    """

    def positive(name: str, value: float, usual: str) -> None:
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ConfigError(f"{name}={value!r}: use a number > 0 ({usual}).")

    positive("rho", rho, "15 in Adaptive-DPO")
    positive(
        "weight_intercept", weight_intercept, "1 in Adaptive-DPO; a pair with u_min = 0 weighs 1 / weight_intercept"
    )
    if not (isinstance(weight_scale, (int, float)) and math.isfinite(weight_scale) and weight_scale >= 0):
        raise ConfigError(
            f"weight_scale={weight_scale!r}: use a number >= 0 (10 in Adaptive-DPO; 0 weighs every pair 1)."
        )
    if weighting not in ("linear", "quadratic"):
        raise ConfigError(f"weighting={weighting!r}: choose 'linear' (Adaptive-DPO's recipe) or 'quadratic'.")
    if margin not in ("quadratic", "linear", "none"):
        raise ConfigError(f"margin={margin!r}: choose 'quadratic' (Adaptive-DPO's recipe), 'linear' or 'none'.")
    if loss_type not in ("sigmoid", "ipo"):
        raise ConfigError(f"loss_type={loss_type!r}: choose 'sigmoid' (Adaptive-DPO's recipe) or 'ipo'.")
    positive("ipo_beta", ipo_beta, "100 in the released code")


class MinorityMetric(NamedTuple):
    """The minority metric of each pair and its two factors, each ``(B,)``, without gradient."""

    u_min: Tensor
    confidence: Tensor
    stability: Tensor


def minority_metric(logits: Tensor, rho: float = 15.0, normalize: bool = True) -> MinorityMetric:
    """Adaptive-DPO's minority metric ``u_min = b * s`` of each pair, from ``M`` annotators' implicit logits
    ``[code]`` (Zhang et al., arXiv 2503.16921; the released ``cal_un_wy_wstd``).

    With ``z_m = rho * h_m`` (``h_m`` first divided by its row's L2 norm over the batch when ``normalize``):

    * confidence ``b = |mean_m sigmoid(z_m) - 1|``: how far the annotators are from agreeing with the label;
    * stability ``s = min(1, std_m(z_m))`` (unbiased std over the annotators): how much they disagree with each other;
    * ``u_min = b * s``.

    An all-zero row (an annotator identical to the reference, e.g. an EMA before its first update) is left at
    zero by the normalisation instead of becoming ``0 / 0`` (NaN) as in the released code.

    Args:
        logits: ``H``, shape ``(M, B)``: annotator ``m``'s ``h_m = D_ref - D_m`` of each pair (``M >= 2``).
        rho: the logit scale ``rho`` (15 with normalisation in the authors' recipe).
        normalize: divide each annotator's row by its L2 norm over the batch (over each process's batch under DDP, as
            the released code does; the batch needs two or more pairs).

    Returns:
        ``MinorityMetric(u_min, confidence, stability)``, each ``(B,)``, detached.

    Example:
        >>> import torch
        >>> from lightning_pref.losses.adaptive_dpo import minority_metric
        >>> logits = torch.tensor([[1.0, -1.0], [1.0, 1.0]])   # two annotators; they disagree on pair 2
        >>> metric = minority_metric(logits, rho=1.0, normalize=False)
        >>> [round(v, 4) for v in metric.u_min.tolist()], [round(v, 4) for v in metric.stability.tolist()]
        ([0.0, 0.5], [0.0, 1.0])
    """
    if logits.ndim != 2 or logits.shape[0] < 2:
        raise DataError(
            f"minority_metric needs the logits of two or more annotators, (M, B); got {tuple(logits.shape)}."
        )
    logits = logits.detach().float()
    if normalize:
        if logits.shape[1] < 2:
            raise DataError(
                "normalize_logits divides each annotator's logits by their norm over the batch, which a batch of one "
                "pair turns into +-1: use two or more pairs per device batch, or set normalize_logits: false."
            )
        norm = logits.norm(dim=1, keepdim=True)
        logits = logits / torch.where(norm > 0, norm, torch.ones_like(norm))
    scaled = rho * logits
    confidence = (torch.sigmoid(scaled).mean(0) - 1).abs()
    stability = scaled.std(0).clamp(max=1.0)
    return MinorityMetric(confidence * stability, confidence, stability)


def minority_weight(u_min: Tensor, intercept: float = 1.0, scale: float = 10.0, kind: WeightKind = "linear") -> Tensor:
    """Adaptive-DPO's per-pair weight ``w = 1 / (c1 + k1 * u_min)`` (``linear``) or ``1 / (c1 + k1 * u_min^2)``
    (``quadratic``) ``[code]``, detached: minority pairs count less.

    Args:
        u_min: the minority metric, ``(B,)``.
        intercept: ``c1`` (1). The weight of a pair with ``u_min = 0`` is ``1 / c1``.
        scale: ``k1`` (10; the released code's ``rewight_temparature``).
        kind: ``linear`` (the authors' recipe) or ``quadratic``.

    Returns:
        ``w``, shape ``(B,)``.

    Example:
        >>> import torch
        >>> from lightning_pref.losses.adaptive_dpo import minority_weight
        >>> minority_weight(torch.tensor([0.0, 0.1, 0.5]))
        tensor([1.0000, 0.5000, 0.1667])
    """
    power = 1 if kind == "linear" else 2
    return (1.0 / (intercept + scale * u_min.detach() ** power)).detach()


def minority_margin(logits: Tensor, u_min: Tensor, beta: float, kind: MarginKind = "quadratic") -> Tensor:
    """Adaptive-DPO's margin ``gamma = mean_B(h) - u_min^2 / beta`` (``quadratic``) or ``mean_B(h) - u_min / beta``
    (``linear``) ``[code]``, detached. ``none`` gives 0.

    ``mean_B(h)`` is the policy's logit averaged over the batch, in ``h``'s units (not ``beta * h``), subtracted
    from the logit ``beta * h`` as in the released code, also while ``u_min`` is 0 in the warm-up.

    Args:
        logits: the policy's ``h = D_ref - D_theta``, ``(B,)``.
        u_min: the minority metric, ``(B,)``.
        beta: Adaptive-DPO's ``beta`` (no 0.5 factor).
        kind: ``quadratic`` (the authors' recipe), ``linear`` or ``none``.

    Returns:
        ``gamma``, shape ``(B,)``.

    Example:
        >>> import torch
        >>> from lightning_pref.losses.adaptive_dpo import minority_margin
        >>> minority_margin(torch.tensor([0.002, 0.004]), torch.tensor([0.0, 0.5]), beta=10.0)   # 0.003 - (0, 0.025)
        tensor([ 0.0030, -0.0220])
    """
    if kind == "none":
        return torch.zeros_like(u_min)
    shrink = u_min**2 if kind == "quadratic" else u_min
    return (logits.detach().mean() - shrink / beta).detach()


def adaptive_dpo_loss(
    policy_w: Tensor,
    policy_l: Tensor,
    ref_w: Tensor,
    ref_l: Tensor,
    annotators_w: Tensor | None = None,
    annotators_l: Tensor | None = None,
    *,
    beta: float = 1000.0,
    rho: float = 15.0,
    normalize: bool = True,
    weight_intercept: float = 1.0,
    weight_scale: float = 10.0,
    weighting: WeightKind = "linear",
    margin: MarginKind = "quadratic",
    loss_type: AdaptiveLossKind = "sigmoid",
    ipo_beta: float = 100.0,
    flipped: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Adaptive-DPO ``[code]`` (Zhang et al., arXiv 2503.16921), METHODS.md section 5.

    With the policy's logit ``h = D_ref - D_theta`` and the other annotators' ``h_m = D_ref - D_m``:

    ``L = mean_B[-w * log sigmoid(beta * h - gamma)]`` (``sigmoid``), or, with ``loss_type="ipo"``,
    ``L = mean_B[w * (h - gamma / beta - 1 / (2 * ipo_beta))^2]``.

    ``u_min`` is the [`minority_metric`][lightning_pref.losses.adaptive_dpo.minority_metric] of
    ``H = [h; h_1; ...]`` (the detached policy first), ``w`` its
    [`minority_weight`][lightning_pref.losses.adaptive_dpo.minority_weight] and ``gamma`` its
    [`minority_margin`][lightning_pref.losses.adaptive_dpo.minority_margin]. Without annotators (the warm-up)
    ``u_min = 0``: ``w = 1 / c1`` and ``gamma = mean_B(h)``. There is no 0.5 factor: ``beta`` is half of this
    library's Diffusion-DPO ``beta``.

    The IPO form regresses the margin-shifted logit ``(beta * h - gamma) / beta`` onto ``1 / (2 * ipo_beta)``, with
    ``ipo_beta`` the released code's separate IPO strength (its ``--beta``, default 100). The released code's IPO
    branch adds the margin with the opposite sign (``h + gamma / beta``); this library shifts both forms the same
    way. Options are checked once, by
    [`check_adaptive_dpo_options`][lightning_pref.losses.adaptive_dpo.check_adaptive_dpo_options].

    Args:
        policy_w, policy_l, ref_w, ref_l: per-sample errors, each ``(B,)``.
        annotators_w, annotators_l: the EMA annotators' errors on the same noisy inputs, each ``(M - 1, B)``;
            ``None`` during the warm-up.
        beta: Adaptive-DPO's ``beta`` (1000 in the authors' SD1.5 recipe, which is Diffusion-DPO's 2000).
        rho, normalize: of [`minority_metric`][lightning_pref.losses.adaptive_dpo.minority_metric].
        weight_intercept, weight_scale, weighting: ``c1``, ``k1`` and the kind of
            [`minority_weight`][lightning_pref.losses.adaptive_dpo.minority_weight].
        margin: the kind of [`minority_margin`][lightning_pref.losses.adaptive_dpo.minority_margin].
        loss_type: ``sigmoid`` (the recipe) or ``ipo``.
        ipo_beta: the IPO form's strength (its target is ``1 / (2 * ipo_beta)``).
        flipped: ``(B,)`` bool, which pairs' labels were flipped (known in synthetic label-noise experiments):
            adds ``weight_flipped`` and ``weight_clean``, the mean weight of each group present in the batch.

    Returns:
        The scalar loss and the metrics: those of [`pairwise_metrics`][lightning_pref.losses.pairwise_metrics]
        (``reward_margin`` is the mean ``beta * h``), ``weight``, ``u_min``, ``gamma`` (means) and, with
        annotators, ``confidence`` and ``stability`` (means).

    Example:
        >>> import torch
        >>> from lightning_pref.losses.adaptive_dpo import adaptive_dpo_loss
        >>> policy_w, policy_l, ref_w, ref_l = torch.tensor([[0.1, 0.3], [0.3, 0.1], [0.2, 0.2], [0.2, 0.2]])
        >>> loss, metrics = adaptive_dpo_loss(policy_w, policy_l, ref_w, ref_l, beta=10.0)   # warm-up: w = 1, gamma = 0
        >>> round(loss.item(), 4), metrics["weight"].item()   # (-log sigmoid(2) - log sigmoid(-2)) / 2
        (1.1269, 1.0)
    """
    logits = (ref_w - ref_l) - (policy_w - policy_l)
    metrics = pairwise_metrics(
        implicit_reward_margin(policy_w, policy_l, ref_w, ref_l, 2 * beta), policy_w, policy_l, ref_w, ref_l
    )
    if annotators_w is None or annotators_l is None:
        u_min = torch.zeros_like(logits.detach())
    else:
        annotator_logits = (ref_w - ref_l).detach() - (annotators_w - annotators_l).detach()
        metric = minority_metric(torch.cat([logits.detach()[None], annotator_logits]), rho, normalize)
        u_min = metric.u_min
        metrics |= {"confidence": metric.confidence.mean(), "stability": metric.stability.mean()}
    weight = minority_weight(u_min, weight_intercept, weight_scale, weighting)
    gamma = minority_margin(logits, u_min, beta, margin)
    if loss_type == "sigmoid":
        losses = -weight * F.logsigmoid(beta * logits - gamma)
    else:
        losses = weight * (logits - gamma / beta - 1 / (2 * ipo_beta)) ** 2
    metrics |= {"weight": weight.mean(), "u_min": u_min.mean(), "gamma": gamma.mean()}
    if flipped is not None:
        flipped = flipped.to(weight.device).bool()
        for name, group in (("weight_flipped", flipped), ("weight_clean", ~flipped)):
            if group.any():
                metrics[name] = weight[group].mean()
    return losses.mean(), metrics

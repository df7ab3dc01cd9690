"""Preference losses as pure functions: per-sample denoising errors in, ``(loss, metrics)`` out.

No Lightning, no models: every function here can be checked by hand on a few numbers.

Notation (METHODS.md, "Shared notation"). For a batch of ``B`` pairs, each pair sharing one timestep and
one noise draw, the four per-sample errors are

* ``policy_w``, ``policy_l``: ``err_theta`` of the winner and the loser, shape ``(B,)``;
* ``ref_w``, ``ref_l``: ``err_ref`` of the same noisy inputs under the frozen reference, shape ``(B,)``;

with ``err = mean over non-batch dims of (prediction - target)^2`` in fp32. Then
``D_theta = policy_w - policy_l``, ``D_ref = ref_w - ref_l`` and the implicit reward margin is
``u = -(beta / 2) * (D_theta - D_ref)``.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from lightning_pref.errors import ConfigError

PreferenceLossKind = Literal["sigmoid", "hinge", "ipo"]


def implicit_reward_margin(
    policy_w: Tensor, policy_l: Tensor, ref_w: Tensor, ref_l: Tensor, beta: float
) -> Tensor:
    """Diffusion-DPO's inside term ``u = -(beta/2) * ((policy_w - policy_l) - (ref_w - ref_l))``.

    Wallace et al. 2024 (arXiv 2311.12908), Eq. 14, with the ``T * omega(lambda_t)`` factor folded into
    ``beta`` as in the official code. Shapes: four ``(B,)`` tensors in, ``(B,)`` out.
    """
    return -0.5 * beta * ((policy_w - policy_l) - (ref_w - ref_l))


def preference_loss(
    margin: Tensor,
    beta: float,
    kind: PreferenceLossKind = "sigmoid",
    label_smoothing: float = 0.0,
) -> Tensor:
    """Per-pair loss of an implicit reward margin ``u`` (shape ``(B,)`` in and out).

    * ``sigmoid`` (Diffusion-DPO, Eq. 14): ``-log sigmoid(u)``; with ``label_smoothing = e`` the
      conservative form (cDPO) ``-(1 - e) log sigmoid(u) - e log sigmoid(-u)``.
    * ``hinge`` (SLiC): ``relu(1 - u)``.
    * ``ipo`` (Azar et al. 2023): ``(u / beta - 1 / (2 beta))^2``, the squared distance of the
      log-likelihood-ratio margin ``u / beta`` from ``1 / (2 beta)``.

    Example:
        >>> preference_loss(torch.tensor([0.0]), beta=1.0)
        tensor([0.6931])
    """
    check_preference_loss_options(kind, label_smoothing)
    if kind == "sigmoid":
        return -(1 - label_smoothing) * F.logsigmoid(margin) - label_smoothing * F.logsigmoid(-margin)
    if kind == "hinge":
        return F.relu(1 - margin)
    return (margin / beta - 1 / (2 * beta)) ** 2


def check_preference_loss_options(kind: str, label_smoothing: float = 0.0) -> None:
    """Raise a clear error for an unknown loss kind or a label smoothing it cannot take."""
    if kind not in ("sigmoid", "hinge", "ipo"):
        raise ConfigError(f"Unknown preference loss kind {kind!r}: choose one of 'sigmoid', 'hinge', 'ipo'.")
    if not 0.0 <= label_smoothing < 0.5:
        raise ConfigError(f"label_smoothing={label_smoothing}: use a value in [0, 0.5).")
    if label_smoothing and kind != "sigmoid":
        raise ConfigError(f"label_smoothing applies to loss kind 'sigmoid' only, not {kind!r}.")


def pairwise_metrics(
    margin: Tensor, policy_w: Tensor, policy_l: Tensor, ref_w: Tensor, ref_l: Tensor
) -> dict[str, Tensor]:
    """The metrics every pairwise method logs (all detached scalars).

    ``implicit_acc`` counts ties (``u == 0``) as one half; ``winner_error_change`` and
    ``loser_error_change`` are ``mean(err_theta - err_ref)`` per branch: both rising at once means the
    policy is getting worse at everything while the margin improves.
    """
    return {**margin_metrics(margin), **error_metrics(policy_w, policy_l, ref_w, ref_l)}


def margin_metrics(margin: Tensor) -> dict[str, Tensor]:
    """``implicit_acc`` (fraction of ``u > 0``, ties count one half) and ``reward_margin`` (mean ``u``)."""
    margin = margin.detach()
    return {
        "implicit_acc": ((margin > 0).float() + 0.5 * (margin == 0).float()).mean(),
        "reward_margin": margin.mean(),
    }


def error_metrics(policy_w: Tensor, policy_l: Tensor, ref_w: Tensor, ref_l: Tensor) -> dict[str, Tensor]:
    """The error half of :func:`pairwise_metrics`: MSEs of policy and reference, error change per branch."""
    return {
        "policy_mse": torch.cat([policy_w, policy_l]).detach().mean(),
        "reference_mse": torch.cat([ref_w, ref_l]).detach().mean(),
        "winner_error_change": (policy_w - ref_w).detach().mean(),
        "loser_error_change": (policy_l - ref_l).detach().mean(),
    }


def diffusion_dpo_loss(
    policy_w: Tensor,
    policy_l: Tensor,
    ref_w: Tensor,
    ref_l: Tensor,
    beta: float,
    kind: PreferenceLossKind = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Diffusion-DPO (Wallace et al., CVPR 2024, arXiv 2311.12908, Eq. 14) ``[code]``.

    ``L = mean_pairs -log sigmoid(-(beta/2) * ((err_theta(w) - err_theta(l)) - (err_ref(w) - err_ref(l))))``

    Args:
        policy_w, policy_l, ref_w, ref_l: per-sample errors, each of shape ``(B,)``.
        beta: KL strength, in the official code's units (2000 for SD1.5, 5000 for SDXL).
        kind: ``sigmoid`` (the paper), ``hinge`` or ``ipo``; see :func:`preference_loss`.
        label_smoothing: cDPO's assumed label-noise rate, ``sigmoid`` only.

    Returns:
        The scalar loss and the metrics of :func:`pairwise_metrics`.

    Example:
        >>> errors = torch.tensor([0.10]), torch.tensor([0.30]), torch.tensor([0.20]), torch.tensor([0.20])
        >>> loss, metrics = diffusion_dpo_loss(*errors, beta=10.0)
        >>> round(loss.item(), 4), round(metrics["reward_margin"].item(), 4)   # u = -5 * (-0.2) = 1
        (0.3133, 1.0)
    """
    margin = implicit_reward_margin(policy_w, policy_l, ref_w, ref_l, beta)
    loss = preference_loss(margin, beta, kind, label_smoothing).mean()
    return loss, pairwise_metrics(margin, policy_w, policy_l, ref_w, ref_l)


# ------------------------------------------------------------------------------------------------------
# The loss family (METHODS.md sections 2, 3, 7 and "Beyond the seeds"). Each objective reuses the margin
# ``u`` above where it can; what is shared between them (masks, weight clipping, timestep buckets, the
# safeguard's gradient scaling) is a small function of its own.
# ------------------------------------------------------------------------------------------------------

ImportanceWeightPlacement = Literal["inside", "outside"]
SafeguardScope = Literal["batch", "pair"]


def timestep_bucket_means(values: Tensor, time_fraction: Tensor, name: str, num_buckets: int = 10) -> dict[str, Tensor]:
    """Mean of ``values`` per bucket of process time, for the buckets present in the batch.

    Args:
        values: one number per pair, ``(B,)``.
        time_fraction: each pair's time as a fraction of the schedule (0 = clean), ``(B,)``.
        name: the metric's name; keys read ``{name}_t0.3-0.4``.
        num_buckets: equal-width buckets of [0, 1].

    Example:
        >>> timestep_bucket_means(torch.tensor([1.0, 3.0, 5.0]), torch.tensor([0.05, 0.01, 0.95]), "w")
        {'w_t0.0-0.1': tensor(2.), 'w_t0.9-1.0': tensor(5.)}
    """
    values = values.detach().float()
    index = (time_fraction.detach().float().to(values.device) * num_buckets).long().clamp(0, num_buckets - 1)
    width = 1.0 / num_buckets
    return {
        f"{name}_t{b * width:.1f}-{(b + 1) * width:.1f}": values[index == b].mean() for b in index.unique().tolist()
    }


def importance_mask(weight_w: Tensor, weight_l: Tensor, threshold: float) -> Tensor:
    """DPO-C&M's mask ``m = 1[w_w >= tau] * 1[w_l >= tau]`` as floats, ``(B,)`` (METHODS.md section 2)."""
    return ((weight_w >= threshold) & (weight_l >= threshold)).float()


def clipped_weight(weight: Tensor, clip_eps: float) -> Tensor:
    """``stopgrad(clip(w, 1 - eps, 1 + eps))``: SDPO's (and PPO's) clipped importance weight."""
    return weight.detach().clamp(1 - clip_eps, 1 + clip_eps)


def check_importance_options(
    mask_threshold: float | None = None,
    clip_eps: float | None = None,
    margin_clip: float | None = None,
    placement: str = "inside",
) -> None:
    """Raise a clear error for importance-weighting options out of range (DPO-C&M, SDPO)."""
    if mask_threshold is not None and not 0.0 <= mask_threshold <= 1.0:
        raise ConfigError(
            f"mask_threshold={mask_threshold}: the expected importance weight lies in [0, 1]; use a threshold "
            "in [0, 1] (0.9 in the paper), or null for no mask."
        )
    if clip_eps is not None and not 0.0 < clip_eps < 1.0:
        raise ConfigError(f"clip_eps={clip_eps}: weights clip to [1 - eps, 1 + eps]; use eps in (0, 1) (default 0.2).")
    if margin_clip is not None and margin_clip <= 0:
        raise ConfigError(f"margin_clip={margin_clip}: use a positive bound on |u|, or null for no clipping.")
    if placement not in ("inside", "outside"):
        raise ConfigError(f"weight_placement={placement!r}: choose 'inside' or 'outside'.")


def dpo_clip_mask_loss(
    policy_w: Tensor,
    policy_l: Tensor,
    ref_w: Tensor,
    ref_l: Tensor,
    weight_w: Tensor,
    weight_l: Tensor,
    beta: float,
    mask_threshold: float = 0.9,
    margin_clip: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """DPO-C&M (Yang et al., arXiv 2505.21893) [secondary]``[reconstructed]``, METHODS.md section 2.

    Diffusion-DPO on the timesteps whose importance weight is high enough for *both* branches:

    ``m = 1[w_w >= tau] * 1[w_l >= tau]``,
    ``L = -sum_pairs(m * log sigmoid(clip(u))) / max(sum_pairs m, 1)``.

    Args:
        policy_w, policy_l, ref_w, ref_l: per-sample errors, each ``(B,)``.
        weight_w, weight_l: importance weights ``w_t`` of the two branches, ``(B,)``
            (:meth:`~lightning_pref.processes.NoiseProcess.log_importance_weight`); used as a mask only.
        beta: KL strength (Diffusion-DPO units).
        mask_threshold: ``tau`` (0.9 in the paper). A batch with every pair masked has loss 0.
        margin_clip: optional symmetric clip of ``u`` to ``[-c, c]`` (no gradient beyond it) ``[reconstructed]``.

    Returns:
        The loss; :func:`pairwise_metrics` (on the unclipped ``u``) plus ``masked_fraction``.

    Example:
        >>> errors = torch.tensor([0.1, 0.1]), torch.tensor([0.3, 0.3]), torch.tensor([0.2, 0.2]), torch.tensor([0.2, 0.2])
        >>> loss, metrics = dpo_clip_mask_loss(*errors, torch.tensor([0.95, 0.5]), torch.ones(2), beta=10.0)
        >>> round(loss.item(), 4), metrics["masked_fraction"].item()   # only the first pair counts: -log sigmoid(1)
        (0.3133, 0.5)
    """
    check_importance_options(mask_threshold, margin_clip=margin_clip)
    margin = implicit_reward_margin(policy_w, policy_l, ref_w, ref_l, beta)
    clipped = margin if margin_clip is None else margin.clamp(-margin_clip, margin_clip)
    mask = importance_mask(weight_w, weight_l, mask_threshold)
    loss = -(mask * F.logsigmoid(clipped)).sum() / mask.sum().clamp(min=1)
    metrics = pairwise_metrics(margin, policy_w, policy_l, ref_w, ref_l)
    return loss, {**metrics, "masked_fraction": 1 - mask.mean()}


def sdpo_loss(
    policy_w: Tensor,
    policy_l: Tensor,
    ref_w: Tensor,
    ref_l: Tensor,
    weight_w: Tensor,
    weight_l: Tensor,
    beta: float,
    clip_eps: float = 0.2,
    mask_threshold: float | None = 0.9,
    placement: ImportanceWeightPlacement = "inside",
) -> tuple[Tensor, dict[str, Tensor]]:
    """SDPO / SIPO, importance-sampled DPO (Yang et al., arXiv 2505.21893) [secondary]``[reconstructed]``, METHODS.md section 2.

    With ``wc = stopgrad(clip(w, 1 - eps, 1 + eps))`` and the mask ``m`` of :func:`importance_mask`:

    * ``inside`` (default): ``u_IS = -(beta/2) [wc_w (err_theta(w) - err_ref(w)) - wc_l (err_theta(l) - err_ref(l))]``,
      ``L = -mean_pairs(m * log sigmoid(u_IS))``;
    * ``outside``: ``L = -mean_pairs(m * stopgrad(clip(w_w * w_l, 1 - eps, 1 + eps)) * log sigmoid(u))``.

    Args:
        policy_w, policy_l, ref_w, ref_l: per-sample errors, each ``(B,)``.
        weight_w, weight_l: importance weights ``w_t``, ``(B,)``.
        beta: KL strength; the paper's values are much smaller than Diffusion-DPO's (see the docs page).
        clip_eps: clip range ``eps`` (0.2, a guess).
        mask_threshold: ``tau`` of the mask; ``None`` for no mask.
        placement: where the weights act, ``inside`` or ``outside`` the log-sigmoid.

    Returns:
        The loss; :func:`pairwise_metrics` of the margin the loss uses (``u_IS`` inside, ``u`` outside) plus
        ``masked_fraction`` and ``clipped_fraction`` (the fraction of weights at a clip bound).

    Example:
        >>> errors = torch.tensor([0.1]), torch.tensor([0.3]), torch.tensor([0.2]), torch.tensor([0.2])
        >>> loss, metrics = sdpo_loss(*errors, torch.tensor([0.5]), torch.tensor([1.0]), beta=10.0, mask_threshold=None)
        >>> round(metrics["reward_margin"].item(), 4)   # -5 * (0.8 * (-0.1) - 1.0 * 0.1) = 0.9
        0.9
    """
    check_importance_options(mask_threshold, clip_eps, placement=placement)
    if placement == "inside":
        clipped_w, clipped_l = clipped_weight(weight_w, clip_eps), clipped_weight(weight_l, clip_eps)
        margin = -0.5 * beta * (clipped_w * (policy_w - ref_w) - clipped_l * (policy_l - ref_l))
        per_pair = -F.logsigmoid(margin)
        weights = torch.cat([weight_w, weight_l])
    else:
        margin = implicit_reward_margin(policy_w, policy_l, ref_w, ref_l, beta)
        per_pair = -clipped_weight(weight_w * weight_l, clip_eps) * F.logsigmoid(margin)
        weights = weight_w * weight_l
    mask = torch.ones_like(per_pair) if mask_threshold is None else importance_mask(weight_w, weight_l, mask_threshold)
    loss = (mask * per_pair).mean()
    at_bound = ((weights.detach() - 1).abs() >= clip_eps).float().mean()
    metrics = pairwise_metrics(margin, policy_w, policy_l, ref_w, ref_l)
    return loss, {**metrics, "masked_fraction": 1 - mask.mean(), "clipped_fraction": at_bound}


def check_dmpo_alpha(alpha: float) -> None:
    """DMPO needs ``0 < alpha < 1``, and not so small that ``log(alpha)`` swamps the loss."""
    if not 1e-6 <= alpha < 1.0:
        raise ConfigError(
            f"alpha={alpha}: DMPO's target is Bernoulli(1 - alpha), so alpha must lie in [1e-6, 1) -- alpha <= 0 "
            "turns the loss into an unbounded -log sigmoid(u) and tiny values make log(alpha) blow up. Use e.g. "
            "alpha: 0.01 (the default)."
        )


def dmpo_loss(
    policy_w: Tensor, policy_l: Tensor, ref_w: Tensor, ref_l: Tensor, beta: float, alpha: float = 0.01
) -> tuple[Tensor, dict[str, Tensor]]:
    """DMPO (Li et al., arXiv 2507.07510) [secondary; loss as in a third-party implementation], METHODS.md section 3.

    The KL of Bernoulli(p) from Bernoulli(q), ``p = sigmoid(u)``, ``q = 1 - alpha``, averaged over pairs:

    ``L = p (log p - log q) + (1 - p) (log(1 - p) - log(1 - q))``,

    computed stably with ``log p = -softplus(-u)`` and ``log(1 - p) = -softplus(u)``. Its derivative is
    ``dL/du = p (1 - p) (u - logit(q))``: zero at ``u = logit(1 - alpha)``, which pulls ``u`` up to that
    target and pushes it back when it overshoots (unlike ``-log sigmoid(u)``, which always pushes up).

    Args:
        policy_w, policy_l, ref_w, ref_l: per-sample errors, each ``(B,)``.
        beta: KL strength (Diffusion-DPO units; third-party settings: SD1.5 2000, SDXL 6000).
        alpha: the target's dispreference rate, in ``[1e-6, 1)`` (default 0.01).

    Returns:
        The loss; :func:`pairwise_metrics` plus ``mean_p`` and its target ``target_p = 1 - alpha``.

    Example:
        >>> loss, metrics = dmpo_loss(*(torch.zeros(1),) * 4, beta=1.0, alpha=0.5)   # p = q = 1/2
        >>> loss.item(), metrics["mean_p"].item()
        (0.0, 0.5)
    """
    check_dmpo_alpha(alpha)
    margin = implicit_reward_margin(policy_w, policy_l, ref_w, ref_l, beta)
    log_p, log_not_p = -F.softplus(-margin), -F.softplus(margin)
    p = log_p.exp()
    per_pair = p * (log_p - math.log1p(-alpha)) + (1 - p) * (log_not_p - math.log(alpha))
    metrics = pairwise_metrics(margin, policy_w, policy_l, ref_w, ref_l)
    return per_pair.mean(), {**metrics, "mean_p": p.detach().mean(), "target_p": margin.new_tensor(1 - alpha)}


def entropy_regularized_reference(
    policy_w: Tensor, policy_l: Tensor, ref_w: Tensor, ref_l: Tensor, beta: float, gamma: float
) -> tuple[Tensor, Tensor]:
    """SEE-DPO's self-entropy regulariser as reference errors (Shekhar et al., TMLR 2025, arXiv 2411.04712)
    [secondary]``[reconstructed]``, METHODS.md section 7.

    The objective ``E[r] - beta KL(p || p_ref) + gamma H(p)`` turns the margin into
    ``u_SEE = -(1/2) [(beta + gamma) D_theta - beta D_ref] = u - (gamma/2) D_theta``. Every pairwise loss
    gets that margin, unchanged in code, from the shifted reference errors returned here,
    ``err_ref' = err_ref - (gamma / beta) err_theta`` (they carry the policy's gradient). In SDPO's
    weighted margin the shift makes the entropy term importance-weighted too.

    Shapes: four ``(B,)`` tensors in, two ``(B,)`` out.

    Example:
        >>> ref_w, ref_l = entropy_regularized_reference(*torch.tensor([[0.1], [0.3], [0.2], [0.2]]), beta=10.0, gamma=5.0)
        >>> implicit_reward_margin(torch.tensor([0.1]), torch.tensor([0.3]), ref_w, ref_l, beta=10.0)   # 1 - 2.5 * (-0.2)
        tensor([1.5000])
    """
    check_entropy_gamma(gamma)
    ratio = gamma / beta
    return ref_w - ratio * policy_w, ref_l - ratio * policy_l


def kto_loss(
    policy: Tensor,
    reference: Tensor,
    desirable: Tensor,
    beta: float,
    reference_point: Tensor | None = None,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Diffusion-KTO (Li et al., arXiv 2404.04465) ``[code]``, METHODS.md "Beyond the seeds".

    Unpaired: each sample carries its own label. With the implicit reward ``g = err_ref - err_theta`` and the
    reference point ``z = clamp(mean(g), 0)`` (detached; averaged over all ranks by the module):

    ``L = mean_samples( w_y * (1 - sigmoid(s_y * beta * (g - z))) )``, ``s_y = +1`` desirable, ``-1`` undesirable.

    Args:
        policy, reference: per-sample errors ``err_theta``, ``err_ref``, ``(N,)``.
        desirable: labels, ``(N,)`` bool (or 0/1).
        beta: 1000 in the official code (no 0.5 factor).
        reference_point: ``z``; ``None`` computes it from this batch.
        desirable_weight, undesirable_weight: ``w_y`` (both 1 in the official code).

    Returns:
        The loss and ``reference_point``, ``kto_acc`` (fraction with ``s_y (g - z) > 0``, ties one half),
        ``policy_mse``, ``reference_mse``, and ``desirable_reward`` / ``undesirable_reward`` (mean ``g`` per
        label, for the labels present).

    Example:
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
        "kto_acc": ((logit > 0).float() + 0.5 * (logit == 0).float()).detach().mean(),
        "policy_mse": policy.detach().mean(),
        "reference_mse": reference.detach().mean(),
    }
    for name, chosen in (("desirable_reward", desirable), ("undesirable_reward", ~desirable)):
        if chosen.any():  # a batch may hold one label only
            metrics[name] = reward[chosen].mean()
    return loss, metrics


def bounded_likelihood(error: Tensor, error_scale: float = 0.5) -> Tensor:
    """MaPO's score of a sample, ``f(e) = s e / (exp(s e) - 1)``: 1 at zero error, falling to 0 as it grows.

    The official code's (bounded) stand-in for the log-odds of the likelihood ``exp(-s e)``; exact and
    differentiable at ``e = 0`` (a series there). Shape-preserving.

    Example:
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
    """MaPO (Hong et al., arXiv 2406.06424) [code: mapo-t2i/mapo, ``utils.compute_loss``], METHODS.md "Beyond the seeds".

    Reference-free: the winner's denoising loss plus a margin term on the policy's errors alone,

    ``L = mean(err_theta(w)) - beta * mean(log sigmoid(T * (f(err_theta(w)) - f(err_theta(l)))))``,

    with ``f`` of :func:`bounded_likelihood` (``s`` = ``error_scale``, ``snr_value`` in the official code,
    0.5) and ``T = margin_scale`` (the number of training timesteps in the official code, 1000).

    Args:
        policy_w, policy_l: per-sample errors of the policy, each ``(B,)``.
        beta: the margin term's weight ``beta_m`` (0.1; *not* Diffusion-DPO's units).
        error_scale: ``s``.
        margin_scale: ``T``.

    Returns:
        The loss; :func:`margin_metrics` of ``T (f_w - f_l)`` plus ``policy_mse``, ``winner_mse``,
        ``loser_mse``, ``sft_loss`` and ``margin_loss`` (the two terms of ``L``).

    Example:
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


def check_safeguard_options(mu: float, scope: str) -> None:
    """Raise a clear error for a safeguard margin or scope out of range."""
    if not 0.0 <= mu <= 1.0:
        raise ConfigError(f"safeguard_mu={mu}: use a value in [0, 1] (0.9 in the authors' scripts).")
    if scope not in ("batch", "pair"):
        raise ConfigError(f"safeguard_scope={scope!r}: choose 'batch' (the official code) or 'pair'.")


def check_entropy_gamma(gamma: float) -> None:
    """SEE-DPO's ``gamma`` must be non-negative (0 turns the regulariser off)."""
    if gamma < 0:
        raise ConfigError(f"entropy_gamma={gamma}: use gamma >= 0 (gamma / beta in 0.05..0.5 to start; 0 = off).")


def loser_gradient_scale(
    residual_w: Tensor,
    residual_l: Tensor,
    mu: float = 0.9,
    scope: SafeguardScope = "batch",
    sample_weight: Tensor | None = None,
) -> Tensor:
    """The loser-gradient safeguard's ``lambda`` (Diffusion-SDPO, Fu et al., arXiv 2511.03317) ``[code]``.

    ``g_w``, ``g_l`` are the gradients of the winner's and the loser's denoising error with respect to the
    model *output* (``2 (prediction - target) / N``, times the process's error weight). Scaling the loser
    branch's gradient by

    ``lambda = clamp((1 - mu) |g_w|^2 / (g_l . g_w), 0, 1)`` if ``g_l . g_w > 0``, else 1,

    keeps the winner's error from rising to first order (output-space approximation: winner and loser outputs
    share coordinates): the update moves the output by ``-eta c (g_w - lambda g_l)``, which changes the
    winner's error by ``-eta c (|g_w|^2 - lambda g_l . g_w) <= -eta c mu |g_w|^2 <= 0``.

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
        >>> loser_gradient_scale(torch.tensor([[1.0, 0.0]]), torch.tensor([[2.0, 0.0]]), mu=0.5)   # 0.5 * 1 / 2
        tensor([0.2500])
    """
    check_safeguard_options(mu, scope)
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

    Example:
        >>> x = torch.tensor([2.0], requires_grad=True)
        >>> (scale_gradient(x, torch.tensor([0.5])) ** 2).sum().backward(); x.grad   # 0.5 * 2x
        tensor([2.])
    """
    return value.detach() + scale.detach() * (value - value.detach())

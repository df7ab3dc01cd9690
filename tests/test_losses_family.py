"""The loss family against hand-computed values, edge cases, and the gradient properties each paper claims."""

import math

import pytest
import torch
from diffusers import DDPMScheduler

from lightning_pref.losses import (
    bounded_likelihood,
    diffusion_dpo_loss,
    dmpo_loss,
    dpo_clip_mask_loss,
    entropy_regularized_reference,
    implicit_reward_margin,
    kto_loss,
    loser_gradient_scale,
    mapo_loss,
    scale_gradient,
    sdpo_loss,
    timestep_bucket_means,
)
from lightning_pref.processes import DDPMProcess, FlowMatchingProcess

BETA = 10.0
# Two pairs; u = -5 * ((pw - pl) - (rw - rl)) = [-5 * (-0.2), -5 * (0.1)] = [1.0, -0.5]
POLICY_W, POLICY_L = torch.tensor([0.10, 0.50]), torch.tensor([0.30, 0.40])
REF_W, REF_L = torch.tensor([0.20, 0.45]), torch.tensor([0.20, 0.45])
ERRORS = (POLICY_W, POLICY_L, REF_W, REF_L)


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


# ------------------------------------------------------------------------------------- timestep buckets
def test_bucket_means_cover_only_the_buckets_present():
    metrics = timestep_bucket_means(torch.tensor([1.0, 2.0, 4.0, 8.0]), torch.tensor([0.0, 0.09, 0.55, 1.0]), "w")
    assert metrics.keys() == {"w_t0.0-0.1", "w_t0.5-0.6", "w_t0.9-1.0"}  # t = 1 falls in the last bucket
    assert metrics["w_t0.0-0.1"].item() == 1.5
    assert metrics["w_t0.9-1.0"].item() == 8.0


# -------------------------------------------------------------------------------------------- DPO-C&M
def test_dpo_clip_mask_averages_over_unmasked_pairs():
    # pair 0 is kept (both weights >= 0.9); pair 1 is masked by its loser's weight 0.89
    loss, metrics = dpo_clip_mask_loss(*ERRORS, torch.tensor([0.95, 1.0]), torch.tensor([0.9, 0.89]), beta=BETA)
    assert loss.item() == pytest.approx(-log_sigmoid(1.0), rel=1e-6)
    assert metrics["masked_fraction"].item() == 0.5
    assert metrics["reward_margin"].item() == pytest.approx(0.25)  # the shared metrics see every pair


def test_dpo_clip_mask_with_every_pair_masked_is_zero_with_zero_gradient():
    policy_w = POLICY_W.clone().requires_grad_()
    loss, metrics = dpo_clip_mask_loss(policy_w, POLICY_L, REF_W, REF_L, torch.zeros(2), torch.ones(2), beta=BETA)
    loss.backward()
    assert loss.item() == 0.0 and metrics["masked_fraction"].item() == 1.0
    assert torch.equal(policy_w.grad, torch.zeros(2))


def test_dpo_clip_mask_margin_clip_caps_the_loss_and_stops_the_gradient():
    policy_w = POLICY_W.clone().requires_grad_()
    loss, _ = dpo_clip_mask_loss(policy_w, POLICY_L, REF_W, REF_L, torch.ones(2), torch.ones(2), beta=BETA, margin_clip=0.25)
    loss.backward()
    assert loss.item() == pytest.approx(-(log_sigmoid(0.25) + log_sigmoid(-0.25)) / 2, rel=1e-6)
    assert torch.equal(policy_w.grad, torch.zeros(2))  # both |u| exceed the clip


@pytest.mark.parametrize(
    "options, message",
    [(dict(mask_threshold=1.5), "mask_threshold=1.5"), (dict(margin_clip=0.0), "margin_clip=0.0")],
)
def test_dpo_clip_mask_bad_options(options, message):
    with pytest.raises(ValueError, match=message):
        dpo_clip_mask_loss(*ERRORS, torch.ones(2), torch.ones(2), beta=BETA, **options)


# ----------------------------------------------------------------------------------------------- SDPO
def test_sdpo_inside_clips_the_weights_into_the_margin():
    weight_w, weight_l = torch.tensor([0.5, 1.1]), torch.tensor([1.0, 3.0])  # clipped: [0.8, 1.1], [1.0, 1.2]
    loss, metrics = sdpo_loss(*ERRORS, weight_w, weight_l, beta=BETA, mask_threshold=None)
    u0 = -5 * (0.8 * (0.10 - 0.20) - 1.0 * (0.30 - 0.20))  # = 0.9
    u1 = -5 * (1.1 * (0.50 - 0.45) - 1.2 * (0.40 - 0.45))  # = -0.575
    assert metrics["reward_margin"].item() == pytest.approx((u0 + u1) / 2, rel=1e-6)
    assert loss.item() == pytest.approx(-(log_sigmoid(u0) + log_sigmoid(u1)) / 2, rel=1e-6)
    assert metrics["clipped_fraction"].item() == 0.5  # 0.5 and 3.0 lie outside [0.8, 1.2]; 1.0 and 1.1 inside


def test_sdpo_outside_weights_the_per_pair_loss_and_the_mask_averages_over_all_pairs():
    weight_w, weight_l = torch.tensor([0.95, 0.5]), torch.tensor([1.0, 1.0])
    loss, metrics = sdpo_loss(*ERRORS, weight_w, weight_l, beta=BETA, placement="outside")
    # pair 1 masked (0.5 < 0.9); pair 0 weighted by clip(0.95) = 0.95; the mean runs over both pairs
    assert loss.item() == pytest.approx(-0.95 * log_sigmoid(1.0) / 2, rel=1e-6)
    assert metrics["masked_fraction"].item() == 0.5


def test_sdpo_with_unit_weights_is_diffusion_dpo():
    ones = torch.ones(2)
    for placement in ("inside", "outside"):
        loss, _ = sdpo_loss(*ERRORS, ones, ones, beta=BETA, placement=placement)
        assert loss.item() == pytest.approx(diffusion_dpo_loss(*ERRORS, beta=BETA)[0].item(), rel=1e-6)


def test_sdpo_weights_are_stop_gradient():
    weight_w = torch.tensor([1.1, 0.9], requires_grad=True)
    loss, _ = sdpo_loss(*ERRORS, weight_w, torch.ones(2), beta=BETA)
    assert not loss.requires_grad  # errors without grad and detached weights: nothing to differentiate


@pytest.mark.parametrize(
    "options, message", [(dict(clip_eps=1.0), "clip_eps=1.0"), (dict(placement="between"), "weight_placement='between'")]
)
def test_sdpo_bad_options(options, message):
    with pytest.raises(ValueError, match=message):
        sdpo_loss(*ERRORS, torch.ones(2), torch.ones(2), beta=BETA, **options)


# ----------------------------------------------------------------------------------------------- DMPO
def test_dmpo_matches_the_bernoulli_kl_by_hand():
    loss, metrics = dmpo_loss(*ERRORS, beta=BETA, alpha=0.1)
    q = 0.9
    expected = [
        sigmoid(u) * math.log(sigmoid(u) / q) + (1 - sigmoid(u)) * math.log((1 - sigmoid(u)) / (1 - q)) for u in (1.0, -0.5)
    ]
    assert loss.item() == pytest.approx(sum(expected) / 2, rel=1e-6)
    assert metrics["mean_p"].item() == pytest.approx((sigmoid(1.0) + sigmoid(-0.5)) / 2, rel=1e-6)
    assert metrics["target_p"].item() == pytest.approx(0.9)


def test_dmpo_is_stable_for_huge_margins_and_a_tie_is_finite():
    big = torch.tensor([1e4, -1e4])
    loss, _ = dmpo_loss(torch.zeros(2), torch.zeros(2), -2 * big / BETA, torch.zeros(2), beta=BETA, alpha=0.01)
    # u = +1e4: p = 1, KL = -log(0.99); u = -1e4: p = 0, KL = -log(0.01)
    assert loss.item() == pytest.approx((-math.log(0.99) - math.log(0.01)) / 2, rel=1e-5)
    tie, metrics = dmpo_loss(*(torch.zeros(1),) * 4, beta=BETA, alpha=0.01)
    assert metrics["implicit_acc"].item() == 0.5
    assert tie.item() == pytest.approx(0.5 * math.log(0.5 / 0.99) + 0.5 * math.log(0.5 / 0.01), rel=1e-6)


def dmpo_margin_gradient(u: float, alpha: float) -> float:
    """dL/du, through the policy's winner error (u = -(beta/2) pw when the other errors are zero)."""
    policy_w = torch.tensor([-2 * u / BETA], dtype=torch.float64, requires_grad=True)
    zero = torch.zeros(1, dtype=torch.float64)
    dmpo_loss(policy_w, zero, zero, zero, beta=BETA, alpha=alpha)[0].backward()
    return policy_w.grad.item() / (-BETA / 2)


@pytest.mark.parametrize("alpha", [0.01, 0.3])
def test_dmpo_gradient_vanishes_at_the_target_and_pushes_back_past_it(alpha):
    target = math.log((1 - alpha) / alpha)  # logit(1 - alpha)
    assert abs(dmpo_margin_gradient(target, alpha)) < 1e-9
    assert dmpo_margin_gradient(target - 1, alpha) < 0  # descent raises u below the target...
    assert dmpo_margin_gradient(target + 1, alpha) > 0  # ...and lowers it above
    p = sigmoid(target + 1)
    assert dmpo_margin_gradient(target + 1, alpha) == pytest.approx(p * (1 - p) * 1.0, rel=1e-6)  # p(1-p)(u - logit q)


@pytest.mark.parametrize("alpha", [0.0, -0.1, 1e-9, 1.0, 1.5])
def test_dmpo_rejects_alpha_out_of_range(alpha):
    with pytest.raises(ValueError, match=rf"alpha={alpha}.*\[1e-6, 1\)"):
        dmpo_loss(*ERRORS, beta=BETA, alpha=alpha)


# -------------------------------------------------------------------------------------------- SEE-DPO
def test_entropy_regularized_reference_gives_the_see_margin():
    gamma = 4.0
    ref_w, ref_l = entropy_regularized_reference(*ERRORS, beta=BETA, gamma=gamma)
    margin = implicit_reward_margin(POLICY_W, POLICY_L, ref_w, ref_l, BETA)
    d_theta = POLICY_W - POLICY_L
    torch.testing.assert_close(margin, torch.tensor([1.0, -0.5]) - gamma / 2 * d_theta)
    # = -(1/2) [(beta + gamma) D_theta - beta D_ref]
    torch.testing.assert_close(margin, -0.5 * ((BETA + gamma) * d_theta - BETA * (REF_W - REF_L)))
    unchanged = entropy_regularized_reference(*ERRORS, beta=BETA, gamma=0.0)
    torch.testing.assert_close(unchanged, (REF_W, REF_L))
    with pytest.raises(ValueError, match="entropy_gamma=-1.0"):
        entropy_regularized_reference(*ERRORS, beta=BETA, gamma=-1.0)


def test_entropy_regularizer_strengthens_the_policy_gradient():
    policy_w = POLICY_W.clone().requires_grad_()
    ref_w, ref_l = entropy_regularized_reference(policy_w, POLICY_L, REF_W, REF_L, beta=BETA, gamma=5.0)
    loss, _ = diffusion_dpo_loss(policy_w, POLICY_L, ref_w, ref_l, beta=BETA)
    loss.backward()
    u = torch.tensor([1.0, -0.5]) - 2.5 * (POLICY_W - POLICY_L)
    # dL/dpw = (beta + gamma)/2 * sigmoid(-u) / B
    torch.testing.assert_close(policy_w.grad, 7.5 * torch.sigmoid(-u) / 2)


# ------------------------------------------------------------------------------------------------ KTO
def test_kto_matches_hand_computation_with_a_positive_reference_point():
    policy, reference = torch.tensor([0.1, 0.2, 0.3]), torch.tensor([0.3, 0.2, 0.2])
    desirable = torch.tensor([True, False, False])
    loss, metrics = kto_loss(policy, reference, desirable, beta=BETA, desirable_weight=2.0, undesirable_weight=0.5)
    g, z = [0.2, 0.0, -0.1], (0.2 + 0.0 - 0.1) / 3
    expected = [2.0 * (1 - sigmoid(BETA * (g[0] - z))), 0.5 * (1 - sigmoid(-BETA * (g[1] - z))), 0.5 * (1 - sigmoid(-BETA * (g[2] - z)))]
    assert loss.item() == pytest.approx(sum(expected) / 3, rel=1e-5)
    assert metrics["reference_point"].item() == pytest.approx(z, rel=1e-5)
    assert metrics["kto_acc"].item() == 1.0  # 0.2 > z; 0.0 < z; -0.1 < z
    assert metrics["desirable_reward"].item() == pytest.approx(0.2, rel=1e-5)
    assert metrics["undesirable_reward"].item() == pytest.approx(-0.05, rel=1e-5)


def test_kto_reference_point_is_clamped_at_zero_and_detached():
    policy = torch.tensor([0.4, 0.4], requires_grad=True)
    loss, metrics = kto_loss(policy, torch.tensor([0.2, 0.2]), torch.tensor([True, True]), beta=BETA)
    assert metrics["reference_point"].item() == 0.0  # mean g = -0.2 < 0
    assert "undesirable_reward" not in metrics  # no undesirable sample in this batch
    loss.backward()
    s = sigmoid(BETA * -0.2)
    # with z detached, dL/dpolicy = beta s (1 - s) / N per desirable sample
    torch.testing.assert_close(policy.grad, torch.full((2,), BETA * s * (1 - s) / 2))


def test_kto_a_sample_at_the_reference_point_is_a_tie():
    loss, metrics = kto_loss(torch.tensor([0.3]), torch.tensor([0.3]), torch.tensor([False]), beta=BETA, reference_point=torch.tensor(0.0))
    assert loss.item() == 0.5 and metrics["kto_acc"].item() == 0.5


# ----------------------------------------------------------------------------------------------- MaPO
def test_mapo_matches_hand_computation():
    loss, metrics = mapo_loss(torch.tensor([0.2, 1.0]), torch.tensor([0.4, 0.5]), beta=0.1, error_scale=0.5, margin_scale=10.0)
    f = lambda e: 0.5 * e / math.expm1(0.5 * e)  # noqa: E731
    margins = [10 * (f(0.2) - f(0.4)), 10 * (f(1.0) - f(0.5))]
    expected = 0.6 - 0.1 * (log_sigmoid(margins[0]) + log_sigmoid(margins[1])) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert metrics["implicit_acc"].item() == 0.5  # lower winner error wins the first pair, loses the second
    assert metrics["sft_loss"].item() == pytest.approx(0.6)
    assert metrics["winner_mse"].item() == pytest.approx(0.6) and metrics["loser_mse"].item() == pytest.approx(0.45)


def test_mapo_is_smooth_at_zero_error():
    error = torch.tensor([0.0, 1e-6, 1e-3], dtype=torch.float64, requires_grad=True)
    value = bounded_likelihood(error, error_scale=0.5)
    value.sum().backward()
    expected = [1.0] + [0.5 * e / math.expm1(0.5 * e) for e in (1e-6, 1e-3)]
    torch.testing.assert_close(value, torch.tensor(expected, dtype=torch.float64))
    torch.testing.assert_close(error.grad, torch.tensor([-0.25, -0.25, -0.25], dtype=torch.float64), atol=1e-4, rtol=0)


def test_mapo_tie_costs_log_2_and_the_margin_term_separates_the_errors():
    policy_w, policy_l = torch.tensor([0.3], requires_grad=True), torch.tensor([0.3], requires_grad=True)
    loss, metrics = mapo_loss(policy_w, policy_l, beta=0.1)
    assert loss.item() == pytest.approx(0.3 + 0.1 * math.log(2), rel=1e-6) and metrics["implicit_acc"].item() == 0.5
    loss.backward()
    assert policy_w.grad.item() > 1.0  # the SFT term (1) plus the margin term lowering the winner's error
    assert policy_l.grad.item() < 0  # the loser's error is pushed up


# ------------------------------------------------------------------------------ loser-gradient safeguard
def test_loser_gradient_scale_by_hand():
    r_w = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    r_l = torch.tensor([[2.0, 0.0], [-1.0, 0.0]])
    # pair 0: |g_w|^2 = 1, g_l.g_w = 2 -> 0.1 * 1 / 2; pair 1: g_l.g_w = -1 < 0 -> 1
    torch.testing.assert_close(loser_gradient_scale(r_w, r_l, mu=0.9, scope="pair"), torch.tensor([0.05, 1.0]))
    # batch: |g_w|^2 = 3, g_l.g_w = 2 - 1 = 1 -> clamp(0.1 * 3, 0, 1)
    torch.testing.assert_close(loser_gradient_scale(r_w, r_l, mu=0.9, scope="batch"), torch.tensor([0.3, 0.3]))
    # mu = 0 and a weakly aligned loser: the bound exceeds 1 and is clamped
    torch.testing.assert_close(loser_gradient_scale(r_w, r_l, mu=0.0, scope="batch"), torch.tensor([1.0, 1.0]))
    # the process's error weights enter squared: pair 1 weighted 2 -> |g_w|^2 = 1 + 8, g_l.g_w = 2 - 4 < 0 -> 1
    weighted = loser_gradient_scale(r_w, r_l, mu=0.9, scope="batch", sample_weight=torch.tensor([1.0, 2.0]))
    torch.testing.assert_close(weighted, torch.tensor([1.0, 1.0]))


@pytest.mark.parametrize("mu, scope, message", [(1.5, "batch", "safeguard_mu=1.5"), (0.5, "sample", "safeguard_scope='sample'")])
def test_loser_gradient_scale_bad_options(mu, scope, message):
    with pytest.raises(ValueError, match=message):
        loser_gradient_scale(torch.ones(1, 2), torch.ones(1, 2), mu=mu, scope=scope)


def output_space_winner_change(residual_w, residual_l, ref_w, ref_l, safeguard: str | None, mu=0.9):
    """The first-order change of each pair's winner error when the update acts on the shared output.

    Output-space approximation of the paper: winner and loser predictions of a pair share coordinates, so
    the update of the output is ``-(dL/dpred_w + dL/dpred_l)``; the winner's error changes by its gradient
    dotted with that update. Returns the change per pair, ``(B,)``, and the loss.
    """
    pred_w = residual_w.clone().requires_grad_()  # target 0: the prediction is the residual
    pred_l = residual_l.clone().requires_grad_()
    err_w, err_l = pred_w.pow(2).mean(1), pred_l.pow(2).mean(1)
    if safeguard is not None:
        err_l = scale_gradient(err_l, loser_gradient_scale(pred_w, pred_l, mu=mu, scope=safeguard))
    loss, _ = diffusion_dpo_loss(err_w, err_l, ref_w, ref_l, beta=BETA)
    grad_w, grad_l = torch.autograd.grad(loss, [pred_w, pred_l])
    update = -(grad_w + grad_l)
    winner_gradient = 2 * residual_w / residual_w.shape[1]
    return (winner_gradient * update).sum(1), loss.detach()


def aligned_residuals(num_pairs=6, elements=16, seed=0):
    """Losers whose residual points the winner's way, but larger: Diffusion-DPO then raises the winner error."""
    generator = torch.Generator().manual_seed(seed)
    residual_w = torch.randn(num_pairs, elements, generator=generator, dtype=torch.float64)
    residual_l = 2 * residual_w + 0.3 * torch.randn(num_pairs, elements, generator=generator, dtype=torch.float64)
    return residual_w, residual_l


def test_without_the_safeguard_the_winner_error_can_rise():
    residual_w, residual_l = aligned_residuals()
    zero = torch.zeros(6, dtype=torch.float64)
    change, _ = output_space_winner_change(residual_w, residual_l, zero, zero, safeguard=None)
    assert (change > 0).all()  # the control case: the property below is not automatic


def test_pair_safeguard_never_raises_a_winner_error_to_first_order():
    residual_w, residual_l = aligned_residuals()
    generator = torch.Generator().manual_seed(1)
    ref_w, ref_l = torch.rand(6, generator=generator, dtype=torch.float64), torch.rand(6, generator=generator, dtype=torch.float64)
    change, loss = output_space_winner_change(residual_w, residual_l, ref_w, ref_l, safeguard="pair")
    assert (change < 0).all()
    # the bound of the paper: change <= -mu * (per-pair loss weight) * |g_w|^2, with weight (beta/2) sigmoid(-u) / B
    err_w, err_l = residual_w.pow(2).mean(1), residual_l.pow(2).mean(1)
    u = implicit_reward_margin(err_w, err_l, ref_w, ref_l, BETA)
    bound = -0.9 * (BETA / 2) * torch.sigmoid(-u) / 6 * (2 * residual_w / 16).pow(2).sum(1)
    assert (change <= bound + 1e-12).all()
    unguarded_loss = diffusion_dpo_loss(err_w, err_l, ref_w, ref_l, beta=BETA)[0]
    assert loss.item() == pytest.approx(unguarded_loss.item(), rel=1e-12)  # the loss value is untouched


def test_batch_safeguard_keeps_the_mean_winner_error_from_rising():
    """The official (batch) rule guarantees the batch-mean winner error when the pairs weigh alike (u equal)."""
    residual_w, residual_l = aligned_residuals()
    ref_w, ref_l = residual_w.pow(2).mean(1), residual_l.pow(2).mean(1)  # policy == reference: u = 0 for all
    change, _ = output_space_winner_change(residual_w, residual_l, ref_w, ref_l, safeguard="batch")
    assert change.sum() < 0
    unguarded, _ = output_space_winner_change(residual_w, residual_l, ref_w, ref_l, safeguard=None)
    assert unguarded.sum() > 0


# ------------------------------------------------------------------------------------ importance weights
def ddpm_scheduler(prediction_type="epsilon"):
    return DDPMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type=prediction_type, clip_sample=False
    )


def test_ddpm_coefficient_is_the_spec_formula():
    process = DDPMProcess(ddpm_scheduler().config)
    t = torch.tensor([1, 2, 10, 100, 500, 999])
    abar = process.alphas_cumprod
    beta = 1 - abar[t] / abar[t - 1]
    btilde = (1 - abar[t - 1]) * beta / (1 - abar[t])
    expected = beta**2 / (2 * btilde * (1 - beta) * (1 - abar[t]))
    torch.testing.assert_close(process.importance_coefficient(t), expected)
    assert process.importance_coefficient(torch.tensor([0])).item() == math.inf  # the step to the clean sample


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_closed_form_weight_is_minus_the_kl_of_the_diffusers_reverse_step(prediction_type):
    """log w = -KL(q(x_prev | x_t, x0) || p_theta(x_prev | x_t)), with both means taken from diffusers' DDPM step."""
    scheduler = ddpm_scheduler(prediction_type)
    process = DDPMProcess(scheduler.config)
    x0, noise, prediction = torch.randn(3, 4, 8, 8, dtype=torch.float64).unbind(0)
    x0, noise, prediction = x0[None], noise[None], prediction[None]
    for t in (3, 250, 800):
        step = torch.tensor([t])
        x_t = process.add_noise(x0, noise, step)
        target = process.target(x0, noise, step)

        def reverse_mean(model_output):  # the same noise draw in both: the difference of the samples is the mean gap
            return scheduler.step(model_output, t, x_t, generator=torch.Generator().manual_seed(0)).prev_sample

        gap = reverse_mean(prediction) - reverse_mean(target)
        kl = gap.pow(2).sum() / (2 * scheduler._get_variance(t))
        squared_error = (prediction - target).pow(2).sum().reshape(1)
        log_weight = process.log_importance_weight(step, squared_error.float())
        assert log_weight.item() == pytest.approx(-kl.item(), rel=1e-4)


def test_v_error_is_abar_times_the_equivalent_epsilon_error():
    """eps_hat = sqrt(abar) v_hat + sqrt(1 - abar) x_t, so |eps_hat - eps|^2 = abar |v_hat - v|^2."""
    v_process = DDPMProcess(ddpm_scheduler("v_prediction").config)
    eps_process = DDPMProcess(ddpm_scheduler().config)
    x0, noise, v_hat = torch.randn(3, 2, 4, 8, 8, dtype=torch.float64).unbind(0)
    t = torch.tensor([100, 700])
    abar = v_process.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    x_t = v_process.add_noise(x0, noise, t)
    eps_hat = abar.sqrt() * v_hat + (1 - abar).sqrt() * x_t
    v_error = (v_hat - v_process.target(x0, noise, t)).pow(2).flatten(1).sum(1)
    eps_error = (eps_hat - noise).pow(2).flatten(1).sum(1)
    torch.testing.assert_close(eps_error, abar.flatten() * v_error)
    # ...and the two processes give the same weight to the same model
    torch.testing.assert_close(
        v_process.log_importance_weight(t, v_error.float()), eps_process.log_importance_weight(t, eps_error.float())
    )


def test_flow_weight_is_the_kl_of_the_gaussian_chain_and_the_euler_gap():
    process = FlowMatchingProcess()
    s, ds = 0.6, 1e-3
    x0, noise, v_hat = torch.randn(3, 4, 8, 8, dtype=torch.float64).unbind(0)
    x_s = (1 - s) * x0 + s * noise
    v = noise - x0

    def posterior_mean(clean):  # q(x_prev | x_s, clean) of the chain with alpha = 1 - s, sigma = s
        a, prev = (1 - s) / (1 - s + ds), s - ds
        var_step = s**2 - a**2 * prev**2
        return (a * prev**2 / s**2) * x_s + ((1 - prev) * var_step / s**2) * clean, var_step * prev**2 / s**2

    (mean_true, variance), (mean_model, _) = posterior_mean(x0), posterior_mean(x_s - s * v_hat)
    kl = (mean_model - mean_true).pow(2).sum() / (2 * variance)
    squared_error = (v_hat - v).pow(2).sum().reshape(1).float()
    log_weight = process.log_importance_weight(torch.tensor([s]), squared_error, step=ds)
    assert log_weight.item() == pytest.approx(-kl.item(), rel=1e-3)
    # the Euler step x_s - ds v_theta misses the true step by -ds (v_theta - v); this stochastic step, by twice that
    torch.testing.assert_close(mean_model - mean_true, -2 * ds * (v_hat - v), rtol=5e-3, atol=1e-6)


def test_sampled_estimator_is_unbiased_for_the_weight_and_its_log_mean_is_minus_the_kl():
    process = DDPMProcess(ddpm_scheduler().config)
    t = torch.full((200_000,), 500)
    squared_error = torch.full((200_000,), 0.4 / process.importance_coefficient(torch.tensor([500])).item())  # KL = 0.4
    xi = torch.randn(t.shape, generator=torch.Generator().manual_seed(0))
    log_weight = process.log_importance_weight(t, squared_error, "sampled", standard_normal=xi)
    assert log_weight.mean().item() == pytest.approx(-0.4, abs=0.01)
    assert log_weight.exp().mean().item() == pytest.approx(1.0, abs=0.02)  # E_q[p / q] = 1
    assert log_weight.std().item() == pytest.approx(math.sqrt(0.8), rel=0.01)  # sqrt(2 KL)


def test_weights_at_the_edges():
    process = DDPMProcess(ddpm_scheduler().config)
    t = torch.tensor([0, 0, 500])
    weight = process.log_importance_weight(t, torch.tensor([0.0, 0.1, 0.0])).exp()
    torch.testing.assert_close(weight, torch.tensor([1.0, 0.0, 1.0]))  # a perfect prediction always weighs 1
    sampled = process.log_importance_weight(t, torch.tensor([0.0, 0.1, 0.0]), "sampled").exp()
    torch.testing.assert_close(sampled, torch.tensor([1.0, 0.0, 1.0]))
    with pytest.raises(ValueError, match="weight_estimator='exact'"):
        process.log_importance_weight(t, torch.zeros(3), "exact")
    with pytest.raises(ValueError, match="importance_step=0.5: DDPM steps are whole"):
        process.log_importance_weight(t, torch.zeros(3), step=0.5)
    with pytest.raises(ValueError, match="importance_step=2.0: a flow step"):
        FlowMatchingProcess().log_importance_weight(torch.tensor([0.5]), torch.zeros(1), step=2.0)

"""What DPO-C&M and SDPO share: per-timestep metrics, and the importance weights they consume
(computed by the noise process, ``NoiseProcess.log_importance_weight``), against diffusers and the closed forms."""

import math

import pytest
import torch
from diffusers import DDPMScheduler

from lightning_pref.losses import timestep_bucket_means
from lightning_pref.losses.importance import calibrated_kl_scale
from lightning_pref.processes import DDPMProcess, FlowMatchingProcess


def test_bucket_means_cover_only_the_buckets_present():
    metrics = timestep_bucket_means(torch.tensor([1.0, 2.0, 4.0, 8.0]), torch.tensor([0.0, 0.09, 0.55, 1.0]), "w")
    assert metrics.keys() == {"w_t0.0-0.1", "w_t0.5-0.6", "w_t0.9-1.0"}  # t = 1 falls in the last bucket
    assert metrics["w_t0.0-0.1"].item() == 1.5
    assert metrics["w_t0.9-1.0"].item() == 8.0


@pytest.mark.parametrize(
    "coefficient, typical_error, threshold", [(0.01, 0.15, 0.9), (3e-3, 1.1, 0.5), (500.0, 3e-3, 0.99)]
)
def test_calibrated_scale_puts_the_typical_weight_at_the_threshold(coefficient, typical_error, threshold):
    scale = calibrated_kl_scale(coefficient, typical_error, threshold)
    assert math.exp(-scale * coefficient * typical_error) == pytest.approx(threshold, rel=1e-12)
    # a sample with twice the typical error at t* weighs tau^2: the scale is linear in the KL
    assert math.exp(-scale * coefficient * 2 * typical_error) == pytest.approx(threshold**2, rel=1e-12)


# ------------------------------------------------------------------------------------ importance weights
def ddpm_scheduler(prediction_type="epsilon"):
    return DDPMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type=prediction_type,
        clip_sample=False,
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
    """Log w = -KL(q(x_prev | x_t, x0) || p_theta(x_prev | x_t)), with both means taken from diffusers' DDPM step."""
    scheduler = ddpm_scheduler(prediction_type)
    process = DDPMProcess(scheduler.config)
    x0, noise, prediction = torch.randn(3, 4, 8, 8, dtype=torch.float64).unbind(0)
    x0, noise, prediction = x0[None], noise[None], prediction[None]
    for t in (3, 250, 800):
        step = torch.tensor([t])
        x_t = process.add_noise(x0, noise, step)
        target = process.target(x0, noise, step)

        def reverse_mean(model_output, t=t, x_t=x_t):  # the same noise draw in both: the samples differ by the mean gap
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

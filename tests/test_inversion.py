"""Deterministic DDIM inversion: its timesteps, diffusers' inverse scheduler, and DDIM sampling undoing it."""

import pytest
import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler, DDPMScheduler

from lightning_pref.backbones import StableDiffusionBackbone
from lightning_pref.errors import ConfigError
from lightning_pref.processes import DDPMProcess, ddim_invert

FP32_ULP = 2.0**-23
SD_SCHEDULE = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False)


def sd_process(prediction_type="epsilon"):
    return DDPMProcess(DDPMScheduler(**SD_SCHEDULE, prediction_type=prediction_type).config)


def diffusers_scheduler(kind, num_steps, **options):
    """``kind`` (DDIMScheduler or DDIMInverseScheduler) on SD's schedule with the released code's settings."""
    scheduler = kind(**SD_SCHEDULE, steps_offset=0, timestep_spacing="leading", **options)
    scheduler.set_timesteps(num_steps)
    return scheduler


def smooth_predictor(shape, seed=0):
    """A noise prediction that depends on the latent and the time, 1/2-Lipschitz in the latent."""
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    return lambda z, t: 0.5 * torch.tanh(weight * z + t.float().view(-1, *[1] * (z.ndim - 1)) / 1000)


def test_timesteps_are_leading_from_zero_as_the_released_script_and_the_inverse_scheduler():
    process = sd_process()
    steps = process.ddim_inversion_timesteps(80)
    assert steps[:3].tolist() == [0, 12, 24] and steps[-1] == 948 and len(steps) == 80
    assert torch.equal(steps, diffusers_scheduler(DDIMInverseScheduler, 80).timesteps)
    assert torch.equal(steps.flip(0), diffusers_scheduler(DDIMScheduler, 80).timesteps)
    for bad in (0, 1001, 2.5):
        with pytest.raises(ConfigError, match="num_inversion_steps"):
            process.ddim_inversion_timesteps(bad)


@pytest.mark.parametrize("set_alpha_to_one", [False, True])
def test_inversion_is_diffusers_inverse_scheduler_step_by_step(set_alpha_to_one):
    process, num_steps = sd_process(), 20
    x0 = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    predict = smooth_predictor(x0.shape[1:])
    inversion = ddim_invert(
        predict,
        x0,
        process.ddim_inversion_timesteps(num_steps),
        process.alphas_cumprod,
        initial_alpha_cumprod=1.0 if set_alpha_to_one else None,
    )
    scheduler = diffusers_scheduler(
        DDIMInverseScheduler, num_steps, set_alpha_to_one=set_alpha_to_one
    )  # clip_sample=False: SD_SCHEDULE
    z, expected = x0, [x0]
    for t in scheduler.timesteps:
        z = scheduler.step(predict(z, t.expand(len(z))), t, z).prev_sample
        expected.append(z)
    expected = torch.stack(expected, 1)
    # Same formula, other association order and float32 vs float64 coefficients: a few ulps of |z| per step, and a
    # 1/2-Lipschitz prediction of a perturbed input passes on at most half of it; upward steps scale z by <= 1.
    tolerance = num_steps * 8 * FP32_ULP * expected.abs().max().item()
    torch.testing.assert_close(inversion.latents, expected, rtol=0, atol=tolerance)
    assert torch.equal(inversion.timesteps, scheduler.timesteps)
    if not set_alpha_to_one:  # the released code's first step maps abar_0 to abar_0: exactly the identity
        assert torch.equal(inversion.latents[:, 1], x0)
    else:
        assert not torch.allclose(inversion.latents[:, 1], x0)


def reverse_step_coefficients(process, timesteps):
    """``(A_j, C_j)`` of the DDIM sampling step from ``t_j``'s level down to ``t_{j-1}``'s (``abar_0`` below
    ``t_0``): ``x_prev = A_j x + C_j eps``, the exact inverse of inversion step ``j`` for the same ``eps``."""
    abar = process.alphas_cumprod[timesteps]
    below = torch.cat([process.alphas_cumprod[:1], abar[:-1]])
    scale = (below / abar).sqrt()
    return scale, (1 - below).sqrt() - scale * (1 - abar).sqrt()


def sample_back(predict, start, num_steps):
    """Deterministic DDIM sampling with diffusers from ``start`` through the inversion's timesteps, and the noise
    prediction of every step (in the order of the inversion's steps)."""
    scheduler = diffusers_scheduler(DDIMScheduler, num_steps, set_alpha_to_one=False)
    x, predictions = start, []
    for t in scheduler.timesteps:
        eps = predict(x, t.expand(len(x)))
        predictions.append(eps)
        x = scheduler.step(eps, t, x).prev_sample
    return x, torch.stack(predictions[::-1], 1)


def test_ddim_sampling_undoes_the_inversion_when_the_prediction_ignores_the_latent():
    process, num_steps = sd_process(), 50
    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    per_time = torch.randn(1000, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    predict = lambda z, t: per_time[t]  # noqa: E731
    inversion = ddim_invert(predict, x0, process.ddim_inversion_timesteps(num_steps), process.alphas_cumprod)
    reconstruction, _ = sample_back(predict, inversion.latents[:, -1], num_steps)
    # Only rounding is left: a few ulps of |z| per step, scaled on the way down by at most
    # prod_j A_j = sqrt(abar_0 / abar_{t_{N-1}}).
    scale, _ = reverse_step_coefficients(process, process.ddim_inversion_timesteps(num_steps))
    tolerance = num_steps * 8 * FP32_ULP * scale.prod().item() * inversion.latents.abs().max().item()
    torch.testing.assert_close(reconstruction, x0, rtol=0, atol=tolerance)


def test_on_the_tiny_model_sampling_returns_to_x0_up_to_what_the_prediction_mismatch_explains(tiny_sd):
    """Inversion step j predicts at ``(z_j, t_j)``, the sampler at ``(x_{j+1}, t_j)``. With ``x_prev = A_j x + C_j e``
    both ways, the reconstruction error is exactly ``sum_j (A_0 ... A_{j-1}) C_j (e_hat_j - e_j)``."""
    backbone = StableDiffusionBackbone(str(tiny_sd))
    process, num_steps = backbone.process, 10
    conditioning = backbone.encode_prompts(["a red cat", "a blue dog"])
    x0 = torch.randn(2, *backbone.latent_shape(1)[1:], generator=torch.Generator().manual_seed(4))

    @torch.no_grad()
    def predict(z, t):
        return backbone.predict(backbone.denoiser, z, t, conditioning).float()

    timesteps = process.ddim_inversion_timesteps(num_steps)
    inversion = ddim_invert(predict, x0, timesteps, process.alphas_cumprod)
    reconstruction, sampled = sample_back(predict, inversion.latents[:, -1], num_steps)
    scale, shift = reverse_step_coefficients(process, timesteps)
    reach = torch.cat([torch.ones(1, dtype=scale.dtype), scale.cumprod(0)[:-1]])  # A_0 ... A_{j-1}
    explained = ((reach * shift).float().view(1, -1, 1, 1, 1) * (sampled - inversion.noise)).sum(1)
    assert (reconstruction - x0).abs().max() > 1e-3  # the tiny model's prediction does depend on its input
    tolerance = 2 * num_steps * 8 * FP32_ULP * scale.prod().item() * inversion.latents.abs().max().item()
    torch.testing.assert_close(reconstruction - x0, explained, rtol=0, atol=tolerance)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_the_noise_of_a_noisy_sample_and_of_a_prediction(prediction_type):
    process = sd_process(prediction_type)
    generator = torch.Generator().manual_seed(5)
    x0, noise = torch.randn(3, 4, 8, 8, generator=generator), torch.randn(3, 4, 8, 8, generator=generator)
    t = torch.tensor([0, 480, 999])
    x_t = process.add_noise(x0, noise, t)
    # x_t / sqrt(1 - abar) amplifies x_t's rounding by at most 1 / sqrt(1 - abar_0) (about 34)
    tolerance = 8 * FP32_ULP * x_t.abs().max().item() / (1 - process.alphas_cumprod[0].item()) ** 0.5
    torch.testing.assert_close(process.noise_of(x_t, x0, t), noise, rtol=0, atol=tolerance)
    # v = sqrt(abar) eps - sqrt(1 - abar) x0 and back: a few ulps of the largest term
    tolerance = 8 * FP32_ULP * (x0.abs() + noise.abs()).max().item()
    torch.testing.assert_close(
        process.predicted_noise(process.target(x0, noise, t), x_t, t), noise, rtol=0, atol=tolerance
    )

"""Importance-weighted methods (DPO-C&M, SDPO): weights from the process, per-bucket logs, masks, sampled weights,
the KL scale and its calibration."""

import math

import pytest
import torch
from helpers.pairs import random_pairs
from helpers.steps import batch_of, lora_gradient, step_errors
from helpers.training import perturb_lora, trainer
from torch.utils.data import DataLoader

from lightning_pref.backbones import StableDiffusion3Backbone, StableDiffusionBackbone
from lightning_pref.errors import ConfigError
from lightning_pref.methods import SDPO, DPOClipMask
from lightning_pref.methods.importance import CALIBRATION_KEY
from lightning_pref.seeding import PairRandomness
from lightning_pref.tiny import write_tiny_sd3_pipeline


def test_weights_come_from_the_process_and_are_logged_per_timestep_bucket(tiny_sd):
    batch = batch_of()
    summed = SDPO(StableDiffusionBackbone(str(tiny_sd)), kl_reduction="sum", mask_threshold=None)
    errors = step_errors(summed, batch)
    weight_w, weight_l = summed.importance_weights(errors)
    expected = summed.process.log_importance_weight(errors.timesteps, errors.policy_w * 4 * 8 * 8).exp()
    torch.testing.assert_close(weight_w, expected)  # `sum`: the KL of the 4x8x8 latent
    _, metrics = summed.compute_loss(errors, batch)
    buckets = {int(t) // 100 for t in errors.timesteps}
    keys = {k for k in metrics if k.startswith("importance_weight_t")}
    assert keys == {f"importance_weight_t{b / 10:.1f}-{(b + 1) / 10:.1f}" for b in buckets}
    assert not any(k.startswith("masked_fraction_t") for k in metrics)  # no mask, no masked fraction per bucket

    per_element = DPOClipMask(StableDiffusionBackbone(str(tiny_sd)))
    mean_weight, _ = per_element.importance_weights(errors)
    torch.testing.assert_close(
        mean_weight, per_element.process.log_importance_weight(errors.timesteps, errors.policy_w).exp()
    )
    assert (mean_weight > weight_w).all()


def test_a_step_that_masks_every_pair_trains_nothing(sd_backbone):
    module = DPOClipMask(sd_backbone, kl_reduction="sum")  # on the tiny model every weight is < 0.9
    perturb_lora(module)
    batch = batch_of()
    loss, metrics = module.compute_loss(step_errors(module, batch), batch)
    assert metrics["masked_fraction"].item() == 1.0 and loss.item() == 0.0
    assert lora_gradient(module, loss).abs().sum() == 0


def test_sampled_weights_follow_the_step_seed(sd_backbone):
    module = SDPO(sd_backbone, weight_estimator="sampled", mask_threshold=None, kl_reduction="sum")
    batch = batch_of()
    draws = [module.importance_weights(step_errors(module, batch, seed))[0] for seed in (0, 0, 1)]
    torch.testing.assert_close(draws[0], draws[1])
    assert not torch.allclose(draws[0], draws[2])


# ------------------------------------------------------------------------------------ the KL scale
def test_the_default_weights_are_the_process_weights_bit_for_bit(tiny_sd):
    batch = batch_of()
    mean, summed = (
        DPOClipMask(StableDiffusionBackbone(str(tiny_sd))),
        SDPO(StableDiffusionBackbone(str(tiny_sd)), kl_reduction="sum"),
    )
    errors = step_errors(mean, batch)
    t = errors.noisy.timesteps
    expected = mean.process.log_importance_weight(t, errors.policy_squared).exp()
    assert torch.equal(torch.cat(mean.importance_weights(errors)), expected)
    expected = summed.process.log_importance_weight(t, errors.policy_squared * 4 * 8 * 8).exp()
    assert torch.equal(torch.cat(summed.importance_weights(errors)), expected)


def test_kl_scale_raises_each_expected_weight_to_its_power(tiny_sd):
    """With log w = -k c_t err, k multiplies the log-weight; fp32 rounding of w (2^-24) grows k-fold in w^k."""
    batch = batch_of()
    plain, scaled = (DPOClipMask(StableDiffusionBackbone(str(tiny_sd)), kl_scale=k) for k in (1.0, 20.0))
    errors = step_errors(plain, batch)
    weights, scaled_weights = torch.cat(plain.importance_weights(errors)), torch.cat(scaled.importance_weights(errors))
    torch.testing.assert_close(scaled_weights.double(), weights.double() ** 20, rtol=22 * 2**-24, atol=0)
    assert (scaled_weights < weights).all()


def calibrated(tiny_sd, at=0.1, **options):
    return DPOClipMask(StableDiffusionBackbone(str(tiny_sd)), calibrate_kl_scale_at=at, **options)


def test_calibration_measures_the_policy_at_t_star_from_its_own_stream(tiny_sd):
    module = calibrated(tiny_sd)
    perturb_lora(module)  # the policy's error, not the reference's
    batch = batch_of(8)
    random = PairRandomness.for_pairs((0,), range(8))
    samples = module.prepare_samples(batch, random)
    # by hand: every pair's winner and loser noised at t = 100 with one draw of the pair's calibration stream
    t = torch.full((16,), 100)
    streams = PairRandomness.for_pairs((module.seed, "kl_scale_calibration"), range(8))
    noise = streams.normal(tuple(samples.latents.shape[1:])).repeat(2, 1, 1, 1)
    x_t = module.process.add_noise(samples.latents, noise, t)
    with torch.no_grad():
        prediction = module.denoiser(x_t, t, encoder_hidden_states=samples.conditioning["encoder_hidden_states"]).sample
        reference = module.reference_prediction(x_t, t, samples.conditioning)
    error = (prediction - noise).pow(2).mean().item()
    assert module.typical_error == pytest.approx(error, rel=1e-5)
    assert abs(error - (reference - noise).pow(2).mean().item()) > 1e-3 * error  # the two networks differ
    coefficient = module.process.importance_coefficient(torch.tensor([100])).item()
    assert math.exp(-module.kl_scale * coefficient * error) == pytest.approx(0.9, rel=1e-5)


def test_calibration_happens_once_and_leaves_the_step_draws_alone(tiny_sd):
    module, plain = calibrated(tiny_sd), DPOClipMask(StableDiffusionBackbone(str(tiny_sd)))
    first = step_errors(module, batch_of(4))
    scale = module.kl_scale
    unweighted = step_errors(plain, batch_of(4))
    assert torch.equal(first.noisy.timesteps, unweighted.noisy.timesteps)
    assert torch.equal(first.policy, unweighted.policy) and torch.equal(first.reference, unweighted.reference)
    other_batch = next(iter(DataLoader(random_pairs(4, size=16, seed=1), batch_size=4)))
    step_errors(module, other_batch, seed=1)
    assert module.kl_scale == scale  # measured on the first batch only...
    random = PairRandomness.for_pairs((1,), range(4))
    samples = module.prepare_samples(other_batch, random)
    assert (
        module.measure_typical_error(samples, other_batch, random) != module.typical_error
    )  # ...though this one differs


def test_the_calibrated_mask_drops_the_steps_below_t_star_and_keeps_the_middle(tiny_sd):
    module, plain = calibrated(tiny_sd), DPOClipMask(StableDiffusionBackbone(str(tiny_sd)))
    batch = batch_of(8)
    step_errors(module, batch)  # calibrates at t* = 100
    # the tiny model's per-element error is ~1.1 at every t, so its weight follows c_t: twice c_100 and more below
    # t = 50 (w <= tau^2), about 0.6 c_100 in the middle (w ~ tau^0.6)
    for timestep_range, calibrated_masked in [((0.0, 0.05), 1.0), ((0.3, 0.7), 0.0)]:
        module.process.timestep_range = plain.process.timestep_range = timestep_range
        errors = step_errors(module, batch, seed=1)
        assert module.compute_loss(errors, batch)[1]["masked_fraction"].item() == calibrated_masked
    module.process.timestep_range = plain.process.timestep_range = (0.0, 0.05)
    errors = step_errors(plain, batch, seed=1)
    assert plain.compute_loss(errors, batch)[1]["masked_fraction"].item() < 0.5  # the per-element KL keeps most


def test_a_resumed_run_keeps_the_measured_calibration(tiny_sd, tmp_path):
    module = calibrated(tiny_sd)
    first = trainer(tmp_path, 1)
    first.fit(module, DataLoader(random_pairs(4), batch_size=4))
    path = tmp_path / "calibrated.ckpt"
    first.save_checkpoint(path)
    assert torch.load(path, weights_only=True)[CALIBRATION_KEY] == {"at": 0.1, "typical_error": module.typical_error}

    other_data = DataLoader(random_pairs(4, seed=1), batch_size=4)  # a new measurement would differ
    resumed = calibrated(tiny_sd)
    trainer(tmp_path, 2).fit(resumed, other_data, ckpt_path=path)
    assert (resumed.typical_error, resumed.kl_scale) == (module.typical_error, module.kl_scale)
    elsewhere = calibrated(tiny_sd, at=0.2)  # calibrated at another t*: measured again
    trainer(tmp_path, 2).fit(elsewhere, other_data, ckpt_path=path)
    assert elsewhere.typical_error not in (None, module.typical_error)


def test_t_star_is_the_nearest_training_step_or_the_flow_time_itself(tiny_sd, tmp_path):
    assert calibrated(tiny_sd, at=0.1234).calibration_time().tolist() == [123]
    assert calibrated(tiny_sd, at=0.9999).calibration_time().tolist() == [999]  # the last step, not past it
    flow = DPOClipMask(
        StableDiffusion3Backbone(str(write_tiny_sd3_pipeline(tmp_path, with_t5=False))), calibrate_kl_scale_at=0.1
    )
    batch = batch_of(2)
    step_errors(flow, batch)
    t_star = flow.calibration_time()
    assert t_star.tolist() == [pytest.approx(0.1)]
    typical = torch.tensor([flow.typical_error * flow.kl_scale])  # a sample with the typical error at s = 0.1...
    assert flow.process.log_importance_weight(t_star, typical).exp().item() == pytest.approx(
        0.9, rel=1e-6
    )  # ...weighs tau


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(kl_scale=0.0), "kl_scale=0.0: use a positive"),
        (dict(calibrate_kl_scale_at=1.0), r"calibrate_kl_scale_at=1.0: give t\* as a fraction"),
        (dict(calibrate_kl_scale_at=0.0004), "the step into the clean sample"),
        (dict(calibrate_kl_scale_at=0.1, kl_reduction="sum"), "kl_reduction='sum' with calibrate_kl_scale_at"),
        (dict(calibrate_kl_scale_at=0.1, kl_scale=2.0), "kl_scale=2.0 with calibrate_kl_scale_at=0.1"),
        (dict(calibrate_kl_scale_at=0.1, mask_threshold=None), r"needs a mask_threshold in \(0, 1\)"),
    ],
)
def test_bad_kl_scale_options_name_the_key_and_the_fix(sd_backbone, options, message):
    with pytest.raises(ConfigError, match=message):
        SDPO(sd_backbone, **options)

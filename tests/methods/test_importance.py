"""Importance-weighted methods (DPO-C&M, SDPO): weights from the process, per-bucket logs, masks, sampled weights."""

import torch
from helpers.steps import batch_of, lora_gradient, step_errors
from helpers.training import perturb_lora

from lightning_pref.backbones import StableDiffusionBackbone
from lightning_pref.methods import SDPO, DPOClipMask


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

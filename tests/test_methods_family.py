"""The loss-family methods as modules: every process, the cross-method options, MaPO's missing reference, the CLI."""

import csv
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import random_pairs
from test_module import perturb_lora, trainer
from torch.utils.data import DataLoader

from lightning_pref.backbones import StableDiffusionBackbone
from lightning_pref.cli import main as cli_main
from lightning_pref.errors import DataError
from lightning_pref.losses import dmpo_loss, entropy_regularized_reference, implicit_reward_margin
from lightning_pref.methods import (
    DMPO,
    SDPO,
    SEEDPO,
    SIPO,
    DiffusionDPO,
    DiffusionKTO,
    DPOClipMask,
    MaPO,
    PairRandomness,
    Samples,
)
from lightning_pref.processes import FlowMatchingProcess

REPO = Path(__file__).resolve().parents[1]
FAMILY = {
    "dpo_clip_mask": DPOClipMask,
    "sdpo": SDPO,
    "dmpo": DMPO,
    "see_dpo": SEEDPO,
    "kto": DiffusionKTO,
    "mapo": MaPO,
}


def batch_of(num_pairs=4, size=16):
    return next(iter(DataLoader(random_pairs(num_pairs, size=size), batch_size=num_pairs)))


def step_errors(module, batch, seed=0):
    """One step's errors, as the training step computes them."""
    random = PairRandomness.for_pairs((seed,), range(len(batch["prompt"])))
    samples = module.prepare_samples(batch, random)
    return module.sample_errors(module.noise_samples(samples, random), samples.conditioning, batch)


def lora_gradient(module, value):
    params = [p for name, p in module.named_parameters() if "lora_B" in name]
    return torch.cat([g.flatten() for g in torch.autograd.grad(value, params, retain_graph=True)])


# --------------------------------------------------------------------------------- every method, every process
def backbone_for(prediction_type, request):
    """A tiny backbone per process: the SD pipeline (epsilon), the pixel pipeline (v), or the SD UNet trained as
    if it were a flow model (a stand-in: the methods only see the process's times, targets and weights)."""
    if prediction_type == "v_prediction":
        return StableDiffusionBackbone(str(request.getfixturevalue("tiny_pixel")))
    backbone = StableDiffusionBackbone(str(request.getfixturevalue("tiny_sd")))
    if prediction_type == "flow":
        backbone.process = FlowMatchingProcess()
    return backbone


@pytest.mark.parametrize("method", list(FAMILY.values()), ids=list(FAMILY))
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "flow"])
def test_every_method_trains_on_every_process(method, prediction_type, request):
    module = method(backbone_for(prediction_type, request))
    assert module.process.prediction_type == prediction_type
    perturb_lora(module)
    batch = batch_of(size=8 if prediction_type == "v_prediction" else 16)  # the pixel pipeline has no VAE
    loss, metrics = module.compute_loss(step_errors(module, batch), batch)
    assert torch.isfinite(loss) and all(torch.isfinite(v) for v in metrics.values())
    assert lora_gradient(module, loss).abs().sum() > 0
    assert method.supported_prediction_types is None  # so none of them refuses a backbone


def test_sipo_is_sdpo():
    assert SIPO is SDPO


# ------------------------------------------------------------------------------------ importance weights
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


# ------------------------------------------------------------------------------------------------- MaPO
def test_mapo_builds_no_reference_copy(sd_backbone):
    module = MaPO(sd_backbone, finetune="full")
    assert module.reference is None
    assert not any(name.startswith("_reference") for name, _ in module.named_modules())


def test_mapo_runs_one_forward_and_never_the_reference(tmp_path, sd_backbone):
    module = MaPO(sd_backbone)
    forwards = []
    module.denoiser.register_forward_hook(lambda *args: forwards.append(1))

    def no_reference(*args, **kwargs):
        raise AssertionError("MaPO called the reference")

    module.reference_prediction = no_reference
    module.reference_denoiser = no_reference
    trainer(tmp_path, 2).fit(module, DataLoader(random_pairs(8), batch_size=4))
    assert len(forwards) == 2  # one policy forward per step
    with pytest.raises(RuntimeError, match="reference-free"):
        with MaPO.reference_denoiser(module):
            pass


# --------------------------------------------------------------------------------------------- Diffusion-KTO
def test_kto_reads_winners_as_desirable_and_losers_as_undesirable(sd_backbone):
    module = DiffusionKTO(sd_backbone, desirable_weight=2.0)
    errors = step_errors(module, batch_of())
    _, metrics = module.compute_loss(errors, {})
    torch.testing.assert_close(metrics["desirable_reward"], (errors.ref_w - errors.policy_w).mean())
    torch.testing.assert_close(metrics["undesirable_reward"], (errors.ref_l - errors.policy_l).mean())
    assert "implicit_acc" in metrics  # the shared pairwise metrics of the pairs it read


def test_kto_on_unpaired_samples_draws_noise_per_sample_and_routes_labels(sd_backbone, monkeypatch):
    module = DiffusionKTO(sd_backbone, beta=100.0)
    pixels = torch.rand(1, 3, 16, 16).expand(4, 3, 16, 16) * 2 - 1  # one image, four times, same prompt
    batch = {"pixels": pixels, "label": torch.tensor([1, 0, 1, 0]), "prompt": ["a red cat"] * 4}
    logged = {}
    monkeypatch.setattr(
        module, "log_metrics", lambda stage, loss, metrics, batch_size: logged.update(metrics, loss=loss)
    )
    monkeypatch.setattr(
        module, "step_randomness", lambda batch, batch_idx, stage: PairRandomness.for_pairs((3,), range(4))
    )
    loss = module.preference_step(batch, 0, "train")

    random = PairRandomness.for_pairs((3,), range(4))  # the same streams, by hand
    x0 = sd_backbone.encode_pixels(pixels, random.generators)
    conditioning = sd_backbone.encode_prompts(batch["prompt"])
    noisy = module.noise_samples(Samples(x0, conditioning, num_pairs=None), random)
    assert len(noisy.timesteps.unique()) == 4  # each sample its own timestep (and noise)
    errors = module.sample_errors(noisy, conditioning, batch)
    reward = errors.reference - errors.policy
    torch.testing.assert_close(logged["desirable_reward"], reward[[0, 2]].mean())
    torch.testing.assert_close(logged["undesirable_reward"], reward[[1, 3]].mean())
    torch.testing.assert_close(loss, logged["loss"])
    with pytest.raises(DataError, match="without 'label'"):
        module.preference_step({"pixels": pixels, "prompt": batch["prompt"]}, 0, "train")


def test_kto_fits_on_the_unpaired_datamodule(sd_backbone, tmp_path):
    from lightning_pref.datamodules import UnpairedDataModule, write_unpaired_shards

    rng = np.random.default_rng(0)
    samples = [
        {"image": rng.integers(0, 256, (16, 16, 3), dtype=np.uint8), "caption": f"a cat {i}", "label": i % 2}
        for i in range(8)
    ]
    write_unpaired_shards(samples, tmp_path / "shards")
    module = DiffusionKTO(sd_backbone, lr=1e-3)
    before = {name: p.detach().clone() for name, p in module.named_parameters() if p.requires_grad}
    data = UnpairedDataModule(str(tmp_path / "shards"), batch_size=4, num_workers=0, batches_per_epoch=2)
    fit_trainer = trainer(tmp_path, 2)
    fit_trainer.fit(module, datamodule=data)
    assert torch.isfinite(fit_trainer.callback_metrics["train/loss"])
    assert "train/reference_point" in fit_trainer.callback_metrics
    assert any(not torch.equal(p, before[name]) for name, p in module.named_parameters() if p.requires_grad)


def test_kto_reference_point_is_averaged_across_ranks(sd_backbone, monkeypatch):
    """Under DDP every rank uses the mean of the ranks' mean rewards; here a fake second rank holds 0.3."""
    import lightning_pref.methods.kto as kto

    def all_reduce(value):  # sum over two ranks: this one and a fake one
        value += 0.3

    module = DiffusionKTO(sd_backbone)
    errors = step_errors(module, batch_of())
    monkeypatch.setattr(kto.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(kto.dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(kto.dist, "all_reduce", all_reduce)
    _, metrics = module.compute_loss(errors, {})
    local = torch.cat([errors.ref_w - errors.policy_w, errors.ref_l - errors.policy_l]).mean()
    torch.testing.assert_close(metrics["reference_point"], ((local + 0.3) / 2).clamp(min=0))
    assert metrics["reference_point"] > 0


# --------------------------------------------------------------------------------- cross-method options
def test_safeguard_scales_only_the_loser_gradient_and_logs_lambda(tiny_sd):
    batch = batch_of()
    plain = DMPO(StableDiffusionBackbone(str(tiny_sd)))
    guarded = DMPO(StableDiffusionBackbone(str(tiny_sd)), loser_safeguard=True)
    perturb_lora(plain)
    guarded.load_state_dict(plain.state_dict())
    errors, guarded_errors = step_errors(plain, batch), step_errors(guarded, batch)
    scale = guarded_errors.loser_gradient_scale
    assert scale.shape == (4,) and 0 < scale[0] < 1 and (scale == scale[0]).all()  # `batch` scope: one lambda
    torch.testing.assert_close(guarded_errors.policy_l, errors.policy_l)  # values untouched
    torch.testing.assert_close(
        lora_gradient(guarded, guarded_errors.policy_l.sum()), scale[0] * lora_gradient(plain, errors.policy_l.sum())
    )
    torch.testing.assert_close(
        lora_gradient(guarded, guarded_errors.policy_w.sum()), lora_gradient(plain, errors.policy_w.sum())
    )
    assert guarded.cross_method_metrics(guarded_errors)["loser_gradient_scale"] == scale.mean()


def test_entropy_option_applies_see_to_another_pairwise_method(sd_backbone):
    module = DMPO(sd_backbone, beta=1000.0, entropy_gamma=200.0)
    perturb_lora(module)
    errors = step_errors(module, batch_of())
    loss, metrics = module.compute_loss(module.entropy_regularized(errors), {})
    see_ref = entropy_regularized_reference(*errors.as_args(), beta=1000.0, gamma=200.0)
    expected, _ = dmpo_loss(errors.policy_w, errors.policy_l, *see_ref, beta=1000.0)
    torch.testing.assert_close(loss, expected)
    margin = implicit_reward_margin(*errors.as_args(), beta=1000.0) - 100.0 * (errors.policy_w - errors.policy_l)
    # the same number computed in another order: terms of size beta * err ~ 1e3 leave fp32 rounding ~1e-4
    torch.testing.assert_close(metrics["reward_margin"], margin.mean(), atol=1e-4, rtol=0)
    # the logged error metrics are those of the true reference, not of the flattened one the loss saw
    true = module.cross_method_metrics(errors)
    torch.testing.assert_close(true["reference_mse"], torch.cat([errors.ref_w, errors.ref_l]).mean())


def test_seedpo_is_diffusion_dpo_with_the_entropy_option(tiny_sd):
    see = SEEDPO(StableDiffusionBackbone(str(tiny_sd)), beta=1000.0, entropy_gamma=300.0)
    dpo = DiffusionDPO(StableDiffusionBackbone(str(tiny_sd)), beta=1000.0, entropy_gamma=300.0)
    perturb_lora(see)
    dpo.load_state_dict(see.state_dict())
    batch = batch_of()
    see_loss = see.compute_loss(see.entropy_regularized(step_errors(see, batch)), batch)[0]
    dpo_loss = dpo.compute_loss(dpo.entropy_regularized(step_errors(dpo, batch)), batch)[0]
    torch.testing.assert_close(see_loss, dpo_loss)


@pytest.mark.parametrize(
    "method, options, message",
    [
        (DiffusionKTO, dict(loser_safeguard=True), "loser_safeguard applies to pairwise methods only"),
        (DiffusionKTO, dict(entropy_gamma=10.0), "entropy_gamma applies to pairwise methods only"),
        (MaPO, dict(entropy_gamma=10.0), "MaPO has none"),
        (SEEDPO, dict(entropy_gamma=0.0), "SEEDPO needs gamma > 0"),
        (DiffusionDPO, dict(entropy_gamma=-1.0), "entropy_gamma=-1.0"),
        (DiffusionDPO, dict(loser_safeguard=True, safeguard_mu=2.0), "safeguard_mu=2.0"),
        (DMPO, dict(alpha=1e-9), "alpha=1e-09"),
        (DPOClipMask, dict(mask_threshold=None), "needs a mask_threshold"),
        (SDPO, dict(kl_reduction="max"), "kl_reduction='max'"),
        (SDPO, dict(weight_estimator="exact"), "weight_estimator='exact'"),
        (SDPO, dict(clip_eps=0.0), "clip_eps=0.0"),
        (DiffusionKTO, dict(undesirable_weight=-1.0), "undesirable_weight=-1.0"),
    ],
)
def test_bad_options_are_clear_errors(sd_backbone, method, options, message):
    with pytest.raises(ValueError, match=message):
        method(sd_backbone, **options)


# ------------------------------------------------------------------------------------ the CLI, per method
def toy_config_for_tests(name, tiny_sd, tiny_shards, tmp_path):
    """The example config of a method, pointed at the tiny pipeline and shards, for two steps."""
    config = yaml.safe_load((REPO / "examples" / "toy" / f"{name}.yaml").read_text())
    config["trainer"].update(
        max_steps=2,
        log_every_n_steps=1,
        enable_progress_bar=False,
        default_root_dir=str(tmp_path),
        logger={"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(tmp_path)}},
    )
    config["model"]["init_args"]["backbone"]["init_args"]["pretrained"] = str(tiny_sd)
    config["data"]["init_args"].update(
        train_shards=f"{tiny_shards}/*.tar", batch_size=2, num_workers=0, shuffle_buffer=4, batches_per_epoch=2
    )
    return config


METHOD_METRICS = {
    "dpo_clip_mask": "train/masked_fraction",
    "sdpo": "train/importance_weight_w",
    "dmpo": "train/mean_p",
    "see_dpo": "train/reward_margin",
    "kto": "train/reference_point",
    "mapo": "train/sft_loss",
}


@pytest.mark.parametrize("name", list(FAMILY))
def test_example_config_fits_two_steps_through_the_cli(name, tiny_sd, tiny_shards, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["lightning-pref"])  # in-process: the CLI reads `args`, not pytest's argv
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(toy_config_for_tests(name, tiny_sd, tiny_shards, tmp_path)))
    cli_main(["fit", "--config", str(path)])
    with next(tmp_path.glob("lightning_logs/version_*/metrics.csv")).open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2  # one row per step
    assert all(row["train/loss"] and row[METHOD_METRICS[name]] for row in rows)
    saved = yaml.safe_load(next(tmp_path.glob("lightning_logs/version_*/config.yaml")).read_text())
    assert saved["model"]["class_path"] == f"lightning_pref.methods.{FAMILY[name].__name__}"

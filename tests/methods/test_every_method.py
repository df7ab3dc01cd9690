"""Every method as a module: a step on every noise process, the cross-method options, bad options, the CLI."""

import csv
import sys

import pytest
import torch
import yaml
from helpers.processes import REPO
from helpers.steps import batch_of, lora_gradient, step_errors
from helpers.training import perturb_lora

from lightning_pref.backbones import StableDiffusionBackbone
from lightning_pref.cli import main as cli_main
from lightning_pref.methods import DMPO, SDPO, SEEDPO, DiffusionDPO, DiffusionKTO, DPOClipMask, MaPO
from lightning_pref.processes import FlowMatchingProcess

FAMILY = {
    "dpo_clip_mask": DPOClipMask,
    "sdpo": SDPO,
    "dmpo": DMPO,
    "see_dpo": SEEDPO,
    "kto": DiffusionKTO,
    "mapo": MaPO,
}


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

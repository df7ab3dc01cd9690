"""`lightning-pref export`: a LoRA run's checkpoint to diffusers' LoRA format, or merged into the denoiser.

(Full fine-tunes from single-file, ZeRO-3 and FSDP2 checkpoints are exported in tests/test_strategies.py;
crafted and damaged checkpoints of every format are refused in tests/hostile/test_checkpoints.py.)
"""

import argparse

import pytest
import torch
import yaml
from diffusers import StableDiffusionPipeline
from helpers.pairs import random_pairs
from helpers.training import trainer
from torch.utils.data import DataLoader

from lightning_pref.cli import main
from lightning_pref.errors import CheckpointError
from lightning_pref.export import build_module, export, export_main


def run_config(tiny_sd, path, **options):
    backbone = {
        "class_path": "lightning_pref.backbones.StableDiffusionBackbone",
        "init_args": {"pretrained": str(tiny_sd)},
    }
    init_args = {"backbone": backbone, "beta": 500.0, "finetune": "lora", "lora_rank": 4, "lr": 1e-2, **options}
    path.write_text(
        yaml.safe_dump({"model": {"class_path": "lightning_pref.methods.DiffusionDPO", "init_args": init_args}})
    )
    return path


@pytest.fixture(scope="module")
def lora_run(tiny_sd, tmp_path_factory):
    """A LoRA Diffusion-DPO run of 3 steps, its config, last checkpoint and trained module."""
    root = tmp_path_factory.mktemp("lora_run")
    config = run_config(tiny_sd, root / "config.yaml")
    module = build_module(config)
    fit_trainer = trainer(root, 3)
    fit_trainer.fit(module, DataLoader(random_pairs(12), batch_size=4))
    checkpoint = root / "last.ckpt"
    fit_trainer.save_checkpoint(checkpoint)
    return config, checkpoint, module


def unet_output(unet, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=generator)
    text = torch.randn(2, 16, 32, generator=generator)
    with torch.no_grad():
        return unet(x, torch.tensor([10, 700]), encoder_hidden_states=text).sample


def test_lora_export_loads_into_the_base_pipeline_and_reproduces_the_policy(tiny_sd, lora_run, tmp_path):
    config, checkpoint, module = lora_run
    out = export(config, checkpoint, tmp_path / "lora")
    assert (out / "pytorch_lora_weights.safetensors").exists()
    pipeline = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None, requires_safety_checker=False)
    base = unet_output(pipeline.unet)
    pipeline.load_lora_weights(out)
    tuned = unet_output(pipeline.unet)
    expected = unet_output(module.denoiser)
    torch.testing.assert_close(tuned, expected, rtol=1e-4, atol=1e-5)
    assert (tuned - base).abs().max() > 1e-3  # the adapter trained and carries over


def test_merged_lora_is_a_complete_pipeline_with_the_policy_weights(lora_run, tmp_path):
    config, checkpoint, module = lora_run
    main(
        [
            "export",
            "--config",
            str(config),
            "--checkpoint",
            str(checkpoint),
            "--out",
            str(tmp_path / "merged"),
            "--merge-lora",
        ]
    )
    pipeline = StableDiffusionPipeline.from_pretrained(
        tmp_path / "merged", safety_checker=None, requires_safety_checker=False
    )
    assert not any("lora" in name for name in pipeline.unet.state_dict())
    torch.testing.assert_close(unet_output(pipeline.unet), unet_output(module.denoiser), rtol=1e-4, atol=1e-5)


def test_a_config_from_another_run_is_refused_by_name(tiny_sd, lora_run, tmp_path):
    _, checkpoint, _ = lora_run
    with pytest.raises(KeyError, match="different runs"):
        export(
            run_config(tiny_sd, tmp_path / "rank8.yaml", lora_rank=8, lora_target_modules=["to_q", "ff.net.2"]),
            checkpoint,
            tmp_path / "out",
        )
    with pytest.raises(FileNotFoundError, match="missing.ckpt does not exist"):
        export(run_config(tiny_sd, tmp_path / "c.yaml"), tmp_path / "missing.ckpt", tmp_path / "out")
    (tmp_path / "empty.yaml").write_text("trainer: {}\n")
    with pytest.raises(KeyError, match="no 'model' section"):
        export(tmp_path / "empty.yaml", checkpoint, tmp_path / "out")


def test_a_checkpoint_holding_other_objects_exports_only_with_the_opt_in(lora_run, tmp_path):
    config, checkpoint, _ = lora_run
    own = tmp_path / "own.ckpt"  # e.g. a run of one's own that saved its arguments beside the weights
    torch.save({**torch.load(checkpoint, weights_only=True), "args": argparse.Namespace(steps=3)}, own)
    command = ["--config", str(config), "--checkpoint", str(own), "--out", str(tmp_path / "lora")]
    refusal = r"own.ckpt refers to the Python global 'argparse.Namespace'.*--trust-pickled-checkpoint\.$"
    with pytest.raises(CheckpointError, match=refusal):
        export_main(command)
    export_main([*command, "--trust-pickled-checkpoint"])
    assert (tmp_path / "lora" / "pytorch_lora_weights.safetensors").exists()

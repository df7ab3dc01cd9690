"""Export round trips for every backbone family: the exported model, loaded by diffusers, samples what the module
samples.

For each tiny pipeline (SD1.5, SDXL, SD3, CogVideoX, Wan) a Diffusion-DPO module is perturbed away from its base
model (every denoiser weight for a full fine-tune, the LoRA B matrices for LoRA), its state saved as a checkpoint
file, and `lightning-pref export` run on it. The export is then loaded the way a user loads it
(``DiffusionPipeline.from_pretrained`` on the export, or on the base model followed by ``load_lora_weights``) and
sampled from the same initial latents, steps and guidance as the library's sampler
(``module.generate``). The pipeline is given the library's sampling scheduler, so both run the same timesteps.

Tolerance: with the exported weights identical (a full export is checked bit for bit), both samplers compute
the same fp32 operations, in a different order in places (guidance, the scheduler's arithmetic); fp32 round-off
(~1e-7 relative) over 2 steps of tiny networks stays orders of magnitude under ``atol=1e-5`` on pixels in
[0, 1], while the perturbation moves the samples by more than 1e-3 (checked, so a lost adapter or weight fails).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import yaml
from diffusers import DiffusionPipeline
from helpers.training import perturb_lora

from lightning_pref.export import build_module, denoiser_folder, export
from lightning_pref.generation import seeded_noise
from lightning_pref.tiny import (
    write_tiny_cogvideox_pipeline,
    write_tiny_sd3_pipeline,
    write_tiny_sd_pipeline,
    write_tiny_wan_pipeline,
)

PROMPTS, SEEDS = ["a red cat", "a blue dog"], [0, 1]
SAMPLING = dict(num_inference_steps=2, guidance_scale=4.0)
ATOL = 1e-5  # pixels in [0, 1]: see the module docstring


@dataclass(frozen=True)
class Family:
    """A tiny pipeline, the library's backbone for it and what diffusers' pipeline needs to sample alike."""

    backbone: str
    write: Callable[[Path], Path]
    backbone_options: dict = field(default_factory=dict)
    call_options: dict = field(default_factory=dict)
    video: bool = False


VIDEO_SIZE = dict(num_frames=5, height=16, width=16)
FAMILIES = {
    "sd15": Family("StableDiffusionBackbone", write_tiny_sd_pipeline),
    # diffusers' SDXL pipeline zeroes the embedding of an absent negative prompt; the library encodes "".
    "sdxl": Family(
        "StableDiffusionXLBackbone",
        lambda path: write_tiny_sd_pipeline(path, variant="sdxl"),
        call_options=dict(negative_prompt=[""] * len(PROMPTS)),
    ),
    "sd3": Family(
        "StableDiffusion3Backbone",
        write_tiny_sd3_pipeline,
        backbone_options=dict(text_encoder_dtype="float32"),  # T5 as the pipeline loads it
        call_options=dict(max_sequence_length=16),  # the tiny T5 tokenizer's length
    ),
    "cogvideox": Family(
        "CogVideoXBackbone",
        write_tiny_cogvideox_pipeline,
        backbone_options=dict(text_encoder_dtype="float32"),
        call_options=dict(max_sequence_length=16),
        video=True,
    ),
    "wan": Family(
        "WanBackbone",
        write_tiny_wan_pipeline,
        backbone_options=dict(text_encoder_dtype="float32", **VIDEO_SIZE),
        call_options=VIDEO_SIZE,
        video=True,
    ),
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    """A family and its tiny base pipeline directory."""
    spec = FAMILIES[request.param]
    return spec, spec.write(tmp_path_factory.mktemp(request.param))


def perturbed_run(spec: Family, pretrained: Path, root: Path, finetune: str, **options):
    """The config, a checkpoint file and the module of a run whose policy differs from the base model."""
    backbone = {
        "class_path": f"lightning_pref.backbones.{spec.backbone}",
        "init_args": {"pretrained": str(pretrained), **spec.backbone_options},
    }
    init_args = {"backbone": backbone, "finetune": finetune, **options}
    config = root / "config.yaml"
    model = {"class_path": "lightning_pref.methods.diffusion_dpo.DiffusionDPO", "init_args": init_args}
    config.write_text(yaml.safe_dump({"model": model}))
    module = build_module(config)
    if finetune == "lora":
        perturb_lora(module)
    else:
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for parameter in module.denoiser.parameters():
                parameter.add_(0.02 * torch.randn(parameter.shape, generator=generator))
    checkpoint = root / "last.ckpt"
    torch.save({"state_dict": module.state_dict()}, checkpoint)  # the single-file layout Lightning writes
    return config, checkpoint, module.eval()


def pipeline_samples(spec: Family, pipeline, module) -> torch.Tensor:
    """Diffusers' samples from the library's initial latents, in the library's layout ``(B, C, [F,] H, W)``."""
    pipeline.scheduler = module.backbone.process.sampling_scheduler()
    pipeline.set_progress_bar_config(disable=True)
    latents = seeded_noise(module.backbone, SEEDS)
    with torch.no_grad():
        output = pipeline(PROMPTS, latents=latents, output_type="pt", **SAMPLING, **spec.call_options)
    if spec.video:
        return output.frames.permute(0, 2, 1, 3, 4)  # theirs: (B, F, C, H, W)
    return output.images


def check_samples_alike(spec: Family, pipeline, module, base_samples: torch.Tensor) -> None:
    ours = module.generate(PROMPTS, SEEDS, **SAMPLING)
    theirs = pipeline_samples(spec, pipeline, module)
    torch.testing.assert_close(theirs, ours, rtol=0, atol=ATOL)
    assert (ours - base_samples).abs().max() > 1e-3  # the trained weights carried over, not the base model's


def test_a_full_fine_tune_exports_a_pipeline_that_samples_like_the_module(family, tmp_path):
    spec, pretrained = family
    config, checkpoint, module = perturbed_run(spec, pretrained, tmp_path, "full")
    out = export(config, checkpoint, tmp_path / "export")
    pipeline = DiffusionPipeline.from_pretrained(out)
    exported = getattr(pipeline, denoiser_folder(module))
    trained = module.denoiser.state_dict()
    assert exported.state_dict().keys() == trained.keys()
    assert all(torch.equal(value, trained[name]) for name, value in exported.state_dict().items())
    base_samples = pipeline_samples(spec, DiffusionPipeline.from_pretrained(pretrained), module)
    check_samples_alike(spec, pipeline, module, base_samples)


@pytest.mark.parametrize("merge_lora", [False, True], ids=["adapter", "merged"])
def test_a_lora_exports_an_adapter_or_a_merged_pipeline_that_samples_like_the_module(family, merge_lora, tmp_path):
    spec, pretrained = family
    # alpha != rank: the adapter's scale alpha / rank must travel with the exported weights
    config, checkpoint, module = perturbed_run(spec, pretrained, tmp_path, "lora", lora_rank=4, lora_alpha=8)
    out = export(config, checkpoint, tmp_path / "export", merge_lora=merge_lora)
    base_samples = pipeline_samples(spec, DiffusionPipeline.from_pretrained(pretrained), module)
    if merge_lora:
        pipeline = DiffusionPipeline.from_pretrained(out)
    else:
        pipeline = DiffusionPipeline.from_pretrained(pretrained)
        pipeline.load_lora_weights(out)
    check_samples_alike(spec, pipeline, module, base_samples)

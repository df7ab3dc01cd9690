"""Export round trips for every backbone family: the exported model, loaded by diffusers, samples what the module
samples.

For each tiny pipeline (SD1.5, SDXL, SD3, FLUX.1-dev, CogVideoX, Wan2.1, Wan2.2 TI2V-5B and A14B) a Diffusion-DPO
module is perturbed away from its base model (every trained denoiser weight for a full fine-tune, the LoRA B
matrices for LoRA; both A14B experts), its state saved as a checkpoint file, and `lightning-pref export` run on it.
The export is then loaded the way a user loads it (``DiffusionPipeline.from_pretrained`` on the export, or on the
base model followed by ``load_lora_weights``, A14B's second adapter with ``load_into_transformer_2=True``) and
sampled from the same initial latents, steps and guidance as the library's sampler (``module.generate``). The
pipeline is given the library's sampling scheduler, so both run the same timesteps (FluxPipeline computes its own
sigmas and shift, those of the library's, tests/backbones/test_flux.py; it keeps its scheduler).

Tolerance: with the exported weights identical (a full export is checked bit for bit), both samplers compute
the same fp32 operations, in a different order in places (guidance, the scheduler's arithmetic); fp32 round-off
(~1e-7 relative) over 2 or 3 steps of tiny networks stays orders of magnitude under ``atol=1e-5`` on pixels in
[0, 1], while the perturbation moves the samples by more than 1e-3 (checked, so a lost adapter or weight fails;
A14B's 3 steps give each expert at least one, checked, so either expert's lost adapter fails too).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest
import torch
import yaml
from diffusers import DiffusionPipeline
from helpers.training import perturb_lora
from safetensors.torch import load_file

from lightning_pref.backbones.flux import pack_latents
from lightning_pref.backbones.wan import Wan22Backbone
from lightning_pref.export import build_module, export
from lightning_pref.generation import seeded_noise
from lightning_pref.tiny import (
    write_tiny_cogvideox_pipeline,
    write_tiny_flux_pipeline,
    write_tiny_sd3_pipeline,
    write_tiny_sd_pipeline,
    write_tiny_wan22_pipeline,
    write_tiny_wan_pipeline,
)

PROMPTS, SEEDS = ["a red cat", "a blue dog"], [0, 1]
GUIDANCE = 4.0
ATOL = 1e-5  # pixels in [0, 1]: see the module docstring


@dataclass(frozen=True)
class Family:
    """A tiny pipeline, the library's backbone for it and what diffusers' pipeline needs to sample alike."""

    backbone: str
    write: Callable[[Path], Path]
    backbone_options: dict = field(default_factory=dict)
    call_options: dict = field(default_factory=dict)
    video: bool = False
    steps: int = 2
    #: the library's initial latents in the layout the pipeline takes them
    pipeline_latents: Callable[[torch.Tensor], torch.Tensor] = lambda latents: latents
    #: whether the pipeline samples with the library's scheduler (FluxPipeline passes its own sigmas and shift)
    library_scheduler: bool = True


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
    # FLUX.1-dev: the guidance is embedded (no unconditional branch), latents are packed in 2 x 2 patches.
    "flux": Family(
        "FluxBackbone",
        write_tiny_flux_pipeline,
        backbone_options=dict(text_encoder_dtype="float32", height=16, width=16),
        call_options=dict(max_sequence_length=16, height=16, width=16),
        pipeline_latents=pack_latents,
        library_scheduler=False,
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
    "wan22_ti2v5b": Family(
        "Wan22Backbone",
        lambda path: write_tiny_wan22_pipeline(path, "ti2v5b"),
        backbone_options=dict(text_encoder_dtype="float32", **VIDEO_SIZE),
        call_options=VIDEO_SIZE,
        video=True,
    ),
    # 3 steps, at model timesteps 1000 (the high-noise expert), 750 and 3 (the low-noise one): both adapters count.
    "wan22_a14b": Family(
        "Wan22Backbone",
        lambda path: write_tiny_wan22_pipeline(path, "a14b"),
        backbone_options=dict(text_encoder_dtype="float32", **VIDEO_SIZE),
        call_options=VIDEO_SIZE,
        video=True,
        steps=3,
    ),
}
A14B_BOUNDARY = 875.0  # the tiny A14B's boundary_ratio 0.875 of 1000 training timesteps


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
                if parameter.requires_grad:  # an A14B expert the run does not train stays as loaded
                    parameter.add_(0.02 * torch.randn(parameter.shape, generator=generator))
    checkpoint = root / "last.ckpt"
    torch.save({"state_dict": module.state_dict()}, checkpoint)  # the single-file layout Lightning writes
    return config, checkpoint, module.eval()


def pipeline_samples(spec: Family, pipeline, module) -> torch.Tensor:
    """Diffusers' samples from the library's initial latents, in the library's layout ``(B, C, [F,] H, W)``."""
    if spec.library_scheduler:
        pipeline.scheduler = module.backbone.process.sampling_scheduler()
    pipeline.set_progress_bar_config(disable=True)
    latents = spec.pipeline_latents(seeded_noise(module.backbone, SEEDS))
    options = dict(num_inference_steps=spec.steps, guidance_scale=GUIDANCE, output_type="pt", **spec.call_options)
    with torch.no_grad():
        output = pipeline(PROMPTS, latents=latents, **options)
    if spec.video:
        return output.frames.permute(0, 2, 1, 3, 4)  # theirs: (B, F, C, H, W)
    return output.images


def check_samples_alike(spec: Family, pipeline, module, base_samples: torch.Tensor) -> None:
    ours = module.generate(PROMPTS, SEEDS, num_inference_steps=spec.steps, guidance_scale=GUIDANCE)
    theirs = pipeline_samples(spec, pipeline, module)
    torch.testing.assert_close(theirs, ours, rtol=0, atol=ATOL)
    assert (ours - base_samples).abs().max() > 1e-3  # the trained weights carried over, not the base model's


def test_a_full_fine_tune_exports_a_pipeline_that_samples_like_the_module(family, tmp_path):
    spec, pretrained = family
    config, checkpoint, module = perturbed_run(spec, pretrained, tmp_path, "full")
    out = export(config, checkpoint, tmp_path / "export")
    pipeline = DiffusionPipeline.from_pretrained(out)
    for folder, network in module.backbone.pipeline_denoisers().items():  # A14B: both experts
        exported, trained = getattr(pipeline, folder).state_dict(), network.state_dict()
        assert exported.keys() == trained.keys()
        assert all(torch.equal(value, trained[name]) for name, value in exported.items())
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
        load_adapters(pipeline, out)
    check_samples_alike(spec, pipeline, module, base_samples)


def load_adapters(pipeline, out: Path) -> None:
    """An export's adapters, as the module docstring of ``lightning_pref.export`` says to load them: Wan2.2 A14B's
    from one sub-directory per trained expert, any other family's from ``out``."""
    experts = [folder for folder in ("transformer", "transformer_2") if (out / folder).is_dir()]
    for folder in experts:
        pipeline.load_lora_weights(out / folder, load_into_transformer_2=folder == "transformer_2")
    if not experts:
        pipeline.load_lora_weights(out)


@pytest.fixture(scope="module")
def tiny_a14b(tmp_path_factory):
    return write_tiny_wan22_pipeline(tmp_path_factory.mktemp("a14b"), "a14b")


def test_a14b_sampling_reaches_both_experts(tiny_a14b):
    spec = FAMILIES["wan22_a14b"]
    scheduler = Wan22Backbone(str(tiny_a14b), **spec.backbone_options).process.sampling_scheduler()
    scheduler.set_timesteps(spec.steps)
    assert (scheduler.timesteps >= A14B_BOUNDARY).tolist() == [True, False, False]


@pytest.mark.parametrize("finetune, merge_lora", [("full", False), ("lora", True), ("lora", False)])
def test_an_a14b_run_of_one_expert_exports_the_other_as_the_base(tiny_a14b, finetune, merge_lora, tmp_path):
    spec = FAMILIES["wan22_a14b"]
    spec = replace(spec, backbone_options={**spec.backbone_options, "trained_experts": "high_noise"})
    config, checkpoint, module = perturbed_run(spec, tiny_a14b, tmp_path, finetune)
    out = export(config, checkpoint, tmp_path / "export", merge_lora=merge_lora)
    if finetune == "lora" and not merge_lora:  # the trained expert's adapter alone, enough to sample like the module
        assert sorted(path.name for path in out.iterdir()) == ["transformer"]
        pipeline = DiffusionPipeline.from_pretrained(tiny_a14b)
        base_samples = pipeline_samples(spec, pipeline, module)
        load_adapters(pipeline, out)
        check_samples_alike(spec, pipeline, module, base_samples)
        return
    weights = "diffusion_pytorch_model.safetensors"
    base_low, exported_low = (load_file(root / "transformer_2" / weights) for root in (tiny_a14b, out))
    assert exported_low.keys() == base_low.keys()
    assert all(torch.equal(value, base_low[name]) for name, value in exported_low.items())
    base_high, exported_high = (load_file(root / "transformer" / weights) for root in (tiny_a14b, out))
    assert any(not torch.equal(value, base_high[name]) for name, value in exported_high.items())

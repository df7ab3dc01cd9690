"""Wan2.1: channels-first latents normalized per channel, prompt states zeroed past the prompt, flow matching
with the checkpoint's flow_shift, sampling equal to diffusers' pipeline, and every method training on it."""

import json
import shutil

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline
from helpers.video import (
    METHODS,
    check_example_config_parses,
    check_method_fits_one_step_or_refuses,
    check_two_step_fit,
)

from lightning_pref.backbones import WanBackbone
from lightning_pref.tiny import write_tiny_wan_pipeline

VIDEO_SIZE = dict(num_frames=5, height=16, width=16)  # the tiny pipeline's videos; Wan's config has no size


@pytest.fixture(scope="session")
def tiny_wan(tmp_path_factory):
    """5 frames of 16 x 16 pixels, latents (4, 3, 8, 8); flow_shift 3 (Wan2.1 at 480p)."""
    return write_tiny_wan_pipeline(tmp_path_factory.mktemp("tiny_wan"))


@pytest.fixture
def backbone(tiny_wan):
    return WanBackbone(str(tiny_wan), **VIDEO_SIZE, text_encoder_dtype="float32")  # exact comparisons with the pipeline


def test_loads_encodes_channels_first_normalized_latents_and_predicts(backbone):
    pixels = torch.rand(2, 3, 5, 16, 16) * 2 - 1
    latents = backbone.encode_pixels(pixels)
    assert latents.shape == backbone.latent_shape(2) == (2, 4, 3, 8, 8)  # (B, C, F, H, W)
    mode = backbone.vae.encode(pixels).latent_dist.mode()
    mean = torch.tensor(backbone.vae.config.latents_mean).view(1, 4, 1, 1, 1)
    std = torch.tensor(backbone.vae.config.latents_std).view(1, 4, 1, 1, 1)
    torch.testing.assert_close(latents, (mode - mean) / std)
    later = pixels.clone()
    later[:, :, 3:] = 0  # the causal VAE's first latent frame sees only the first pixel frame
    changed = (backbone.encode_pixels(later) - latents).abs().amax(dim=(0, 1, 3, 4))
    assert changed[0] == 0 and changed[2] > 0  # so dim 2 is time
    torch.testing.assert_close(backbone.decode_latents(latents), backbone.vae.decode(mode).sample)
    conditioning = backbone.encode_prompts(["a red cat", "a dog"])
    prediction = backbone.predict(backbone.denoiser, latents, torch.tensor([10.0, 900.0]), conditioning)
    assert prediction.shape == latents.shape
    assert not any(p.requires_grad for p in [*backbone.text_encoder.parameters(), *backbone.vae.parameters()])


def test_prompt_states_past_the_prompt_are_zero_as_in_the_pipeline(backbone, tiny_wan):
    states = backbone.encode_prompts(["a red cat", "  a &amp; dog "])["encoder_hidden_states"]
    assert states.shape == (2, 512, 32)  # 512 UMT5 tokens by default
    assert states[0, :4].abs().amin() > 0 and states[0, 4:].abs().amax() == 0  # a, red, cat, </s>, then zeros
    pipeline = WanPipeline.from_pretrained(tiny_wan)
    theirs, _ = pipeline.encode_prompt(  # 512 tokens: the pipeline's __call__ default
        ["a red cat", "  a &amp; dog "], do_classifier_free_guidance=False, max_sequence_length=512
    )
    torch.testing.assert_close(states, theirs)  # HTML entities and whitespace cleaned as the pipeline does


def test_process_is_flow_matching_with_the_configs_shift(backbone, tiny_wan):
    process = backbone.process
    assert process.prediction_type == "flow"
    scheduler_config = json.loads((tiny_wan / "scheduler" / "scheduler_config.json").read_text())
    assert process.shift == scheduler_config["flow_shift"] == 3.0
    x0, noise, s = torch.randn(3, 4, 3, 8, 8), torch.randn(3, 4, 3, 8, 8), torch.tensor([0.0, 0.4, 1.0])
    torch.testing.assert_close(process.target(x0, noise, s), noise - x0)
    torch.testing.assert_close(process.add_noise(x0, noise, s)[1], 0.6 * x0[1] + 0.4 * noise[1])
    torch.testing.assert_close(process.model_timesteps(s), s * 1000)
    sampler = process.sampling_scheduler()
    assert isinstance(sampler, FlowMatchEulerDiscreteScheduler) and sampler.config.shift == 3.0
    overridden = WanBackbone(str(tiny_wan), shift=5.0, time_sampling="logit_normal", timestep_range=(0.2, 0.8))
    assert overridden.process.shift == 5.0 and overridden.process.time_sampling == "logit_normal"
    assert overridden.process.timestep_range == (0.2, 0.8)


@pytest.mark.parametrize(
    "part, change, message",
    [
        (
            "model_index.json",
            {"transformer_2": ["diffusers", "WanTransformer3DModel"], "boundary_ratio": 0.9},
            "two expert",
        ),
        ("transformer/config.json", {"in_channels": 8}, "image-to-video checkpoint"),
    ],
)
def test_two_expert_and_image_to_video_checkpoints_are_refused(tiny_wan, tmp_path, part, change, message):
    copy = shutil.copytree(tiny_wan, tmp_path / "pipeline")
    config_file = copy / part
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), **change}))
    with pytest.raises(ValueError, match=message):
        WanBackbone(str(copy))


def test_sampling_is_deterministic_and_equals_the_diffusers_pipeline(backbone, tiny_wan):
    prompts = ["a red cat", "a dog"]
    noise = torch.randn(backbone.latent_shape(2), generator=torch.Generator().manual_seed(0))
    first = backbone.sample(prompts, initial_noise=noise, num_inference_steps=3, guidance_scale=5.0)
    second = backbone.sample(prompts, initial_noise=noise, num_inference_steps=3, guidance_scale=5.0)
    assert first.shape == (2, 3, 5, 16, 16) and first.min() >= 0 and first.max() <= 1  # (B, C, F, H, W)
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    # The pipeline with the flow-matching Euler sampler of the backbone (its config ships UniPC).
    pipeline = WanPipeline.from_pretrained(tiny_wan, scheduler=backbone.process.sampling_scheduler())
    frames = pipeline(
        prompts, latents=noise, num_inference_steps=3, guidance_scale=5.0, output_type="pt", **VIDEO_SIZE
    ).frames
    torch.testing.assert_close(first, frames.permute(0, 2, 1, 3, 4), rtol=0, atol=1e-5)  # theirs: (B, F, C, H, W)


@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_two_step_diffusion_dpo_trains_the_policy_not_the_reference(backbone, finetune, tmp_path):
    check_two_step_fit(backbone, finetune, tmp_path)


@pytest.mark.parametrize("method", METHODS, ids=lambda method: method.__name__)
def test_every_method_fits_one_step_or_refuses(backbone, method, tmp_path):
    check_method_fits_one_step_or_refuses(method, backbone, tmp_path)


def test_example_config_parses_through_the_cli(capsys, monkeypatch):
    config = check_example_config_parses("wan21_1.3b_diffusion_dpo.yaml", capsys, monkeypatch)
    backbone = config["model"]["init_args"]["backbone"]
    assert backbone["class_path"] == "lightning_pref.backbones.WanBackbone"
    assert backbone["init_args"]["pretrained"] == "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
    assert config["model"]["init_args"]["finetune"] == "lora" and config["model"]["init_args"]["gradient_checkpointing"]
    assert config["trainer"]["precision"] == "bf16-mixed"
    assert config["data"]["class_path"] == "lightning_pref.datamodules.VideoPreferenceDataModule"
    assert config["data"]["init_args"]["num_frames"] == 81

"""CogVideoX: frames-first latents, the checkpoint's SNR-shifted v schedule, rotary embeddings as the pipeline
computes them, sampling equal to diffusers' pipeline, and every method training on it."""

import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import CogVideoXDDIMScheduler, CogVideoXDPMScheduler, CogVideoXPipeline, DDIMScheduler
from helpers.video import (
    METHODS,
    check_example_config_parses,
    check_method_fits_one_step_or_refuses,
    check_two_step_fit,
    fit,
)

from lightning_pref.backbones import CogVideoXBackbone
from lightning_pref.datamodules import VideoPreferenceDataModule, write_preference_shards
from lightning_pref.datamodules.media import encode_video
from lightning_pref.methods import DiffusionDPO
from lightning_pref.processes import DDPMProcess
from lightning_pref.tiny import write_tiny_cogvideox_pipeline


@pytest.fixture(scope="session")
def tiny_cogvideox(tmp_path_factory):
    """CogVideoX-5B-like: rotary embeddings; 5 frames of 16 x 16 pixels, latents (3, 4, 8, 8)."""
    return write_tiny_cogvideox_pipeline(tmp_path_factory.mktemp("tiny_cogvideox"))


@pytest.fixture(scope="session")
def tiny_cogvideox_2b(tmp_path_factory):
    """CogVideoX-2B-like: sin-cos position embeddings, no rotary embeddings."""
    return write_tiny_cogvideox_pipeline(tmp_path_factory.mktemp("tiny_cogvideox_2b"), rotary=False)


@pytest.fixture(scope="session")
def tiny_cogvideox_15(tmp_path_factory):
    """CogVideoX1.5-like: latent frames patched in pairs."""
    return write_tiny_cogvideox_pipeline(tmp_path_factory.mktemp("tiny_cogvideox_15"), patch_size_t=2)


@pytest.fixture
def backbone(tiny_cogvideox):
    return CogVideoXBackbone(str(tiny_cogvideox), text_encoder_dtype="float32")  # exact comparisons with the pipeline


def test_loads_encodes_frames_first_and_predicts(backbone):
    conditioning = backbone.encode_prompts(["a red cat", "a dog"])
    assert conditioning["encoder_hidden_states"].shape == (2, 16, 32)  # max_text_seq_length tokens by default
    pixels = torch.rand(2, 3, 5, 16, 16) * 2 - 1  # (B, C, F, H, W), as the video DataModule yields them
    latents = backbone.encode_pixels(pixels)
    assert latents.shape == backbone.latent_shape(2) == (2, 3, 4, 8, 8)  # (B, F, C, H, W)
    mode = backbone.vae.encode(pixels).latent_dist.mode()
    torch.testing.assert_close(latents, (mode * backbone.vae.config.scaling_factor).permute(0, 2, 1, 3, 4))
    assert backbone.decode_latents(latents).shape == pixels.shape
    sampled = backbone.encode_pixels(pixels, [torch.Generator().manual_seed(i) for i in range(2)])
    assert sampled.shape == latents.shape and not torch.equal(sampled, latents)
    prediction = backbone.predict(backbone.denoiser, latents, torch.tensor([10, 900]), conditioning)
    assert prediction.shape == latents.shape
    assert not any(p.requires_grad for p in [*backbone.text_encoder.parameters(), *backbone.vae.parameters()])


def test_process_is_the_checkpoints_snr_shifted_v_prediction(backbone, tiny_cogvideox):
    process = backbone.process
    scheduler = CogVideoXDDIMScheduler.from_pretrained(tiny_cogvideox, subfolder="scheduler")
    assert process.prediction_type == "v_prediction"
    torch.testing.assert_close(process.alphas_cumprod, scheduler.alphas_cumprod.double())
    assert process.alphas_cumprod[-1] == 0  # zero terminal SNR
    unshifted = DDIMScheduler.from_config(scheduler.config).alphas_cumprod.double()
    assert (process.alphas_cumprod[1:-1] < unshifted[1:-1]).all()  # SNR divided by snr_shift_scale = 3
    # CogVideoX-5B ships CogVideoXDPMScheduler: the same schedule, named by the class or by its config keys.
    dpm = CogVideoXDPMScheduler.from_config(scheduler.config)
    for config in ({**dpm.config, "_class_name": "CogVideoXDPMScheduler"}, dpm.config):
        torch.testing.assert_close(DDPMProcess(config).alphas_cumprod, dpm.alphas_cumprod.double())
    assert isinstance(process.sampling_scheduler(), CogVideoXDDIMScheduler)
    x0, noise, t = torch.randn(3, 3, 4, 8, 8), torch.randn(3, 3, 4, 8, 8), torch.tensor([0, 500, 999])
    torch.testing.assert_close(process.add_noise(x0, noise, t), scheduler.add_noise(x0, noise, t))
    torch.testing.assert_close(process.target(x0, noise, t), scheduler.get_velocity(x0, noise, t))
    torch.testing.assert_close(process.target(x0, noise, t)[2], -x0[2])  # v = -x0 at zero SNR


@pytest.mark.parametrize("latent_size", [(8, 8), (8, 4), (4, 8)])
def test_rotary_embedding_is_the_pipelines_at_any_grid(backbone, tiny_cogvideox, latent_size):
    pipeline = CogVideoXPipeline.from_pretrained(tiny_cogvideox)
    height, width = latent_size
    ours = backbone.rotary_embedding(torch.zeros(1, 3, 4, height, width))
    theirs = pipeline._prepare_rotary_positional_embeddings(2 * height, 2 * width, 3, torch.device("cpu"))
    assert ours[0].shape == (3 * height * width // 4, 16)  # one row per patch, the head width
    for mine, reference in zip(ours, theirs):
        torch.testing.assert_close(mine, reference)


def test_predict_passes_the_rotary_embedding(backbone):
    calls = []
    forward = backbone.denoiser.forward

    def recording_forward(*args, **kwargs):
        calls.append(kwargs)
        return forward(*args, **kwargs)

    backbone.denoiser.forward = recording_forward
    x_t, t = torch.randn(1, 3, 4, 8, 8), torch.tensor([500])
    conditioning = backbone.encode_prompts(["a red cat"])
    prediction = backbone.predict(backbone.denoiser, x_t, t, conditioning)
    cos, sin = calls[0]["image_rotary_emb"]
    assert cos.shape == sin.shape == (3 * 4 * 4, 16)
    without = forward(x_t, conditioning["encoder_hidden_states"], t, return_dict=False)[0]
    assert not torch.allclose(prediction, without)  # the embedding changes the output


def test_cogvideox_2b_has_no_rotary_embedding(tiny_cogvideox_2b):
    backbone = CogVideoXBackbone(str(tiny_cogvideox_2b))
    x_t = torch.randn(1, 3, 4, 8, 8)
    assert backbone.rotary_embedding(x_t) is None
    conditioning = backbone.encode_prompts(["a cat"])
    assert backbone.predict(backbone.denoiser, x_t, torch.tensor([5]), conditioning).shape == x_t.shape
    with pytest.raises(ValueError, match="cover exactly 16 text tokens"):
        CogVideoXBackbone(str(tiny_cogvideox_2b), max_sequence_length=8)


def test_cogvideox_15_patches_latent_frames_in_pairs(tiny_cogvideox_15):
    backbone = CogVideoXBackbone(str(tiny_cogvideox_15))
    assert backbone.latent_shape(1) == (1, 2, 4, 8, 8)  # 3 latent frames rounded down to a pair
    pipeline = CogVideoXPipeline.from_pretrained(tiny_cogvideox_15)
    x_t = torch.randn(backbone.latent_shape(1))
    theirs = pipeline._prepare_rotary_positional_embeddings(16, 16, 2, torch.device("cpu"))
    for mine, reference in zip(backbone.rotary_embedding(x_t), theirs):
        torch.testing.assert_close(mine, reference)
    conditioning = backbone.encode_prompts(["a red cat"])
    assert backbone.predict(backbone.denoiser, x_t, torch.tensor([5]), conditioning).shape == x_t.shape
    with pytest.raises(ValueError, match="videos of 3 or 7 frames"):
        backbone.predict(backbone.denoiser, torch.randn(1, 3, 4, 8, 8), torch.tensor([5]), conditioning)


@pytest.mark.parametrize(
    "change, message",
    [({"ofs_embed_dim": 8}, "'ofs' embedding"), ({"in_channels": 8}, "image-to-video checkpoint")],
)
def test_image_to_video_checkpoints_are_refused(tiny_cogvideox, tmp_path, change, message):
    copy = shutil.copytree(tiny_cogvideox, tmp_path / "pipeline")
    config_file = copy / "transformer" / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), **change}))
    with pytest.raises(ValueError, match=message):
        CogVideoXBackbone(str(copy))


def test_sampling_is_deterministic_and_equals_the_diffusers_pipeline(backbone, tiny_cogvideox):
    prompts = ["a red cat", "a dog"]
    noise = torch.randn(backbone.latent_shape(2), generator=torch.Generator().manual_seed(0))
    first = backbone.sample(prompts, initial_noise=noise, num_inference_steps=3, guidance_scale=6.0)
    second = backbone.sample(prompts, initial_noise=noise, num_inference_steps=3, guidance_scale=6.0)
    assert first.shape == (2, 3, 5, 16, 16) and first.min() >= 0 and first.max() <= 1  # (B, C, F, H, W)
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    pipeline = CogVideoXPipeline.from_pretrained(tiny_cogvideox)
    frames = pipeline(  # the pipeline's 226 tokens are the real checkpoints' max_text_seq_length, 16 here
        prompts, latents=noise, num_inference_steps=3, guidance_scale=6.0, output_type="pt", max_sequence_length=16
    ).frames
    torch.testing.assert_close(first, frames.permute(0, 2, 1, 3, 4), rtol=0, atol=1e-5)  # theirs: (B, F, C, H, W)


@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_two_step_diffusion_dpo_trains_the_policy_not_the_reference(backbone, finetune, tmp_path):
    check_two_step_fit(backbone, finetune, tmp_path)


@pytest.mark.parametrize("method", METHODS, ids=lambda method: method.__name__)
def test_every_method_fits_one_step_or_refuses(backbone, method, tmp_path):
    check_method_fits_one_step_or_refuses(method, backbone, tmp_path)


def test_a_video_datamodule_batch_trains(backbone, tmp_path):
    rng = np.random.default_rng(0)
    clips = []
    for i in range(4):  # video files, as `lightning-pref data video-pairs` copies them into shards
        clips.append(tmp_path / f"clip{i}.mp4")
        clips[-1].write_bytes(encode_video(rng.integers(0, 256, (6, 24, 24, 3), dtype=np.uint8), fps=8))
    pairs = [{"winner": clips[i], "loser": clips[i + 1], "caption": f"a red cat {i}"} for i in range(3)]
    write_preference_shards(pairs, tmp_path / "shards")
    data = VideoPreferenceDataModule(
        str(tmp_path / "shards"), num_frames=5, resolution=16, batch_size=2, num_workers=0, batches_per_epoch=1
    )
    module = DiffusionDPO(backbone, lr=1e-3)
    trainer = fit(module, tmp_path, steps=1, data=data)
    assert trainer.global_step == 1 and torch.isfinite(trainer.callback_metrics["train/loss"])


def test_example_config_parses_through_the_cli(capsys, monkeypatch):
    config = check_example_config_parses("cogvideox_5b_diffusion_dpo.yaml", capsys, monkeypatch)
    backbone = config["model"]["init_args"]["backbone"]
    assert backbone["class_path"] == "lightning_pref.backbones.CogVideoXBackbone"
    assert backbone["init_args"]["pretrained"] == "THUDM/CogVideoX-5b"
    assert config["model"]["init_args"]["finetune"] == "lora" and config["model"]["init_args"]["gradient_checkpointing"]
    assert config["trainer"]["precision"] == "bf16-mixed"
    assert config["data"]["class_path"] == "lightning_pref.datamodules.VideoPreferenceDataModule"
    assert config["data"]["init_args"]["num_frames"] == 49


def test_t5_is_held_in_bfloat16_by_default_and_training_runs(tiny_cogvideox, tmp_path):
    backbone = CogVideoXBackbone(str(tiny_cogvideox))
    assert backbone.text_encoder.dtype == torch.bfloat16
    assert backbone.encode_prompts(["a red cat"])["encoder_hidden_states"].dtype == torch.float32  # the denoiser's
    check_two_step_fit(backbone, "lora", tmp_path)

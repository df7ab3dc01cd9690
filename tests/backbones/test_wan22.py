"""Wan2.2: TI2V-5B (48-channel latents, one timestep per token) and A14B (two experts routed by timestep) equal
diffusers' pipeline, the experts are routed and trained as the pipeline uses them, and every method trains on both."""

import json
import shutil

import pytest
import torch
from diffusers import WanPipeline, WanTransformer3DModel
from helpers.video import (
    METHODS,
    check_example_config_parses,
    check_method_fits_one_step_or_refuses,
    check_two_step_fit,
    fit,
    parameters,
)

from lightning_pref.backbones import WanBackbone
from lightning_pref.backbones.wan import Wan22Backbone, WanExperts
from lightning_pref.methods import DiffusionDPO
from lightning_pref.tiny.video import write_tiny_wan22_pipeline, write_tiny_wan_pipeline

VIDEO_SIZE = dict(num_frames=5, height=16, width=16)  # the tiny pipelines' videos
LAYOUTS = ["ti2v5b", "a14b"]
BOUNDARY = 875.0  # the tiny A14B's boundary_ratio 0.875 of 1000 training timesteps


@pytest.fixture(scope="session")
def tiny_wan22(tmp_path_factory):
    """Both tiny layouts, by name: TI2V-5B latents (48, 3, 4, 4), A14B latents (4, 3, 8, 8)."""
    return {layout: write_tiny_wan22_pipeline(tmp_path_factory.mktemp(layout), layout) for layout in LAYOUTS}


def load(path, **options) -> Wan22Backbone:
    return Wan22Backbone(str(path), **VIDEO_SIZE, text_encoder_dtype="float32", **options)  # exact comparisons


@pytest.fixture(params=LAYOUTS)
def backbone(request, tiny_wan22):
    return load(tiny_wan22[request.param])


def test_ti2v_latents_are_the_wan22_vaes_normalized_and_timesteps_reach_every_token(tiny_wan22):
    backbone = load(tiny_wan22["ti2v5b"])
    assert backbone.expand_timesteps and isinstance(backbone.denoiser, WanTransformer3DModel)
    pixels = torch.rand(2, 3, 5, 16, 16) * 2 - 1
    latents = backbone.encode_pixels(pixels)
    assert latents.shape == backbone.latent_shape(2) == (2, 48, 3, 4, 4)  # 2x2 pixel patches, then 2x down
    mode = backbone.vae.encode(pixels).latent_dist.mode()
    mean = torch.tensor(backbone.vae.config.latents_mean).view(1, 48, 1, 1, 1)
    std = torch.tensor(backbone.vae.config.latents_std).view(1, 48, 1, 1, 1)
    torch.testing.assert_close(latents, (mode - mean) / std)
    torch.testing.assert_close(backbone.decode_latents(latents), backbone.vae.decode(mode).sample)
    seen = []
    backbone.denoiser.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["timestep"]), with_kwargs=True
    )
    conditioning = backbone.encode_prompts(["a red cat", "a dog"])
    prediction = backbone.predict(backbone.denoiser, latents, torch.tensor([10.0, 900.0]), conditioning)
    assert prediction.shape == latents.shape
    # One timestep per token: 3 frames x (4 / 2) x (4 / 2) patches, each sample's own.
    torch.testing.assert_close(seen[0], torch.tensor([[10.0] * 12, [900.0] * 12]), rtol=0, atol=0)


@pytest.mark.parametrize("layout, steps", [("ti2v5b", 3), ("a14b", 3)])
def test_sampling_equals_the_diffusers_pipeline(tiny_wan22, layout, steps):
    backbone = load(tiny_wan22[layout])
    scheduler = backbone.process.sampling_scheduler()
    scheduler.set_timesteps(steps)
    if layout == "a14b":  # the run crosses the boundary: the first step on the high-noise expert, then the low
        assert (scheduler.timesteps >= BOUNDARY).tolist() == [True, False, False]
    prompts = ["a red cat", "a dog"]
    noise = torch.randn(backbone.latent_shape(2), generator=torch.Generator().manual_seed(0))
    ours = backbone.sample(prompts, initial_noise=noise, num_inference_steps=steps, guidance_scale=5.0)
    assert ours.shape == (2, 3, 5, 16, 16) and ours.min() >= 0 and ours.max() <= 1
    pipeline = WanPipeline.from_pretrained(tiny_wan22[layout], scheduler=backbone.process.sampling_scheduler())
    assert pipeline.config.expand_timesteps == (layout == "ti2v5b")
    assert (pipeline.transformer_2 is not None) == (layout == "a14b")
    frames = pipeline(
        prompts, latents=noise, num_inference_steps=steps, guidance_scale=5.0, output_type="pt", **VIDEO_SIZE
    ).frames
    torch.testing.assert_close(ours, frames.permute(0, 2, 1, 3, 4), rtol=0, atol=1e-5)  # theirs: (B, F, C, H, W)


def test_a_timestep_reaches_the_expert_of_its_side_of_the_boundary(tiny_wan22):
    backbone = load(tiny_wan22["a14b"])
    experts = backbone.denoiser
    assert isinstance(experts, WanExperts) and experts.boundary == BOUNDARY
    x_t = torch.randn(3, 4, 3, 8, 8)
    states = backbone.encode_prompts(["a red cat", "a dog", "a square"])["encoder_hidden_states"]
    timesteps = torch.tensor([100.0, BOUNDARY, 990.0])  # low, exactly the boundary (high, as the pipeline's >=), high
    routed = backbone.predict(experts, x_t, timesteps, {"encoder_hidden_states": states})

    def alone(expert, row):
        return expert(x_t[row : row + 1], timesteps[row : row + 1], states[row : row + 1], return_dict=False)[0][0]

    high, low = experts.high_noise, experts.low_noise
    for row, right, wrong in [(0, low, high), (1, high, low), (2, high, low)]:
        torch.testing.assert_close(routed[row], alone(right, row), rtol=0, atol=1e-6)
        assert (routed[row] - alone(wrong, row)).abs().amax() > 1e-3  # the experts' weights differ


def test_an_expert_no_sample_reaches_still_runs_so_every_process_runs_both(tiny_wan22):
    backbone = load(tiny_wan22["a14b"])
    experts = backbone.denoiser.requires_grad_(True)
    x_t = torch.randn(2, 4, 3, 8, 8)
    states = backbone.encode_prompts(["a red cat", "a dog"])["encoder_hidden_states"]
    timesteps = torch.tensor([990.0, 900.0])  # both samples on the high-noise expert
    output = backbone.predict(experts, x_t, timesteps, {"encoder_hidden_states": states})
    alone = experts.high_noise(x_t, timesteps, states, return_dict=False)[0]
    torch.testing.assert_close(output, alone, rtol=0, atol=0)  # the idle expert's call adds exactly zero
    output.square().mean().backward()
    high = [p.grad for p in experts.high_noise.parameters()]
    low = [p.grad for p in experts.low_noise.parameters()]
    assert all(grad is not None for grad in high + low)  # every parameter took part: DDP needs no unused ones
    assert all(grad.abs().amax() == 0 for grad in low) and any(grad.abs().amax() > 0 for grad in high)


@pytest.mark.parametrize("expert", ["high_noise", "low_noise"])
def test_one_expert_trains_on_its_own_times_and_the_other_stays_as_loaded(tiny_wan22, expert, tmp_path):
    backbone = load(tiny_wan22["a14b"], trained_experts=expert)
    model_timesteps = backbone.process.model_timesteps(backbone.process.sample_timesteps(4000))
    quantiles = backbone.process.model_timesteps(backbone.process.timesteps_at(torch.linspace(0, 0.9999, 101)))
    for times in (model_timesteps, quantiles):
        assert (times >= BOUNDARY).all() if expert == "high_noise" else (times < BOUNDARY).all()
    other = "low_noise" if expert == "high_noise" else "high_noise"
    module = DiffusionDPO(backbone, finetune="lora", beta=500.0, lr=1e-3)
    before = parameters(getattr(backbone.denoiser, other))
    lora = [name for name, p in backbone.denoiser.named_parameters() if p.requires_grad]
    assert lora and all(name.startswith(f"{expert}.") and "lora_" in name for name in lora)
    fit(module, tmp_path, steps=2)
    after = parameters(backbone.denoiser)
    assert all(not torch.equal(after[name], torch.zeros_like(after[name])) for name in lora if "lora_B" in name)
    torch.testing.assert_close(parameters(getattr(backbone.denoiser, other)), before, rtol=0, atol=0)


def test_a_full_fine_tunes_reference_is_the_frozen_copy_of_each_samples_expert(tiny_wan22):
    backbone = load(tiny_wan22["a14b"])
    original = load(tiny_wan22["a14b"]).denoiser
    module = DiffusionDPO(backbone, finetune="full")
    with torch.no_grad():
        for param in backbone.denoiser.parameters():
            param.add_(0.01 * torch.randn_like(param))  # the policy moved away from the reference
    x_t = torch.randn(2, 4, 3, 8, 8)
    conditioning = backbone.encode_prompts(["a red cat", "a dog"])
    timesteps = torch.tensor([990.0, 100.0])  # one sample per expert
    reference = module.reference.predict(backbone, x_t, timesteps, conditioning)
    torch.testing.assert_close(reference, backbone.predict(original, x_t, timesteps, conditioning), rtol=0, atol=1e-6)
    policy = backbone.predict(backbone.denoiser, x_t, timesteps, conditioning)
    assert (policy - reference).abs().amax(dim=(1, 2, 3, 4)).amin() > 1e-4  # both samples' experts moved


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_two_step_diffusion_dpo_trains_the_policy_not_the_reference(tiny_wan22, layout, finetune, tmp_path):
    check_two_step_fit(load(tiny_wan22[layout]), finetune, tmp_path)


@pytest.mark.parametrize("method", METHODS, ids=lambda method: method.__name__)
def test_every_method_fits_one_step_or_refuses(backbone, method, tmp_path):
    check_method_fits_one_step_or_refuses(method, backbone, tmp_path)


def edited_copy(source, tmp_path, part: str, change: dict):
    copy = shutil.copytree(source, tmp_path / "pipeline")
    config_file = copy / part
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), **change}))
    return copy


@pytest.mark.parametrize(
    "layout, options, message",
    [
        ("ti2v5b", {"trained_experts": "high_noise"}, "has one transformer: remove trained_experts"),
        ("a14b", {"trained_experts": "high"}, "choose 'both', 'high_noise' or 'low_noise'"),
        ("a14b", {"trained_experts": "low_noise", "timestep_range": (0.9, 1.0)}, "holds no time of the low_noise"),
    ],
)
def test_options_that_do_not_fit_the_layout_are_refused(tiny_wan22, layout, options, message):
    with pytest.raises(ValueError, match=message):
        load(tiny_wan22[layout], **options)


def test_each_release_is_refused_by_the_other_releases_backbone(tiny_wan22, tmp_path):
    with pytest.raises(ValueError, match="TI2V-5B.*use Wan22Backbone"):
        WanBackbone(str(tiny_wan22["ti2v5b"]))
    with pytest.raises(ValueError, match="two expert transformers.*use Wan22Backbone"):
        WanBackbone(str(tiny_wan22["a14b"]))
    with pytest.raises(ValueError, match="Wan2.1.*use WanBackbone"):
        Wan22Backbone(str(write_tiny_wan_pipeline(tmp_path / "wan21")))
    no_boundary = edited_copy(tiny_wan22["a14b"], tmp_path, "model_index.json", {"boundary_ratio": None})
    with pytest.raises(ValueError, match="needs a boundary_ratio in"):
        Wan22Backbone(str(no_boundary))


@pytest.mark.parametrize(
    "name, pretrained, frames",
    [
        ("wan22_ti2v_5b_diffusion_dpo.yaml", "Wan-AI/Wan2.2-TI2V-5B-Diffusers", 121),
        ("wan22_a14b_diffusion_dpo.yaml", "Wan-AI/Wan2.2-T2V-A14B-Diffusers", 81),
    ],
)
def test_example_configs_parse_through_the_cli(name, pretrained, frames, capsys, monkeypatch):
    config = check_example_config_parses(name, capsys, monkeypatch)
    backbone = config["model"]["init_args"]["backbone"]
    assert backbone["class_path"] == "lightning_pref.backbones.wan.Wan22Backbone"
    assert backbone["init_args"]["pretrained"] == pretrained
    assert config["model"]["init_args"]["finetune"] == "lora" and config["model"]["init_args"]["gradient_checkpointing"]
    assert config["trainer"]["precision"] == "bf16-mixed"
    assert config["data"]["class_path"] == "lightning_pref.datamodules.VideoPreferenceDataModule"
    assert config["data"]["init_args"]["num_frames"] == backbone["init_args"]["num_frames"] == frames

"""The FLUX.1 backbone on tiny dev-style (guidance embeds, dynamic shift) and schnell-style pipelines: packing,
conditioning and sampling as diffusers' FluxPipeline computes them, the shift and the guidance, Diffusion-DPO fits,
every pairwise method, and the example config."""

import copy
import math

import pytest
import torch
from diffusers import FluxPipeline
from helpers.cli import printed_config
from helpers.pairs import random_pairs
from helpers.training import trainer
from helpers.video import METHODS
from torch import nn
from torch.utils.data import DataLoader

from lightning_pref.backbones import FluxBackbone
from lightning_pref.backbones.flux import latent_image_ids, pack_latents, unpack_latents
from lightning_pref.errors import ConfigError, MissingFileError
from lightning_pref.generation import generate, seeded_noise
from lightning_pref.methods import DiffusionDPO, InversionDPO
from lightning_pref.processes import image_token_shift
from lightning_pref.tiny.image import write_tiny_flux_pipeline

PROMPTS = ["a red cat", "a blue dog"]
TOKENS = 16  # the tiny tokenizers' model_max_length: T5 tokens
IMAGE = dict(height=16, width=16)  # the tiny pipeline's images: 8 x 8 x 16 latents, 4 x 4 = 16 packed tokens
IMAGE_TOKENS = 16


@pytest.fixture(scope="session")
def tiny_flux_dev(tmp_path_factory):
    return write_tiny_flux_pipeline(tmp_path_factory.mktemp("tiny_flux_dev"))


@pytest.fixture(scope="session")
def tiny_flux_schnell(tmp_path_factory):
    return write_tiny_flux_pipeline(tmp_path_factory.mktemp("tiny_flux_schnell"), guidance_embeds=False)


@pytest.fixture(params=["dev", "schnell"])
def variant(request):
    return request.param, request.getfixturevalue(f"tiny_flux_{request.param}")


def flux(path, **options):
    """The backbone at the tiny images' size, T5 in float32 as the pipeline loads it (exact comparisons)."""
    return FluxBackbone(str(path), **IMAGE, **{"text_encoder_dtype": "float32", **options})


def diffusers_pipeline(path):
    pipeline = FluxPipeline.from_pretrained(str(path))
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


# ------------------------------------------------------------------------------------------------- packing
def test_packing_makes_one_token_per_2x2_patch_and_unpacking_undoes_it():
    latents = torch.randn(2, 16, 6, 8)
    tokens = pack_latents(latents)
    assert tokens.shape == (2, 3 * 4, 64)
    # token (row 1, column 2) holds channel c of pixel (2 + i, 4 + j) at feature 4 c + 2 i + j
    torch.testing.assert_close(tokens[:, 1 * 4 + 2].reshape(2, 16, 2, 2), latents[:, :, 2:4, 4:6], rtol=0, atol=0)
    torch.testing.assert_close(unpack_latents(tokens, 6, 8), latents, rtol=0, atol=0)
    torch.testing.assert_close(tokens, FluxPipeline._pack_latents(latents, 2, 16, 6, 8), rtol=0, atol=0)
    ids = latent_image_ids(6, 8, torch.device("cpu"), torch.float32)
    assert ids[1 * 4 + 2].tolist() == [0.0, 1.0, 2.0] and ids.shape == (12, 3)
    torch.testing.assert_close(ids, FluxPipeline._prepare_latent_image_ids(2, 3, 4, "cpu", torch.float32))


# -------------------------------------------------------------------------------------- loading, conditioning
def test_loads_and_conditions_as_the_pipeline(variant):
    name, path = variant
    backbone = flux(path)
    conditioning = backbone.encode_prompts(PROMPTS)
    hidden, pooled = conditioning["encoder_hidden_states"], conditioning["pooled_projections"]
    assert hidden.shape == (2, TOKENS, 64) and pooled.shape == (2, 16)
    expected_hidden, expected_pooled, text_ids = diffusers_pipeline(path).encode_prompt(
        PROMPTS, None, max_sequence_length=TOKENS
    )
    torch.testing.assert_close(hidden, expected_hidden)  # fp32: the same encoder on the same tokens
    torch.testing.assert_close(pooled, expected_pooled)
    assert (text_ids == 0).all()

    assert backbone.conditioning_widths() == {"encoder_hidden_states": 64, "pooled_projections": 16}
    latents = backbone.encode_pixels(torch.rand(2, 3, 16, 16) * 2 - 1)
    assert latents.shape == backbone.latent_shape(2) == (2, 16, 8, 8)
    raw = backbone.vae.encode(torch.zeros(1, 3, 16, 16)).latent_dist.mode()
    torch.testing.assert_close(backbone.encode_pixels(torch.zeros(1, 3, 16, 16)), (raw - 0.1159) * 0.3611)
    assert backbone.predict(backbone.denoiser, latents, torch.tensor([10.0, 900.0]), conditioning).shape == (
        2,
        16,
        8,
        8,
    )
    frozen = (backbone.text_encoder, backbone.text_encoder_2, backbone.vae)
    assert not any(p.requires_grad for part in frozen for p in part.parameters())
    assert backbone.guidance == (1.0 if name == "dev" else None)
    assert backbone.gradient_checkpointing_by_default


def test_a_directory_without_a_pipeline_is_refused_before_loading(tmp_path):
    with pytest.raises(MissingFileError, match="has no model_index.json"):
        FluxBackbone(str(tmp_path))


def test_t5_is_held_in_bfloat16_by_default(tiny_flux_dev):
    backbone = FluxBackbone(str(tiny_flux_dev), **IMAGE)
    assert backbone.text_encoder_2.dtype == torch.bfloat16 and backbone.text_encoder.dtype == torch.float32
    assert backbone.encode_prompts(PROMPTS)["encoder_hidden_states"].dtype == backbone.denoiser.dtype


# ---------------------------------------------------------------------------------------- shift, guidance
def test_training_shift_is_the_samplers_at_the_image_token_count(tiny_flux_dev, tiny_flux_schnell):
    assert image_token_shift(256, {}) == pytest.approx(0.5) and image_token_shift(4096, {}) == pytest.approx(1.15)
    dev = flux(tiny_flux_dev).process
    mu = 0.5 + (IMAGE_TOKENS - 256) * (1.15 - 0.5) / (4096 - 256)  # FluxPipeline's calculate_shift
    assert dev.mu == pytest.approx(mu) and dev.shift == pytest.approx(math.exp(mu))
    s = dev.sample_timesteps(20000, torch.Generator().manual_seed(0))
    shift = math.exp(mu)  # logit-normal(0, 1) has median 1/2, which the shift moves to shift / (1 + shift)
    assert abs(s.median().item() - shift / (1 + shift)) < 0.01
    assert flux(tiny_flux_dev, shift=1.0).process.shift == 1.0  # diffusers' DreamBooth-FLUX scripts: unshifted
    schnell = flux(tiny_flux_schnell).process
    assert schnell.mu is None and schnell.shift == 1.0
    big = FluxBackbone(str(tiny_flux_dev), height=256, width=256).process  # the tiny VAE's 2x: 64 x 64 patches
    assert big.mu == pytest.approx(1.15) and big.shift == pytest.approx(math.exp(1.15))


def test_training_guidance_is_fed_to_dev_and_refused_on_schnell(tiny_flux_dev, tiny_flux_schnell):
    seen = []
    backbone = flux(tiny_flux_dev, guidance=3.5)
    backbone.denoiser.register_forward_pre_hook(
        lambda _, args, kwargs: seen.append(kwargs["guidance"]), with_kwargs=True
    )
    conditioning = backbone.encode_prompts(PROMPTS)
    x_t, timesteps = torch.randn(backbone.latent_shape(2)), torch.tensor([300.0, 800.0])
    with torch.no_grad():
        at_35 = backbone.predict(backbone.denoiser, x_t, timesteps, conditioning)
        backbone.guidance = 1.0
        at_1 = backbone.predict(backbone.denoiser, x_t, timesteps, conditioning)
    assert [g.tolist() for g in seen] == [[3.5, 3.5], [1.0, 1.0]]
    assert not torch.allclose(at_35, at_1)  # the guidance embedding changes the prediction
    with pytest.raises(ConfigError, match="guidance=3.5: .* no guidance embedding"):
        flux(tiny_flux_schnell, guidance=3.5)


# ---------------------------------------------------------------------------------------------- sampling
def test_sampling_equals_the_diffusers_pipeline(variant):
    """The same tiny directory and the same noise: the same images. Both run the same fp32 operations on the same
    packed tokens (the Euler step is elementwise, so stepping unpacked latents changes no value); what is left is
    T5's fp32 reduction order, one ulp of its states (see the conditioning test), hence fp32's default tolerance."""
    name, path = variant
    backbone = flux(path)
    noise = torch.randn(backbone.latent_shape(2), generator=torch.Generator().manual_seed(0))
    images = backbone.sample(PROMPTS, initial_noise=noise, num_inference_steps=3, guidance_scale=4.0)
    assert images.shape == (2, 3, 16, 16) and images.std() > 0.05
    expected = diffusers_pipeline(path)(
        PROMPTS,
        **IMAGE,
        num_inference_steps=3,
        guidance_scale=4.0,
        latents=pack_latents(noise),
        output_type="pt",
        max_sequence_length=TOKENS,
    ).images
    torch.testing.assert_close(images, expected)
    other = backbone.sample(PROMPTS, initial_noise=noise, num_inference_steps=3, guidance_scale=2.0)
    assert torch.equal(other, images) == (name == "schnell")  # dev embeds the guidance; schnell ignores it


class Recorder(nn.Module):
    """A stand-in transformer that predicts zero velocity and records the timesteps and guidance it is fed."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(()))
        self.calls = []

    def forward(self, hidden_states, timestep, guidance, **inputs):
        self.calls.append((hidden_states.shape[0], timestep, guidance))
        return (torch.zeros_like(hidden_states),)


def test_sampler_embeds_the_guidance_without_doubling_and_uses_fluxs_sigmas(tiny_flux_dev):
    backbone = flux(tiny_flux_dev)
    recorder = Recorder()
    backbone.sample(PROMPTS, denoiser=recorder, num_inference_steps=4, guidance_scale=3.5, decode=False)
    assert [batch for batch, _, _ in recorder.calls] == [2] * 4  # one forward a step: no unconditional half
    assert all(guidance.tolist() == [3.5, 3.5] for _, _, guidance in recorder.calls)
    shift = math.exp(backbone.process.mu)
    sigmas = torch.linspace(1, 1 / 4, 4, dtype=torch.float64)  # FluxPipeline's sigmas, shifted by exp(mu)
    expected = shift * sigmas / (1 + (shift - 1) * sigmas)
    timesteps = torch.stack([t[0] for _, t, _ in recorder.calls]).double()
    torch.testing.assert_close(timesteps, expected, rtol=1e-6, atol=0)  # the fp32 rounding of the schedule
    recorder.calls.clear()  # a training forward after sampling feeds the training guidance
    latents = torch.zeros(backbone.latent_shape(len(PROMPTS)))
    backbone.predict(recorder, latents, torch.full((len(PROMPTS),), 500.0), backbone.encode_prompts(PROMPTS))
    assert recorder.calls[0][2].tolist() == [backbone.guidance] * len(PROMPTS) != [3.5] * len(PROMPTS)


def test_generate_samples_flux_with_embedded_guidance(tiny_flux_dev):
    """The library's generate() (sample grids, online pairs, SPIN's losers) goes through FLUX's sampler: one forward a
    step with the guidance embedded, the same images as ``sample`` on the seeds' noise."""
    backbone = flux(tiny_flux_dev)
    recorder = Recorder()
    generate(backbone, PROMPTS, [3, 4], denoiser=recorder, num_inference_steps=2, guidance_scale=5.0, decode=False)
    assert [(batch, guidance.tolist()) for batch, _, guidance in recorder.calls] == [(2, [5.0, 5.0])] * 2
    images = generate(backbone, PROMPTS, [3, 4], num_inference_steps=2, guidance_scale=5.0, batch_size=1)
    expected = backbone.sample(
        PROMPTS, initial_noise=seeded_noise(backbone, [3, 4]), num_inference_steps=2, guidance_scale=5.0
    )
    torch.testing.assert_close(images, expected)  # batches of one: a different batch, fp32 reduction order only


# ------------------------------------------------------------------------------------------------- fits
@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_two_step_diffusion_dpo_trains_the_policy_not_the_reference(finetune, tiny_flux_dev, tmp_path):
    backbone = flux(tiny_flux_dev)
    module = DiffusionDPO(backbone, beta=300.0, finetune=finetune, lr=1e-3)
    if finetune == "lora":
        adapted = {name.split(".lora_A")[0] for name, _ in module.denoiser.named_parameters() if "lora_A" in name}
        expected = {f"transformer_blocks.0.attn.{p}" for p in ("to_q", "to_out.0", "add_q_proj", "to_add_out")}
        assert expected | {"single_transformer_blocks.0.attn.to_q"} <= adapted  # both kinds of block
    trained = {name: value.clone() for name, value in module.named_parameters() if value.requires_grad}
    frozen = {part: copy.deepcopy(getattr(backbone, part).state_dict()) for part in ("text_encoder", "vae")}
    trainer(tmp_path, 2).fit(module, DataLoader(random_pairs(4), batch_size=2))

    assert module.global_step == 2
    assert module.denoiser.is_gradient_checkpointing  # on by default, as for the other billion-parameter models
    assert all(not torch.equal(value, trained[name]) for name, value in module.named_parameters() if name in trained)
    for part, state in frozen.items():
        assert all(torch.equal(value, state[key]) for key, value in getattr(backbone, part).state_dict().items())
    original = flux(tiny_flux_dev)
    x_t, timesteps = torch.randn(original.latent_shape(2)), torch.tensor([300.0, 800.0])
    conditioning = original.encode_prompts(PROMPTS)
    with torch.no_grad():
        reference = module.reference_prediction(x_t, timesteps, conditioning)
        policy = backbone.predict(module.denoiser, x_t, timesteps, conditioning)
        base = original.predict(original.denoiser, x_t, timesteps, conditioning)
    torch.testing.assert_close(reference, base)
    assert not torch.allclose(policy, base)


@pytest.mark.parametrize("method", [*METHODS, InversionDPO], ids=lambda method: method.__name__)
def test_every_pairwise_method_fits_a_step_or_refuses_flow(method, tiny_flux_dev, tmp_path):
    backbone = flux(tiny_flux_dev)
    supported = method.supported_prediction_types
    if supported is not None and "flow" not in supported:
        with pytest.raises(ValueError, match="predicts 'flow'"):
            method(backbone)
        return
    module = method(backbone, lr=1e-3)
    fit = trainer(tmp_path, 1)
    fit.fit(module, DataLoader(random_pairs(2), batch_size=2))
    assert module.global_step == 1 and torch.isfinite(fit.callback_metrics["train/loss"])


# ------------------------------------------------------------------------------------------ example config
def test_example_config_parses(capsys):
    printed = printed_config("flux_dev_diffusion_dpo.yaml", capsys)
    model = printed["model"]["init_args"]
    backbone = model["backbone"]
    assert backbone["class_path"] == "lightning_pref.backbones.FluxBackbone"
    assert backbone["init_args"]["pretrained"] == "black-forest-labs/FLUX.1-dev"
    assert backbone["init_args"]["guidance"] == 1.0
    assert model["finetune"] == "lora" and printed["trainer"]["precision"] == "bf16-mixed"

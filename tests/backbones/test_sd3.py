"""The SD3 backbone on tiny SD3.5-style pipelines: conditioning as diffusers' pipeline builds it, flow-matching
inputs and targets, sampling, Diffusion-DPO fits, every method, and the example config."""

import copy
import csv
import math
import sys

import pytest
import torch
import yaml
from diffusers import StableDiffusion3Pipeline
from helpers.pairs import random_pairs
from helpers.processes import REPO
from helpers.training import trainer
from torch import nn
from torch.utils.data import DataLoader

from lightning_pref.backbones import StableDiffusion3Backbone
from lightning_pref.cli import main as cli_main
from lightning_pref.datamodules import PreferenceDataModule
from lightning_pref.datamodules.precompute import precompute_shards
from lightning_pref.methods import DMPO, SDPO, SEEDPO, DiffusionDPO, DiffusionKTO, DPOClipMask, MaPO
from lightning_pref.tiny import write_tiny_sd3_pipeline

PROMPTS = ["a red cat", "a blue dog"]
CLIP_TOKENS, T5_TOKENS, ZERO_T5_TOKENS = 16, 16, 256  # tiny tokenizers' lengths; SD3's default T5 length
CLIP_WIDTH, T5_WIDTH = 16 + 32, 64  # CLIP-L + CLIP-G channels; T5 channels (the transformer's joint_attention_dim)


@pytest.fixture(scope="session")
def tiny_sd3(tmp_path_factory):
    """A tiny SD3.5-style pipeline with T5 (8x8x16 latents, 16x16 pixels)."""
    return write_tiny_sd3_pipeline(tmp_path_factory.mktemp("tiny_sd3"))


@pytest.fixture(scope="session")
def tiny_sd3_no_t5(tmp_path_factory):
    """The same pipeline saved without T5 (``text_encoder_3: [null, null]``)."""
    return write_tiny_sd3_pipeline(tmp_path_factory.mktemp("tiny_sd3_no_t5"), with_t5=False)


def diffusers_pipeline(path, with_t5):
    """Diffusers' own StableDiffusion3Pipeline on the same directory, the reference for conditioning and sampling."""
    without_t5 = {} if with_t5 else dict(text_encoder_3=None, tokenizer_3=None)
    pipeline = StableDiffusion3Pipeline.from_pretrained(str(path), **without_t5)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


# -------------------------------------------------------------------------------------- loading, conditioning
@pytest.mark.parametrize("with_t5", [True, False], ids=["t5", "no_t5"])
def test_loads_and_predicts_with_the_pipelines_conditioning(with_t5, request):
    path = request.getfixturevalue("tiny_sd3" if with_t5 else "tiny_sd3_no_t5")
    backbone = StableDiffusion3Backbone(str(path), text_encoder_dtype="float32")  # T5 as the pipeline loads it
    assert (backbone.text_encoder_3 is not None) == with_t5
    conditioning = backbone.encode_prompts(PROMPTS)
    hidden, pooled = conditioning["encoder_hidden_states"], conditioning["pooled_projections"]
    t5_tokens = T5_TOKENS if with_t5 else ZERO_T5_TOKENS
    assert hidden.shape == (2, CLIP_TOKENS + t5_tokens, T5_WIDTH) and pooled.shape == (2, CLIP_WIDTH)
    assert (hidden[:, :CLIP_TOKENS, CLIP_WIDTH:] == 0).all()  # CLIP channels zero-padded to T5's width
    assert (hidden[:, CLIP_TOKENS:] == 0).all() != with_t5  # zeros stand for T5 only when it is absent

    pipeline = diffusers_pipeline(path, with_t5)
    expected_hidden, _, expected_pooled, _ = pipeline.encode_prompt(
        PROMPTS, None, None, do_classifier_free_guidance=False, max_sequence_length=t5_tokens
    )
    torch.testing.assert_close(hidden, expected_hidden)
    torch.testing.assert_close(pooled, expected_pooled)

    latents = backbone.encode_pixels(torch.rand(2, 3, 16, 16) * 2 - 1)
    assert latents.shape == backbone.latent_shape(2) == (2, 16, 8, 8)
    prediction = backbone.predict(backbone.denoiser, latents, torch.tensor([10.0, 900.0]), conditioning)
    assert prediction.shape == latents.shape
    frozen = [backbone.text_encoder, backbone.text_encoder_2, backbone.text_encoder_3, backbone.vae]
    assert not any(p.requires_grad for part in frozen if part is not None for p in part.parameters())


def test_max_sequence_length_sets_the_t5_tokens_or_their_zeros(tiny_sd3, tiny_sd3_no_t5):
    for path in (tiny_sd3, tiny_sd3_no_t5):
        backbone = StableDiffusion3Backbone(str(path), max_sequence_length=8)
        assert backbone.encode_prompts(PROMPTS)["encoder_hidden_states"].shape == (2, CLIP_TOKENS + 8, T5_WIDTH)


def test_latents_use_the_vaes_shift_and_scaling(tiny_sd3):
    backbone = StableDiffusion3Backbone(str(tiny_sd3))
    pixels = torch.rand(1, 3, 16, 16) * 2 - 1
    raw = backbone.vae.encode(pixels).latent_dist.mode()
    torch.testing.assert_close(backbone.encode_pixels(pixels), (raw - 0.0609) * 1.5305)
    torch.testing.assert_close(backbone.decode_latents((raw - 0.0609) * 1.5305), backbone.vae.decode(raw).sample)


def test_caption_dropout_replaces_both_prompt_keys(tiny_sd3):
    backbone = StableDiffusion3Backbone(str(tiny_sd3))
    assert backbone.prompt_keys == ("encoder_hidden_states", "pooled_projections")
    conditioning = backbone.encode_prompts(PROMPTS)
    dropped = backbone.drop_prompts(conditioning, torch.tensor([True, False]))
    empty = backbone.encode_prompts([""])
    for key in backbone.prompt_keys:
        torch.testing.assert_close(dropped[key][0], empty[key][0])
        torch.testing.assert_close(dropped[key][1], conditioning[key][1])
        assert not torch.allclose(conditioning[key][0], empty[key][0])


# --------------------------------------------------------------------------------------------- the process
def test_process_is_sd3s_flow_with_logit_normal_times(tiny_sd3):
    process = StableDiffusion3Backbone(str(tiny_sd3)).process
    assert process.prediction_type == "flow" and process.shift == 3.0  # from the scheduler config
    assert process.sampling_scheduler().config.shift == 3.0
    s = process.sample_timesteps(20000, torch.Generator().manual_seed(0))
    # logit-normal(0, 1) has median 1/2, which the shift moves to 3 * 0.5 / (1 + 2 * 0.5) = 0.75
    assert abs(s.median().item() - 0.75) < 0.01 and 0 < s.min() and s.max() < 1
    torch.testing.assert_close(process.model_timesteps(s), s * 1000)

    options = dict(time_sampling="uniform", timestep_range=(0.2, 0.4), error_weighting="eps_equivalent")
    uniform = StableDiffusion3Backbone(str(tiny_sd3), **options).process
    s = uniform.sample_timesteps(20000, torch.Generator().manual_seed(0))
    low, high = (3 * f / (1 + 2 * f) for f in (0.2, 0.4))  # the range applies before the shift
    assert low <= s.min() and s.max() <= high and abs(s.median().item() - 3 * 0.3 / 1.6) < 0.01
    torch.testing.assert_close(uniform.error_weight(s), (1 - s) ** 2)


def test_the_transformer_trains_on_flow_inputs_and_velocity_targets(tiny_sd3, tmp_path):
    """x_t = (1 - s) x0 + s eps, target eps - x0, and the transformer sees x_t at timestep 1000 s."""
    module = DiffusionDPO(StableDiffusion3Backbone(str(tiny_sd3)))
    noised, seen = [], []
    noise_samples = module.noise_samples

    def recorded_noise_samples(*args, **kwargs):
        noised.append(noise_samples(*args, **kwargs))
        return noised[-1]

    module.noise_samples = recorded_noise_samples
    module.denoiser.register_forward_pre_hook(lambda _, args, kwargs: seen.append(kwargs), with_kwargs=True)
    generator = torch.Generator().manual_seed(0)
    latents_w, latents_l = torch.randn(2, 3, 16, 8, 8, generator=generator)
    pairs = [
        {"latents_w": w, "latents_l": loser, "prompt": p} for w, loser, p in zip(latents_w, latents_l, PROMPTS + ["a"])
    ]
    trainer(tmp_path, 1).fit(module, DataLoader(pairs, batch_size=3))

    (noisy,), (policy_inputs, reference_inputs) = noised, seen
    s = noisy.timesteps.reshape(-1, 1, 1, 1)
    assert ((0 < s) & (s < 1)).all()
    for inputs in (policy_inputs, reference_inputs):
        torch.testing.assert_close(inputs["hidden_states"], noisy.x_t)
        torch.testing.assert_close(inputs["timestep"], noisy.timesteps * 1000)
    x0 = noisy.x_t - s * noisy.target  # since x_t = x0 + s (eps - x0)
    torch.testing.assert_close(x0, torch.cat([latents_w, latents_l]), atol=1e-5, rtol=0)
    eps_w, eps_l = (noisy.x_t + (1 - s) * noisy.target).chunk(2)  # eps = x_t + (1 - s)(eps - x0)
    torch.testing.assert_close(eps_w, eps_l, atol=1e-5, rtol=0)  # one noise per pair, shared by winner and loser
    assert abs(eps_w.std().item() - 1) < 0.1


# ---------------------------------------------------------------------------------------------- sampling
@pytest.mark.parametrize("with_t5", [True, False], ids=["t5", "no_t5"])
def test_sampling_is_deterministic_and_matches_the_diffusers_pipeline(with_t5, request):
    path = request.getfixturevalue("tiny_sd3" if with_t5 else "tiny_sd3_no_t5")
    backbone = StableDiffusion3Backbone(str(path), text_encoder_dtype="float32")  # T5 as the pipeline loads it
    noise = torch.randn(backbone.latent_shape(2), generator=torch.Generator().manual_seed(0))
    first = backbone.sample(PROMPTS, initial_noise=noise, num_inference_steps=3)
    second = backbone.sample(PROMPTS, initial_noise=noise, num_inference_steps=3)
    assert first.shape == (2, 3, 16, 16) and first.min() >= 0 and first.max() <= 1 and first.std() > 0.05
    torch.testing.assert_close(first, second)
    expected = diffusers_pipeline(path, with_t5)(
        PROMPTS,
        num_inference_steps=3,
        guidance_scale=5.0,
        latents=noise,
        output_type="pt",
        max_sequence_length=T5_TOKENS if with_t5 else ZERO_T5_TOKENS,
    ).images
    torch.testing.assert_close(first, expected)


class VelocityOracle(nn.Module):
    """A stand-in transformer predicting the exact velocity ``eps - x0`` of a known pair, recording timesteps."""

    def __init__(self, velocity):
        super().__init__()
        self.velocity, self.timesteps = velocity, []

    def forward(self, hidden_states, timestep, encoder_hidden_states, pooled_projections, return_dict):
        self.timesteps.append(timestep)
        return (self.velocity.repeat(hidden_states.shape[0] // self.velocity.shape[0], 1, 1, 1),)


def test_sampler_integrates_the_velocity_from_pure_noise_to_the_data(tiny_sd3):
    backbone = StableDiffusion3Backbone(str(tiny_sd3))
    generator = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, *backbone.latent_shape(1), generator=generator)
    oracle = VelocityOracle(eps - x0)
    images = backbone.sample(PROMPTS[:1], denoiser=oracle, initial_noise=eps, num_inference_steps=4)
    torch.testing.assert_close(images, ((backbone.decode_latents(x0) + 1) / 2).clamp(0, 1), atol=1e-5, rtol=0)
    timesteps = torch.stack([t[0] for t in oracle.timesteps])
    scheduler = backbone.process.sampling_scheduler()
    scheduler.set_timesteps(4)
    torch.testing.assert_close(timesteps, scheduler.timesteps)  # handed to the transformer as they are
    assert timesteps[0] == 1000 and (timesteps.diff() < 0).all() and timesteps[-1] > 0


# ------------------------------------------------------------------------------------------------- fits
FROZEN_PARTS = ("text_encoder", "text_encoder_2", "text_encoder_3", "vae")
#: the last block drops its text tokens' outputs, so its text queries get no gradient (their LoRA B stays 0)
UNUSED_LORA = {"backbone.denoiser.transformer_blocks.1.attn.add_q_proj.lora_B.default.weight"}


@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_diffusion_dpo_fit_changes_the_policy_and_not_the_reference(finetune, tiny_sd3, tmp_path):
    backbone = StableDiffusion3Backbone(str(tiny_sd3))
    module = DiffusionDPO(backbone, beta=300.0, finetune=finetune, lr=1e-3, gradient_checkpointing=True)
    if finetune == "lora":
        adapted = {name.split(".lora_A")[0] for name, _ in module.denoiser.named_parameters() if "lora_A" in name}
        projections = ("to_q", "to_out.0", "add_q_proj", "add_v_proj", "to_add_out")
        expected = {f"transformer_blocks.0.attn.{name}" for name in projections} | {"transformer_blocks.0.attn2.to_q"}
        assert expected <= adapted  # image and text sides of the joint attention, and SD3.5's second attention
    trained = {name: value.clone() for name, value in module.named_parameters() if value.requires_grad}
    frozen = {part: copy.deepcopy(getattr(backbone, part).state_dict()) for part in FROZEN_PARTS}
    trainer(tmp_path, 2).fit(module, DataLoader(random_pairs(4), batch_size=2))

    assert module.global_step == 2
    unchanged = {
        name for name, value in module.named_parameters() if name in trained and torch.equal(value, trained[name])
    }
    assert unchanged == (UNUSED_LORA if finetune == "lora" else set())
    for part, state in frozen.items():
        for key, value in getattr(backbone, part).state_dict().items():
            assert torch.equal(value, state[key]), f"{part}.{key} changed"
    original = StableDiffusion3Backbone(str(tiny_sd3))
    x_t, timesteps = torch.randn(original.latent_shape(2)), torch.tensor([300.0, 800.0])
    conditioning = original.encode_prompts(PROMPTS)
    with torch.no_grad():
        reference = module.reference_prediction(x_t, timesteps, conditioning)
        policy = backbone.predict(module.denoiser, x_t, timesteps, conditioning)
        base = original.predict(original.denoiser, x_t, timesteps, conditioning)
    torch.testing.assert_close(reference, base)
    assert not torch.allclose(policy, base)


def test_trains_on_precomputed_latents_and_both_prompt_tensors(tiny_sd3, tiny_shards, tmp_path):
    backbone = StableDiffusion3Backbone(str(tiny_sd3))
    precompute_shards(backbone, str(tiny_shards), tmp_path / "latents", dtype="float32")
    data = PreferenceDataModule(str(tmp_path / "latents"), batch_size=2, num_workers=0, batches_per_epoch=1)
    batch = next(iter(data.train_dataloader()))
    assert batch["latents_w"].shape == (2, 16, 8, 8) and "pixels_w" not in batch
    torch.testing.assert_close(
        batch["pooled_projections"], backbone.encode_prompts(batch["prompt"])["pooled_projections"]
    )

    def no_text_encoders(prompts):
        raise AssertionError("the text encoders ran on precomputed prompts")

    backbone.encode_prompts = no_text_encoders
    module = DiffusionDPO(backbone)
    trainer(tmp_path, 1).fit(module, datamodule=data)
    assert module.global_step == 1


METHODS = [DiffusionDPO, DPOClipMask, SDPO, DMPO, SEEDPO, DiffusionKTO, MaPO]


@pytest.mark.parametrize("method", METHODS, ids=[method.__name__ for method in METHODS])
def test_every_method_fits_one_step_or_refuses_flow(method, tiny_sd3, tmp_path):
    backbone = StableDiffusion3Backbone(str(tiny_sd3))
    options = dict(entropy_gamma=30.0, beta=300.0) if method is SEEDPO else {}
    supported = method.supported_prediction_types
    if supported is not None and "flow" not in supported:
        with pytest.raises(ValueError, match="predicts 'flow'"):
            method(backbone, **options)
        return
    module = method(backbone, **options)
    fit = trainer(tmp_path, 1)
    fit.fit(module, DataLoader(random_pairs(2), batch_size=2))
    assert module.global_step == 1 and torch.isfinite(fit.callback_metrics["train/loss"])


# ------------------------------------------------------------------------------------------ example config
def test_example_config_parses(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--config", str(REPO / "examples" / "sd3_diffusion_dpo.yaml"), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    backbone = printed["model"]["init_args"]["backbone"]
    assert backbone["class_path"] == "lightning_pref.backbones.StableDiffusion3Backbone"
    assert backbone["init_args"]["pretrained"] == "stabilityai/stable-diffusion-3.5-medium"
    assert printed["data"]["class_path"] == "lightning_pref.datamodules.PickAPicDataModule"


def test_example_config_fits_one_step_on_the_tiny_pipeline(tiny_sd3, tiny_shards, tmp_path, monkeypatch):
    """The example as written (LoRA, bf16-mixed, gradient checkpointing), on one CPU with the tiny pipeline."""
    monkeypatch.setattr(sys, "argv", ["lightning-pref"])
    config = yaml.safe_load((REPO / "examples" / "sd3_diffusion_dpo.yaml").read_text())
    config["trainer"].update(
        accelerator="cpu",
        devices=1,
        strategy="auto",
        max_steps=1,
        accumulate_grad_batches=1,
        log_every_n_steps=1,
        enable_progress_bar=False,
        default_root_dir=str(tmp_path),
        logger={"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(tmp_path)}},
    )
    config["model"]["init_args"]["backbone"]["init_args"]["pretrained"] = str(tiny_sd3)
    config["data"]["init_args"].update(
        train_shards=f"{tiny_shards}/*.tar", batch_size=2, num_workers=0, resolution=16, batches_per_epoch=1
    )
    path = tmp_path / "sd3.yaml"
    path.write_text(yaml.safe_dump(config))
    cli_main(["fit", "--config", str(path)])
    with next(tmp_path.glob("lightning_logs/version_*/metrics.csv")).open() as handle:
        rows = list(csv.DictReader(handle))
    (losses,) = [row["train/loss"] for row in rows if row["train/loss"]]
    assert float(losses) == pytest.approx(math.log(2))  # LoRA starts as the reference: margin 0
    (lr,) = [row["lr-AdamW"] for row in rows if row["lr-AdamW"]]
    assert float(lr) == pytest.approx(1e-8 * 2 / 201)  # scale_lr by 2 pairs per step, first of 200 warm-up steps
    assert next(
        tmp_path.glob("lightning_logs/version_*/checkpoints/last.ckpt")
    ).is_file()  # the example's callbacks ran


def test_t5_is_held_in_bfloat16_by_default_and_feeds_the_denoiser_its_dtype(tiny_sd3):
    backbone = StableDiffusion3Backbone(str(tiny_sd3))
    assert backbone.text_encoder_3.dtype == torch.bfloat16 and backbone.text_encoder.dtype == torch.float32
    hidden = backbone.encode_prompts(PROMPTS)["encoder_hidden_states"]
    assert hidden.dtype == backbone.denoiser.dtype == torch.float32
    exact = StableDiffusion3Backbone(str(tiny_sd3), text_encoder_dtype="float32").encode_prompts(PROMPTS)[
        "encoder_hidden_states"
    ]
    torch.testing.assert_close(hidden, exact, rtol=0.05, atol=0.05)  # bf16 rounding only
    with pytest.raises(ValueError, match="text_encoder_dtype='int8'"):
        StableDiffusion3Backbone(str(tiny_sd3), text_encoder_dtype="int8")

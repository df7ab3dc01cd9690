import pytest
import torch

from lightning_pref.backbones import StableDiffusionBackbone, StableDiffusionXLBackbone


def test_sd_backbone_loads_and_predicts(tiny_sd):
    backbone = StableDiffusionBackbone(str(tiny_sd))
    assert backbone.vae is not None and backbone.vae_scale_factor == 2
    conditioning = backbone.encode_prompts(["a red cat", "a dog"])
    assert conditioning["encoder_hidden_states"].shape == (2, 16, 32)
    latents = backbone.encode_pixels(torch.rand(2, 3, 16, 16) * 2 - 1)
    assert latents.shape == backbone.latent_shape(2) == (2, 4, 8, 8)
    prediction = backbone.predict(backbone.denoiser, latents, torch.tensor([1, 900]), conditioning)
    assert prediction.shape == latents.shape
    assert not any(p.requires_grad for p in backbone.text_encoder.parameters())
    assert not any(p.requires_grad for p in backbone.vae.parameters())


def test_sdxl_backbone_uses_both_encoders_and_time_ids(tiny_sdxl):
    backbone = StableDiffusionXLBackbone(str(tiny_sdxl))
    conditioning = backbone.encode_prompts(["a red cat"])
    assert conditioning["encoder_hidden_states"].shape == (1, 16, 64)
    assert conditioning["text_embeds"].shape == (1, 32)
    x_t = torch.randn(1, 4, 8, 8)
    default = backbone.predict(backbone.denoiser, x_t, torch.tensor([500]), conditioning)
    explicit = backbone.predict(
        backbone.denoiser,
        x_t,
        torch.tensor([500]),
        {**conditioning, "time_ids": torch.tensor([[16.0, 16, 0, 0, 16, 16]])},
    )
    cropped = backbone.predict(
        backbone.denoiser,
        x_t,
        torch.tensor([500]),
        {**conditioning, "time_ids": torch.tensor([[64.0, 64, 8, 8, 16, 16]])},
    )
    torch.testing.assert_close(default, explicit)
    assert not torch.allclose(default, cropped)


def test_pixel_space_pipeline_has_no_vae(tiny_pixel):
    backbone = StableDiffusionBackbone(str(tiny_pixel))
    assert backbone.vae is None
    pixels = torch.rand(2, 3, 8, 8) * 2 - 1
    assert torch.equal(backbone.encode_pixels(pixels), pixels)
    assert backbone.process.prediction_type == "v_prediction"


def test_sampling_is_deterministic_given_noise(tiny_sd):
    backbone = StableDiffusionBackbone(str(tiny_sd))
    noise = torch.randn(backbone.latent_shape(2))
    first = backbone.sample(["a red cat", "a dog"], initial_noise=noise, num_inference_steps=3)
    second = backbone.sample(["a red cat", "a dog"], initial_noise=noise, num_inference_steps=3)
    assert first.shape == (2, 3, 16, 16) and first.min() >= 0 and first.max() <= 1
    torch.testing.assert_close(first, second)


def test_caption_dropout_replaces_rows_with_the_empty_prompt(tiny_sd):
    backbone = StableDiffusionBackbone(str(tiny_sd))
    conditioning = backbone.encode_prompts(["a red cat", "a dog"])
    dropped = backbone.drop_prompts(conditioning, torch.tensor([True, False]))
    empty = backbone.encode_prompts([""])["encoder_hidden_states"]
    torch.testing.assert_close(dropped["encoder_hidden_states"][0], empty[0])
    torch.testing.assert_close(dropped["encoder_hidden_states"][1], conditioning["encoder_hidden_states"][1])


def test_not_a_pipeline_directory_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        StableDiffusionBackbone(str(tmp_path))


def test_missing_local_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a local directory nor a hub id"):
        StableDiffusionBackbone(str(tmp_path / "models" / "missing"))

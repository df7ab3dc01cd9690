"""Stable Diffusion 1.x/2.x and SDXL: a UNet2DConditionModel, CLIP text encoder(s), an optional VAE.

Both load from a hub id or a local diffusers pipeline directory through ``from_pretrained``. A pipeline
without a ``vae`` entry in ``model_index.json`` is a pixel-space model (the toy model of this project).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from huggingface_hub import hf_hub_download
from torch import Tensor, nn
from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

from lightning_pref.backbones.base import Backbone, Conditioning
from lightning_pref.processes import DDPMProcess
from lightning_pref.errors import ConfigError, MissingFileError


def read_model_index(pretrained: str, revision: str | None = None) -> dict[str, Any]:
    """The pipeline's ``model_index.json`` (which components it has), from a local directory or the hub."""
    local = Path(pretrained)
    if local.is_dir():
        index_file = local / "model_index.json"
        if not index_file.is_file():
            raise MissingFileError(
                f"{local} has no model_index.json: point `pretrained` at a diffusers pipeline directory "
                "(the folder holding unet/, text_encoder/, tokenizer/, scheduler/)."
            )
    elif pretrained.startswith((".", "/", "~")) or pretrained.count("/") != 1:
        raise MissingFileError(
            f"pretrained={pretrained!r} is neither a local directory nor a hub id ('namespace/name'): check the "
            "path (relative paths are resolved from the current directory)."
        )
    else:
        index_file = Path(hf_hub_download(pretrained, "model_index.json", revision=revision))
    return json.loads(index_file.read_text())


def torch_dtype(name: str) -> torch.dtype:
    """``"bfloat16"`` -> ``torch.bfloat16``, with a clear error for anything that is not a floating dtype."""
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ConfigError(f"text_encoder_dtype={name!r}: use a floating dtype name such as 'bfloat16' or 'float32'.")
    return dtype


def _frozen(module: nn.Module) -> nn.Module:
    return module.requires_grad_(False).eval()


class ImagePipelineMixin:
    """What the image backbones (SD1.5, SDXL, SD3) share: square latents at the denoiser's ``sample_size``,
    an optional ``AutoencoderKL`` between pixels and latents, and fixed-length tokenization.

    Latents are ``(z - shift_factor) * scaling_factor`` of the VAE's posterior ``z``; ``shift_factor`` is
    SD3's (Esser et al. 2024) and absent (0) for SD1.5 and SDXL. Without a VAE, latents are the pixels.
    """

    vae: AutoencoderKL | None
    denoiser: nn.Module
    device: torch.device

    @property
    def vae_scale_factor(self) -> int:
        return 1 if self.vae is None else 2 ** (len(self.vae.config.block_out_channels) - 1)

    def latent_shape(self, batch_size: int) -> tuple[int, ...]:
        size = self.denoiser.config.sample_size
        return (batch_size, self.denoiser.config.in_channels, size, size)

    def tokenize(self, tokenizer: Any, prompts: list[str], max_length: int | None = None) -> Tensor:
        """Token ids padded (or truncated) to ``max_length``, by default the tokenizer's ``model_max_length``."""
        return tokenizer(
            prompts,
            padding="max_length",
            max_length=max_length or tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.device)

    @torch.no_grad()
    def encode_pixels(self, pixels: Tensor, generator: torch.Generator | None = None) -> Tensor:
        if self.vae is None:
            return pixels
        posterior = self.vae.encode(pixels.to(self.vae.dtype)).latent_dist
        latents = posterior.sample(generator) if generator is not None else posterior.mode()
        shift = self.vae.config.shift_factor or 0.0
        return (latents - shift) * self.vae.config.scaling_factor

    @torch.no_grad()
    def decode_latents(self, latents: Tensor) -> Tensor:
        if self.vae is None:
            return latents
        shift = self.vae.config.shift_factor or 0.0
        latents = latents / self.vae.config.scaling_factor + shift
        return self.vae.decode(latents.to(self.vae.dtype)).sample


class StableDiffusionBackbone(ImagePipelineMixin, Backbone):
    """SD1.5-style pipeline: one CLIP text encoder (last hidden state), DDPM epsilon or v prediction.

    Args:
        pretrained: hub id or local path of a diffusers pipeline.
        revision, variant: passed to every ``from_pretrained`` (e.g. ``variant="fp16"``).
        vae: optional separate VAE (hub id or path), e.g. an fp16-safe SDXL VAE.
        timestep_range, error_weighting: noise-process options (:class:`~lightning_pref.processes.DDPMProcess`).
    """

    def __init__(
        self,
        pretrained: str,
        revision: str | None = None,
        variant: str | None = None,
        vae: str | None = None,
        timestep_range: tuple[float, float] = (0.0, 1.0),
        error_weighting: Literal["constant", "min_snr"] = "constant",
    ):
        super().__init__()
        self.pretrained = pretrained
        index = read_model_index(pretrained, revision)
        load = dict(revision=revision, variant=variant)
        self.denoiser = UNet2DConditionModel.from_pretrained(pretrained, subfolder="unet", **load)
        self.load_text_encoders(pretrained, revision, variant)
        has_vae = vae is not None or (index.get("vae") or [None])[0] is not None
        self.vae = None
        if has_vae:
            source = dict(pretrained_model_name_or_path=vae) if vae else dict(
                pretrained_model_name_or_path=pretrained, subfolder="vae", **load
            )
            self.vae = _frozen(AutoencoderKL.from_pretrained(**source))
        scheduler = DDPMScheduler.from_pretrained(pretrained, subfolder="scheduler", revision=revision)
        self.process = DDPMProcess(scheduler.config, timestep_range=timestep_range, error_weighting=error_weighting)

    def load_text_encoders(self, pretrained: str, revision: str | None, variant: str | None) -> None:
        self.tokenizer = AutoTokenizer.from_pretrained(pretrained, subfolder="tokenizer", revision=revision)
        self.text_encoder = _frozen(
            CLIPTextModel.from_pretrained(pretrained, subfolder="text_encoder", revision=revision, variant=variant)
        )

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        hidden = self.text_encoder(self.tokenize(self.tokenizer, prompts))[0]
        return {"encoder_hidden_states": hidden}

    def predict(self, denoiser: nn.Module, x_t: Tensor, timesteps: Tensor, conditioning: Conditioning) -> Tensor:
        return denoiser(x_t, timesteps, encoder_hidden_states=conditioning["encoder_hidden_states"], return_dict=False)[0]


class StableDiffusionXLBackbone(StableDiffusionBackbone):
    """SDXL: two CLIP text encoders (penultimate hidden states concatenated), pooled text embeddings from the
    second, and six micro-conditioning time ids ``(orig_h, orig_w, crop_top, crop_left, target_h, target_w)``.

    Time ids default to an uncropped image at the latent's pixel size; a batch may carry its own ``time_ids``.
    """

    prompt_keys = ("encoder_hidden_states", "text_embeds")

    def load_text_encoders(self, pretrained: str, revision: str | None, variant: str | None) -> None:
        super().load_text_encoders(pretrained, revision, variant)
        self.tokenizer_2 = AutoTokenizer.from_pretrained(pretrained, subfolder="tokenizer_2", revision=revision)
        self.text_encoder_2 = _frozen(
            CLIPTextModelWithProjection.from_pretrained(
                pretrained, subfolder="text_encoder_2", revision=revision, variant=variant
            )
        )

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        first = self.text_encoder(self.tokenize(self.tokenizer, prompts), output_hidden_states=True)
        second = self.text_encoder_2(self.tokenize(self.tokenizer_2, prompts), output_hidden_states=True)
        hidden = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
        return {"encoder_hidden_states": hidden, "text_embeds": second.text_embeds}

    def conditioning_widths(self) -> dict[str, int]:
        """The UNet's cross-attention width, and the pooled embedding's: the added-condition input less six time ids."""
        config = self.denoiser.config
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        return {"encoder_hidden_states": config.cross_attention_dim, "text_embeds": pooled}

    def predict(self, denoiser: nn.Module, x_t: Tensor, timesteps: Tensor, conditioning: Conditioning) -> Tensor:
        time_ids = conditioning.get("time_ids")
        if time_ids is None:
            height, width = (side * self.vae_scale_factor for side in x_t.shape[-2:])
            time_ids = x_t.new_tensor([height, width, 0, 0, height, width]).expand(x_t.shape[0], 6)
        added = {"text_embeds": conditioning["text_embeds"], "time_ids": time_ids}
        return denoiser(
            x_t,
            timesteps,
            encoder_hidden_states=conditioning["encoder_hidden_states"],
            added_cond_kwargs=added,
            return_dict=False,
        )[0]

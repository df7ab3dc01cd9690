"""What the text-to-image backbones (SD1.5, SDXL, SD3, FLUX.1) share.

Square latents at the denoiser's ``sample_size``, an optional ``AutoencoderKL`` between ``(B, C, H, W)``
pixels in [-1, 1] and latents, and fixed-length tokenization. The families load the parts and say how
prompts are encoded and how the denoiser is called. SD3 and FLUX.1 also share their MMDiT's conditioning
(``MMDiTMixin``).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import AutoencoderKL
from torch import Tensor, nn

from lightning_pref.backbones.base import parameter_dtype


class ImagePipelineMixin:
    """The image half of a backbone (mixed in before ``Backbone``).

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
    def encode_pixels(self, pixels: Tensor, generator: torch.Generator | list[torch.Generator] | None = None) -> Tensor:
        """``(B, C, H, W)`` pixels to latents: the posterior's mode, or a sample drawn with ``generator`` (a list:
        one generator per image); without a VAE, the pixels themselves."""
        if self.vae is None:
            return pixels
        posterior = self.vae.encode(pixels.to(parameter_dtype(self.vae))).latent_dist
        latents = posterior.sample(generator) if generator is not None else posterior.mode()
        shift = self.vae.config.shift_factor or 0.0
        return (latents - shift) * self.vae.config.scaling_factor

    @torch.no_grad()
    def decode_latents(self, latents: Tensor) -> Tensor:
        """Latents to ``(B, C, H, W)`` pixels in [-1, 1]."""
        if self.vae is None:
            return latents
        shift = self.vae.config.shift_factor or 0.0
        latents = latents / self.vae.config.scaling_factor + shift
        return self.vae.decode(latents.to(parameter_dtype(self.vae))).sample


class MMDiTMixin(ImagePipelineMixin):
    """What SD3 and FLUX.1 share (mixed in before ``Backbone``): a billion-parameter MMDiT conditioned on T5's
    hidden states (``encoder_hidden_states``, the transformer's ``joint_attention_dim`` wide) and pooled CLIP
    embeddings (``pooled_projections``, ``pooled_projection_dim`` wide), both replaced under caption dropout."""

    prompt_keys = ("encoder_hidden_states", "pooled_projections")
    #: the joint attention's image projections and, where a block has them, its text (context) projections.
    lora_target_modules = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
    gradient_checkpointing_by_default = True
    max_sequence_length: int

    def t5_hidden_states(self, tokenizer: Any, text_encoder: nn.Module, prompts: list[str]) -> Tensor:
        """T5's last hidden states of ``max_sequence_length`` tokens (at most the tokenizer's ``model_max_length``),
        in the denoiser's dtype."""
        length = min(self.max_sequence_length, tokenizer.model_max_length)
        return text_encoder(self.tokenize(tokenizer, prompts, length))[0].to(parameter_dtype(self.denoiser))

    def conditioning_widths(self) -> dict[str, int]:
        config = self.denoiser.config
        return {"encoder_hidden_states": config.joint_attention_dim, "pooled_projections": config.pooled_projection_dim}

"""Wan2.1 (Wan team 2025, "Wan: Open and Advanced Large-Scale Video Generative Models").

A UMT5 text encoder (512 tokens; states past each prompt zeroed), a causal 3D VAE (4x in time, 8x in
space) whose latents are normalized per channel by ``latents_mean`` / ``latents_std``, and a diffusion
transformer over ``(B, C, F, H, W)`` latents (3D rotary embeddings computed inside the model), trained by
flow matching: ``x_t = (1 - s) x0 + s eps``, velocity target ``eps - x0``.
"""

from __future__ import annotations

import html
from typing import Any, Literal

import torch
from diffusers import AutoencoderKLWan, WanTransformer3DModel
from torch import Tensor, nn
from transformers import UMT5EncoderModel

from lightning_pref.backbones.base import Conditioning
from lightning_pref.backbones.loading import has_component
from lightning_pref.backbones.video import TextToVideoBackbone, VideoShape
from lightning_pref.errors import ConfigError
from lightning_pref.processes import FlowMatchingProcess


def clean_prompt(prompt: str) -> str:
    """The Wan pipeline's prompt clean-up: HTML entities decoded, whitespace collapsed (no ``ftfy`` repair)."""
    return " ".join(html.unescape(html.unescape(prompt)).split())


class WanBackbone(TextToVideoBackbone):
    """Wan2.1 text-to-video (``Wan-AI/Wan2.1-T2V-1.3B-Diffusers``, ``Wan-AI/Wan2.1-T2V-14B-Diffusers``).

    The flow-matching time shift is the scheduler config's ``flow_shift`` (3.0 for the 480p 1.3B
    checkpoint, 5.0 for 720p): training times ``s`` are drawn, then shifted ``shift s / (1 + (shift - 1) s)``,
    the distribution of the sampler's steps. Sampling uses ``FlowMatchEulerDiscreteScheduler`` with that shift.

    Args:
        pretrained: hub id or local path of a diffusers Wan pipeline.
        revision, variant: passed to every ``from_pretrained``.
        max_sequence_length: UMT5 tokens per prompt (512, as the pipeline).
        num_frames, height, width: the video size ``latent_shape`` describes (what ``sample`` generates;
            81 frames at 480 x 832 by default). Training takes the size of its data.
        vae_tiling: encode and decode in spatial tiles (less memory for large frames).
        shift: overrides the config's ``flow_shift``.
        timestep_range, time_sampling, logit_mean, logit_std, error_weighting: noise-process options
            ([`FlowMatchingProcess`][lightning_pref.processes.FlowMatchingProcess]).
        text_encoder_dtype: dtype the frozen T5 is held in (``bfloat16`` by default: T5-XXL's 4.7B weights take
            9.5 GB instead of 19 GB on every GPU); its states reach the denoiser in the denoiser's dtype.
    """

    text_encoder_class = UMT5EncoderModel
    vae_class = AutoencoderKLWan
    denoiser_class = WanTransformer3DModel
    mask_prompt_padding = True
    #: Wan2.1's 480p videos and the pipeline's prompt length: the defaults of ``num_frames``, ``height``,
    #: ``width`` and ``max_sequence_length``
    training_video = VideoShape(frames=81, height=480, width=832, text_tokens=512)

    def __init__(
        self,
        pretrained: str,
        revision: str | None = None,
        variant: str | None = None,
        max_sequence_length: int = training_video.text_tokens,
        num_frames: int = training_video.frames,
        height: int = training_video.height,
        width: int = training_video.width,
        vae_tiling: bool = False,
        text_encoder_dtype: str = "bfloat16",
        shift: float | None = None,
        timestep_range: tuple[float, float] = (0.0, 1.0),
        time_sampling: Literal["uniform", "logit_normal"] = "uniform",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        error_weighting: Literal["constant", "eps_equivalent"] = "constant",
    ):
        super().__init__(pretrained, revision, variant, max_sequence_length, vae_tiling, text_encoder_dtype)
        self.video_size = (num_frames, height, width)
        self.process = FlowMatchingProcess(
            num_train_timesteps=self.scheduler_config.get("num_train_timesteps", 1000),
            shift=shift if shift is not None else self.scheduler_config.get("flow_shift", 1.0),
            time_sampling=time_sampling,
            logit_mean=logit_mean,
            logit_std=logit_std,
            timestep_range=timestep_range,
            error_weighting=error_weighting,
        )

    def check_checkpoint(self, model_index: dict[str, Any], denoiser_config: dict[str, Any]) -> None:
        super().check_checkpoint(model_index, denoiser_config)
        if has_component(model_index, "transformer_2"):
            raise ConfigError(
                f"{self.pretrained!r} has two expert transformers (Wan2.2 A14B: one for high noise, one for low, "
                f"switching at boundary_ratio={model_index.get('boundary_ratio')}): WanBackbone trains one "
                "transformer; use a Wan2.1 checkpoint."
            )

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        return super().encode_prompts([clean_prompt(prompt) for prompt in prompts])

    def latent_shape(self, batch_size: int) -> tuple[int, ...]:
        num_frames, height, width = self.video_size
        temporal, spatial = self.vae.config.scale_factor_temporal, self.vae.config.scale_factor_spatial
        frames = (num_frames - 1) // temporal + 1
        return (batch_size, self.denoiser.config.in_channels, frames, height // spatial, width // spatial)

    def latent_statistics(self, like: Tensor) -> tuple[Tensor, Tensor]:
        """The VAE's per-channel latent mean and standard deviation, shaped ``(1, C, 1, 1, 1)`` like ``like``."""
        config = self.vae.config
        return tuple(
            torch.tensor(values, device=like.device, dtype=like.dtype).view(1, config.z_dim, 1, 1, 1)
            for values in (config.latents_mean, config.latents_std)
        )

    def normalize_latents(self, vae_latents: Tensor) -> Tensor:
        mean, std = self.latent_statistics(vae_latents)
        return (vae_latents - mean) / std

    def denormalize_latents(self, latents: Tensor) -> Tensor:
        mean, std = self.latent_statistics(latents)
        return latents * std + mean

    def predict(self, denoiser: nn.Module, x_t: Tensor, timesteps: Tensor, conditioning: Conditioning) -> Tensor:
        """The velocity ``eps - x0`` for ``(B, C, F, H, W)`` latents; ``timesteps`` are ``s * 1000``."""
        return denoiser(
            hidden_states=x_t,
            timestep=timesteps,
            encoder_hidden_states=conditioning["encoder_hidden_states"],
            return_dict=False,
        )[0]

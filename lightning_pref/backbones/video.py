"""What the text-to-video backbones (CogVideoX, Wan2.1) share.

A frozen T5-family text encoder reading a fixed number of tokens per prompt, a frozen 3D VAE between
``(B, C, F, H, W)`` pixels in [-1, 1] and latents, and a video transformer as the denoiser, all loaded from a
hub id or a local diffusers pipeline directory. Subclasses say how latents are normalized and laid out, how
the transformer is called, and which noise process the checkpoint was trained with.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from diffusers import DDPMScheduler, ModelMixin
from torch import Tensor
from transformers import AutoTokenizer, PreTrainedModel

from lightning_pref.backbones.base import Backbone, Conditioning, parameter_dtype
from lightning_pref.backbones.loading import frozen, read_model_index, torch_dtype
from lightning_pref.errors import ConfigError


@dataclass(frozen=True)
class VideoShape:
    """One training video: pixel frames and size, and the prompt's text tokens."""

    frames: int
    height: int
    width: int
    text_tokens: int

    def __str__(self) -> str:
        return f"{self.frames}x{self.height}x{self.width}"


class TextToVideoBackbone(Backbone):
    """Base class of the video backbones; loads tokenizer, text encoder, VAE and transformer.

    Args:
        pretrained: hub id or local path of a diffusers pipeline.
        revision, variant: passed to every ``from_pretrained``.
        max_sequence_length: tokens per prompt (prompts are padded or truncated to it).
        vae_tiling: encode and decode in spatial tiles (less memory for large frames).
        text_encoder_dtype: dtype of the frozen text encoder (see the subclasses).

    Subclasses set ``text_encoder_class``, ``vae_class``, ``denoiser_class``, ``mask_prompt_padding`` (run the
    text encoder with the attention mask and zero the states past each prompt, as Wan2.1; else the padding is
    encoded like any token, as CogVideoX), ``training_video`` and implement the latent normalization, ``predict``
    and ``latent_shape``. After ``__init__``, ``scheduler_config`` holds the checkpoint's scheduler config.

    ``training_video`` and ``vae_compression`` describe the published checkpoints, for sizing a run without
    loading one (``lightning-pref plan``); a loaded backbone reads its own configs.
    """

    text_encoder_class: type[PreTrainedModel]
    vae_class: type[ModelMixin]
    denoiser_class: type[ModelMixin]
    mask_prompt_padding: bool
    #: the published checkpoints' training videos
    training_video: VideoShape
    #: how much the published checkpoints' VAEs (CogVideoX's and Wan2.1's alike) compress time and space
    vae_compression: tuple[int, int] = (4, 8)
    gradient_checkpointing_by_default = True

    def __init__(
        self,
        pretrained: str,
        revision: str | None,
        variant: str | None,
        max_sequence_length: int | None,
        vae_tiling: bool,
        text_encoder_dtype: str,
    ):
        super().__init__()
        self.pretrained = pretrained
        index = read_model_index(pretrained, revision)
        denoiser_config = self.denoiser_class.load_config(pretrained, subfolder="transformer", revision=revision)
        self.check_checkpoint(index, denoiser_config)  # before loading gigabytes of weights
        load = dict(revision=revision, variant=variant)
        self.tokenizer = AutoTokenizer.from_pretrained(pretrained, subfolder="tokenizer", revision=revision)
        self.text_encoder = frozen(
            self.text_encoder_class.from_pretrained(
                pretrained, subfolder="text_encoder", torch_dtype=torch_dtype(text_encoder_dtype), **load
            )
        )
        self.vae = frozen(self.vae_class.from_pretrained(pretrained, subfolder="vae", **load))
        self.vae.enable_slicing()  # one video at a time through the VAE: the same latents, less memory
        if vae_tiling:
            self.vae.enable_tiling()
        self.denoiser = self.denoiser_class.from_pretrained(pretrained, subfolder="transformer", **load)
        # The raw config, `_class_name` included (any scheduler class reads it as it is).
        self.scheduler_config = DDPMScheduler.load_config(pretrained, subfolder="scheduler", revision=revision)
        self.max_sequence_length = max_sequence_length

    def check_checkpoint(self, model_index: dict[str, Any], denoiser_config: dict[str, Any]) -> None:
        """Refuse image-to-video checkpoints: their transformer also reads image latents (more input channels)."""
        in_channels = denoiser_config["in_channels"]
        if in_channels != (denoiser_config.get("out_channels") or in_channels):
            raise ConfigError(
                f"{self.pretrained!r} is an image-to-video checkpoint ({model_index.get('_class_name')}: the "
                f"transformer takes {in_channels} input channels for {denoiser_config['out_channels']} output "
                f"channels, the video latents plus image latents): {type(self).__name__} trains text-to-video "
                "models; use a text-to-video checkpoint."
            )

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        tokens = self.tokenizer(
            list(prompts),
            padding="max_length",
            max_length=self.max_sequence_length,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        ).to(self.device)
        if not self.mask_prompt_padding:
            return {"encoder_hidden_states": self.text_encoder(tokens.input_ids)[0].to(parameter_dtype(self.denoiser))}
        hidden = self.text_encoder(tokens.input_ids, attention_mask=tokens.attention_mask)[0].to(
            parameter_dtype(self.denoiser)
        )
        return {"encoder_hidden_states": hidden * tokens.attention_mask.unsqueeze(-1).to(hidden.dtype)}

    @torch.no_grad()
    def encode_pixels(self, pixels: Tensor, generator: torch.Generator | list[torch.Generator] | None = None) -> Tensor:
        """``(B, C, F, H, W)`` pixels to latents: the posterior's mode, or a sample drawn with ``generator`` (a
        list: one generator per video)."""
        posterior = self.vae.encode(pixels.to(parameter_dtype(self.vae))).latent_dist
        return self.normalize_latents(posterior.sample(generator) if generator is not None else posterior.mode())

    @torch.no_grad()
    def decode_latents(self, latents: Tensor) -> Tensor:
        """Latents to ``(B, C, F, H, W)`` pixels in [-1, 1]."""
        return self.vae.decode(self.denormalize_latents(latents).to(parameter_dtype(self.vae))).sample

    def normalize_latents(self, vae_latents: Tensor) -> Tensor:
        """The VAE's ``(B, C, F, H, W)`` latents as the denoiser's clean latents ``x0``."""
        raise NotImplementedError

    def denormalize_latents(self, latents: Tensor) -> Tensor:
        """The inverse of ``normalize_latents``."""
        raise NotImplementedError

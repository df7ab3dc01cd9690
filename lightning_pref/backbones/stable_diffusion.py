"""Stable Diffusion 1.x/2.x and SDXL: a UNet2DConditionModel, CLIP text encoder(s), an optional VAE.

Both load from a hub id or a local diffusers pipeline directory through ``from_pretrained``. A pipeline
without a ``vae`` entry in ``model_index.json`` is a pixel-space model (the toy model of this project).
"""

from __future__ import annotations

from typing import Literal

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from torch import Tensor, nn
from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

from lightning_pref.backbones.base import Backbone, Conditioning
from lightning_pref.backbones.image import ImagePipelineMixin
from lightning_pref.backbones.loading import frozen, has_component, read_model_index
from lightning_pref.processes import DDPMProcess


class StableDiffusionBackbone(ImagePipelineMixin, Backbone):
    """SD1.5-style pipeline: one CLIP text encoder (last hidden state), DDPM epsilon or v prediction.

    Args:
        pretrained: hub id or local path of a diffusers pipeline.
        revision, variant: passed to every ``from_pretrained`` (e.g. ``variant="fp16"``).
        vae: optional separate VAE (hub id or path), e.g. an fp16-safe SDXL VAE.
        timestep_range, error_weighting: noise-process options ([`DDPMProcess`][lightning_pref.processes.DDPMProcess]).
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
        self.vae = None
        if vae is not None:
            self.vae = frozen(AutoencoderKL.from_pretrained(vae))
        elif has_component(index, "vae"):
            self.vae = frozen(AutoencoderKL.from_pretrained(pretrained, subfolder="vae", **load))
        scheduler = DDPMScheduler.from_pretrained(pretrained, subfolder="scheduler", revision=revision)
        self.process = DDPMProcess(scheduler.config, timestep_range=timestep_range, error_weighting=error_weighting)

    def load_text_encoders(self, pretrained: str, revision: str | None, variant: str | None) -> None:
        self.tokenizer = AutoTokenizer.from_pretrained(pretrained, subfolder="tokenizer", revision=revision)
        self.text_encoder = frozen(
            CLIPTextModel.from_pretrained(pretrained, subfolder="text_encoder", revision=revision, variant=variant)
        )

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        hidden = self.text_encoder(self.tokenize(self.tokenizer, prompts))[0]
        return {"encoder_hidden_states": hidden}

    def predict(self, denoiser: nn.Module, x_t: Tensor, timesteps: Tensor, conditioning: Conditioning) -> Tensor:
        return denoiser(x_t, timesteps, encoder_hidden_states=conditioning["encoder_hidden_states"], return_dict=False)[
            0
        ]


class StableDiffusionXLBackbone(StableDiffusionBackbone):
    """SDXL: two CLIP text encoders (penultimate hidden states concatenated), pooled text embeddings from the
    second, and six micro-conditioning time ids ``(orig_h, orig_w, crop_top, crop_left, target_h, target_w)``.

    Time ids default to an uncropped image at the latent's pixel size; a batch may carry its own ``time_ids``.
    """

    prompt_keys = ("encoder_hidden_states", "text_embeds")

    def load_text_encoders(self, pretrained: str, revision: str | None, variant: str | None) -> None:
        super().load_text_encoders(pretrained, revision, variant)
        self.tokenizer_2 = AutoTokenizer.from_pretrained(pretrained, subfolder="tokenizer_2", revision=revision)
        self.text_encoder_2 = frozen(
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

"""The backbone interface: everything a preference method needs from one model family.

A backbone owns the frozen encoders (text encoders, VAE), the trainable denoiser and the noise process.
Methods never touch a family's specifics; they call five things:

* ``Backbone.encode_prompts`` -> a conditioning dict (the denoiser's keyword inputs),
* ``Backbone.encode_pixels`` -> clean latents ``x0`` (identity in pixel space),
* ``Backbone.process`` -> noising, targets and timesteps ([`lightning_pref.processes`][lightning_pref.processes]),
* ``Backbone.predict`` -> the denoiser's output for ``(x_t, t, conditioning)``, for *any* denoiser of
  the family (the policy, or a frozen reference copy),
* ``Backbone.sample`` -> images from prompts, for evaluation and for self-play methods.

Latents are ``(B, C, H, W)`` for images. Video families use ``(B, F, C, H, W)`` (CogVideoX) or
``(B, C, F, H, W)`` (Wan2.1); the interface is layout-agnostic, since errors average over all non-batch
dimensions.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lightning_pref.errors import DataError
from lightning_pref.processes import NoiseProcess

Conditioning = dict[str, Tensor]


def parameter_dtype(network: nn.Module) -> torch.dtype:
    """The dtype a network's weights are held in (float32 for one without parameters)."""
    return next((param.dtype for param in network.parameters()), torch.float32)


def conditioning_in(conditioning: Conditioning, dtype: torch.dtype) -> Conditioning:
    """The conditioning with its floating tensors in ``dtype`` (the denoiser's)."""
    return {key: value.to(dtype) if value.is_floating_point() else value for key, value in conditioning.items()}


def concat_conditioning(parts: list[Conditioning]) -> Conditioning:
    """Stack conditioning dicts along the batch (e.g. ``[winners; losers]`` or ``[uncond; cond]``)."""
    return {key: torch.cat([part[key] for part in parts]) for key in parts[0]}


class Backbone(nn.Module):
    """Base class of model families. Subclasses load their parts in ``__init__``.

    Attributes:
        denoiser: the network preference optimization trains (UNet or transformer).
        process: the noise process the denoiser was trained with.
        prompt_keys: conditioning keys derived from the prompt, replaced by the empty prompt's values
            under caption dropout and in the unconditional branch of classifier-free guidance.
        lora_target_modules: default module names LoRA adapts in this family's denoiser (unless a family says
            otherwise, the attention's query, key, value and output projections).
        gradient_checkpointing_by_default: whether methods checkpoint the denoiser's activations unless told
            otherwise (on for the billion-parameter transformers, whose activations dominate memory).
    """

    denoiser: nn.Module
    process: NoiseProcess
    prompt_keys: tuple[str, ...] = ("encoder_hidden_states",)
    #: the dimension of a latent batch that holds the channels (CogVideoX's latents are frames first)
    channel_dim: int = 1
    lora_target_modules: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    gradient_checkpointing_by_default: bool = False

    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        raise NotImplementedError

    def encode_pixels(self, pixels: Tensor, generator: torch.Generator | list[torch.Generator] | None = None) -> Tensor:
        """Pixels in [-1, 1] to clean latents ``x0``: the VAE posterior's mode without ``generator``, else a sample
        drawn with it (a list: one generator per sample, as ``DiagonalGaussianDistribution.sample`` takes them)."""
        raise NotImplementedError

    def decode_latents(self, latents: Tensor) -> Tensor:
        """Clean latents to pixels in [-1, 1]."""
        raise NotImplementedError

    def predict(self, denoiser: nn.Module, x_t: Tensor, timesteps: Tensor, conditioning: Conditioning) -> Tensor:
        """The denoiser's prediction; ``timesteps`` are model timesteps (``process.model_timesteps(t)``)."""
        raise NotImplementedError

    def latent_shape(self, batch_size: int) -> tuple[int, ...]:
        """Shape of a batch of latents at the denoiser's native resolution."""
        raise NotImplementedError

    def conditioning_for(self, batch: dict[str, Any]) -> Conditioning:
        """Conditioning of a batch: precomputed tensors when present (checked against this backbone's text
        encoders), else encoded from ``batch['prompt']``."""
        if all(key in batch for key in self.prompt_keys):
            conditioning = {key: batch[key] for key in self.prompt_keys}
            for key, width in self.conditioning_widths().items():
                if conditioning[key].shape[-1] != width:
                    raise DataError(
                        f"the batch's precomputed '{key}' is {conditioning[key].shape[-1]} wide, but "
                        f"{type(self).__name__}'s denoiser takes {width}: the shards were precomputed with another "
                        "model; rerun `lightning-pref data precompute` with this backbone."
                    )
            return conditioning
        if "prompt" not in batch:
            raise DataError(
                "The batch has no 'prompt' field and no precomputed conditioning "
                f"({', '.join(self.prompt_keys)}): give the DataModule a caption field, or precompute "
                "the embeddings with `lightning-pref data precompute`."
            )
        return self.encode_prompts(list(batch["prompt"]))

    def empty_conditioning(self) -> Conditioning:
        """The empty prompt's conditioning (caption dropout), encoded once per device."""
        cached = getattr(self, "_empty_conditioning", None)
        if cached is None or next(iter(cached.values())).device != self.device:
            cached = self.encode_prompts([""])
            object.__setattr__(self, "_empty_conditioning", cached)  # a cache, not a submodule or a buffer
        return cached

    def conditioning_widths(self) -> dict[str, int]:
        """The last dimension the denoiser takes of each prompt tensor, read from its config (no encoder runs)."""
        config = self.denoiser.config
        for name in ("cross_attention_dim", "text_embed_dim", "text_dim"):
            if isinstance(config.get(name), int):
                return {"encoder_hidden_states": config[name]}
        return {}

    def spatial_multiple(self) -> int:
        """What the latents' height and width must be multiples of: the UNet's downsampling, or the patch size."""
        config = self.denoiser.config
        if "block_out_channels" in config:
            return 2 ** (len(config.block_out_channels) - 1)
        patch = config.get("patch_size") or 1
        return patch[-1] if isinstance(patch, (list, tuple)) else patch

    def check_batch_media(self, name: str, media: Tensor, latents: bool) -> None:
        """Refuse pixels or latents this backbone cannot take, in the config's terms (images vs videos,
        latent channels, resolution), before they reach a convolution."""
        expected = self.latent_shape(1)
        kind = "videos" if len(expected) == 5 else "images"
        if media.ndim != len(expected):
            got = "videos" if media.ndim == 5 else "images" if media.ndim == 4 else f"{media.ndim}-d tensors"
            raise DataError(
                f"the batch's '{name}' are {got} {tuple(media.shape)}, but {type(self).__name__} trains on {kind}: use "
                "a DataModule of the backbone's kind (VideoPreferenceDataModule for video models)."
            )
        if latents and media.shape[self.channel_dim] != expected[self.channel_dim]:
            raise DataError(
                f"the batch's '{name}' have {media.shape[self.channel_dim]} channels, but {type(self).__name__}'s "
                f"denoiser takes {expected[self.channel_dim]}: the shards were precomputed with another model; rerun "
                "`lightning-pref data precompute` with this backbone."
            )
        pixels_per_latent = getattr(self, "vae_scale_factor", None)  # image families; video VAEs check their inputs
        if not latents and pixels_per_latent is None:
            return
        multiple = self.spatial_multiple() * (1 if latents else pixels_per_latent)
        if any(side % multiple for side in media.shape[-2:]):
            in_pixels = (
                f" (a multiple of {self.spatial_multiple() * pixels_per_latent} pixels)" if pixels_per_latent else ""
            )
            raise DataError(
                f"the batch's '{name}' are {tuple(media.shape[-2:])} {'latents' if latents else 'pixels'}, but "
                f"{type(self).__name__} needs sides divisible by {multiple}: set the DataModule's `resolution`"
                f"{in_pixels}, or precompute at such a resolution."
            )

    def drop_prompts(self, conditioning: Conditioning, drop: Tensor) -> Conditioning:
        """Replace the prompt-derived conditioning of rows where ``drop`` is true by the empty prompt's."""
        if not drop.any():
            return conditioning
        empty = self.empty_conditioning()
        dropped = dict(conditioning)
        for key in self.prompt_keys:
            value = conditioning[key]
            mask = drop.to(value.device).reshape(-1, *([1] * (value.ndim - 1)))
            dropped[key] = torch.where(mask, empty[key].to(value.dtype).expand_as(value), value)
        return dropped

    def pipeline_denoisers(self) -> dict[str, nn.Module]:
        """The trained networks by the diffusers pipeline folder each loads from, and is exported to: ``unet`` or
        ``transformer``; Wan2.2 A14B's two experts are ``transformer`` and ``transformer_2``."""
        return {"unet" if "UNet" in type(self.denoiser).__name__ else "transformer": self.denoiser}

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    @torch.no_grad()
    def sample(
        self,
        prompts: list[str],
        *,
        denoiser: nn.Module | None = None,
        num_inference_steps: int = 25,
        guidance_scale: float = 5.0,
        initial_noise: Tensor | None = None,
        decode: bool = True,
        conditioning: Conditioning | None = None,
    ) -> Tensor:
        """Generate one image per prompt with classifier-free guidance; returns pixels in [0, 1] (with
        ``decode=False``, the clean latents).

        ``initial_noise`` (of ``latent_shape``) fixes the starting noise, so two denoisers (say, the base and
        the tuned model) can be compared on identical seeds; without it, the noise is drawn from the global RNG.
        ``conditioning``: the prompts' conditioning when the caller has made it (FLUX adds its guidance to it);
        by default ``encode_prompts(prompts)``.
        """
        denoiser = denoiser if denoiser is not None else self.denoiser
        device = self.device
        scheduler = self.process.sampling_scheduler()
        scheduler.set_timesteps(num_inference_steps, device=device)
        conditioning = self.encode_prompts(prompts) if conditioning is None else conditioning
        guided = guidance_scale != 1.0
        if guided:
            empty = self.encode_prompts([""] * len(prompts))
            conditioning = concat_conditioning([{**conditioning, **empty}, conditioning])
        dtype = parameter_dtype(denoiser)  # e.g. bfloat16 when DeepSpeed holds the weights in it
        conditioning = conditioning_in(conditioning, dtype)
        if initial_noise is None:
            initial_noise = torch.randn(self.latent_shape(len(prompts)))
        # FlowMatchEulerDiscreteScheduler has neither: its initial noise has unit scale, its inputs no rescaling.
        latents = initial_noise.to(device) * getattr(scheduler, "init_noise_sigma", 1.0)
        scale_model_input = getattr(scheduler, "scale_model_input", lambda sample, t: sample)
        for t in scheduler.timesteps:
            model_input = scale_model_input(torch.cat([latents] * 2) if guided else latents, t).to(dtype)
            timesteps = t.expand(model_input.shape[0]).to(device)
            prediction = self.predict(denoiser, model_input, timesteps, conditioning).float()
            if guided:
                unconditional, conditional = prediction.chunk(2)
                prediction = unconditional + guidance_scale * (conditional - unconditional)
            latents = scheduler.step(prediction, t, latents).prev_sample
        if not decode:
            return latents
        return ((self.decode_latents(latents).float() + 1) / 2).clamp(0, 1)

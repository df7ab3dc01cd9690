"""FLUX.1 [dev] and [schnell] (Black Forest Labs 2024): a rectified-flow MMDiT over 2 x 2-packed latents.

As diffusers' ``FluxPipeline`` lays it out: CLIP-L read for its pooled output (``pooled_projections``), T5-XXL's
hidden states (``encoder_hidden_states``), a 16-channel ``AutoencoderKL`` with ``shift_factor`` and
``scaling_factor``, and a ``FluxTransformer2DModel`` that reads each 2 x 2 latent patch as one token
([`pack_latents`][lightning_pref.backbones.flux.pack_latents] /
[`unpack_latents`][lightning_pref.backbones.flux.unpack_latents]) with rotary position ids of the tokens' rows
and columns (``img_ids``) and zeros for the text tokens (``txt_ids``). The library keeps latents unpacked,
``(B, 16, H, W)`` like every image family: packing is a permutation, so noise, targets and per-sample errors are
the same either way, and precomputed latent shards stay images.

FLUX.1-dev is guidance distilled: its transformer embeds a guidance value (``guidance_embeds``) instead of running
classifier-free guidance; FLUX.1-schnell has no such input.
"""

from __future__ import annotations

from typing import Literal

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
from torch import Tensor, nn
from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

from lightning_pref.backbones.base import Backbone, Conditioning
from lightning_pref.backbones.image import MMDiTMixin
from lightning_pref.backbones.loading import frozen, read_model_index, torch_dtype
from lightning_pref.errors import ConfigError
from lightning_pref.processes import FluxFlowMatchingProcess

#: the training guidance of a guidance-distilled checkpoint unless told otherwise (see ``FluxBackbone``)
DEFAULT_TRAINING_GUIDANCE = 1.0


def pack_latents(latents: Tensor) -> Tensor:
    """``(B, C, H, W)`` latents to ``(B, H/2 * W/2, 4 C)`` tokens: one per 2 x 2 patch, row-major, each holding its
    channels, then the patch's rows, then its columns (``FluxPipeline._pack_latents``). Undone by ``unpack_latents``."""
    batch, channels, height, width = latents.shape
    patches = latents.reshape(batch, channels, height // 2, 2, width // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(batch, (height // 2) * (width // 2), 4 * channels)


def unpack_latents(tokens: Tensor, height: int, width: int) -> Tensor:
    """``(B, H/2 * W/2, 4 C)`` tokens back to ``(B, C, H, W)`` latents of ``height`` x ``width``: the inverse of
    ``pack_latents``."""
    batch, _, features = tokens.shape
    patches = tokens.reshape(batch, height // 2, width // 2, features // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(batch, features // 4, height, width)


def latent_image_ids(height: int, width: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """The rotary position ids of the packed tokens of ``height`` x ``width`` latents, ``(H/2 * W/2, 3)``:
    ``(0, row, column)`` of each 2 x 2 patch, in ``pack_latents``' order."""
    rows, columns = torch.meshgrid(torch.arange(height // 2), torch.arange(width // 2), indexing="ij")
    ids = torch.stack([torch.zeros_like(rows), rows, columns], dim=-1).reshape(-1, 3)
    return ids.to(device=device, dtype=dtype)


class FluxBackbone(MMDiTMixin, Backbone):
    """FLUX.1 pipeline (``black-forest-labs/FLUX.1-dev``, ``black-forest-labs/FLUX.1-schnell``): flow matching
    ``x_t = (1 - s) x0 + s eps``, velocity target ``eps - x0``.

    **Shift.** The noise process is [`FluxFlowMatchingProcess`][lightning_pref.processes.FluxFlowMatchingProcess]:
    dev's scheduler shifts by the image token count (``use_dynamic_shifting``), ``mu`` = 1.15 at 1024 x 1024, and
    training times get the sampler's shift ``exp(mu)`` at ``height`` x ``width`` (3.16 at 1024 x 1024: set them to
    the training resolution); schnell's shift is 1. ``shift`` overrides the training shift (``1.0``: diffusers'
    DreamBooth-FLUX scripts); sampling always follows ``FluxPipeline``.

    **Guidance.** A guidance-distilled checkpoint (``transformer.config.guidance_embeds``: dev) needs a guidance
    value in every forward. Training feeds the fixed ``guidance``, by default 1.0, SimpleTuner's default
    (``flux_guidance_value``, chosen there to keep dev's distillation intact): at 1 the distilled model stands
    for the unguided conditional model whose likelihood Diffusion-DPO's objective is about, and the policy and
    its reference see the same value. Diffusers' DreamBooth-FLUX scripts train at 3.5 (``--guidance_scale``), the
    pipeline's sampling default. ``sample`` embeds its ``guidance_scale`` as ``FluxPipeline`` does: one forward a
    step, never a classifier-free doubling; schnell ignores it, like the pipeline.

    Args:
        pretrained: hub id or local path of a diffusers FLUX.1 pipeline.
        revision, variant: passed to every ``from_pretrained``.
        max_sequence_length: T5 tokens (at most the T5 tokenizer's ``model_max_length``): 512, as the pipeline.
        height, width: the image size in pixels ``sample`` generates (and ``latent_shape`` describes), and the one
            whose token count sets the shift (1024 x 1024, the pipeline's default).
        guidance: the guidance value training feeds a guidance-distilled transformer; ``None``: 1.0 for dev,
            nothing for schnell (setting it on schnell is an error).
        shift: the training times' shift instead of the sampler's (see above).
        timestep_range, time_sampling, logit_mean, logit_std, error_weighting: noise-process options
            ([`FlowMatchingProcess`][lightning_pref.processes.FlowMatchingProcess]); logit-normal times by default,
            as for SD3.
        text_encoder_dtype: dtype the frozen T5 is held in (``bfloat16`` by default: T5-XXL's 4.7B weights take
            9.5 GB instead of 19 GB on every GPU); its states reach the denoiser in the denoiser's dtype.
    """

    def __init__(
        self,
        pretrained: str,
        revision: str | None = None,
        variant: str | None = None,
        max_sequence_length: int = 512,
        height: int = 1024,
        width: int = 1024,
        guidance: float | None = None,
        shift: float | None = None,
        timestep_range: tuple[float, float] = (0.0, 1.0),
        time_sampling: Literal["uniform", "logit_normal"] = "logit_normal",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        error_weighting: Literal["constant", "eps_equivalent"] = "constant",
        text_encoder_dtype: str = "bfloat16",
    ):
        super().__init__()
        self.pretrained = pretrained
        self.max_sequence_length = max_sequence_length
        read_model_index(pretrained, revision)  # a pipeline directory or hub id, with a clear error otherwise
        transformer_config = FluxTransformer2DModel.load_config(pretrained, subfolder="transformer", revision=revision)
        self.guidance = self.training_guidance(guidance, bool(transformer_config.get("guidance_embeds")))
        load = dict(revision=revision, variant=variant)
        self.denoiser = FluxTransformer2DModel.from_pretrained(pretrained, subfolder="transformer", **load)
        self.tokenizer = AutoTokenizer.from_pretrained(pretrained, subfolder="tokenizer", revision=revision)
        self.tokenizer_2 = AutoTokenizer.from_pretrained(pretrained, subfolder="tokenizer_2", revision=revision)
        self.text_encoder = frozen(CLIPTextModel.from_pretrained(pretrained, subfolder="text_encoder", **load))
        self.text_encoder_2 = frozen(
            T5EncoderModel.from_pretrained(
                pretrained, subfolder="text_encoder_2", torch_dtype=torch_dtype(text_encoder_dtype), **load
            )
        )
        self.vae = frozen(AutoencoderKL.from_pretrained(pretrained, subfolder="vae", **load))
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(
            pretrained, subfolder="scheduler", revision=revision
        )
        self.image_size = (height, width)
        _, _, latent_height, latent_width = self.latent_shape(1)
        self.process = FluxFlowMatchingProcess(
            scheduler.config,
            image_seq_len=(latent_height // 2) * (latent_width // 2),
            shift=shift,
            timestep_range=timestep_range,
            time_sampling=time_sampling,
            logit_mean=logit_mean,
            logit_std=logit_std,
            error_weighting=error_weighting,
        )

    def training_guidance(self, guidance: float | None, guidance_embeds: bool) -> float | None:
        """The guidance value training feeds the transformer: ``guidance`` or 1.0 with guidance embeds, else none."""
        if not guidance_embeds:
            if guidance is not None:
                raise ConfigError(
                    f"guidance={guidance}: {self.pretrained!r} has no guidance embedding (transformer.config."
                    "guidance_embeds is false, as FLUX.1-schnell): remove `guidance` from the backbone's options."
                )
            return None
        return DEFAULT_TRAINING_GUIDANCE if guidance is None else float(guidance)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        clip = self.text_encoder(self.tokenize(self.tokenizer, prompts))
        return {
            "encoder_hidden_states": self.t5_hidden_states(self.tokenizer_2, self.text_encoder_2, prompts),
            "pooled_projections": clip.pooler_output,
        }

    def latent_shape(self, batch_size: int) -> tuple[int, ...]:
        """``(B, 16, H, W)`` latents of ``height`` x ``width`` pixels (sides rounded down to whole 2 x 2 patches)."""
        patch = 2 * self.vae_scale_factor
        height, width = (2 * (side // patch) for side in self.image_size)
        return (batch_size, self.denoiser.config.in_channels // 4, height, width)

    def spatial_multiple(self) -> int:
        return 2  # latents are packed in 2 x 2 patches

    def predict(self, denoiser: nn.Module, x_t: Tensor, timesteps: Tensor, conditioning: Conditioning) -> Tensor:
        """The velocity ``eps - x0`` of ``(B, 16, H, W)`` latents; ``timesteps`` are ``s * 1000``, as the scheduler
        hands them out (the transformer takes ``s``). The guidance is the conditioning's ``guidance`` (what
        ``sample`` embeds), else the training ``guidance`` (none for schnell)."""
        batch, _, height, width = x_t.shape
        hidden = conditioning["encoder_hidden_states"]
        guidance = conditioning.get("guidance")
        if guidance is None and self.guidance is not None:
            guidance = torch.full((batch,), self.guidance, device=x_t.device)
        velocity = denoiser(
            hidden_states=pack_latents(x_t),
            timestep=timesteps / self.process.num_train_timesteps,
            guidance=guidance,
            pooled_projections=conditioning["pooled_projections"],
            encoder_hidden_states=hidden,
            txt_ids=hidden.new_zeros(hidden.shape[1], 3),
            img_ids=latent_image_ids(height, width, x_t.device, x_t.dtype),
            return_dict=False,
        )[0]
        return unpack_latents(velocity, height, width)

    @torch.no_grad()
    def sample(
        self,
        prompts: list[str],
        *,
        denoiser: nn.Module | None = None,
        num_inference_steps: int = 28,
        guidance_scale: float = 3.5,
        initial_noise: Tensor | None = None,
        decode: bool = True,
        conditioning: Conditioning | None = None,
    ) -> Tensor:
        """Generate one image per prompt as ``FluxPipeline`` does (28 steps, guidance 3.5 by default): the sigmas
        ``linspace(1, 1/N, N)`` shifted by the image token count, and ``guidance_scale`` embedded in the
        transformer of a guidance-distilled checkpoint (one forward a step, no unconditional branch): it travels
        as the conditioning's ``guidance``. A checkpoint without guidance embeds (schnell) ignores it. Returns
        pixels in [0, 1] (with ``decode=False``, latents)."""
        conditioning = dict(self.encode_prompts(prompts) if conditioning is None else conditioning)
        if self.guidance is not None:
            conditioning["guidance"] = torch.full((len(prompts),), float(guidance_scale), device=self.device)
        return super().sample(  # guidance_scale=1: the base sampler's loop without classifier-free guidance
            prompts,
            denoiser=denoiser,
            num_inference_steps=num_inference_steps,
            guidance_scale=1.0,
            initial_noise=initial_noise,
            decode=decode,
            conditioning=conditioning,
        )

"""Wan2.1 and Wan2.2 (Wan team 2025, "Wan: Open and Advanced Large-Scale Video Generative Models").

A UMT5 text encoder (512 tokens; states past each prompt zeroed), a causal 3D VAE (4x in time, 8x in
space) whose latents are normalized per channel by ``latents_mean`` / ``latents_std``, and a diffusion
transformer over ``(B, C, F, H, W)`` latents (3D rotary embeddings computed inside the model), trained by
flow matching: ``x_t = (1 - s) x0 + s eps``, velocity target ``eps - x0``.

Wan2.2 keeps all of it and adds two layouts, as diffusers' ``WanPipeline`` reads them from ``model_index.json``:

* TI2V-5B (``expand_timesteps: true``): one transformer over the latents of the Wan2.2 VAE (48 channels, 4x in
  time and 16x in space: a 2x2 pixel patch before the encoder), fed one timestep per latent token.
* A14B (``transformer_2`` and ``boundary_ratio``): two expert transformers of one architecture, the
  ``transformer`` denoising high noise levels and ``transformer_2`` low ones
  ([`WanExperts`][lightning_pref.backbones.wan.WanExperts]).
"""

from __future__ import annotations

import html
import math
from typing import Any, Literal

import torch
from diffusers import AutoencoderKLWan, WanTransformer3DModel
from torch import Tensor, nn
from transformers import UMT5EncoderModel

from lightning_pref.backbones.base import Conditioning, parameter_dtype
from lightning_pref.backbones.loading import has_component, read_model_index
from lightning_pref.backbones.video import TextToVideoBackbone, VideoShape
from lightning_pref.errors import ConfigError
from lightning_pref.processes import FlowMatchingProcess


def clean_prompt(prompt: str) -> str:
    """The Wan pipeline's prompt clean-up: HTML entities decoded, whitespace collapsed (no ``ftfy`` repair)."""
    return " ".join(html.unescape(html.unescape(prompt)).split())


def release_of(model_index: dict[str, Any]) -> str:
    """``"2.2"`` for a pipeline of Wan2.2's layouts (two experts, or one timestep per token), else ``"2.1"``."""
    return "2.2" if has_component(model_index, "transformer_2") or model_index.get("expand_timesteps") else "2.1"


def describe_wan_layout(model_index: dict[str, Any]) -> str:
    """What makes a pipeline Wan2.1, TI2V-5B or A14B, for error messages."""
    if has_component(model_index, "transformer_2"):
        return (
            "Wan2.2 A14B: two expert transformers, one for high noise and one for low, switching at "
            f"boundary_ratio={model_index.get('boundary_ratio')}"
        )
    if model_index.get("expand_timesteps"):
        return "Wan2.2 TI2V-5B: one timestep per latent token (expand_timesteps)"
    return "Wan2.1: neither transformer_2 nor expand_timesteps in its model_index.json"


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
    #: the release whose checkpoints this class trains (the other one's are refused)
    wan_release = "2.1"
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
        release = release_of(model_index)
        if release != self.wan_release:
            right_class = "Wan22Backbone" if release == "2.2" else "WanBackbone"
            raise ConfigError(
                f"{self.pretrained!r} is {describe_wan_layout(model_index)}; {type(self).__name__} trains Wan"
                f"{self.wan_release}: use {right_class}."
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


#: the experts of Wan2.2 A14B, by what they denoise: ``transformer`` and ``transformer_2`` of the pipeline
EXPERTS = ("high_noise", "low_noise")
#: how far (in fractions of the schedule before the shift) one expert's training times keep from the boundary
BOUNDARY_MARGIN = 1e-6


class WanExperts(nn.Module):
    """Wan2.2 A14B's two expert transformers as one denoiser, each sample sent to the expert of its timestep.

    ``WanPipeline`` picks the expert of a sampling step by its timestep: ``high_noise`` (the pipeline's
    ``transformer``) at model timesteps ``t >= boundary``, ``low_noise`` (``transformer_2``) below, with
    ``boundary = boundary_ratio * num_train_timesteps`` (875 for Wan2.2-T2V-A14B). Training routes every sample
    the same way, so a sample at time ``s`` (model timestep ``1000 s``) trains the expert that denoises ``s`` when
    sampling. A frozen copy of this module (a full fine-tune's reference) routes alike: each sample is compared
    with the frozen copy of its own expert; under LoRA, with that expert's adapters off.

    The rest of the library sees one denoiser: ``config`` is the experts' shared architecture, ``blocks`` are
    both experts' blocks (the units FSDP2 shards), and LoRA (``add_adapter``), gradient checkpointing and
    ``requires_grad_`` reach the ``trained`` experts only: an expert left out stays frozen, without adapters.

    Args:
        high_noise, low_noise: the two ``WanTransformer3DModel`` experts.
        boundary: the model timestep at and above which ``high_noise`` denoises.
        trained: the experts a fine-tune changes: both, or one of ``EXPERTS``.
    """

    def __init__(
        self,
        high_noise: WanTransformer3DModel,
        low_noise: WanTransformer3DModel,
        boundary: float,
        trained: tuple[str, ...] = EXPERTS,
    ):
        super().__init__()
        self.high_noise = high_noise
        self.low_noise = low_noise
        self.boundary = boundary
        self.trained = trained

    @property
    def config(self) -> Any:
        return self.high_noise.config

    @property
    def dtype(self) -> torch.dtype:
        return parameter_dtype(self)

    @property
    def blocks(self) -> list[nn.Module]:
        return [*self.high_noise.blocks, *self.low_noise.blocks]

    @property
    def peft_config(self) -> dict[str, Any]:
        """The LoRA configs of the trained experts (each expert got the same ones)."""
        return self.trained_experts()[0].peft_config

    def trained_experts(self) -> list[WanTransformer3DModel]:
        return [getattr(self, name) for name in self.trained]

    def requires_grad_(self, requires_grad: bool = True) -> WanExperts:
        for expert in self.trained_experts():
            expert.requires_grad_(requires_grad)
        return self

    def add_adapter(self, adapter_config: Any, adapter_name: str = "default") -> None:
        for expert in self.trained_experts():
            expert.add_adapter(adapter_config, adapter_name=adapter_name)

    def enable_gradient_checkpointing(self) -> None:
        for expert in self.trained_experts():
            expert.enable_gradient_checkpointing()

    def forward(
        self, hidden_states: Tensor, timestep: Tensor, encoder_hidden_states: Tensor, return_dict: bool = False
    ) -> tuple[Tensor]:
        """Each expert on its own samples (one ``timestep`` per sample); the outputs in the inputs' order, as a
        tuple (what a transformer returns with ``return_dict=False``, the only form offered).

        A trained expert that no sample reaches still runs, on one latent patch and one text token, its output
        added times zero: every process then runs the same modules in the same order whatever its timesteps
        (ZeRO-3 and FSDP2 gather each module's weights collectively, DDP reduces every parameter's gradient),
        for one token's compute. The idle expert's gradient is zero, as DDP would make it for an unused one.
        """
        high = timestep >= self.boundary
        outputs, rows, idle = [], [], []
        for name, chosen in (("high_noise", high), ("low_noise", ~high)):
            expert = getattr(self, name)
            index = chosen.nonzero().squeeze(1)
            if len(index):
                outputs.append(
                    expert(
                        hidden_states=hidden_states[index],
                        timestep=timestep[index],
                        encoder_hidden_states=encoder_hidden_states[index],
                        return_dict=False,
                    )[0]
                )
                rows.append(index)
            elif name in self.trained:
                frames, height, width = expert.config.patch_size
                one_token = expert(
                    hidden_states=hidden_states[:1, :, :frames, :height, :width],
                    timestep=timestep[:1],
                    encoder_hidden_states=encoder_hidden_states[:1, :1],
                    return_dict=False,
                )[0]
                idle.append(0 * one_token.sum())
        output = torch.cat(outputs)[torch.cat(rows).argsort()]
        return (output + sum(idle) if idle else output,)


class Wan22Backbone(WanBackbone):
    """Wan2.2 text-to-video: TI2V-5B (``Wan-AI/Wan2.2-TI2V-5B-Diffusers``) and A14B
    (``Wan-AI/Wan2.2-T2V-A14B-Diffusers``), in the layout the checkpoint's ``model_index.json`` says.

    Everything else is [`WanBackbone`][lightning_pref.backbones.wan.WanBackbone]'s: the text, the per-channel latent
    normalisation (of the Wan2.2 VAE's 48 channels for TI2V-5B), flow matching with the config's ``flow_shift``.

    * TI2V-5B (``expand_timesteps``): ``predict`` gives the transformer each sample's timestep once per latent
      token, as the pipeline does when it generates from text.
    * A14B (``transformer_2``, ``boundary_ratio``): ``denoiser`` is a
      [`WanExperts`][lightning_pref.backbones.wan.WanExperts] holding both experts. A training sample at time
      ``s`` trains the high-noise expert when ``1000 s >= 1000 boundary_ratio``, the low-noise one below; its
      reference is the frozen version of the same expert. ``sample`` uses the expert of each step, with one
      guidance scale for both (the pipeline's default when it is not given ``guidance_scale_2``).

    The arguments are ``WanBackbone``'s, plus ``trained_experts``; the video size defaults to the layout's.

    Args:
        trained_experts: A14B only. ``both`` (default), or ``high_noise`` / ``low_noise``: that expert alone is
            fine-tuned (its LoRA adapters, or its weights) on times drawn from its own side of the boundary (the
            part of ``timestep_range`` whose shifted times fall there); the other stays frozen, without adapters.
        num_frames, height, width: the size ``sample`` generates; by default the layout's published one,
            121 x 704 x 1280 for TI2V-5B (24 fps), 81 x 720 x 1280 for A14B (16 fps).
    """

    wan_release = "2.2"
    #: TI2V-5B's videos (A14B's are ``a14b_video``), and its VAE's compression (A14B keeps Wan2.1's VAE)
    training_video = VideoShape(frames=121, height=704, width=1280, text_tokens=512)
    a14b_video = VideoShape(frames=81, height=720, width=1280, text_tokens=512)
    vae_compression = (4, 16)

    def __init__(
        self,
        pretrained: str,
        revision: str | None = None,
        variant: str | None = None,
        trained_experts: Literal["both", "high_noise", "low_noise"] = "both",
        max_sequence_length: int = training_video.text_tokens,
        num_frames: int | None = None,
        height: int | None = None,
        width: int | None = None,
        vae_tiling: bool = False,
        text_encoder_dtype: str = "bfloat16",
        shift: float | None = None,
        timestep_range: tuple[float, float] = (0.0, 1.0),
        time_sampling: Literal["uniform", "logit_normal"] = "uniform",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        error_weighting: Literal["constant", "eps_equivalent"] = "constant",
    ):
        index = read_model_index(pretrained, revision)  # read here too: wrong options fail before any weight loads
        two_experts = has_component(index, "transformer_2")
        check_trained_experts(pretrained, trained_experts, two_experts)
        video = self.a14b_video if two_experts else self.training_video
        super().__init__(
            pretrained,
            revision=revision,
            variant=variant,
            max_sequence_length=max_sequence_length,
            num_frames=num_frames or video.frames,
            height=height or video.height,
            width=width or video.width,
            vae_tiling=vae_tiling,
            text_encoder_dtype=text_encoder_dtype,
            shift=shift,
            timestep_range=timestep_range,
            time_sampling=time_sampling,
            logit_mean=logit_mean,
            logit_std=logit_std,
            error_weighting=error_weighting,
        )
        self.expand_timesteps = bool(index.get("expand_timesteps"))
        if not two_experts:
            return
        low_noise = self.denoiser_class.from_pretrained(
            pretrained, subfolder="transformer_2", revision=revision, variant=variant
        )
        trained = EXPERTS if trained_experts == "both" else (trained_experts,)
        boundary_ratio = index["boundary_ratio"]
        self.denoiser = WanExperts(self.denoiser, low_noise, boundary_ratio * self.process.num_train_timesteps, trained)
        for name in EXPERTS:
            if name not in trained:
                getattr(self.denoiser, name).requires_grad_(False)
        if trained_experts != "both":
            self.process.timestep_range = self.expert_timestep_range(trained_experts, boundary_ratio)

    def pipeline_denoisers(self) -> dict[str, nn.Module]:
        """A14B: the high-noise expert is the pipeline's ``transformer``, the low-noise one its ``transformer_2``."""
        if isinstance(self.denoiser, WanExperts):
            return {"transformer": self.denoiser.high_noise, "transformer_2": self.denoiser.low_noise}
        return super().pipeline_denoisers()

    def check_checkpoint(self, model_index: dict[str, Any], denoiser_config: dict[str, Any]) -> None:
        super().check_checkpoint(model_index, denoiser_config)
        if not has_component(model_index, "transformer_2"):
            return
        ratio = model_index.get("boundary_ratio")
        if not (isinstance(ratio, (int, float)) and 0 < ratio < 1) or model_index.get("expand_timesteps"):
            raise ConfigError(
                f"{self.pretrained!r} has two expert transformers but boundary_ratio={ratio!r} and "
                f"expand_timesteps={model_index.get('expand_timesteps')!r} in its model_index.json: Wan2.2 A14B "
                "needs a boundary_ratio in (0, 1) and no expand_timesteps; check the pipeline directory."
            )

    def expert_timestep_range(self, expert: str, boundary_ratio: float) -> tuple[float, float]:
        """The part of the process's ``timestep_range`` whose shifted times reach ``expert``.

        ``timestep_range`` holds fractions before the shift ``s' = k s / (1 + (k - 1) s)``; its inverse maps the
        boundary to ``b / (k - (k - 1) b)``, moved ``1e-6`` into the expert's side: float32 rounding of the shift
        never carries a drawn time across (at ``k = 3`` the boundary itself comes out as 874.99994).
        """
        shift = self.process.shift
        boundary = boundary_ratio / (shift - (shift - 1) * boundary_ratio)
        low, high = self.process.timestep_range
        if expert == "high_noise":
            low = max(low, boundary + BOUNDARY_MARGIN)
        else:
            high = min(high, boundary - BOUNDARY_MARGIN)
        if low >= high:
            raise ConfigError(
                f"timestep_range={self.process.timestep_range} holds no time of the {expert} expert (fractions "
                f"{'above' if expert == 'high_noise' else 'below'} {boundary:.4f}, which the shift {shift} maps to "
                f"boundary_ratio={boundary_ratio}): widen timestep_range, or train the other expert."
            )
        return low, high

    def predict(self, denoiser: nn.Module, x_t: Tensor, timesteps: Tensor, conditioning: Conditioning) -> Tensor:
        """``WanBackbone.predict``; with ``expand_timesteps`` (TI2V-5B), each sample's timestep repeated for each of
        its latent tokens, ``(B, F H W / patch volume)``, as the pipeline feeds them."""
        if self.expand_timesteps:
            patch_size = self.denoiser.config.patch_size
            tokens = math.prod(size // patch for size, patch in zip(x_t.shape[2:], patch_size))
            timesteps = timesteps[:, None].expand(-1, tokens)
        return super().predict(denoiser, x_t, timesteps, conditioning)


def check_trained_experts(pretrained: str, trained_experts: str, two_experts: bool) -> None:
    """Refuse an unknown ``trained_experts``, or one expert picked on a checkpoint with one transformer."""
    if trained_experts not in ("both", *EXPERTS):
        raise ConfigError(f"trained_experts={trained_experts!r}: choose 'both', 'high_noise' or 'low_noise'.")
    if trained_experts != "both" and not two_experts:
        raise ConfigError(
            f"trained_experts={trained_experts!r} picks one of Wan2.2 A14B's two experts, but {pretrained!r} has one "
            "transformer: remove trained_experts."
        )

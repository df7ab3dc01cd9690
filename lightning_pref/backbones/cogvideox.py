"""CogVideoX (Yang et al. 2024, "CogVideoX: Text-to-Video Diffusion Models with An Expert Transformer").

A T5 text encoder (226 tokens), a 3D causal VAE (4x in time, 8x in space) and an expert transformer over
latents laid out ``(B, F, C, H, W)``, trained by v-prediction on a DDPM schedule whose SNR is divided by
``snr_shift_scale`` (3) and rescaled to zero terminal SNR. CogVideoX-2B adds sin-cos position embeddings to
the tokens; CogVideoX-5B and CogVideoX1.5-5B rotate queries and keys by 3D rotary embeddings of the latent
grid (``use_rotary_positional_embeddings``), which ``CogVideoXBackbone.predict`` computes per call.
"""

from __future__ import annotations

from typing import Any, Literal

from diffusers import AutoencoderKLCogVideoX, CogVideoXTransformer3DModel
from diffusers.models.embeddings import get_3d_rotary_pos_embed
from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid
from torch import Tensor, nn
from transformers import T5EncoderModel

from lightning_pref.backbones.base import Conditioning
from lightning_pref.backbones.video import TextToVideoBackbone, VideoShape
from lightning_pref.errors import ConfigError
from lightning_pref.processes import DDPMProcess


class CogVideoXBackbone(TextToVideoBackbone):
    """CogVideoX-2B/5B and CogVideoX1.5-5B text-to-video.

    Latents are ``(B, F, C, H, W)``: the VAE's posterior times its ``scaling_factor``, frames first. The noise
    process is the checkpoint's own schedule (``CogVideoXDDIMScheduler`` / ``CogVideoXDPMScheduler`` config;
    [`DDPMProcess`][lightning_pref.processes.DDPMProcess] reproduces the SNR shift), sampled with DDIM.

    Args:
        pretrained: hub id (``THUDM/CogVideoX-2b``, ``THUDM/CogVideoX-5b``) or local pipeline directory.
        revision, variant: passed to every ``from_pretrained``.
        max_sequence_length: T5 tokens per prompt; by default the transformer's ``max_text_seq_length`` (226).
            CogVideoX-2B's position embeddings fix it to that value.
        vae_tiling: encode and decode in spatial tiles (less memory at 480x720).
        timestep_range, error_weighting: noise-process options ([`DDPMProcess`][lightning_pref.processes.DDPMProcess]).
        text_encoder_dtype: dtype the frozen T5 is held in (``bfloat16`` by default: T5-XXL's 4.7B weights take
            9.5 GB instead of 19 GB on every GPU); its states reach the denoiser in the denoiser's dtype.

    CogVideoX1.5 patches latent frames in pairs (``patch_size_t`` 2): its videos need an even number of latent
    frames ``(num_frames - 1) / 4 + 1`` (e.g. 77 or 85 frames, not 81), and ``latent_shape`` rounds down to
    one (the pipeline instead pads the noise with a frame it discards before decoding).
    """

    channel_dim = 2  # latents are (B, F, C, H, W)
    text_encoder_class = T5EncoderModel
    vae_class = AutoencoderKLCogVideoX
    denoiser_class = CogVideoXTransformer3DModel
    mask_prompt_padding = False
    #: CogVideoX-2B's and 5B's (their transformers' ``sample_frames``, ``sample_height x sample_width`` latents
    #: in pixels, ``max_text_seq_length``)
    training_video = VideoShape(frames=49, height=480, width=720, text_tokens=226)

    def __init__(
        self,
        pretrained: str,
        revision: str | None = None,
        variant: str | None = None,
        max_sequence_length: int | None = None,
        vae_tiling: bool = False,
        text_encoder_dtype: str = "bfloat16",
        timestep_range: tuple[float, float] = (0.0, 1.0),
        error_weighting: Literal["constant", "min_snr"] = "constant",
    ):
        super().__init__(pretrained, revision, variant, max_sequence_length, vae_tiling, text_encoder_dtype)
        config = self.denoiser.config
        if max_sequence_length is None:
            self.max_sequence_length = config.max_text_seq_length
        elif max_sequence_length != config.max_text_seq_length and not config.use_rotary_positional_embeddings:
            raise ConfigError(
                f"max_sequence_length={max_sequence_length}: this transformer's position embeddings cover exactly "
                f"{config.max_text_seq_length} text tokens; leave max_sequence_length unset."
            )
        self.process = DDPMProcess(
            self.scheduler_config, timestep_range=timestep_range, error_weighting=error_weighting
        )

    def check_checkpoint(self, model_index: dict[str, Any], denoiser_config: dict[str, Any]) -> None:
        super().check_checkpoint(model_index, denoiser_config)
        if denoiser_config.get("ofs_embed_dim"):
            raise ConfigError(
                f"{self.pretrained!r} has an 'ofs' embedding (ofs_embed_dim={denoiser_config['ofs_embed_dim']}), "
                "which only CogVideoX1.5's image-to-video transformer conditions on: CogVideoXBackbone trains "
                "text-to-video checkpoints (THUDM/CogVideoX-2b, THUDM/CogVideoX-5b, THUDM/CogVideoX1.5-5B)."
            )

    @property
    def vae_scale_factor_temporal(self) -> int:
        return self.vae.config.temporal_compression_ratio

    def latent_shape(self, batch_size: int) -> tuple[int, ...]:
        """The transformer's native size: ``sample_frames`` pixel frames (49; 81 for 1.5) of
        ``sample_height x sample_width`` latents (60 x 90, i.e. 480 x 720 pixels; 1.5: 96 x 170)."""
        config = self.denoiser.config
        frames = (config.sample_frames - 1) // self.vae_scale_factor_temporal + 1
        frames -= frames % (config.patch_size_t or 1)
        return (batch_size, frames, config.in_channels, config.sample_height, config.sample_width)

    def normalize_latents(self, vae_latents: Tensor) -> Tensor:
        return (vae_latents * self.vae.config.scaling_factor).permute(0, 2, 1, 3, 4)

    def denormalize_latents(self, latents: Tensor) -> Tensor:
        return latents.permute(0, 2, 1, 3, 4) / self.vae.config.scaling_factor

    def rotary_embedding(self, x_t: Tensor) -> tuple[Tensor, Tensor] | None:
        """Cosines and sines of the 3D rotary embedding of ``x_t``'s patch grid (``None`` for CogVideoX-2B).

        CogVideoX 1.0 (5B) spreads the grid over the part of its base grid (``sample_height x sample_width``
        in patches) that the grid's aspect ratio covers when resized into it, centred; CogVideoX1.5 gives the
        patches the integer positions of the base grid's top-left corner, frames counted in pairs.
        """
        config = self.denoiser.config
        if not config.use_rotary_positional_embeddings:
            return None
        frames, height, width = x_t.shape[1], x_t.shape[3] // config.patch_size, x_t.shape[4] // config.patch_size
        base_height, base_width = config.sample_height // config.patch_size, config.sample_width // config.patch_size
        if config.patch_size_t is None:
            crop = get_resize_crop_region_for_grid((height, width), base_width, base_height)
            return get_3d_rotary_pos_embed(config.attention_head_dim, crop, (height, width), frames, device=x_t.device)
        return get_3d_rotary_pos_embed(
            config.attention_head_dim,
            None,
            (height, width),
            frames // config.patch_size_t,
            grid_type="slice",
            max_size=(base_height, base_width),
            device=x_t.device,
        )

    def predict(self, denoiser: nn.Module, x_t: Tensor, timesteps: Tensor, conditioning: Conditioning) -> Tensor:
        """The v-prediction for ``(B, F, C, H, W)`` latents ``x_t``."""
        frames, patch_size_t = x_t.shape[1], self.denoiser.config.patch_size_t
        if patch_size_t and frames % patch_size_t:
            below = frames - frames % patch_size_t
            fitting = dict.fromkeys([max(below, patch_size_t), below + patch_size_t])  # latent frame counts
            video_frames = " or ".join(str((n - 1) * self.vae_scale_factor_temporal + 1) for n in fitting)
            raise ConfigError(
                f"CogVideoX1.5 patches {patch_size_t} latent frames together, but the latents have {frames}: use "
                f"videos of {video_frames} frames (a multiple of {patch_size_t} latent frames)."
            )
        return denoiser(
            hidden_states=x_t,
            encoder_hidden_states=conditioning["encoder_hidden_states"],
            timestep=timesteps,
            image_rotary_emb=self.rotary_embedding(x_t),
            return_dict=False,
        )[0]

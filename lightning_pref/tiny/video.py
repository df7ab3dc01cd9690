"""Tiny CogVideoX, Wan2.1 and Wan2.2 pipelines built from configs, offline, for tests.

Each writer saves a complete diffusers pipeline directory (``model_index.json``, ``tokenizer/``,
``text_encoder/``, ``transformer/``, ``vae/``, ``scheduler/``) that loads through the backbones'
``from_pretrained`` path, and through diffusers' own ``CogVideoXPipeline`` / ``WanPipeline``.

The CogVideoX and Wan2.1 VAEs compress 2x in time and space: videos of ``1 + 2k`` frames of ``16 x 16`` pixels
(5 frames by default) become ``1 + k`` latent frames of ``8 x 8``. The Wan2.2 VAE (TI2V-5B's) compresses 2x in
time and 4x in space (a 2x2 pixel patch, then one downsampling): ``4 x 4`` latents of 48 channels.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from diffusers import (
    AutoencoderKLCogVideoX,
    AutoencoderKLWan,
    CogVideoXDDIMScheduler,
    CogVideoXTransformer3DModel,
    UniPCMultistepScheduler,
    WanTransformer3DModel,
)

from lightning_pref.tiny.image import (
    PROMPT_TOKENS,
    TINY_WORDS,
    build_t5_tokenizer,
    tiny_t5_encoder,
    write_model_index,
)

TEXT_WIDTH = 32  # hidden size of the tiny T5 / UMT5 encoders
LATENT_CHANNELS = 4
PIXEL_SIZE = 16
NUM_FRAMES = 5  # pixel frames: 3 latent frames
WAN22_LATENT_CHANNELS = 48  # the Wan2.2 VAE's z_dim, as TI2V-5B's


def write_text_encoder(path: Path, umt5: bool) -> dict[str, list[str]]:
    """Save a tiny T5 (or UMT5) tokenizer and encoder; return their ``model_index.json`` entries."""
    tokenizer = build_t5_tokenizer(TINY_WORDS)
    encoder = tiny_t5_encoder(len(tokenizer), TEXT_WIDTH, umt5=umt5)
    tokenizer.save_pretrained(path / "tokenizer")
    encoder.save_pretrained(path / "text_encoder")
    return {
        "tokenizer": ["transformers", type(tokenizer).__name__],
        "text_encoder": ["transformers", type(encoder).__name__],
    }


def write_tiny_cogvideox_pipeline(path: str | Path, *, rotary: bool = True, patch_size_t: int | None = None) -> Path:
    """A tiny CogVideoX pipeline: ``rotary`` like the 5B (else sin-cos positions like the 2B), ``patch_size_t``
    like CogVideoX1.5 (latent frames patched in pairs), 16 text tokens (226 in the real ones). v-prediction with
    CogVideoX's shifted, zero-terminal-SNR schedule (``CogVideoXDDIMScheduler``, ``snr_shift_scale=3``)."""
    path = Path(path)
    torch.manual_seed(0)
    components = write_text_encoder(path, umt5=False)
    AutoencoderKLCogVideoX(
        block_out_channels=(8, 16),
        down_block_types=("CogVideoXDownBlock3D",) * 2,
        up_block_types=("CogVideoXUpBlock3D",) * 2,
        latent_channels=LATENT_CHANNELS,
        layers_per_block=1,
        norm_num_groups=4,
        temporal_compression_ratio=2,
        sample_height=PIXEL_SIZE,
        sample_width=PIXEL_SIZE,
    ).save_pretrained(path / "vae")
    CogVideoXTransformer3DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        time_embed_dim=16,
        text_embed_dim=TEXT_WIDTH,
        num_layers=2,
        sample_width=PIXEL_SIZE // 2,
        sample_height=PIXEL_SIZE // 2,
        sample_frames=NUM_FRAMES,
        patch_size=2,
        patch_size_t=patch_size_t,
        temporal_compression_ratio=2,
        max_text_seq_length=PROMPT_TOKENS,
        use_rotary_positional_embeddings=rotary,
    ).save_pretrained(path / "transformer")
    CogVideoXDDIMScheduler(
        prediction_type="v_prediction",
        rescale_betas_zero_snr=True,
        snr_shift_scale=3.0,
        timestep_spacing="trailing",
        clip_sample=False,
    ).save_pretrained(path / "scheduler")
    components.update(
        vae=["diffusers", "AutoencoderKLCogVideoX"],
        transformer=["diffusers", "CogVideoXTransformer3DModel"],
        scheduler=["diffusers", "CogVideoXDDIMScheduler"],
    )
    write_model_index(path, "CogVideoXPipeline", components)
    return path


def tiny_wan21_vae() -> AutoencoderKLWan:
    """Wan2.1's VAE (also A14B's), tiny: 4 latent channels with per-channel statistics, 2x in time and space."""
    return AutoencoderKLWan(
        base_dim=8,
        z_dim=LATENT_CHANNELS,
        dim_mult=[1, 2],
        num_res_blocks=1,
        temperal_downsample=[True],
        latents_mean=[0.1, -0.2, 0.3, 0.0],
        latents_std=[1.5, 0.5, 2.0, 1.0],
        scale_factor_temporal=2,
        scale_factor_spatial=2,
    )


def tiny_wan22_vae() -> AutoencoderKLWan:
    """The Wan2.2 VAE (TI2V-5B's), tiny: residual blocks over 2x2 pixel patches (12 input channels), 48 latent
    channels with per-channel statistics, 2x in time, 4x in space."""
    channels = torch.arange(WAN22_LATENT_CHANNELS)
    return AutoencoderKLWan(
        base_dim=8,
        z_dim=WAN22_LATENT_CHANNELS,
        dim_mult=[1, 1],  # a residual VAE's last two widths are equal (TI2V-5B: [1, 2, 4, 4])
        num_res_blocks=1,
        temperal_downsample=[True],
        is_residual=True,
        in_channels=12,
        out_channels=12,
        patch_size=2,
        latents_mean=(0.1 * (channels % 5) - 0.2).tolist(),
        latents_std=(0.5 + 0.25 * (channels % 4)).tolist(),
        scale_factor_temporal=2,
        scale_factor_spatial=4,
    )


def tiny_wan_transformer(latent_channels: int) -> WanTransformer3DModel:
    """A two-block ``WanTransformer3DModel`` over ``latent_channels`` latents (1x2x2 patches), from the global RNG."""
    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=latent_channels,
        out_channels=latent_channels,
        text_dim=TEXT_WIDTH,
        freq_dim=32,
        ffn_dim=64,
        num_layers=2,
        rope_max_seq_len=32,
    )


def write_wan_scheduler(path: Path, flow_shift: float) -> None:
    """Wan's flow-matching ``UniPCMultistepScheduler`` config with ``flow_shift``."""
    UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=flow_shift, num_train_timesteps=1000
    ).save_pretrained(path / "scheduler")


#: the diffusers classes of a Wan pipeline's components besides the text encoder
WAN_COMPONENTS = dict(
    vae=["diffusers", "AutoencoderKLWan"],
    transformer=["diffusers", "WanTransformer3DModel"],
    scheduler=["diffusers", "UniPCMultistepScheduler"],
)


def write_tiny_wan_pipeline(path: str | Path) -> Path:
    """A tiny Wan2.1 pipeline: UMT5 encoder, ``WanTransformer3DModel``, ``AutoencoderKLWan`` with per-channel
    latent statistics, and Wan's flow-matching ``UniPCMultistepScheduler`` config (``flow_shift`` 3, as Wan2.1
    at 480p)."""
    path = Path(path)
    torch.manual_seed(0)
    components = write_text_encoder(path, umt5=True)
    tiny_wan21_vae().save_pretrained(path / "vae")
    tiny_wan_transformer(LATENT_CHANNELS).save_pretrained(path / "transformer")
    write_wan_scheduler(path, flow_shift=3.0)
    write_model_index(path, "WanPipeline", {**components, **WAN_COMPONENTS})
    return path


def write_tiny_wan22_pipeline(path: str | Path, layout: Literal["ti2v5b", "a14b"] = "ti2v5b") -> Path:
    """A tiny Wan2.2 pipeline of one of its layouts, with ``model_index.json`` keys as the published ones:

    * ``ti2v5b``: the Wan2.2 VAE (48 latent channels), one transformer fed one timestep per latent token
      (``expand_timesteps: true``), ``flow_shift`` 5 (TI2V-5B's);
    * ``a14b``: Wan2.1's VAE, two transformers of one architecture and different weights (``transformer``, the
      high-noise expert, and ``transformer_2``), ``boundary_ratio`` 0.875 (T2V-A14B's), ``flow_shift`` 3, so that
      a few Euler steps reach both experts (3 steps: model timesteps 1000, 750, 3).
    """
    if layout not in ("ti2v5b", "a14b"):
        raise ValueError(f"layout={layout!r}: choose 'ti2v5b' or 'a14b'.")
    path = Path(path)
    torch.manual_seed(0)
    components = {**write_text_encoder(path, umt5=True), **WAN_COMPONENTS}
    if layout == "ti2v5b":
        tiny_wan22_vae().save_pretrained(path / "vae")
        tiny_wan_transformer(WAN22_LATENT_CHANNELS).save_pretrained(path / "transformer")
        write_wan_scheduler(path, flow_shift=5.0)
        components.update(transformer_2=[None, None], boundary_ratio=None, expand_timesteps=True)
    else:
        tiny_wan21_vae().save_pretrained(path / "vae")
        tiny_wan_transformer(LATENT_CHANNELS).save_pretrained(path / "transformer")
        tiny_wan_transformer(LATENT_CHANNELS).save_pretrained(path / "transformer_2")  # the RNG moved: other weights
        write_wan_scheduler(path, flow_shift=3.0)
        components.update(
            transformer_2=["diffusers", "WanTransformer3DModel"], boundary_ratio=0.875, expand_timesteps=False
        )
    write_model_index(path, "WanPipeline", components)
    return path

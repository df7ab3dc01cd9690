"""Tiny SD1.5, SDXL, pixel-space, SD3.5 and FLUX.1 pipelines, and the tiny tokenizers and text encoders they are made of.

Each writer saves a complete diffusers pipeline directory (``model_index.json``, the denoiser's ``unet/`` or
``transformer/``, text encoders and tokenizers, ``scheduler/`` and optionally ``vae/``) that loads through the
backbones' ``from_pretrained`` path. The toy world's base model is trained from these tokenizers and encoders
(``benchmarks/train_toy_base.py``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
    UMT5Config,
    UMT5EncoderModel,
)
from transformers.convert_slow_tokenizer import bytes_to_unicode

TINY_WORDS = ("a", "an", "photo", "of", "red", "blue", "green", "cat", "dog", "circle", "square", "on")
PROMPT_TOKENS = 16  # the tokenizers' model_max_length, and the CLIP encoders' positions
SAMPLE_SIZE = 8  # the denoisers' latent (or, in pixel space, pixel) height and width


def build_clip_tokenizer(words: Iterable[str]) -> CLIPTokenizer:
    """A CLIP BPE tokenizer whose vocabulary holds every byte plus each of ``words`` as one token.

    Unknown words still tokenize (byte by byte), so any prompt is valid input.
    """
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols]
    merges = []
    for word in sorted({w.lower() for w in words}):
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        merged = pieces[0]
        for piece in pieces[1:]:
            merges.append((merged, piece))
            merged += piece
            tokens.append(merged)
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab: dict[str, int] = {}
    for token in tokens:
        vocab.setdefault(token, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=list(dict.fromkeys(merges)), model_max_length=PROMPT_TOKENS)


def tiny_text_encoder(
    vocab_size: int, hidden_size: int = 32, projection_dim: int | None = None
) -> CLIPTextModel | CLIPTextModelWithProjection:
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=PROMPT_TOKENS,
        projection_dim=projection_dim or hidden_size,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )
    if projection_dim is None:
        return CLIPTextModel(config)
    return CLIPTextModelWithProjection(config)


def build_t5_tokenizer(words: Iterable[str]) -> T5Tokenizer:
    """A unigram (SentencePiece-style) T5 tokenizer: each of ``words`` one piece, plus single letters.

    Words outside ``words`` still tokenize (letter by letter; other characters map to ``<unk>``).
    """
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("\u2581" + word.lower(), -1.0) for word in dict.fromkeys(words)]
    pieces += [(char, -5.0) for char in "abcdefghijklmnopqrstuvwxyz0123456789\u2581"]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=PROMPT_TOKENS)


def tiny_t5_encoder(vocab_size: int, hidden_size: int = 32, umt5: bool = False) -> T5EncoderModel | UMT5EncoderModel:
    """A two-layer T5 (CogVideoX, SD3) or UMT5 (Wan2.1) text encoder."""
    options = dict(
        vocab_size=vocab_size,
        d_model=hidden_size,
        d_kv=hidden_size // 2,
        d_ff=2 * hidden_size,
        num_layers=2,
        num_heads=2,
        relative_attention_num_buckets=8,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    if umt5:
        return UMT5EncoderModel(UMT5Config(**options))
    return T5EncoderModel(T5Config(**options))


def write_tiny_vae(path: Path, sample_size: int, latent_channels: int = 4, **config: Any) -> None:
    """A tiny ``AutoencoderKL`` with one down-sampling block: ``sample_size`` latents, ``2 * sample_size`` pixels.

    ``config`` adds keys of the VAE's config, e.g. SD3's ``shift_factor`` and ``scaling_factor``.
    """
    AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=latent_channels,
        block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=8,
        sample_size=2 * sample_size,
        **config,
    ).save_pretrained(path)


def write_model_index(path: Path, pipeline_class: str, components: dict[str, list[str | None]]) -> None:
    """The pipeline's ``model_index.json``: its class and, per component, ``[library, class]`` (or nulls)."""
    index = {"_class_name": pipeline_class, "_diffusers_version": "0.42.1", **components}
    (path / "model_index.json").write_text(json.dumps(index, indent=2))


def write_tiny_sd_pipeline(
    path: str | Path,
    *,
    variant: Literal["sd", "sdxl"] = "sd",
    pixel_space: bool = False,
    sample_size: int = SAMPLE_SIZE,
    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon",
    block_out_channels: tuple[int, ...] = (32, 64),
) -> Path:
    """Write a complete tiny SD1.5- or SDXL-style pipeline directory and return its path.

    ``sample_size`` is the denoiser's spatial size (latent size, or pixel size when ``pixel_space``).
    With a VAE, images are ``2 * sample_size`` pixels (one down-sampling block).
    """
    path = Path(path)
    torch.manual_seed(0)
    tokenizer = build_clip_tokenizer(TINY_WORDS)
    vocab_size = len(tokenizer)
    components: dict[str, list[str | None]] = {
        "scheduler": ["diffusers", "DDPMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": [None, None],
    }
    text_width = 32
    tokenizer.save_pretrained(path / "tokenizer")
    tiny_text_encoder(vocab_size, text_width).save_pretrained(path / "text_encoder")
    unet_extra = {}
    if variant == "sdxl":
        tokenizer.save_pretrained(path / "tokenizer_2")
        tiny_text_encoder(vocab_size, text_width, projection_dim=text_width).save_pretrained(path / "text_encoder_2")
        components["tokenizer_2"] = ["transformers", "CLIPTokenizer"]
        components["text_encoder_2"] = ["transformers", "CLIPTextModelWithProjection"]
        # SDXL conditions on both encoders' hidden states (concatenated) plus pooled text + 6 time ids.
        time_embed_dim = 8
        unet_extra = dict(
            addition_embed_type="text_time",
            addition_time_embed_dim=time_embed_dim,
            projection_class_embeddings_input_dim=text_width + 6 * time_embed_dim,
        )
        text_width *= 2
    channels = 3 if pixel_space else 4
    levels = len(block_out_channels)
    UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=block_out_channels,
        layers_per_block=1,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (levels - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (levels - 1) + ("UpBlock2D",),
        cross_attention_dim=text_width,
        attention_head_dim=8,
        norm_num_groups=8,
        **unet_extra,
    ).save_pretrained(path / "unet")
    if not pixel_space:
        write_tiny_vae(path / "vae", sample_size)
        components["vae"] = ["diffusers", "AutoencoderKL"]
    DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type=prediction_type,
        clip_sample=False,
    ).save_pretrained(path / "scheduler")
    pipeline_class = "StableDiffusionXLPipeline" if variant == "sdxl" else "StableDiffusionPipeline"
    write_model_index(path, pipeline_class, components)
    return path


def write_tiny_sd3_pipeline(path: str | Path, *, with_t5: bool = True) -> Path:
    """Write a complete tiny SD3.5-style pipeline directory and return its path.

    The parts of SD3 (Esser et al. 2024) at toy widths: CLIP-L and CLIP-G text encoders with projections
    (widths 16 and 32 for 768 and 1280), T5 (width 64 for 4096, wider than both CLIPs together, as in SD3;
    ``text_encoder_3: [null, null]`` when ``with_t5`` is false), a two-block MMDiT whose first block has
    SD3.5's second attention and RMS q/k-norm, a 16-channel VAE with SD3's ``shift_factor`` and
    ``scaling_factor``, and a ``FlowMatchEulerDiscreteScheduler`` with shift 3. Latents are ``SAMPLE_SIZE`` (8)
    square, images twice that.
    """
    path = Path(path)
    torch.manual_seed(0)
    clip_tokenizer = build_clip_tokenizer(TINY_WORDS)
    clip_widths = (16, 32)
    t5_width = 64
    components: dict[str, list[str | None]] = {}
    for suffix, width in zip(("", "_2"), clip_widths):
        clip_tokenizer.save_pretrained(path / f"tokenizer{suffix}")
        tiny_text_encoder(len(clip_tokenizer), width, projection_dim=width).save_pretrained(
            path / f"text_encoder{suffix}"
        )
        components[f"tokenizer{suffix}"] = ["transformers", "CLIPTokenizer"]
        components[f"text_encoder{suffix}"] = ["transformers", "CLIPTextModelWithProjection"]
    components["tokenizer_3"] = components["text_encoder_3"] = [None, None]
    if with_t5:
        t5_tokenizer = build_t5_tokenizer(TINY_WORDS)
        t5_tokenizer.save_pretrained(path / "tokenizer_3")
        tiny_t5_encoder(len(t5_tokenizer), t5_width).save_pretrained(path / "text_encoder_3")
        components["tokenizer_3"] = ["transformers", "T5Tokenizer"]
        components["text_encoder_3"] = ["transformers", "T5EncoderModel"]
    latent_channels, heads, head_width = 16, 2, 8
    SD3Transformer2DModel(
        sample_size=SAMPLE_SIZE,
        patch_size=2,
        in_channels=latent_channels,
        out_channels=latent_channels,
        num_layers=2,
        attention_head_dim=head_width,
        num_attention_heads=heads,
        joint_attention_dim=t5_width,
        caption_projection_dim=heads * head_width,
        pooled_projection_dim=sum(clip_widths),
        pos_embed_max_size=SAMPLE_SIZE,
        dual_attention_layers=(0,),
        qk_norm="rms_norm",
    ).save_pretrained(path / "transformer")
    write_tiny_vae(
        path / "vae",
        SAMPLE_SIZE,
        latent_channels=latent_channels,
        shift_factor=0.0609,
        scaling_factor=1.5305,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0).save_pretrained(path / "scheduler")
    components.update(
        transformer=["diffusers", "SD3Transformer2DModel"],
        vae=["diffusers", "AutoencoderKL"],
        scheduler=["diffusers", "FlowMatchEulerDiscreteScheduler"],
    )
    write_model_index(path, "StableDiffusion3Pipeline", components)
    return path


def write_tiny_flux_pipeline(path: str | Path, *, guidance_embeds: bool = True) -> Path:
    """Write a complete tiny FLUX.1-style pipeline directory and return its path.

    The parts of FLUX.1 (Black Forest Labs 2024, as diffusers' ``FluxPipeline`` lays them out) at toy widths: a
    CLIP-L text encoder read for its pooled output (width 16 for 768), T5 (width 64 for 4096), a transformer with
    two double-stream and two single-stream blocks (two heads of 16 channels, rotary axes ``(4, 6, 6)`` for
    ``(16, 56, 56)``; the blocks hold most weights, as in FLUX.1) over 2 x 2-packed 16-channel latents (64 input
    channels), a 16-channel VAE with FLUX's ``shift_factor`` and
    ``scaling_factor``, and a ``FlowMatchEulerDiscreteScheduler``: with ``guidance_embeds`` (FLUX.1-dev, guidance
    distilled) the transformer embeds a guidance value and the scheduler shifts by the image token count
    (``use_dynamic_shifting``, dev's config); without (FLUX.1-schnell) neither, and the shift is 1. Latents are
    ``SAMPLE_SIZE`` (8) square, images twice that.
    """
    path = Path(path)
    torch.manual_seed(0)
    clip_tokenizer, t5_tokenizer = build_clip_tokenizer(TINY_WORDS), build_t5_tokenizer(TINY_WORDS)
    clip_width, t5_width, latent_channels = 16, 64, 16
    clip_tokenizer.save_pretrained(path / "tokenizer")
    tiny_text_encoder(len(clip_tokenizer), clip_width).save_pretrained(path / "text_encoder")
    t5_tokenizer.save_pretrained(path / "tokenizer_2")
    tiny_t5_encoder(len(t5_tokenizer), t5_width).save_pretrained(path / "text_encoder_2")
    FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * latent_channels,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=t5_width,
        pooled_projection_dim=clip_width,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 6, 6),
    ).save_pretrained(path / "transformer")
    write_tiny_vae(
        path / "vae",
        SAMPLE_SIZE,
        latent_channels=latent_channels,
        shift_factor=0.1159,
        scaling_factor=0.3611,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0 if guidance_embeds else 1.0,
        use_dynamic_shifting=guidance_embeds,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    ).save_pretrained(path / "scheduler")
    write_model_index(
        path,
        "FluxPipeline",
        {
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer_2": ["transformers", "T5Tokenizer"],
            "text_encoder_2": ["transformers", "T5EncoderModel"],
            "transformer": ["diffusers", "FluxTransformer2DModel"],
            "vae": ["diffusers", "AutoencoderKL"],
            "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        },
    )
    return path

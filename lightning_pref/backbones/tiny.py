"""Tiny pipelines built from configs, offline, in well under a second.

Tests, the quickstart and the toy world never download weights: they write a complete diffusers-style
pipeline directory (``model_index.json``, ``unet/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/`` and
optionally ``vae/``) and load it back through the same ``from_pretrained`` path a real checkpoint takes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Literal

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
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


def build_clip_tokenizer(words: Iterable[str], model_max_length: int = 16) -> CLIPTokenizer:
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
    return CLIPTokenizer(
        vocab=vocab, merges=list(dict.fromkeys(merges)), model_max_length=model_max_length
    )


def tiny_text_encoder(
    vocab_size: int, hidden_size: int = 32, max_positions: int = 16, projection_dim: int | None = None
) -> CLIPTextModel | CLIPTextModelWithProjection:
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=max_positions,
        projection_dim=projection_dim or hidden_size,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )
    if projection_dim is None:
        return CLIPTextModel(config)
    return CLIPTextModelWithProjection(config)


def build_t5_tokenizer(words: Iterable[str], model_max_length: int = 16) -> T5Tokenizer:
    """A unigram (SentencePiece-style) T5 tokenizer: each of ``words`` one piece, plus single letters.

    Words outside ``words`` still tokenize (letter by letter; other characters map to ``<unk>``).
    """
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("\u2581" + word.lower(), -1.0) for word in dict.fromkeys(words)]
    pieces += [(char, -5.0) for char in "abcdefghijklmnopqrstuvwxyz0123456789\u2581"]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=model_max_length)


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


def write_tiny_sd_pipeline(
    path: str | Path,
    *,
    variant: Literal["sd", "sdxl"] = "sd",
    pixel_space: bool = False,
    sample_size: int = 8,
    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon",
    block_out_channels: tuple[int, ...] = (32, 64),
    words: Iterable[str] = TINY_WORDS,
    seed: int = 0,
) -> Path:
    """Write a complete tiny SD1.5- or SDXL-style pipeline directory and return its path.

    ``sample_size`` is the denoiser's spatial size (latent size, or pixel size when ``pixel_space``).
    With a VAE, images are ``2 * sample_size`` pixels (one down-sampling block).
    """
    path = Path(path)
    torch.manual_seed(seed)
    tokenizer = build_clip_tokenizer(words)
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
        tiny_text_encoder(vocab_size, text_width, projection_dim=text_width).save_pretrained(
            path / "text_encoder_2"
        )
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
        AutoencoderKL(
            in_channels=3,
            out_channels=3,
            latent_channels=4,
            block_out_channels=(16, 32),
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            norm_num_groups=8,
            sample_size=2 * sample_size,
        ).save_pretrained(path / "vae")
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
    index = {"_class_name": pipeline_class, "_diffusers_version": "0.42.1", **components}
    (path / "model_index.json").write_text(json.dumps(index, indent=2))
    return path

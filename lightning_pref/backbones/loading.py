"""What every family's loading shares: the pipeline's component index, dtype names, frozen parts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import hf_hub_download
from torch import nn

from lightning_pref.errors import ConfigError, MissingFileError


def read_model_index(pretrained: str, revision: str | None = None) -> dict[str, Any]:
    """The pipeline's ``model_index.json`` (which components it has), from a local directory or the hub."""
    local = Path(pretrained)
    if local.is_dir():
        index_file = local / "model_index.json"
        if not index_file.is_file():
            raise MissingFileError(
                f"{local} has no model_index.json: point `pretrained` at a diffusers pipeline directory "
                "(the folder holding unet/, text_encoder/, tokenizer/, scheduler/)."
            )
    elif pretrained.startswith((".", "/", "~")) or pretrained.count("/") != 1:
        raise MissingFileError(
            f"pretrained={pretrained!r} is neither a local directory nor a hub id ('namespace/name'): check the "
            "path (relative paths are resolved from the current directory)."
        )
    else:
        index_file = Path(hf_hub_download(pretrained, "model_index.json", revision=revision))
    return json.loads(index_file.read_text())


def has_component(model_index: dict[str, Any], name: str) -> bool:
    """Whether the pipeline holds ``name``: listed in its index, and not as ``[null, null]`` (saved without it)."""
    return (model_index.get(name) or [None])[0] is not None


def torch_dtype(name: str) -> torch.dtype:
    """``"bfloat16"`` -> ``torch.bfloat16``, with a clear error for anything that is not a floating dtype."""
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ConfigError(f"text_encoder_dtype={name!r}: use a floating dtype name such as 'bfloat16' or 'float32'.")
    return dtype


def frozen(module: nn.Module) -> nn.Module:
    """A loaded encoder or VAE without gradients, in eval mode."""
    return module.requires_grad_(False).eval()

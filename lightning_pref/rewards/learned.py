"""What every learned scorer shares: frozen weights, batched no-grad scoring, dtype names, 8-bit images.

A learned scorer ([`PickScoreReward`][lightning_pref.rewards.clip.PickScoreReward],
[`AestheticReward`][lightning_pref.rewards.clip.AestheticReward], ...) is an ``nn.Module`` whose weights
are frozen and which stays in eval mode even when the module holding it is put in training mode. Its
weights follow ``.to(device)`` like any submodule (a LightningModule or pair source holding it moves it);
images are moved to the scorer's device, scored ``batch_size`` at a time without gradient, and the
``(B,)`` float32 scores come back on the images' device.

Images reach the models' own preprocessing as 8-bit pixels, the values a saved PNG holds, so scores match
the published numbers, which were all computed on image files.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from torch import Tensor

from lightning_pref.errors import ConfigError, MissingFileError, check_whole_numbers
from lightning_pref.rewards.base import RewardModel


def reward_dtype(name: str) -> torch.dtype:
    """``"bfloat16"`` -> ``torch.bfloat16``; a ``ConfigError`` naming ``dtype`` for anything else."""
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ConfigError(f"dtype={name!r}: use a floating dtype name such as 'float32', 'bfloat16' or 'float16'.")
    return dtype


def check_pretrained(key: str, pretrained: str) -> None:
    """Raise a ``MissingFileError`` naming ``key`` unless ``pretrained`` is a local directory or looks like a
    hub id (``namespace/name``); the hub itself is only asked when the model loads."""
    if Path(pretrained).is_dir():
        return
    if pretrained.startswith((".", "/", "~")) or pretrained.count("/") != 1:
        raise MissingFileError(
            f"{key}={pretrained!r} is neither a local directory nor a hub id ('namespace/name'): check the path "
            "(relative paths are resolved from the current directory)."
        )


def quantized(images: Tensor) -> Tensor:
    """``(B, 3, H, W)`` floats in [0, 1] as uint8 on the CPU: the pixels of the PNG these images would be saved as."""
    return images.detach().mul(255).round().to(torch.uint8).cpu()


def pil_images(images: Tensor) -> list[Image.Image]:
    """``(B, 3, H, W)`` floats in [0, 1] as RGB ``PIL`` images (8 bits per channel)."""
    return [Image.fromarray(pixels.numpy()) for pixels in quantized(images).permute(0, 2, 3, 1)]


class LearnedReward(RewardModel):
    """Base class of learned scorers: frozen, always in eval mode, no gradient, ``batch_size`` images at a time.

    Subclasses build their models in ``__init__`` (frozen with ``requires_grad_(False)``) and implement
    ``score_batch``; ``compute`` splits the inputs into batches and gathers the scores.
    """

    def __init__(self, batch_size: int = 16):
        super().__init__()
        check_whole_numbers(batch_size=batch_size)
        self.batch_size = batch_size

    def train(self, mode: bool = True) -> LearnedReward:
        """Stay in eval mode (dropout off) whatever the holder asks: a scorer is never trained."""
        return super().train(False)

    @property
    def device(self) -> torch.device:
        """Where the scorer's weights are, and so where it computes."""
        return next(self.parameters()).device

    def compute(self, images: Tensor, prompts: list[str]) -> Tensor:
        if not len(images):
            return torch.zeros(0, device=images.device)
        with torch.no_grad():
            scores = [
                self.score_batch(images[start : start + self.batch_size], prompts[start : start + self.batch_size])
                for start in range(0, len(images), self.batch_size)
            ]
        return torch.cat(scores).float().to(images.device)

    def score_batch(self, images: Tensor, prompts: list[str]) -> Tensor:
        """``(b,)`` scores of at most ``batch_size`` images in [0, 1] and their prompts."""
        raise NotImplementedError(f"{type(self).__name__} must implement score_batch(images, prompts).")

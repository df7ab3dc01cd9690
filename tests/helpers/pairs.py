"""Preference pairs of random images, held in memory."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader


def random_pairs(num: int, size: int = 16, seed: int = 0) -> list[dict]:
    """Preference pairs of random images as model inputs (pixels in [-1, 1])."""
    generator = torch.Generator().manual_seed(seed)
    prompts = ["a red cat", "a blue dog", "a green circle", "a square"]
    return [
        {
            "pixels_w": torch.rand(3, size, size, generator=generator) * 2 - 1,
            "pixels_l": torch.rand(3, size, size, generator=generator) * 2 - 1,
            "prompt": prompts[i % len(prompts)],
        }
        for i in range(num)
    ]


def pair_loader(num_pairs: int = 8, batch_size: int = 4) -> DataLoader:
    return DataLoader(random_pairs(num_pairs), batch_size=batch_size)

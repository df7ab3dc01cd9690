"""The reward interface: score a batch of images against their prompts, higher is better.

Toy rewards ([`lightning_pref.rewards.toy`][lightning_pref.rewards.toy]) and learned ones (PickScore, CLIP score, HPS) share it, so
preference-pair builders and evaluation code never care which one they hold.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


def check_reward_inputs(images: Tensor, prompts: Sequence[str]) -> None:
    """Raise a ``ValueError`` naming the problem unless ``images`` is ``(B, 3, H, W)`` in [0, 1] with B prompts."""
    if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"images must be a (batch, 3, height, width) tensor; got {shape}.")
    if not images.is_floating_point():
        raise ValueError(
            f"images must be floats in [0, 1]; got dtype {images.dtype}. Convert uint8 images with `images / 255`."
        )
    if images.numel() and (images.min() < 0 or images.max() > 1):
        raise ValueError(
            f"images must be in [0, 1]; got values from {images.min().item():.3g} to {images.max().item():.3g}. "
            "Map diffusion outputs from [-1, 1] with `(images + 1).div(2).clamp(0, 1)`."
        )
    if isinstance(prompts, str) or len(prompts) != len(images):
        count = "a single string" if isinstance(prompts, str) else f"{len(prompts)} prompts"
        raise ValueError(f"prompts must be a list with one prompt per image: got {count} for {len(images)} images.")


class RewardModel(nn.Module):
    """Base class of rewards. Subclasses set ``name`` and implement ``compute``.

    Call ``score`` (or the module itself): it checks the inputs, then calls ``compute``.
    """

    name: str = "reward"

    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """Rewards of shape ``(B,)`` for ``images`` ``(B, 3, H, W)`` in [0, 1] and their ``prompts``."""
        check_reward_inputs(images, prompts)
        return self.compute(images, list(prompts))

    def forward(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        return self.score(images, prompts)

    def compute(self, images: Tensor, prompts: list[str]) -> Tensor:
        """The rewards, for inputs already checked by ``score``."""
        raise NotImplementedError(f"{type(self).__name__} must implement compute(images, prompts).")


class WeightedSumReward(RewardModel):
    """``sum_i weight_i * reward_i``, e.g. ``WeightedSumReward([(WarmthReward(), 1.0), (ShapeAgreementReward(), 1.0)])``."""

    def __init__(self, terms: Sequence[tuple[RewardModel, float]]):
        super().__init__()
        if not terms:
            raise ValueError("terms is empty: pass at least one (reward, weight) pair.")
        for reward, _ in terms:
            if not isinstance(reward, RewardModel):
                raise ValueError(f"terms must hold (RewardModel, weight) pairs; got {type(reward).__name__}.")
        self.rewards = nn.ModuleList(reward for reward, _ in terms)
        self.weights = [float(weight) for _, weight in terms]
        self.name = " + ".join(f"{weight:g} * {reward.name}" for reward, weight in zip(self.rewards, self.weights))

    def compute(self, images: Tensor, prompts: list[str]) -> Tensor:
        total = torch.zeros(len(images), device=images.device)
        for reward, weight in zip(self.rewards, self.weights):
            total = total + weight * reward.compute(images, prompts).to(total)
        return total

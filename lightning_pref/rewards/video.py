"""Score videos with an image reward: the mean of its scores over the frames (all, or evenly sampled ones).

A video reward is a [`RewardModel`][lightning_pref.rewards.RewardModel] whose ``score`` takes
``(B, 3, F, H, W)`` videos in [0, 1] (the library's video layout: batches, video VAEs and the sampler all
use it) or, with ``layout="BFCHW"``, ``(B, F, 3, H, W)``; it returns ``(B,)`` like any reward.

Example:
    >>> from lightning_pref.rewards import WarmthReward
    >>> videos = torch.rand(2, 3, 8, 32, 32)
    >>> FrameAveragedReward(WarmthReward(), frames=4).score(videos, ["a red circle", "a blue square"]).shape
    torch.Size([2])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from lightning_pref.errors import ConfigError, check_whole_numbers
from lightning_pref.rewards.base import RewardModel, check_reward_inputs

#: where the frame and channel axes are in a ``(B, ..., H, W)`` video
LAYOUTS = {"BCFHW": (2, 1), "BFCHW": (1, 2)}


def sampled_frames(count: int, frames: int | None) -> Tensor:
    """Indices of ``frames`` evenly spaced frames out of ``count``, first and last included (all when ``frames``
    is ``None`` or at least ``count``)."""
    if frames is None or frames >= count:
        return torch.arange(count)
    return torch.linspace(0, count - 1, frames).round().long()


class FrameAveragedReward(RewardModel):
    """``score(video) = mean over the sampled frames f of image_reward(frame f, prompt)``.

    Each frame is scored against its video's prompt by ``image_reward`` (which batches them as it does
    images); the frames of all videos go to it in one call.

    Args:
        image_reward: any image [`RewardModel`][lightning_pref.rewards.RewardModel] (PickScore, aesthetic, ...).
        frames: score this many evenly spaced frames (first and last included); ``None``: every frame.
        layout: ``BCFHW`` for ``(B, 3, F, H, W)`` videos (the library's), ``BFCHW`` for ``(B, F, 3, H, W)``.
    """

    def __init__(
        self, image_reward: RewardModel, frames: int | None = None, layout: Literal["BCFHW", "BFCHW"] = "BCFHW"
    ):
        super().__init__()
        if not isinstance(image_reward, RewardModel):
            raise ConfigError(
                f"image_reward={type(image_reward).__name__}: give a lightning_pref.rewards.RewardModel that scores "
                "images (e.g. lightning_pref.rewards.PickScoreReward)."
            )
        if frames is not None:
            check_whole_numbers(frames=frames)
        if layout not in LAYOUTS:
            raise ConfigError(f"layout={layout!r}: choose 'BCFHW' for (B, 3, F, H, W) or 'BFCHW' for (B, F, 3, H, W).")
        self.image_reward = image_reward
        self.frames = frames
        self.layout = layout
        self.name = f"{image_reward.name} (frame mean)"

    def score(self, videos: Tensor, prompts: Sequence[str]) -> Tensor:
        """Rewards ``(B,)`` for ``videos`` in [0, 1] laid out as ``layout`` and their ``prompts``."""
        frame_axis, channel_axis = LAYOUTS[self.layout]
        if (
            not isinstance(videos, Tensor)
            or videos.ndim != 5
            or videos.shape[channel_axis] != 3
            or videos.shape[frame_axis] == 0
        ):
            shape = tuple(videos.shape) if isinstance(videos, Tensor) else type(videos).__name__
            wanted = (
                "(batch, 3, frames, height, width)" if self.layout == "BCFHW" else "(batch, frames, 3, height, width)"
            )
            raise ValueError(
                f"videos must be a {wanted} tensor with at least one frame (layout={self.layout!r}); got {shape}."
            )
        frames = videos.movedim(frame_axis, 1)  # (B, F, 3, H, W)
        frames = frames[:, sampled_frames(frames.shape[1], self.frames).to(videos.device)]
        check_reward_inputs(frames[:, 0], prompts)  # one prompt per video (the image reward checks every frame)
        return self.compute(frames, list(prompts)).view(frames.shape[:2]).mean(dim=1)

    def compute(self, frames: Tensor, prompts: list[str]) -> Tensor:
        """``(B * F,)`` scores of ``(B, F, 3, H, W)`` frames, each against its video's prompt."""
        count = frames.shape[1]
        return self.image_reward.score(frames.flatten(0, 1), [prompt for prompt in prompts for _ in range(count)])

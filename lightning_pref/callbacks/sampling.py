"""Sample images from fixed prompts and seeds before, during and after training."""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from PIL import Image
from torch import Tensor

from lightning_pref.rewards import RewardModel


def save_image_grid(rows: list[Tensor], path: str | Path, scale: int = 1, max_frames: int = 8) -> Path:
    """Save rows of images (each ``(N, 3, H, W)`` in [0, 1]) as one PNG grid, upscaled ``scale`` times.

    Videos (``(N, 3, F, H, W)``) become filmstrips of at most ``max_frames`` evenly spaced frames.
    """
    rows = [filmstrips(row, max_frames) if row.ndim == 5 else row for row in rows]
    grid = torch.cat([torch.cat(list(row), dim=-1) for row in rows], dim=-2)
    array = (grid.permute(1, 2, 0).float().cpu().numpy() * 255).round().astype(np.uint8)
    image = Image.fromarray(array)
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def filmstrips(videos: Tensor, max_frames: int) -> Tensor:
    """``(N, 3, F, H, W)`` videos to ``(N, 3, H, k * W)`` strips of ``k = min(F, max_frames)`` frames."""
    frames = videos.shape[2]
    chosen = torch.linspace(0, frames - 1, min(frames, max_frames)).round().long()
    picked = videos[:, :, chosen]  # (N, 3, k, H, W)
    return picked.permute(0, 1, 3, 2, 4).flatten(3)


class SampleGrid(pl.Callback):
    """Generate the same prompts from the same initial noise at fit start, every ``every_n_steps`` and at fit
    end; write ``before.png``, ``step_XXXXXX.png`` and ``before_after.png`` (top row: before, bottom: after).
    With a ``reward``, the mean reward of each set is logged (``samples/reward``) and, at the end, written
    with the per-image rewards to ``rewards.json``.

    Args:
        prompts: prompts to sample, one image each.
        seed: seeds the initial noise; image ``i`` uses ``seed + i``.
        every_n_steps: also sample during training (``None``: only at start and end).
        num_inference_steps, guidance_scale: sampler options.
        dirpath: output directory (default: ``<trainer.log_dir>/samples``).
        scale: nearest-neighbour upscaling of the PNGs, for small toy images.
        reward: optional scorer of the samples ([`RewardModel`][lightning_pref.rewards.RewardModel]).
    """

    def __init__(
        self,
        prompts: list[str],
        seed: int = 0,
        every_n_steps: int | None = None,
        num_inference_steps: int = 25,
        guidance_scale: float = 5.0,
        dirpath: str | None = None,
        scale: int = 1,
        reward: RewardModel | None = None,
    ):
        self.prompts = list(prompts)
        self.seed = seed
        self.every_n_steps = every_n_steps
        self.num_inference_steps = num_inference_steps
        self.guidance_scale = guidance_scale
        self.dirpath = dirpath
        self.scale = scale
        self.reward = reward
        self.before: Tensor | None = None

    def output_dir(self, trainer: pl.Trainer) -> Path:
        return Path(self.dirpath or Path(trainer.log_dir or trainer.default_root_dir) / "samples")

    def generate(self, pl_module: pl.LightningModule) -> Tensor:
        seeds = [self.seed + i for i in range(len(self.prompts))]
        return pl_module.generate(
            self.prompts,
            seeds,
            num_inference_steps=self.num_inference_steps,
            guidance_scale=self.guidance_scale,
            batch_size=len(self.prompts),
        ).cpu()

    def save(self, trainer: pl.Trainer, images: Tensor, name: str) -> None:
        save_image_grid([images], self.output_dir(trainer) / name, self.scale)
        if self.reward is not None and trainer.logger is not None:
            reward = self.reward.score(images, self.prompts).mean().item()
            trainer.logger.log_metrics({"samples/reward": reward}, step=trainer.global_step)

    # Every rank samples (under ZeRO-3 and FSDP2 each forward gathers weights from all ranks); rank 0 writes.
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.before = self.generate(pl_module)
        if trainer.is_global_zero:
            self.save(trainer, self.before, "before.png")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps and step % self.every_n_steps == 0 and step > 0:
            images = self.generate(pl_module)
            if trainer.is_global_zero:
                self.save(trainer, images, f"step_{step:06d}.png")

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.before is None:
            return
        after = self.generate(pl_module)
        if not trainer.is_global_zero:
            return
        self.save(trainer, after, "after.png")
        save_image_grid([self.before, after], self.output_dir(trainer) / "before_after.png", self.scale)
        if self.reward is not None:
            before_rewards = self.reward.score(self.before, self.prompts)
            after_rewards = self.reward.score(after, self.prompts)
            summary = {
                "reward": self.reward.name,
                "mean_before": before_rewards.mean().item(),
                "mean_after": after_rewards.mean().item(),
                "win_rate": ((after_rewards > before_rewards).float() + 0.5 * (after_rewards == before_rewards).float())
                .mean()
                .item(),
                "per_image": [
                    {"prompt": p, "seed": self.seed + i, "before": b, "after": a}
                    for i, (p, b, a) in enumerate(zip(self.prompts, before_rewards.tolist(), after_rewards.tolist()))
                ],
            }
            (self.output_dir(trainer) / "rewards.json").write_text(json.dumps(summary, indent=2))

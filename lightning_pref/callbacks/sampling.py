"""Sample fixed prompts from fixed seeds during training: a before/after grid (``SampleGrid``) and a
policy-against-reference log with scores and win rates (``SampleLogger``)."""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchmetrics import MeanMetric
from tqdm.auto import tqdm

from lightning_pref.datamodules.media import encode_video
from lightning_pref.errors import ConfigError, check_whole_numbers
from lightning_pref.losses.common import win_fraction, win_terms
from lightning_pref.rewards import RewardModel

#: seconds a sampling round runs before its progress bar appears (short rounds show none)
PROGRESS_DELAY = 3.0


def tile(rows: list[Tensor]) -> Tensor:
    """Rows of images ``(N, 3, H, W)`` (or videos ``(N, 3, F, H, W)``) side by side, rows stacked: one
    ``(3, rows * H, N * W)`` image (or ``(3, F, rows * H, N * W)`` video)."""
    return torch.cat([torch.cat(list(row), dim=-1) for row in rows], dim=-2)


def upscale(pixels: Tensor, scale: int) -> Tensor:
    """Nearest-neighbour upscaling of the last two dimensions by a whole ``scale``."""
    return pixels.repeat_interleave(scale, dim=-2).repeat_interleave(scale, dim=-1) if scale > 1 else pixels


def to_uint8(pixels: Tensor) -> np.ndarray:
    """Channels-first pixels in [0, 1] (``(3, H, W)`` or ``(3, F, H, W)``) to channels-last ``uint8``."""
    return (pixels.movedim(0, -1).float().cpu().numpy() * 255).round().astype(np.uint8)


def image_grid(rows: list[Tensor], scale: int = 1, max_frames: int = 8) -> Tensor:
    """One ``(3, H, W)`` grid in [0, 1] of rows of images, upscaled ``scale`` times; videos become filmstrips
    of at most ``max_frames`` evenly spaced frames (``filmstrips``)."""
    return upscale(tile([filmstrips(row, max_frames) if row.ndim == 5 else row for row in rows]), scale)


def save_image_grid(rows: list[Tensor], path: str | Path, scale: int = 1, max_frames: int = 8) -> Path:
    """Save rows of images (each ``(N, 3, H, W)`` in [0, 1]) as one PNG grid, upscaled ``scale`` times.

    Videos (``(N, 3, F, H, W)``) become filmstrips of at most ``max_frames`` evenly spaced frames.
    """
    return save_png(image_grid(rows, scale, max_frames), path)


def save_png(image: Tensor, path: str | Path) -> Path:
    """Save a ``(3, H, W)`` image in [0, 1] as a PNG (making its directory)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(to_uint8(image)).save(path)
    return path


def save_video_grid(rows: list[Tensor], path: str | Path, scale: int = 1, fps: float = 8.0) -> Path:
    """Save rows of videos (each ``(N, 3, F, H, W)`` in [0, 1]) as one H.264 mp4 whose frame ``f`` is the grid
    of every video's frame ``f``, upscaled ``scale`` times and padded with black to even sides (H.264 in
    yuv420p needs them)."""
    grid = upscale(tile(rows), scale)  # (3, F, H, W)
    height, width = grid.shape[-2:]
    grid = torch.nn.functional.pad(grid, (0, width % 2, 0, height % 2))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode_video(to_uint8(grid), fps=fps))
    return path


def filmstrips(videos: Tensor, max_frames: int) -> Tensor:
    """``(N, 3, F, H, W)`` videos to ``(N, 3, H, k * W)`` strips of ``k = min(F, max_frames)`` frames."""
    frames = videos.shape[2]
    chosen = torch.linspace(0, frames - 1, min(frames, max_frames)).round().long()
    picked = videos[:, :, chosen]  # (N, 3, k, H, W)
    return picked.permute(0, 1, 3, 2, 4).flatten(3)


def samples_dir(trainer: pl.Trainer, dirpath: str | None) -> Path:
    """``dirpath``, or ``<trainer.log_dir>/samples``. Call it on every rank: ``trainer.log_dir`` is a broadcast."""
    return Path(dirpath) if dirpath else Path(trainer.log_dir or trainer.default_root_dir) / "samples"


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
        self.directory: Path | None = None  # set in `setup`, on every rank

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.directory = samples_dir(trainer, self.dirpath)

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
        save_image_grid([images], self.directory / name, self.scale)
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
        save_image_grid([self.before, after], self.directory / "before_after.png", self.scale)
        if self.reward is not None:
            before_rewards = self.reward.score(self.before, self.prompts)
            after_rewards = self.reward.score(after, self.prompts)
            summary = {
                "reward": self.reward.name,
                "mean_before": before_rewards.mean().item(),
                "mean_after": after_rewards.mean().item(),
                "win_rate": win_fraction(after_rewards, before_rewards).item(),
                "per_image": [
                    {"prompt": p, "seed": self.seed + i, "before": b, "after": a}
                    for i, (p, b, a) in enumerate(zip(self.prompts, before_rewards.tolist(), after_rewards.tolist()))
                ],
            }
            (self.directory / "rewards.json").write_text(json.dumps(summary, indent=2))


def scores_of(scorer: RewardModel, samples: Tensor, prompts: list[str]) -> Tensor:
    """``(N,)`` scores of images ``(N, 3, H, W)``; a video ``(N, 3, F, H, W)`` scores the mean over its frames."""
    if samples.ndim == 4:
        return scorer.score(samples, prompts).float()
    count, frames = samples.shape[0], samples.shape[2]
    frames_as_images = samples.transpose(1, 2).flatten(0, 1)  # (N * F, 3, H, W), video by video
    frame_prompts = [prompt for prompt in prompts for _ in range(frames)]
    return scorer.score(frames_as_images, frame_prompts).float().view(count, frames).mean(dim=1)


class SampleLogger(pl.Callback):
    """Every ``every_n_steps`` optimizer steps and when training ends, sample fixed prompts from fixed seeds with
    the policy and with the reference, score them, and log grids, mean scores and the policy's win rate.

    Prompt ``i`` is always sampled from the initial noise of seed ``seed + i``
    ([`seeded_noise`][lightning_pref.generation.seeded_noise]), by the policy and by the reference
    ([`PreferenceDiffusionModule.generate`][lightning_pref.methods.base.PreferenceDiffusionModule.generate]),
    so two rounds, two runs and the two sources differ only by their weights. Logged (to every logger of the
    trainer, at the optimizer step; ``<scorer>`` is the scorer's ``name``):

    * ``samples/<scorer>/policy`` and ``samples/<scorer>/reference``: the mean score of the prompts' samples (a
      video scores the mean over its frames);
    * ``samples/<scorer>/win_rate``: the fraction of prompts whose policy sample scores higher than the
      reference's from the same seed (ties count 1/2);
    * the image ``samples/grid`` to loggers that take images (TensorBoard's ``add_image``, W&B's
      ``log_image``); a CSV logger gets the numbers and the files below only.

    Files, under ``dirpath/step_XXXXXX/`` (the optimizer step): ``grid.png`` (top row the policy, bottom row
    the reference, one column per prompt; videos as filmstrips of at most ``max_frames`` frames), with videos
    ``grid.mp4`` (the same grid, playing), and ``scores.json`` (every prompt's seed and scores, and the logged
    numbers). A reference-free method (MaPO) has no reference: its rows, scores and files are the policy's
    alone, without win rates.

    Under several processes, prompt ``i`` is sampled and scored on rank ``i % world_size``; every rank samples
    the same number of prompts (shares are padded with repeats that count for nothing), since under ZeRO-3 and
    FSDP2 every forward gathers weights from all ranks. The means are reduced across ranks with torchmetrics
    (``MeanMetric``), the samples gathered to rank 0, which alone writes the files. A round that takes more
    than a few seconds shows a progress bar when the trainer shows one.

    Args:
        prompts: the prompts, one sample each per source.
        seed: prompt ``i`` starts from the noise of seed ``seed + i``.
        every_n_steps: sample every this many optimizer steps (``None``: only when training ends).
        scorers: [`RewardModel`][lightning_pref.rewards.RewardModel]s to score the samples with, distinct names.
        num_inference_steps, guidance_scale: sampler options.
        batch_size: samples per sampler call on each rank.
        dirpath: output directory (default: ``<trainer.log_dir>/samples``).
        scale: nearest-neighbour upscaling of grids and videos, for small toy samples.
        max_frames: frames per filmstrip in ``grid.png`` (videos).
        fps: frame rate of ``grid.mp4`` (videos).
    """

    def __init__(
        self,
        prompts: list[str],
        seed: int = 0,
        every_n_steps: int | None = 100,
        scorers: list[RewardModel] | None = None,
        num_inference_steps: int = 25,
        guidance_scale: float = 5.0,
        batch_size: int = 8,
        dirpath: str | None = None,
        scale: int = 1,
        max_frames: int = 8,
        fps: float = 8.0,
    ):
        if not prompts or isinstance(prompts, str):
            raise ConfigError(f"prompts={prompts!r}: give a list of at least one prompt.")
        if every_n_steps is not None:
            check_whole_numbers(every_n_steps=every_n_steps)
        check_whole_numbers(
            num_inference_steps=num_inference_steps, batch_size=batch_size, scale=scale, max_frames=max_frames
        )
        if fps <= 0:
            raise ConfigError(f"fps={fps}: use a positive frame rate.")
        scorers = list(scorers or [])
        for scorer in scorers:
            if not isinstance(scorer, RewardModel):
                raise ConfigError(f"scorers: {type(scorer).__name__} is not a RewardModel (lightning_pref.rewards).")
        names = [scorer.name for scorer in scorers]
        if len(set(names)) < len(names):
            raise ConfigError(f"scorers: the names {names} repeat; each scorer's metrics are named after it.")
        self.prompts = list(prompts)
        self.seed = seed
        self.every_n_steps = every_n_steps
        self.scorers = scorers
        self.num_inference_steps = num_inference_steps
        self.guidance_scale = guidance_scale
        self.batch_size = batch_size
        self.dirpath = dirpath
        self.scale = scale
        self.max_frames = max_frames
        self.fps = fps
        self.directory: Path | None = None  # set in `setup`, on every rank
        self.sampled_step: int | None = None  # the optimizer step of the last round (accumulation repeats steps)

    # ------------------------------------------------------------------------------------------ hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.directory = samples_dir(trainer, self.dirpath)
        for scorer in self.scorers:
            scorer.to(pl_module.device)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0:
            self.sample_round(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.sample_round(trainer, pl_module)  # before teardown: the strategy and the loggers are still up

    # --------------------------------------------------------------------------------------- one round
    def sample_round(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Sample, score and log once per optimizer step (every rank takes part; rank 0 writes)."""
        step = trainer.global_step
        if step == self.sampled_step:
            return
        self.sampled_step = step
        indices = self.rank_share(trainer.global_rank, trainer.world_size)
        prompts = [self.prompts[i % len(self.prompts)] for i in indices]
        counted = torch.tensor([i < len(self.prompts) for i in indices], dtype=torch.float32, device=pl_module.device)
        samples = self.generate(trainer, pl_module, prompts, [self.seed + i for i in indices])
        scores = {
            source: {scorer.name: scores_of(scorer, media, prompts) for scorer in self.scorers}
            for source, media in samples.items()
        }
        metrics = self.aggregate(scores, counted)
        gathered = {source: self.in_prompt_order(pl_module, media).cpu() for source, media in samples.items()}
        gathered_scores = {
            source: {name: self.in_prompt_order(pl_module, values).tolist() for name, values in by_scorer.items()}
            for source, by_scorer in scores.items()
        }
        if trainer.is_global_zero:
            self.write(trainer, step, gathered, gathered_scores, metrics)

    def rank_share(self, rank: int, world_size: int) -> list[int]:
        """Rank ``rank``'s prompt indices ``rank, rank + W, ...``, padded to ``ceil(n / W)`` (indices ``>= n``
        are repeats that count for nothing), so every rank calls the sampler equally often."""
        per_rank = -(-len(self.prompts) // world_size)
        return [rank + k * world_size for k in range(per_rank)]

    def generate(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, prompts: list[str], seeds: list[int]
    ) -> dict[str, Tensor]:
        """This rank's samples from the policy and (unless the method has none) the reference."""
        sources = ["policy"] + (["reference"] if pl_module.reference is not None else [])
        starts = range(0, len(prompts), self.batch_size)
        show = trainer.is_global_zero and trainer.progress_bar_callback is not None
        samples = {}
        with tqdm(
            total=len(sources) * len(starts),
            desc=f"samples at step {trainer.global_step}",
            unit="batch",
            delay=PROGRESS_DELAY,
            leave=False,
            disable=not show,
        ) as progress:
            for source in sources:
                batches = []
                for start in starts:
                    chunk = slice(start, start + self.batch_size)
                    batches.append(
                        pl_module.generate(
                            prompts[chunk],
                            seeds[chunk],
                            source=source,
                            num_inference_steps=self.num_inference_steps,
                            guidance_scale=self.guidance_scale,
                            batch_size=self.batch_size,
                        )
                    )
                    progress.update()
                samples[source] = torch.cat(batches)
        return samples

    def aggregate(self, scores: dict[str, dict[str, Tensor]], counted: Tensor) -> dict[str, float]:
        """The logged numbers, each a mean over every rank's counted prompts (``MeanMetric``, reduced across ranks)."""
        terms = {}
        for scorer in self.scorers:
            for source, by_scorer in scores.items():
                terms[self.metric_name(scorer, source)] = by_scorer[scorer.name]
            if "reference" in scores:
                terms[self.metric_name(scorer, "win_rate")] = win_terms(
                    scores["policy"][scorer.name], scores["reference"][scorer.name]
                )
        metrics = {}
        for name, values in terms.items():
            mean = MeanMetric().to(counted.device)
            mean.update(values, weight=counted)
            metrics[name] = mean.compute().item()
        return metrics

    def in_prompt_order(self, pl_module: pl.LightningModule, share: Tensor) -> Tensor:
        """Every rank's share gathered (a collective), in prompt order, without the padding: rank ``r``'s
        ``k``-th row is prompt ``k * W + r``."""
        world_size = pl_module.trainer.world_size
        gathered = pl_module.all_gather(share) if world_size > 1 else share[None]  # (W, per_rank, ...)
        return gathered.transpose(0, 1).flatten(0, 1)[: len(self.prompts)]

    # ------------------------------------------------------------------------------ files and loggers
    def write(
        self,
        trainer: pl.Trainer,
        step: int,
        samples: dict[str, Tensor],
        scores: dict[str, dict[str, list[float]]],
        metrics: dict[str, float],
    ) -> None:
        """Rank 0: the round's files, and its numbers and grid to every logger."""
        directory = self.directory / f"step_{step:06d}"
        rows = list(samples.values())
        grid = image_grid(rows, self.scale, self.max_frames)
        save_png(grid, directory / "grid.png")
        if rows[0].ndim == 5:
            save_video_grid(rows, directory / "grid.mp4", self.scale, self.fps)
        per_prompt = [
            {
                "prompt": prompt,
                "seed": self.seed + i,
                **{
                    source: {name: values[i] for name, values in by_scorer.items()}
                    for source, by_scorer in scores.items()
                },
            }
            for i, prompt in enumerate(self.prompts)
        ]
        summary = {"step": step, "metrics": metrics, "samples": per_prompt}
        (directory / "scores.json").write_text(json.dumps(summary, indent=2))
        for logger in trainer.loggers:
            if metrics:
                logger.log_metrics(metrics, step=step)
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_image"):  # TensorBoard: a (3, H, W) float image in [0, 1]
                experiment.add_image("samples/grid", grid, global_step=step)
            elif hasattr(logger, "log_image"):  # W&B
                logger.log_image(key="samples/grid", images=[to_uint8(grid)], step=step)

    # ---------------------------------------------------------------------------------------- names
    @staticmethod
    def metric_name(scorer: RewardModel, quantity: str) -> str:
        """``samples/<scorer>/<quantity>``: ``policy``, ``reference`` or ``win_rate``."""
        return f"samples/{scorer.name}/{quantity}"

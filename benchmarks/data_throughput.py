"""How fast the DataModule feeds pairs, against how fast a training step consumes them.

Prints, measured in one run on this machine:

1. pairs/s of ``PreferenceDataModule`` with 2 workers, batch 8, from
   a. 512 px JPEG pairs (decode, resize, crop, flip, scale to [-1, 1]);
   b. precomputed SD1.5-shaped tensors (``latents_w``/``latents_l`` 4x64x64 and ``encoder_hidden_states``
      77x768, float16 in ``latents.safetensors``);
2. pairs/s a ``DiffusionDPO`` training step consumes (median step time; batches of 2 pairs at 512 px, held
   in memory) on a small SD-shaped model (8x VAE down-sampling: 512 px -> 64x64x4 latents; the tiny test
   UNet and text encoder), with the VAE and the text encoder run in the step (pixel batches) and skipped
   (batches from ``lightning-pref data precompute``), and the ratio of their step times. Steps run on one
   thread and the ratio uses their CPU time, which a shared machine disturbs far less than wall time (both
   are printed).

The step figures depend on the model (the share of the VAE encoder in a step); the loader figures do not.

    python benchmarks/data_throughput.py [--pairs 192] [--batches 20] [--steps 4] [--repeats 2]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
import webdataset as wds
from diffusers import AutoencoderKL
from safetensors.torch import save as save_safetensors

from lightning_pref.backbones import StableDiffusionBackbone
from lightning_pref.datamodules import PreferenceDataModule, write_preference_shards
from lightning_pref.datamodules.precompute import precompute_shards
from lightning_pref.methods import DiffusionDPO
from lightning_pref.tiny import write_tiny_sd_pipeline

SHARDS = 8
STEP_BATCH = 2


def photo_like(rng: np.random.Generator, size: int) -> np.ndarray:
    """A smooth random image with some texture: JPEG-compresses like a photo (tens of kB at 512 px)."""
    coarse = rng.integers(0, 256, (size // 32, size // 32, 3)).astype(np.float32)
    smooth = np.kron(coarse, np.ones((32, 32, 1)))
    return np.clip(smooth + rng.normal(0, 12, smooth.shape), 0, 255).astype(np.uint8)


def write_jpeg_pairs(out_dir: Path, num_pairs: int, size: int = 512) -> None:
    rng = np.random.default_rng(0)
    pairs = (
        {"winner": photo_like(rng, size), "loser": photo_like(rng, size), "caption": f"a photo {i}"}
        for i in range(num_pairs)
    )
    write_preference_shards(pairs, out_dir, samples_per_shard=max(1, num_pairs // SHARDS), image_format="jpg")


def write_sd15_latents(out_dir: Path, num_pairs: int) -> None:
    """Precomputed shards with SD1.5's tensor shapes (values are random: only the I/O and decoding matter)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    per_shard = num_pairs // SHARDS
    for shard in range(SHARDS):
        with wds.TarWriter(str(out_dir / f"latents-{shard:06d}.tar")) as sink:
            for i in range(per_shard):
                tensors = {
                    name: torch.randn(shape, generator=generator).half()
                    for name, shape in [
                        ("latents_w", (4, 64, 64)),
                        ("latents_l", (4, 64, 64)),
                        ("encoder_hidden_states", (77, 768)),
                    ]
                }
                sink.write(
                    {
                        "__key__": f"{shard}-{i:06d}",
                        "json": {"caption": "a photo"},
                        "latents.safetensors": save_safetensors(tensors),
                    }
                )


def loader_pairs_per_second(shards: Path, batches: int, **options) -> float:
    """Pairs/s over ``batches`` batches of 8 after the first 2 (worker start-up excluded)."""
    data = PreferenceDataModule(
        str(shards), batch_size=8, num_workers=2, shuffle_buffer=64, batches_per_epoch=batches + 2, **options
    )
    iterator = iter(data.train_dataloader())
    for _ in range(2):
        next(iterator)
    start = time.perf_counter()
    count = sum(len(batch["key"]) for batch in iterator)
    return count / (time.perf_counter() - start)


def write_sd_shaped_model(path: Path) -> Path:
    """The tiny SD pipeline with a 4-level VAE (8x down-sampling, as SD's) and a UNet at 64x64 latents."""
    write_tiny_sd_pipeline(path, sample_size=64)
    AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8, 16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        norm_num_groups=8,
        sample_size=512,
    ).save_pretrained(path / "vae")
    return path


class StepTimer(pl.Callback):
    """Wall time and CPU time of each training step. The steps run on one thread: its CPU time is the work
    done, whatever else loads a shared machine (with several threads, waiting threads spin and count)."""

    def __init__(self):
        self.wall: list[float] = []
        self.cpu: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.start = (time.perf_counter(), time.process_time())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.wall.append(time.perf_counter() - self.start[0])
        self.cpu.append(time.process_time() - self.start[1])


def step_times(model: Path, shards: Path, steps: int) -> tuple[list[float], list[float]]:
    """Wall and CPU step times of DiffusionDPO on ``steps`` batches of ``STEP_BATCH`` read from ``shards``
    beforehand (the first step, which warms up, is left out)."""
    data = PreferenceDataModule(str(shards), batch_size=STEP_BATCH, num_workers=0, batches_per_epoch=steps)
    batches = list(data.train_dataloader())
    timer = StepTimer()
    trainer = pl.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
    )
    trainer.fit(
        DiffusionDPO(StableDiffusionBackbone(str(model)), lr=1e-4),
        torch.utils.data.DataLoader(batches, batch_size=None),
    )
    return timer.wall[1:], timer.cpu[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=192, help="pairs written per data set")
    parser.add_argument("--batches", type=int, default=20, help="timed loader batches of 8")
    parser.add_argument("--steps", type=int, default=4, help="training steps per run (the first is not timed)")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved runs per configuration")
    args = parser.parse_args()
    torch.set_num_threads(2)
    pl.seed_everything(0, verbose=False)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_jpeg_pairs(tmp / "jpeg", args.pairs)
        write_sd15_latents(tmp / "sd15_latents", args.pairs)
        pixel_rate = loader_pairs_per_second(tmp / "jpeg", args.batches, resolution=512, random_flip=True)
        latent_rate = loader_pairs_per_second(tmp / "sd15_latents", args.batches)

        torch.set_num_threads(1)
        write_jpeg_pairs(tmp / "step_jpeg", STEP_BATCH * args.steps)
        model = write_sd_shaped_model(tmp / "model")
        precompute_shards(
            StableDiffusionBackbone(str(model)).eval(), str(tmp / "step_jpeg"), tmp / "step_latents", resolution=512
        )
        wall, cpu = {"pixels": [], "latents": []}, {"pixels": [], "latents": []}
        for _ in range(args.repeats):  # interleaved, so drift in machine load hits both alike
            for name, shards in [("pixels", tmp / "step_jpeg"), ("latents", tmp / "step_latents")]:
                wall_times, cpu_times = step_times(model, shards, args.steps)
                wall[name] += wall_times
                cpu[name] += cpu_times
        pixel_wall, latent_wall = statistics.median(wall["pixels"]), statistics.median(wall["latents"])
        pixel_cpu, latent_cpu = statistics.median(cpu["pixels"]), statistics.median(cpu["latents"])

    print(f"loader, 512 px JPEG pairs, 2 workers:          {pixel_rate:8.1f} pairs/s")
    print(f"loader, precomputed SD1.5 tensors, 2 workers:  {latent_rate:8.1f} pairs/s")
    print(
        f"step, encoding in the step (VAE + text):       {STEP_BATCH / pixel_wall:8.2f} pairs/s "
        f"({pixel_wall:.2f} s wall, {pixel_cpu:.2f} CPU-s per batch of {STEP_BATCH})"
    )
    print(
        f"step, precomputed latents:                     {STEP_BATCH / latent_wall:8.2f} pairs/s "
        f"({latent_wall:.2f} s wall, {latent_cpu:.2f} CPU-s per batch of {STEP_BATCH})"
    )
    print(f"loader supply / step demand, pixels:           {pixel_rate * pixel_wall / STEP_BATCH:8.0f}x")
    print(f"loader supply / step demand, latents:          {latent_rate * latent_wall / STEP_BATCH:8.0f}x")
    print(
        f"step-time ratio, precomputed / on-the-fly:     {latent_cpu / pixel_cpu:8.3f} (CPU time; wall: {latent_wall / pixel_wall:.3f})"
    )


if __name__ == "__main__":
    main()

"""The library's in-loop sampler against diffusers' own ``StableDiffusionPipeline`` on the same parts.

[`generate`][lightning_pref.generation.generate] samples inside training (online DPO's candidates, SPIN's losers,
the sample grids). This benchmark assembles a ``StableDiffusionPipeline`` from the very modules the library's
backbone loaded (the same UNet, VAE, text encoder, tokenizer, and a DDIM scheduler of the same config) and runs
both with the same prompts, steps, batch, guidance and initial latents. Prints the samples per second of each,
timed interleaved over ``--repeats`` rounds in one process (the order alternates per round, so drifting machine
load hits both alike), their ratio (goal: at least 0.95) and the largest absolute difference of their images
in [0, 1] (they compute the same thing: it should be float32 round-off).

    python benchmarks/sampler_throughput.py [--batch 8] [--steps 10] [--repeats 5] [--sample-size 16]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable

import torch
from diffusers import StableDiffusionPipeline

from lightning_pref.backbones import StableDiffusionBackbone
from lightning_pref.generation import generate, seeded_noise
from lightning_pref.tiny import write_tiny_sd_pipeline

PROMPTS = ("a red cat", "a blue dog", "a green circle", "a square")


def diffusers_pipeline(backbone: StableDiffusionBackbone) -> StableDiffusionPipeline:
    """A ``StableDiffusionPipeline`` made of the backbone's own modules and its sampling scheduler."""
    pipeline = StableDiffusionPipeline(
        vae=backbone.vae,
        text_encoder=backbone.text_encoder,
        tokenizer=backbone.tokenizer,
        unet=backbone.denoiser,
        scheduler=backbone.process.sampling_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    # The pipeline rewrites a scheduler config's steps_offset 0 (the tiny config's) to 1, which shifts every
    # timestep; the real SD1.5 config has 1 already. Keep the library's schedule so both run the same steps.
    pipeline.scheduler = backbone.process.sampling_scheduler()
    return pipeline


def seconds(run: Callable[[], torch.Tensor]) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    images = run()
    return time.perf_counter() - start, images


def measure(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as directory:
        backbone = StableDiffusionBackbone(str(write_tiny_sd_pipeline(directory, sample_size=args.sample_size)))
    backbone.eval()
    pipeline = diffusers_pipeline(backbone)
    pipeline.set_progress_bar_config(disable=True)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.batch)]
    seeds = list(range(args.batch))
    settings = dict(num_inference_steps=args.steps, guidance_scale=args.guidance)

    def library() -> torch.Tensor:
        return generate(backbone, prompts, seeds, batch_size=args.batch, **settings)

    def reference() -> torch.Tensor:
        latents = seeded_noise(backbone, seeds)
        return pipeline(prompts, latents=latents, output_type="pt", **settings).images

    runs = {"library": library, "diffusers": reference}
    times: dict[str, list[float]] = {name: [] for name in runs}
    with torch.no_grad():
        images = {name: run() for name, run in runs.items()}  # warm-up, and the outputs compared
        for round_ in range(args.repeats):
            for name in list(runs)[:: 1 if round_ % 2 == 0 else -1]:
                elapsed, _ = seconds(runs[name])
                times[name].append(elapsed)
    rates = {name: args.batch / statistics.median(values) for name, values in times.items()}
    return {
        "batch": args.batch,
        "steps": args.steps,
        "guidance_scale": args.guidance,
        "repeats": args.repeats,
        "samples_per_second": rates,
        "ratio": rates["library"] / rates["diffusers"],
        "max_abs_difference": (images["library"].cpu() - images["diffusers"].cpu()).abs().max().item(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8, help="samples per call")
    parser.add_argument("--steps", type=int, default=10, help="sampler steps")
    parser.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds of each sampler")
    parser.add_argument("--sample-size", type=int, default=16, help="latent side of the tiny pipeline's UNet")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result = measure(args)
    rates = result["samples_per_second"]
    print(f"library sampler:   {rates['library']:.2f} samples/s")
    print(f"diffusers pipeline: {rates['diffusers']:.2f} samples/s")
    print(f"ratio library / diffusers: {result['ratio']:.3f} (goal >= 0.95)")
    print(f"max abs difference of the images: {result['max_abs_difference']:.2e}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()

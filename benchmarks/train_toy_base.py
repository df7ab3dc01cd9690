"""Train the toy world's base text-to-image model from scratch on a CPU, save it, and measure it.

    .venv/bin/python benchmarks/train_toy_base.py                  # train, save, evaluate
    .venv/bin/python benchmarks/train_toy_base.py --evaluate-only  # re-measure the saved model

The output (default ``lightning_pref/toy/base_model/``) is a diffusers pipeline directory laid out like
``write_tiny_sd_pipeline(..., pixel_space=True)`` writes it: ``model_index.json`` without a VAE, ``unet/``,
``text_encoder/``, ``tokenizer/`` and ``scheduler/``, plus ``samples.png``, a grid of the model's samples for
the colour-free evaluation prompts (one row per prompt, one column per seed).

Choices (each measured on this 2-core CPU):

* Pixel space, no VAE: 24x24x3 images are small enough to denoise directly. At 32x32 (with 8 attention
  heads) every sample cost 1.9x more and every training step 1.8x: the toy benchmark's rows took 110
  minutes there, 67 here.
* UNet channels (16, 32, 64), cross-attention only at the 6x6 level and in the middle block, two heads of
  32 channels: the prompt sets global properties (shape, colour, background) that need no fine spatial
  attention. Cross-attention in the middle block alone cost 0.72x per sample but left colour words
  ignored (colour agreement at chance, 0.15, against 0.29 here) and a user's tokens in PPD nearly
  powerless; narrower outer levels, channels (8, 16, 64), drew noisy blobs (shape agreement 0.59).
* The text encoder trains jointly with the UNet. A randomly initialised CLIP encoder maps the handful of
  words that matter to arbitrary features; training it costs little (0.1M parameters) and lets it learn
  to keep "circle" and "square" apart. Preference methods then freeze it, as Diffusion-DPO freezes
  Stable Diffusion's.
* Epsilon prediction with the cosine ("squaredcos_cap_v2") schedule, which suits low-resolution pixel
  space better than the latent-space "scaled_linear"; ``clip_sample`` because pixels live in [-1, 1];
  "trailing" timestep spacing so that a 25-step DDIM sampler starts from pure noise.
* Offset noise (a random per-image, per-channel constant of std 0.1 added to the noise). An epsilon
  model decides an image's overall colours at the noisiest steps, where its predictions barely move the
  image; without the offset, a 1500-step run ignored colour and background words entirely (colour
  agreement at chance, 0.15) and drew tinted backgrounds. With it (on the earlier 32x32 model, which
  attended at 8x8), colour agreement reached 0.48 and the backgrounds turned neutral. A 0.3 offset broke
  the shapes.
* 10% of prompts are replaced by the empty prompt, so classifier-free guidance works.
* AdamW, learning rate 2e-3 with a linear warm-up, then cosine decay to zero so a short run ends on
  settled weights.

Everything is seeded; with the same ``--seed``, thread count and library versions the weights are the same.
The committed weights are this script's defaults (1500 steps of 32 scenes) with ``--threads 1``: 6 minutes of
training on the 2-core machine while another training shared it.
"""

# ruff: noqa: E402  (OMP_WAIT_POLICY must be set before the other imports load torch)
from __future__ import annotations

import os

# Idle OpenMP threads sleep instead of spinning. Set before torch loads OpenMP: on a shared machine,
# spinning threads waiting for a descheduled sibling made training steps up to 10x slower.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import math
import time
from pathlib import Path

import diffusers
import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from PIL import Image
from transformers import CLIPTextModel, CLIPTokenizer

from lightning_pref.rewards.toy import ColorAgreementReward, ShapeAgreementReward, WarmthReward, classify_colors
from lightning_pref.tiny.image import build_clip_tokenizer, tiny_text_encoder
from lightning_pref.toy import BASE_MODEL_PATH
from lightning_pref.toy.world import COLORS, EVAL_PROMPTS, IMAGE_SIZE, SHAPES, WORDS, ToySceneDataset, make_prompt

TEXT_WIDTH = 64
EMPTY_PROMPT_PROBABILITY = 0.1
NOISE_OFFSET = 0.1
WARMUP_STEPS = 100
GRAD_CLIP_NORM = 1.0
SAMPLING_STEPS = 25
GUIDANCE_SCALE = 4.0


def build_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=IMAGE_SIZE,
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_WIDTH,
        attention_head_dim=2,  # diffusers' name for the number of heads: 2 heads of 32 channels
        norm_num_groups=8,
    )


def build_scheduler() -> DDPMScheduler:
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        prediction_type="epsilon",
        clip_sample=True,
        timestep_spacing="trailing",
    )


def encode_prompts(tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, prompts: list[str]) -> torch.Tensor:
    """The text encoder's last hidden state, exactly as Stable Diffusion pipelines condition on it."""
    ids = tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    return text_encoder(ids)[0]


def learning_rate_factor(step: int, total_steps: int) -> float:
    if step < WARMUP_STEPS:
        return (step + 1) / WARMUP_STEPS
    progress = (step - WARMUP_STEPS) / max(1, total_steps - WARMUP_STEPS)
    return 0.5 * (1 + math.cos(math.pi * progress))


def train(args: argparse.Namespace) -> None:
    torch.manual_seed(args.seed)
    tokenizer = build_clip_tokenizer(WORDS)
    text_encoder = tiny_text_encoder(len(tokenizer), hidden_size=TEXT_WIDTH)
    unet = build_unet()
    scheduler = build_scheduler()
    parameters = [*unet.parameters(), *text_encoder.parameters()]
    print(
        f"parameters: unet {sum(p.numel() for p in unet.parameters()):,}, "
        f"text encoder {sum(p.numel() for p in text_encoder.parameters()):,}"
    )

    scenes = ToySceneDataset(args.steps * args.batch_size, seed=args.seed)
    loader = torch.utils.data.DataLoader(scenes, batch_size=args.batch_size)
    optimizer = torch.optim.AdamW(parameters, lr=args.lr)
    learning_rates = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: learning_rate_factor(step, args.steps))
    generator = torch.Generator().manual_seed(args.seed)

    start, running_loss = time.perf_counter(), 0.0
    for step, batch in enumerate(loader):
        pixels = batch["pixels"]
        keep_prompt = torch.rand(len(pixels), generator=generator) >= EMPTY_PROMPT_PROBABILITY
        prompts = [prompt if keep else "" for prompt, keep in zip(batch["prompt"], keep_prompt)]
        noise = torch.randn(pixels.shape, generator=generator)
        noise += NOISE_OFFSET * torch.randn(len(pixels), 3, 1, 1, generator=generator)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(pixels),), generator=generator)
        noisy = scheduler.add_noise(pixels, noise, timesteps)

        predicted_noise = unet(noisy, timesteps, encode_prompts(tokenizer, text_encoder, prompts)).sample
        loss = F.mse_loss(predicted_noise, noise)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, GRAD_CLIP_NORM)
        optimizer.step()
        learning_rates.step()

        running_loss += loss.item()
        if (step + 1) % args.log_every == 0:
            elapsed = time.perf_counter() - start
            print(f"step {step + 1}/{args.steps}  loss {running_loss / args.log_every:.4f}  {elapsed:.0f}s", flush=True)
            running_loss = 0.0
    print(f"training time: {time.perf_counter() - start:.0f}s")
    save_pipeline(args.out, unet, text_encoder, tokenizer, scheduler)


def save_pipeline(
    out: Path, unet: UNet2DConditionModel, text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer, scheduler
) -> None:
    """Write the pipeline directory (same layout as ``write_tiny_sd_pipeline(..., pixel_space=True)``)."""
    unet.save_pretrained(out / "unet")
    text_encoder.save_pretrained(out / "text_encoder")
    tokenizer.save_pretrained(out / "tokenizer")
    scheduler.save_pretrained(out / "scheduler")
    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "scheduler": ["diffusers", "DDPMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": [None, None],
    }
    (out / "model_index.json").write_text(json.dumps(index, indent=2))


@torch.no_grad()
def generate(
    unet: UNet2DConditionModel,
    text_encoder: CLIPTextModel,
    tokenizer: CLIPTokenizer,
    scheduler: DDIMScheduler,
    prompts: list[str],
    seed: int,
) -> torch.Tensor:
    """DDIM samples with classifier-free guidance, one per prompt, as ``(B, 3, H, W)`` in [0, 1]."""
    conditional = encode_prompts(tokenizer, text_encoder, prompts)
    unconditional = encode_prompts(tokenizer, text_encoder, [""] * len(prompts))
    text = torch.cat([unconditional, conditional])
    size = unet.config.sample_size
    images = torch.randn(len(prompts), 3, size, size, generator=torch.Generator().manual_seed(seed))
    scheduler.set_timesteps(SAMPLING_STEPS)
    for timestep in scheduler.timesteps:
        noise_unconditional, noise_conditional = unet(torch.cat([images, images]), timestep, text).sample.chunk(2)
        noise = noise_unconditional + GUIDANCE_SCALE * (noise_conditional - noise_unconditional)
        images = scheduler.step(noise, timestep, images).prev_sample
    return (images + 1).div(2).clamp(0, 1)


def evaluate(model_dir: Path, num_seeds: int) -> None:
    """Load the saved pipeline back and measure its samples with the toy rewards."""
    unet = UNet2DConditionModel.from_pretrained(model_dir / "unet").eval()
    text_encoder = CLIPTextModel.from_pretrained(model_dir / "text_encoder").eval()
    tokenizer = CLIPTokenizer.from_pretrained(model_dir / "tokenizer")
    scheduler = DDIMScheduler.from_config(DDPMScheduler.load_config(model_dir / "scheduler"))

    prompts = list(EVAL_PROMPTS)
    by_seed = [generate(unet, text_encoder, tokenizer, scheduler, prompts, seed) for seed in range(num_seeds)]
    images = torch.stack(by_seed, dim=1)  # (prompt, seed, 3, H, W)
    flat_images, flat_prompts = images.flatten(0, 1), [p for p in prompts for _ in range(num_seeds)]

    shape_agreement = ShapeAgreementReward()(flat_images, flat_prompts)
    warmth = WarmthReward()(flat_images, flat_prompts).view(len(prompts), num_seeds)
    colors = classify_colors(flat_images).view(len(prompts), num_seeds)
    print(f"\ncolour-free evaluation prompts: {len(prompts)} prompts x {num_seeds} seeds")
    print(f"  shape agreement {shape_agreement.mean():.3f}  (chance {1 / len(SHAPES):.2f})")
    for shape in SHAPES:
        rows = [i for i, p in enumerate(flat_prompts) if p.split()[1] == shape]
        print(f"    {shape:9s}{shape_agreement[rows].mean():.3f}")
    print(
        f"  warmth mean {warmth.mean():.3f}  std over all samples {warmth.std():.3f}  "
        f"mean std over seeds within a prompt {warmth.std(dim=1).mean():.3f}"
    )
    names = [*COLORS, "gray/none"]
    counts = torch.bincount(torch.where(colors < 0, len(COLORS), colors).flatten(), minlength=len(names))
    print("  colour distribution " + "  ".join(f"{n} {c / colors.numel():.2f}" for n, c in zip(names, counts)))
    distinct = [len(set(row.tolist()) - {-1}) for row in colors]
    print(f"  distinct colours per prompt across seeds: mean {np.mean(distinct):.1f} of {len(COLORS)}")

    colored_prompts = [make_prompt(shape, color) for shape in SHAPES for color in COLORS]
    colored_images = torch.cat(
        [generate(unet, text_encoder, tokenizer, scheduler, colored_prompts, seed) for seed in range(2)]
    )
    colored_prompts = colored_prompts * 2
    print(f"colour-naming prompts: {len(colored_prompts)} samples")
    print(
        f"  shape agreement {ShapeAgreementReward()(colored_images, colored_prompts).mean():.3f}  "
        f"colour agreement {ColorAgreementReward()(colored_images, colored_prompts).mean():.3f}"
    )

    grid = images.permute(0, 3, 1, 4, 2).flatten(2, 3).flatten(0, 1)  # (prompts * H, seeds * W, 3)
    Image.fromarray((grid * 255).round().byte().numpy()).save(model_dir / "samples.png")
    weights = sum(f.stat().st_size for f in model_dir.rglob("*.safetensors"))
    everything = sum(f.stat().st_size for f in model_dir.rglob("*") if f.is_file())
    print(f"saved: {model_dir}  weights {weights:,} bytes, directory {everything:,} bytes")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=BASE_MODEL_PATH, help="pipeline directory to write")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--log-every", type=int, default=100)
    parser.add_argument("--eval-seeds", type=int, default=8, help="samples per evaluation prompt")
    parser.add_argument("--evaluate-only", action="store_true", help="skip training, measure the saved model")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not args.evaluate_only:
        train(args)
    elif not (args.out / "model_index.json").is_file():
        parser.error(f"--evaluate-only: {args.out} holds no model_index.json; train first (drop --evaluate-only).")
    evaluate(args.out, args.eval_seeds)


if __name__ == "__main__":
    main()

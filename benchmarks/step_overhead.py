"""What Lightning and the shared base module cost per step, and what the LoRA reference saves in memory.

Prints, measured side by side in one run:

1. the median training-step time of ``DiffusionDPO`` under ``Trainer.fit`` over a minimal hand-written
   PyTorch loop doing the same math (encode, shared noising, policy and reference forwards, loss, backward,
   AdamW step) on the same small UNet and the same batches (goal: at most 1.05), and over a hand-written
   *supervised* step on the same stacked ``2B`` samples (one forward and backward, no reference; goal: at
   most 1.45), for a LoRA and for a full fine-tune. The preference step adds one no-grad forward. A full
   fine-tune's backward costs about two forwards (activation and weight gradients), so the added forward is
   about a third of a forward-backward and the limit about 4/3; a LoRA backward skips the frozen weights'
   gradients and costs about one forward, so there the limit is about 3/2. The steps are paired: after each
   Lightning step, one hand-written DPO step and one supervised step run on the same batch, so all three see
   the same machine load (on a shared 2-core machine separate runs' medians wander by 10% or more); each ratio
   is the mean of per-step ratios with its 95% interval;
2. the peak memory of a training run whose reference is the LoRA network with adapters disabled over the
   same run with a frozen copy of the base denoiser as reference (goal: at most 0.6). Each configuration
   runs in its own process; the figure is the process's peak resident memory during training above its
   memory before the module was built (so it counts weights, the reference, activations, gradients and
   optimizer state, but not the transient copies made while loading weights).

    python benchmarks/step_overhead.py [--steps 30] [--width 64]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from intervals import t_interval

from lightning_pref.backbones import StableDiffusionBackbone
from lightning_pref.methods import DiffusionDPO
from lightning_pref.reference import FrozenCopy
from lightning_pref.tiny import write_tiny_sd_pipeline

BATCH = 8


def make_batches(steps: int, size: int) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    return [
        {
            "pixels_w": torch.rand(BATCH, 3, size, size, generator=generator) * 2 - 1,
            "pixels_l": torch.rand(BATCH, 3, size, size, generator=generator) * 2 - 1,
            "prompt": ["a red cat"] * BATCH,
        }
        for _ in range(steps)
    ]


class HandLoop:
    """The same math without Lightning or the module: the reference a careful hand-written script would be.

    ``objective="dpo"``: Diffusion-DPO (policy forward with grad, reference forward without, on the stacked
    ``[winners; losers]``); ``"supervised"``: the plain denoising loss on the same stacked samples (one forward
    with grad), the floor any preference step is measured against. The LoRA reference switches the adapted
    layers off and on directly (diffusers' model-wide ``disable_adapters()`` walks every module, several ms
    more per step here); the full fine-tune's reference is a frozen copy of the base UNet.
    """

    def __init__(self, pipeline: Path, objective: str, finetune: str):
        from peft.tuners.tuners_utils import BaseTunerLayer

        set_up = DiffusionDPO(StableDiffusionBackbone(str(pipeline)), beta=5000, finetune=finetune, lr=1e-4)
        self.backbone, self.unet = set_up.backbone, set_up.denoiser  # identical set-up (LoRA or all trainable)
        self.objective = objective
        self.adapted = [module for module in self.unet.modules() if isinstance(module, BaseTunerLayer)]
        self.frozen = copy.deepcopy(self.unet).requires_grad_(False) if finetune == "full" else None
        self.alphas = self.backbone.process.alphas_cumprod.float()
        trained = [p for p in self.unet.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(trained, lr=1e-4, weight_decay=1e-2)

    def step(self, batch: dict, step: int) -> float:
        """One training step on ``batch``; returns its wall time in seconds."""
        start = time.perf_counter()
        backbone, unet = self.backbone, self.unet
        generator = torch.Generator().manual_seed(step)
        with torch.no_grad():
            pixels = torch.cat([batch["pixels_w"], batch["pixels_l"]])
            latents = backbone.vae.encode(pixels).latent_dist.sample(generator) * backbone.vae.config.scaling_factor
            hidden = backbone.text_encoder(backbone.tokenize(backbone.tokenizer, batch["prompt"]))[0].repeat(2, 1, 1)
        t = torch.randint(0, 1000, (BATCH,), generator=generator).repeat(2)
        noise = torch.randn(latents[:BATCH].shape, generator=generator).repeat(2, 1, 1, 1)
        a = self.alphas[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * latents + (1 - a).sqrt() * noise
        policy = unet(x_t, t, encoder_hidden_states=hidden).sample
        policy_err = (policy.float() - noise).pow(2).mean(dim=(1, 2, 3))
        if self.objective == "supervised":
            loss = policy_err.mean()
        else:
            with torch.no_grad():
                if self.frozen is not None:
                    reference = self.frozen(x_t, t, encoder_hidden_states=hidden).sample
                else:
                    for layer in self.adapted:
                        layer.enable_adapters(False)
                    reference = unet(x_t, t, encoder_hidden_states=hidden).sample
                    for layer in self.adapted:
                        layer.enable_adapters(True)
            ref_err = (reference.float() - noise).pow(2).mean(dim=(1, 2, 3))
            pw, pl_ = policy_err.chunk(2)
            rw, rl = ref_err.chunk(2)
            loss = -F.logsigmoid(-0.5 * 5000 * ((pw - pl_) - (rw - rl))).mean()
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return time.perf_counter() - start


class PairedTimer(pl.Callback):
    """Times each Lightning step and, right after it, one step of each hand-written loop on the same batch (in
    alternating order), so every Lightning step is compared with hand steps run under the same machine load."""

    def __init__(self, loops: dict[str, HandLoop]):
        self.loops = loops
        self.times: dict[str, list[float]] = {"lightning": [], **{name: [] for name in loops}}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.times["lightning"].append(time.perf_counter() - self.start)
        names = list(self.loops) if batch_idx % 2 == 0 else list(reversed(self.loops))
        for name in names:
            self.times[name].append(self.loops[name].step(batch, batch_idx))


def paired_step_times(pipeline: Path, batches: list[dict], finetune: str) -> dict[str, list[float]]:
    """Step times of ``DiffusionDPO`` under ``Trainer.fit`` and of the hand-written DPO and supervised loops,
    step by step on the same batches."""
    timer = PairedTimer({objective: HandLoop(pipeline, objective, finetune) for objective in ("dpo", "supervised")})
    module = DiffusionDPO(StableDiffusionBackbone(str(pipeline)), beta=5000, finetune=finetune, lr=1e-4)
    trainer = pl.Trainer(
        max_steps=len(batches),
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
    )
    trainer.fit(module, torch.utils.data.DataLoader(batches, batch_size=None))
    return timer.times


class FrozenCopyReferenceDPO(DiffusionDPO):
    """The same LoRA policy, but with a frozen deep copy of the base denoiser (adapters off) as the reference."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.denoiser.disable_adapters()
        self.reference = FrozenCopy(self.denoiser)
        self.denoiser.enable_adapters()


def interval(ratios: list[float]) -> str:
    """``mean [low, high]``: the mean of per-step ratios and its two-sided 95% t-interval."""
    mean, low, high = t_interval(ratios)
    return f"{mean:.3f} [{low:.3f}, {high:.3f}]"


def memory_mb(field: str) -> float:
    """``VmRSS`` (resident now) or ``VmHWM`` (peak resident) of this process, in MB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status: the memory comparison needs Linux.")


def peak_memory_child(pipeline: str, reference: str, steps: int) -> None:
    """Run in a subprocess: train and print the peak RSS above the pre-build baseline, in MB."""
    torch.set_num_threads(2)
    batches = make_batches(steps, 16)
    baseline = memory_mb("VmRSS")
    cls = DiffusionDPO if reference == "adapters_disabled" else FrozenCopyReferenceDPO
    module = cls(StableDiffusionBackbone(pipeline), beta=5000, finetune="lora", lr=1e-4)
    weights_mb = sum(p.numel() * p.element_size() for p in module.denoiser.parameters()) / 2**20
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak: loading transients are not training memory
    trainer = pl.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, torch.utils.data.DataLoader(batches, batch_size=None))
    peak = memory_mb("VmHWM")
    print(json.dumps({"reference": reference, "peak_mb": peak - baseline, "denoiser_mb": weights_mb}))


def measure_peak(pipeline: Path, reference: str, steps: int) -> dict:
    result = subprocess.run(
        [sys.executable, __file__, "--child", str(pipeline), reference, str(steps)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30, help="training steps per repeat (the first 5 dropped)")
    parser.add_argument("--repeats", type=int, default=3, help="repeats of each paired timing")
    parser.add_argument("--width", type=int, default=32, help="UNet base width for the timing (32: the tiny UNet)")
    parser.add_argument(
        "--memory-widths", type=int, nargs="+", default=[128, 256], help="UNet base widths for the memory comparison"
    )
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        peak_memory_child(args.child[0], args.child[1], int(args.child[2]))
        return

    torch.set_num_threads(2)
    pl.seed_everything(0, verbose=False)
    with tempfile.TemporaryDirectory() as tmp:
        timing_model = write_tiny_sd_pipeline(Path(tmp) / "timing", block_out_channels=(args.width, 2 * args.width))
        batches = make_batches(args.steps, 16)
        ratios = {}
        for finetune in ("lora", "full"):
            times = {"lightning": [], "dpo": [], "supervised": []}
            for _ in range(args.repeats):
                for name, values in paired_step_times(timing_model, batches, finetune).items():
                    times[name] += values[5:]  # the first steps warm up allocators and caches
            ratios[finetune] = {
                "hand": [ours / theirs for ours, theirs in zip(times["lightning"], times["dpo"])],
                "supervised": [ours / theirs for ours, theirs in zip(times["lightning"], times["supervised"])],
                "lightning_ms": 1000 * statistics.median(times["lightning"]),
            }

        memory_rows = []
        for width in args.memory_widths:
            model = write_tiny_sd_pipeline(
                Path(tmp) / f"memory{width}", block_out_channels=(width, 2 * width, 4 * width)
            )
            lora, frozen = measure_peak(model, "adapters_disabled", 6), measure_peak(model, "frozen_copy", 6)
            memory_rows.append((width, lora["denoiser_mb"], lora["peak_mb"], frozen["peak_mb"]))

    print(
        f"Each ratio: a Lightning step over the hand-written steps run right after it on the same batch; the mean over "
        f"{args.repeats} x {args.steps - 5} steps with its 95% t-interval."
    )
    for finetune, measured in ratios.items():
        limit = "4/3" if finetune == "full" else "3/2"
        print(f"{finetune} fine-tune (Lightning DiffusionDPO step: median {measured['lightning_ms']:.1f} ms):")
        print(f"  ratio Lightning / hand-written loop: {interval(measured['hand'])}   (goal <= 1.05)")
        print(
            f"  ratio Lightning DPO / supervised:    {interval(measured['supervised'])}   (goal <= 1.45; one extra "
            f"no-grad forward: about {limit})"
        )
    print()
    print(
        "UNet width | denoiser weights | peak, adapters-off reference | peak, frozen-copy reference | ratio (goal <= 0.6)"
    )
    for width, weights, lora, frozen in memory_rows:
        print(f"{width:10d} | {weights:13.0f} MB | {lora:25.0f} MB | {frozen:24.0f} MB | {lora / frozen:.3f}")


if __name__ == "__main__":
    main()

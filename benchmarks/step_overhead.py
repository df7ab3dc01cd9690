"""What Lightning and the shared base module cost per step, and what the LoRA reference saves in memory.

Prints, measured side by side in one run:

1. the median training-step time of ``DiffusionDPO`` under ``Trainer.fit`` over a minimal hand-written
   PyTorch loop doing the same math (encode, shared noising, policy and reference forwards, loss, backward,
   AdamW step) on the same small UNet and the same batches (goal: at most 1.05), and over a hand-written
   *supervised* step on the same stacked ``2B`` samples (one forward and backward, no reference): the
   preference step adds one no-grad forward, about a third of a forward-backward, so its limit is about
   4/3 (goal: at most 1.45);
2. the peak memory of a training run whose reference is the LoRA network with adapters disabled over the
   same run with a frozen copy of the base denoiser as reference (goal: at most 0.6). Each configuration
   runs in its own process; the figure is the process's peak resident memory during training above its
   memory before the module was built (so it counts weights, the reference, activations, gradients and
   optimizer state, but not the transient copies made while loading weights).

    python benchmarks/step_overhead.py [--steps 30] [--width 64]
"""

from __future__ import annotations

import argparse
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


class StepTimer(pl.Callback):
    def __init__(self):
        self.times: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.times.append(time.perf_counter() - self.start)


def lightning_step_times(pipeline: Path, batches: list[dict]) -> list[float]:
    module = DiffusionDPO(StableDiffusionBackbone(str(pipeline)), beta=5000, finetune="lora", lr=1e-4)
    timer = StepTimer()
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


def plain_step_times(pipeline: Path, batches: list[dict], objective: str = "dpo") -> list[float]:
    """The same math without Lightning or the module: the reference a hand-written script would be.

    ``objective="dpo"``: Diffusion-DPO (policy forward with grad, reference forward without, on the stacked
    ``[winners; losers]``); ``"supervised"``: the plain denoising loss on the same stacked samples (one forward
    with grad), the floor any preference step is measured against.
    """
    reference_module = DiffusionDPO(StableDiffusionBackbone(str(pipeline)), beta=5000, finetune="lora", lr=1e-4)
    backbone, unet = reference_module.backbone, reference_module.denoiser  # identical set-up (LoRA, frozen parts)
    alphas = backbone.process.alphas_cumprod.float()
    optimizer = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=1e-4, weight_decay=1e-2)
    times = []
    for step, batch in enumerate(batches):
        start = time.perf_counter()
        generator = torch.Generator().manual_seed(step)
        with torch.no_grad():
            latents = backbone.vae.encode(torch.cat([batch["pixels_w"], batch["pixels_l"]])).latent_dist.sample(
                generator
            )
            latents = latents * backbone.vae.config.scaling_factor
            hidden = backbone.text_encoder(backbone.tokenize(backbone.tokenizer, batch["prompt"]))[0].repeat(2, 1, 1)
        t = torch.randint(0, 1000, (BATCH,), generator=generator).repeat(2)
        noise = torch.randn(latents[:BATCH].shape, generator=generator).repeat(2, 1, 1, 1)
        a = alphas[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * latents + (1 - a).sqrt() * noise
        policy = unet(x_t, t, encoder_hidden_states=hidden).sample
        policy_err = (policy.float() - noise).pow(2).mean(dim=(1, 2, 3))
        if objective == "supervised":
            loss = policy_err.mean()
        else:
            with torch.no_grad():
                unet.disable_adapters()
                reference = unet(x_t, t, encoder_hidden_states=hidden).sample
                unet.enable_adapters()
            ref_err = (reference.float() - noise).pow(2).mean(dim=(1, 2, 3))
            pw, pl_ = policy_err.chunk(2)
            rw, rl = ref_err.chunk(2)
            loss = -F.logsigmoid(-0.5 * 5000 * ((pw - pl_) - (rw - rl))).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return times


class FrozenCopyReferenceDPO(DiffusionDPO):
    """The same LoRA policy, but with a frozen deep copy of the base denoiser (adapters off) as the reference."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.denoiser.disable_adapters()
        self.reference = FrozenCopy(self.denoiser)
        self.denoiser.enable_adapters()


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
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats of each timing")
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
        lightning_times, plain_times, supervised_times = [], [], []
        for _ in range(args.repeats):  # interleave, so drift in machine load hits all alike
            lightning_times += lightning_step_times(timing_model, batches)[5:]
            plain_times += plain_step_times(timing_model, batches)[5:]
            supervised_times += plain_step_times(timing_model, batches, objective="supervised")[5:]
        lightning_median, plain_median = statistics.median(lightning_times), statistics.median(plain_times)
        supervised_median = statistics.median(supervised_times)

        memory_rows = []
        for width in args.memory_widths:
            model = write_tiny_sd_pipeline(
                Path(tmp) / f"memory{width}", block_out_channels=(width, 2 * width, 4 * width)
            )
            lora, frozen = measure_peak(model, "adapters_disabled", 6), measure_peak(model, "frozen_copy", 6)
            memory_rows.append((width, lora["denoiser_mb"], lora["peak_mb"], frozen["peak_mb"]))

    print(f"step time, Lightning DiffusionDPO:   {1000 * lightning_median:7.2f} ms (median of {len(lightning_times)})")
    print(f"step time, hand-written loop:       {1000 * plain_median:7.2f} ms (median of {len(plain_times)})")
    print(f"step time, hand-written supervised: {1000 * supervised_median:7.2f} ms (fwd+bwd on the same 2B samples)")
    print(f"ratio Lightning / plain:             {lightning_median / plain_median:.3f}   (goal <= 1.05)")
    print(
        f"ratio Lightning DPO / supervised:    {lightning_median / supervised_median:.3f}   (goal <= 1.45; one extra no-grad "
        "forward: about 4/3)"
    )
    print()
    print(
        "UNet width | denoiser weights | peak, adapters-off reference | peak, frozen-copy reference | ratio (goal <= 0.6)"
    )
    for width, weights, lora, frozen in memory_rows:
        print(f"{width:10d} | {weights:13.0f} MB | {lora:25.0f} MB | {frozen:24.0f} MB | {lora / frozen:.3f}")


if __name__ == "__main__":
    main()

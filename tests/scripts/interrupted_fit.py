"""Run by tests/test_resume.py: a Diffusion-DPO fit on preference shards that may be killed and resumed.

    python interrupted_fit.py PIPELINE SHARDS OUT_DIR --finetune {lora,full} --workers N --devices N --steps N
        [--kill-at STEP] [--resume CHECKPOINT]

A checkpoint is written after every optimizer step (``OUT_DIR/checkpoints/step=K.ckpt``). Every rank appends
``{"step": K, "loss": ...}`` to ``OUT_DIR/losses-rank{r}.jsonl`` as each step ends. With ``--kill-at K`` the
whole process group is killed with SIGKILL as step K+1 starts (after step K's checkpoint is on disk): no
cleanup, no final checkpoint, as a preempted job dies. At the end rank 0 writes the trained weights to
``OUT_DIR/final.safetensors``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
from pathlib import Path

import lightning.pytorch as pl
from helpers.processes import dump_stacks_on_request
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors.torch import save_file

from lightning_pref.backbones import StableDiffusionBackbone
from lightning_pref.datamodules import PreferenceDataModule
from lightning_pref.methods import DiffusionDPO


class RecordAndKill(pl.Callback):
    def __init__(self, out: Path, kill_at: int | None):
        self.out, self.kill_at = out, kill_at

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_step == self.kill_at and trainer.is_global_zero:
            os.killpg(os.getpgid(0), signal.SIGKILL)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        with (self.out / f"losses-rank{trainer.global_rank}.jsonl").open("a") as file:
            file.write(
                json.dumps({"step": trainer.global_step, "loss": outputs["loss"].item(), "keys": batch["key"]}) + "\n"
            )


def main() -> None:
    dump_stacks_on_request()
    # Ctrl-C reaches a fit in a terminal's foreground, where SIGINT raises KeyboardInterrupt. A suite started in the
    # background of a non-interactive shell (`sh -c 'make test &'`) hands its processes SIGINT ignored; undo that.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    parser = argparse.ArgumentParser()
    parser.add_argument("pipeline")
    parser.add_argument("shards")
    parser.add_argument("out", type=Path)
    parser.add_argument("--finetune", default="full")
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--kill-at", type=int, default=None)
    parser.add_argument("--resume", default=None)
    args = parser.parse_args()
    module = DiffusionDPO(StableDiffusionBackbone(args.pipeline), beta=500.0, finetune=args.finetune, lr=1e-3, seed=3)
    data = PreferenceDataModule(
        args.shards,
        batch_size=2,
        num_workers=args.workers,
        shuffle_buffer=6,
        batches_per_epoch=3,
        random_flip=True,
        seed=5,
    )
    checkpoints = ModelCheckpoint(
        dirpath=args.out / "checkpoints", filename="{step}", every_n_train_steps=1, save_top_k=-1
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy="ddp" if args.devices > 1 else "auto",
        max_steps=args.steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=args.out,
        callbacks=[RecordAndKill(args.out, args.kill_at), checkpoints],
    )
    trainer.fit(module, datamodule=data, ckpt_path=args.resume)
    if trainer.is_global_zero:
        save_file(
            {name: value.contiguous() for name, value in module.denoiser.state_dict().items()},
            args.out / "final.safetensors",
        )


if __name__ == "__main__":
    main()

"""Run by tests/callbacks/test_sample_logger.py as a script: Lightning's launcher re-executes it for every rank.

    python sample_logger_fit.py PIPELINE OUT_DIR [--devices N]

Fits Diffusion-DPO (LoRA) on a tiny pixel-space pipeline for 3 steps on 1 process or N under DDP (gloo), with
a CSVLogger under ``OUT_DIR`` and a [`SampleLogger`][lightning_pref.callbacks.SampleLogger] of 5 toy prompts
(every 2 steps and at the end: steps 2 and 3) scored by two toy rewards. The LoRA weights are set from a fixed
seed before the fit (the policy differs from the reference) and the optimizer has learning rate 0, so every
run samples the same networks at every step and only the split of the prompts across ranks differs; the
sampler draws one prompt at a time, so a sample does not depend on the other prompts of its batch either.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import lightning.pytorch as pl
import torch
from helpers.pairs import random_pairs
from helpers.processes import dump_stacks_on_request
from helpers.training import perturb_lora
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

from lightning_pref.backbones import StableDiffusionBackbone
from lightning_pref.callbacks.sampling import SampleLogger
from lightning_pref.methods import DiffusionDPO
from lightning_pref.rewards import ColorAgreementReward, WarmthReward

PROMPTS = ["a red circle", "a blue square", "a green triangle", "a cross", "a yellow circle on a black background"]
STEPS, EVERY_N_STEPS, PAIRS_PER_RANK = 3, 2, 2


class FixedWeightsDPO(DiffusionDPO):
    """Diffusion-DPO whose optimizer leaves the weights where they are (SGD with learning rate 0)."""

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.0)


class RankPairs(pl.LightningDataModule):
    def train_dataloader(self):
        return DataLoader(random_pairs(PAIRS_PER_RANK * STEPS, size=8, seed=self.trainer.global_rank), batch_size=2)


def main() -> None:
    dump_stacks_on_request()
    parser = argparse.ArgumentParser()
    parser.add_argument("pipeline")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--devices", type=int, default=1)
    args = parser.parse_args()
    module = FixedWeightsDPO(StableDiffusionBackbone(args.pipeline), finetune="lora", beta=500.0, seed=7)
    torch.manual_seed(3)
    perturb_lora(module)
    sample_logger = SampleLogger(
        PROMPTS,
        seed=11,
        every_n_steps=EVERY_N_STEPS,
        scorers=[WarmthReward(), ColorAgreementReward()],
        num_inference_steps=2,
        guidance_scale=3.0,
        batch_size=1,
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy="ddp" if args.devices > 1 else "auto",
        max_steps=STEPS,
        logger=CSVLogger(args.out_dir),
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        default_root_dir=args.out_dir,
        callbacks=[sample_logger],
    )
    trainer.fit(module, datamodule=RankPairs())


if __name__ == "__main__":
    main()

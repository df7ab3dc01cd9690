"""Run by tests/callbacks/test_replay.py as a script on 2 CPU processes: Lightning's launchers re-execute it per rank.

    python replay_fit.py PIPELINE OUT_DIR --strategy {ddp,zero2}

Fits a full fine-tune of Diffusion-DPO for 5 steps with RandomCheckpointReplay (a snapshot every 2 steps, a pool
of 3, a draw every step), each rank on its own pairs, and writes per rank ``rank{r}.json`` (the draw of every step,
the pool's snapshot steps, whether the reference held the draw exactly at every step, the draws' seed) and
``reference{r}.safetensors`` (the reference's weights at the end).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import deepspeed.ops
import lightning.pytorch as pl
import torch
from helpers.pairs import random_pairs
from helpers.processes import dump_stacks_on_request
from safetensors.torch import save_file
from torch.utils.data import DataLoader

from lightning_pref.backbones import StableDiffusionBackbone
from lightning_pref.callbacks.replay import RandomCheckpointReplay
from lightning_pref.methods import DiffusionDPO
from lightning_pref.strategies import DeepSpeedStrategy

deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # skip compiling the shared-memory comm op

STEPS, PAIRS_PER_RANK = 5, 2


class RankPairs(pl.LightningDataModule):
    def train_dataloader(self):
        rank = self.trainer.global_rank
        mine = random_pairs(2 * PAIRS_PER_RANK)[rank * PAIRS_PER_RANK :][:PAIRS_PER_RANK]
        return DataLoader(mine * STEPS, batch_size=PAIRS_PER_RANK)


class Record(pl.Callback):
    """After the replay callback: each step's draw, and whether the reference holds exactly the drawn snapshot."""

    def __init__(self, replay: RandomCheckpointReplay, out_dir: Path):
        self.replay, self.out_dir, self.draws, self.exact = replay, out_dir, [], []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        drawn = self.replay.snapshots[self.replay.drawn_index]
        held = module.reference.copy.state_dict()
        self.draws.append(self.replay.drawn_index)
        self.exact.append(all(torch.equal(held[name].cpu(), value) for name, value in drawn.items()))

    def on_train_end(self, trainer, module):
        rank = trainer.global_rank
        record = {
            "draws": self.draws,
            "exact": self.exact,
            "snapshot_steps": self.replay.snapshot_steps,
            "seed": module.seed,
        }
        (self.out_dir / f"rank{rank}.json").write_text(json.dumps(record))
        reference = {
            name: value.detach().cpu().contiguous() for name, value in module.reference.copy.state_dict().items()
        }
        save_file(reference, self.out_dir / f"reference{rank}.safetensors")


def main() -> None:
    dump_stacks_on_request()
    parser = argparse.ArgumentParser()
    parser.add_argument("pipeline")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--strategy", choices=["ddp", "zero2"], default="ddp")
    args = parser.parse_args()
    module = DiffusionDPO(StableDiffusionBackbone(args.pipeline), finetune="full", lr=1e-2, seed=5)
    replay = RandomCheckpointReplay(every_n_steps=2, pool_size=3)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=DeepSpeedStrategy(stage=2) if args.strategy == "zero2" else "ddp",
        max_steps=STEPS,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        default_root_dir=args.out_dir,
        callbacks=[replay, Record(replay, args.out_dir)],
    )
    trainer.fit(module, datamodule=RankPairs())


if __name__ == "__main__":
    main()

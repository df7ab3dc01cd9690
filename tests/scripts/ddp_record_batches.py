"""Run by tests/datamodules/test_streaming_ddp.py as a script (Lightning's DDP launcher re-executes it for rank 1).

    python ddp_record_batches.py SHARD_DIR OUT_DIR

Fits a one-parameter module for two epochs on 2 CPU processes (gloo) with 2 dataloader workers each, and
writes, per rank, the keys and label flips of every sample it trained on and its batch count.
"""

import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch

from lightning_pref.datamodules import PreferenceDataModule


class Recorder(pl.LightningModule):
    def __init__(self, out_dir: str):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.out_dir = Path(out_dir)
        self.keys, self.flips, self.batches = [], {}, 0

    def training_step(self, batch, batch_idx):
        self.batches += 1
        self.keys += batch["key"]
        self.flips.update(zip(batch["key"], batch["label_flipped"].tolist()))
        return (self.weight * batch["pixels_w"].mean()) ** 2  # DDP all-reduces its gradient every step

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def on_train_end(self):
        record = {
            "keys": self.keys,
            "flips": self.flips,
            "batches": self.batches,
            "skipped": self.trainer.datamodule.skipped_samples,
        }
        (self.out_dir / f"rank{self.global_rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    shards, out_dir = sys.argv[1:3]
    pl.seed_everything(0)
    data = PreferenceDataModule(
        shards, batch_size=2, num_workers=2, shuffle_buffer=4, batches_per_epoch=5, label_noise=0.3, seed=3
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
    )
    trainer.fit(Recorder(out_dir), datamodule=data)

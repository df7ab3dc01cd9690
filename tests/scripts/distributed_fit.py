"""Run by tests/test_strategies.py and tests/hostile/test_checkpoints.py as a script: Lightning's launchers re-execute it for every rank.

    python distributed_fit.py PIPELINE OUT_DIR --strategy {single,ddp,zero2,zero3,fsdp2} --finetune {lora,full}
        [--backbone {sd,sd3,flux,cogvideox,wan,wan22_a14b}] [--devices N] [--nodes N] [--steps N] [--resume CHECKPOINT]

Fits Diffusion-DPO on a tiny pipeline (default: pixel-space SD) with the same global batch of 4 pairs at every step (so a
resumed run sees what the uninterrupted one saw), split evenly across processes (rank r trains pairs
[r * 4/W, (r+1) * 4/W)), saves a checkpoint every 2 steps, and writes per rank ``rank{r}.json``: the loss of
every step, how many elements of the reference this rank holds (and of how many), and whether the
reference's prediction stayed fixed; with the SD backbone, a SampleGrid samples on every rank (the weights
may be sharded) and rank 0 writes ``samples/before_after.png``; rank 0 also writes the final denoiser weights, gathered from their
shards, to ``final_denoiser.safetensors``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import deepspeed
import deepspeed.ops
import lightning.pytorch as pl
import torch
from helpers.distributed import BACKBONES, GLOBAL_BATCH, global_batch, training_module
from helpers.processes import dump_stacks_on_request
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy
from safetensors.torch import save_file
from torch.utils.data import DataLoader

from lightning_pref.callbacks import SampleGrid
from lightning_pref.reference import FrozenCopy
from lightning_pref.strategies import DeepSpeedStrategy, ModelParallelStrategy

deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # skip compiling the shared-memory comm op


class RankSlice(pl.LightningDataModule):
    """Each rank's contiguous share of the global batch, once per step."""

    def __init__(self, steps: int, pixel_shape: tuple[int, ...]):
        super().__init__()
        self.steps, self.pixel_shape = steps, pixel_shape

    def train_dataloader(self):
        per_rank = GLOBAL_BATCH // self.trainer.world_size
        mine = global_batch(self.pixel_shape)[self.trainer.global_rank * per_rank :][:per_rank]
        return DataLoader(mine * self.steps, batch_size=per_rank)


class Record(pl.Callback):
    def __init__(self, out_dir: Path, pixel_shape: tuple[int, ...]):
        self.out_dir, self.pixel_shape, self.losses = out_dir, pixel_shape, {}

    def reference_output(self, module) -> torch.Tensor:
        x = module.backbone.encode_pixels(
            torch.stack([pair["pixels_w"] for pair in global_batch(self.pixel_shape)[:2]])
        )
        timesteps = module.process.model_timesteps(module.process.sample_timesteps(2, torch.Generator().manual_seed(0)))
        conditioning = module.backbone.encode_prompts(["a red cat", "a square"])
        with torch.no_grad():
            return module.reference_prediction(x, timesteps, conditioning).float()

    def on_train_start(self, trainer, module):
        self.reference_before = self.reference_output(module)
        reference = module.reference.copy if isinstance(module.reference, FrozenCopy) else module.denoiser
        self.reference_local = sum(local_numel(p) for p in reference.parameters())
        self.reference_total = sum(full_numel(p) for p in reference.parameters())

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.losses[trainer.global_step] = outputs["loss"].item()

    def on_train_end(self, trainer, module):
        record = {
            "losses": self.losses,
            "errors": module.errors_by_step,
            "reference_local": self.reference_local,
            "reference_total": self.reference_total,
            "reference_change": (self.reference_output(module) - self.reference_before).abs().max().item(),
            "reference_sharded": isinstance(module.reference, FrozenCopy) and module.reference.sharded,
            "reference_dtype": str(next(module.reference.copy.parameters()).dtype)
            if isinstance(module.reference, FrozenCopy)
            else None,
        }
        (self.out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))
        state = gathered_state(module.denoiser, trainer.strategy)
        if trainer.global_rank == 0:
            save_file(state, self.out_dir / "final_denoiser.safetensors")


def gathered_state(denoiser: torch.nn.Module, strategy) -> dict[str, torch.Tensor]:
    """The denoiser's whole state dict on every rank (a collective under ZeRO-3 and FSDP2)."""
    if isinstance(strategy, DeepSpeedStrategy) and strategy.zero_stage_3:
        with deepspeed.zero.GatheredParameters(list(denoiser.parameters())):
            return {key: value.detach().clone() for key, value in denoiser.state_dict().items()}
    state = denoiser.state_dict()
    return {
        key: (value.full_tensor() if hasattr(value, "full_tensor") else value).detach().clone()
        for key, value in state.items()
    }


def local_numel(param: torch.Tensor) -> int:
    if hasattr(param, "ds_tensor"):  # ZeRO-3 partition
        return param.ds_tensor.numel()
    if hasattr(param, "to_local"):  # FSDP2 DTensor shard
        return param.to_local().numel()
    return param.numel()


def full_numel(param: torch.Tensor) -> int:
    return param.ds_numel if hasattr(param, "ds_numel") else param.numel()


def strategy_for(name: str, processes: int):
    if name == "fsdp2":  # one data-parallel mesh over every process of every node
        return ModelParallelStrategy(data_parallel_size=processes, tensor_parallel_size=1)
    return {
        "single": "auto",
        "ddp": DDPStrategy(),
        "zero2": DeepSpeedStrategy(stage=2),
        "zero3": DeepSpeedStrategy(stage=3),
    }[name]


def main() -> None:
    dump_stacks_on_request()
    parser = argparse.ArgumentParser()
    parser.add_argument("pipeline")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--strategy", default="single")
    parser.add_argument("--finetune", default="full")
    parser.add_argument("--backbone", default="sd", choices=sorted(BACKBONES))
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--resume", default=None)
    parser.add_argument("--precision", default="32-true")
    args = parser.parse_args()
    pixel_shape = BACKBONES[args.backbone][1]
    module = training_module(args.pipeline, args.backbone, args.finetune)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=args.devices,
        num_nodes=args.nodes,
        strategy=strategy_for(args.strategy, args.devices * args.nodes),
        max_steps=args.steps,
        precision=args.precision,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        default_root_dir=args.out_dir,
        callbacks=[
            Record(args.out_dir, pixel_shape),
            ModelCheckpoint(args.out_dir / "checkpoints", filename="{step}", every_n_train_steps=2, save_top_k=-1),
            *(
                [SampleGrid(["a red cat", "a square"], num_inference_steps=2, dirpath=str(args.out_dir / "samples"))]
                if args.backbone == "sd"
                else []
            ),
        ],
    )
    trainer.fit(module, datamodule=RankSlice(args.steps, pixel_shape), ckpt_path=args.resume)


if __name__ == "__main__":
    main()

"""Prompts only, for methods that make their samples while training (online DPO, any ``pair_source``).

A batch is ``{"prompt": [...], "key": [...]}``; key ``prompt-000007`` names the prompt's line (or list index).
The prompts are read in passes, each pass a fresh permutation seeded by ``(seed, pass)``, and dealt out in
global batches: global batch ``g`` holds the next ``world_size x batch_size`` prompts of that sequence and rank
``r`` takes its ``r``-th slice. So ranks never share a prompt within a step, every rank yields exactly
``batches_per_epoch`` batches per epoch (DDP ranks never wait on each other), and the batches are a function of
``(seed, g, rank, world_size)`` alone: a checkpoint holds the number of batches trained on, and a resumed run
continues with the batches the uninterrupted run would have drawn.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np

from lightning_pref.batch import KEY, PROMPT
from lightning_pref.errors import ConfigError, DataError, MissingFileError, check_whole_numbers


def read_prompts(prompts: str | list[str]) -> list[str]:
    """The prompts of a list, or of a text file (one per line; blank lines skipped)."""
    if isinstance(prompts, (list, tuple)):
        if not prompts or not all(isinstance(prompt, str) for prompt in prompts):
            raise ConfigError("prompts: give a non-empty list of strings, or the path of a text file (one per line).")
        return list(prompts)
    path = Path(prompts)
    if not path.is_file():
        raise MissingFileError(
            f"prompts file {str(path)!r} does not exist: check the path, or give the prompts as a list."
        )
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        raise DataError(f"prompts file {str(path)!r} holds no prompt: write one prompt per line.")
    return lines


class PromptLoader:
    """The training loader: ``batches_per_epoch`` prompt batches per epoch for one rank, resumable.

    ``consumed``, called by the DataModule for each batch the trainer actually trains on (not the one Lightning
    prefetches), advances the state; outside a trainer every batch handed out counts as consumed.
    """

    def __init__(self, prompts: list[str], batch_size: int, batches_per_epoch: int, seed: int, rank: int, world: int):
        self.prompts, self.batch_size, self.batches_per_epoch = prompts, batch_size, batches_per_epoch
        self.seed, self.rank, self.world = seed, rank, world
        self.counts_own_consumption = False
        #: batches trained on so far, over all epochs
        self.consumed_batches = 0

    def __len__(self) -> int:
        return self.batches_per_epoch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        epoch_end = (self.consumed_batches // self.batches_per_epoch + 1) * self.batches_per_epoch
        for global_batch in range(self.consumed_batches, epoch_end):  # the rest of the epoch (all of a new one)
            if self.counts_own_consumption:
                self.consumed()
            yield self.batch(global_batch)

    def batch(self, global_batch: int) -> dict[str, Any]:
        """This rank's slice of global batch ``global_batch``."""
        first = (global_batch * self.world + self.rank) * self.batch_size
        indices = [self.prompt_at(position) for position in range(first, first + self.batch_size)]
        return {PROMPT: [self.prompts[i] for i in indices], KEY: [f"prompt-{i:06d}" for i in indices]}

    def prompt_at(self, position: int) -> int:
        """The index of the prompt at ``position`` of the endless sequence of permutations."""
        count = len(self.prompts)
        permutation = np.random.default_rng((self.seed, position // count)).permutation(count)
        return int(permutation[position % count])

    def consumed(self) -> None:
        self.consumed_batches += 1

    def state_dict(self) -> dict[str, Any]:
        return {"consumed_batches": self.consumed_batches, "world_size": self.world, "prompts": len(self.prompts)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["world_size"] != self.world or state["prompts"] != len(self.prompts):
            raise DataError(
                f"the checkpoint's prompt stream had {state['prompts']} prompts on {state['world_size']} ranks, this "
                f"run has {len(self.prompts)} on {self.world}: resume with the same prompts and number of devices."
            )
        self.consumed_batches = int(state["consumed_batches"])


class PromptDataModule(pl.LightningDataModule):
    """Batches of prompts, shuffled, split across ranks, resumable (see the module docstring).

    Args:
        prompts: a list of prompts, or the path of a text file holding one per line.
        batch_size: prompts per batch and device (the pairs a pair source makes from them, before near-ties drop).
        batches_per_epoch: batches per rank per epoch.
        seed: seeds the order of the prompts.
    """

    def __init__(self, prompts: str | list[str], batch_size: int = 8, batches_per_epoch: int = 1000, seed: int = 0):
        super().__init__()
        check_whole_numbers(batch_size=batch_size, batches_per_epoch=batches_per_epoch)
        self.prompts = read_prompts(prompts)
        self.batch_size, self.batches_per_epoch, self.seed = batch_size, batches_per_epoch, seed
        self.train_loader: PromptLoader | None = None

    def train_dataloader(self) -> PromptLoader:
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer is not None else (0, 1)
        self.train_loader = PromptLoader(self.prompts, self.batch_size, self.batches_per_epoch, self.seed, rank, world)
        self.train_loader.counts_own_consumption = self.trainer is None
        return self.train_loader

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Lightning hands this batch to the training step: the loader's resumable state moves past it."""
        if self.trainer is not None and self.trainer.training and self.train_loader is not None:
            self.train_loader.consumed()
        return batch

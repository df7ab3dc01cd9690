"""Random checkpoint replay: the reference drawn, stage by stage, from snapshots of earlier trained weights.

SSPO's Random Checkpoint Replay (Zhang et al., arXiv 2410.05255, v1 "SePPO"; METHODS.md section 9,
``[secondary]``): keep the initial model plus a snapshot every ``K`` optimizer steps (the paper: every 30, 7 in
total) and, at each stage, draw the reference uniformly from the snapshots taken so far. Any method with a
reference can train against it; [`SSPO`][lightning_pref.methods.sspo.SSPO] adds it by default.

A snapshot is [`trained_weights()`][lightning_pref.methods.base.PreferenceDiffusionModule.trained_weights]: CPU
copies of the LoRA adapters, or of the whole denoiser in a full fine-tune. Installing one
([`Reference.install`][lightning_pref.reference.Reference.install]) puts it in a second frozen adapter (LoRA) or
in the frozen copy (full).
"""

from __future__ import annotations

from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import Tensor

from lightning_pref.errors import ConfigError, check_whole_numbers
from lightning_pref.seeding import stream_seed

WhenFull = Literal["stop", "replace_oldest"]


class RandomCheckpointReplay(pl.Callback):
    """Keeps a pool of snapshots of the trained weights and installs one, drawn uniformly, as the reference.

    * The pool starts with the weights at fit start and takes a snapshot after every ``every_n_steps``-th
      optimizer step, up to ``pool_size`` snapshots.
    * Stage ``s`` covers optimizer steps ``[s * draw_every_n_steps, (s + 1) * draw_every_n_steps)``. At its first
      micro-batch one snapshot is drawn uniformly from the pool, with a generator seeded by
      ``stream_seed(seed, "replay", s)`` ([`stream_seed`][lightning_pref.seeding.stream_seed]): every rank
      draws the same index without communicating, and a resumed run draws what the uninterrupted run would
      have. The draw is installed as the module's reference and logged (on the steps the logger writes) as ``replay/snapshot`` (its index in the
      pool), ``replay/snapshot_step`` (the optimizer step it was taken at) and ``replay/pool_size``.
    * The pool, the steps of its snapshots and the installed draw are the callback's checkpoint state (plain
      tensors and ints); a resumed run reinstalls the draw of the stage it resumes in.

    What ``[secondary]`` leaves open is an option (METHODS.md section 9 is from summaries of the paper only):

    Args:
        every_n_steps: optimizer steps between snapshots (the paper: 30).
        pool_size: most snapshots kept, the initial one included (the paper: 7).
        when_full: ``stop`` (default): take no more snapshots, so the pool is the paper's initial model plus the
            first ``pool_size - 1`` snapshots and stays fixed; ``replace_oldest``: a new snapshot replaces the
            oldest one taken during training (the initial model stays), so the pool follows training.
        draw_every_n_steps: optimizer steps per stage. The summaries say "at each stage" without defining a
            stage; the default 1 draws afresh at every optimizer step ``[reconstructed]``.
        seed: names the draws' streams; ``None``: the module's ``seed``.

    Memory: every rank holds the pool on the CPU, ``pool_size`` copies of the adapters (LoRA) or of the whole
    denoiser (full fine-tune). The parameters must be whole on every rank: DDP and DeepSpeed ZeRO-2 work;
    ZeRO-3 and FSDP2 are refused at fit start (docs/guides/checkpoint-replay.md).
    """

    def __init__(
        self,
        every_n_steps: int = 30,
        pool_size: int = 7,
        when_full: WhenFull = "stop",
        draw_every_n_steps: int = 1,
        seed: int | None = None,
    ):
        check_whole_numbers(every_n_steps=every_n_steps, pool_size=pool_size, draw_every_n_steps=draw_every_n_steps)
        if when_full not in ("stop", "replace_oldest"):
            raise ConfigError(f"when_full={when_full!r}: choose 'stop' (the default) or 'replace_oldest'.")
        self.every_n_steps = every_n_steps
        self.pool_size = pool_size
        self.when_full = when_full
        self.draw_every_n_steps = draw_every_n_steps
        self.seed = seed
        #: the pool: CPU snapshots of the trained weights, and the optimizer step each was taken at
        self.snapshots: list[dict[str, Tensor]] = []
        self.snapshot_steps: list[int] = []
        #: the draw of the current stage (its stage, index in the pool and snapshot), and whether this process
        #: has installed it
        self.drawn_stage = -1
        self.drawn_index = -1
        self.drawn: dict[str, Tensor] = {}
        self.installed = False

    # ----------------------------------------------------------------------------------------- checks
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Refuse what cannot replay, then take the initial snapshot (unless a checkpoint restored the pool)."""
        from lightning_pref.methods.base import PreferenceDiffusionModule

        name = type(pl_module).__name__
        if not isinstance(pl_module, PreferenceDiffusionModule):
            raise ConfigError(f"RandomCheckpointReplay replays the reference of a preference method, not of {name}.")
        if pl_module.reference is None:
            raise ConfigError(
                f"RandomCheckpointReplay replaces the reference, and {name} is reference-free: remove the callback, "
                "or use a method with a reference (e.g. SSPO, DiffusionDPO)."
            )
        trained = [param for param in pl_module.parameters() if param.requires_grad]
        if any(hasattr(param, "ds_id") or hasattr(param, "to_local") for param in trained):
            raise ConfigError(
                "RandomCheckpointReplay needs whole trained weights on every rank to snapshot and install them, but "
                f"{type(trainer.strategy).__name__} partitions them (ZeRO-3 or FSDP2): use DDP or DeepSpeed ZeRO-2 "
                "(docs/guides/checkpoint-replay.md)."
            )
        if not self.snapshots:  # (a resumed run's pool was restored before fit start, or is restored after it)
            self.add_snapshot(pl_module.trained_weights(), trainer.global_step)

    # ------------------------------------------------------------------------------------ the pool
    def add_snapshot(self, weights: dict[str, Tensor], step: int) -> None:
        """Put ``weights`` in the pool, as ``when_full`` says once it holds ``pool_size``."""
        if len(self.snapshots) < self.pool_size:
            self.snapshots.append(weights)
            self.snapshot_steps.append(step)
        elif self.when_full == "replace_oldest" and self.pool_size > 1:
            del self.snapshots[1], self.snapshot_steps[1]  # the oldest after the initial model
            self.snapshots.append(weights)
            self.snapshot_steps.append(step)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        stepped = step > self.snapshot_steps[-1]  # once per optimizer step, not per accumulated micro-batch
        if stepped and step % self.every_n_steps == 0:
            self.add_snapshot(pl_module.trained_weights(), step)

    # ----------------------------------------------------------------------------------- the draws
    def stage_of(self, step: int) -> int:
        return step // self.draw_every_n_steps

    @staticmethod
    def draw_index(seed: int, stage: int, pool_size: int) -> int:
        """The snapshot stage ``stage`` draws from a pool of ``pool_size``: uniform, from its own named stream."""
        generator = torch.Generator().manual_seed(stream_seed(seed, "replay", stage))
        return int(torch.randint(pool_size, (1,), generator=generator))

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        stage = self.stage_of(trainer.global_step)
        if stage != self.drawn_stage:
            seed = self.seed if self.seed is not None else pl_module.seed
            self.drawn_stage = stage
            self.drawn_index = self.draw_index(seed, stage, len(self.snapshots))
            self.drawn = self.snapshots[self.drawn_index]
            self.installed = False
        if not self.installed:  # a new draw, or the first batch of a resumed run
            pl_module.reference.install(self.drawn)
            self.installed = True
        if not pl_module.logs_this_step():
            return
        pl_module.log_dict(
            {
                "replay/snapshot": float(self.drawn_index),
                "replay/snapshot_step": float(self.drawn_step()),
                "replay/pool_size": float(len(self.snapshots)),
            },
            on_step=True,
            on_epoch=False,
            batch_size=1,
        )

    def drawn_step(self) -> int:
        """The optimizer step the installed snapshot was taken at (``-1`` once ``replace_oldest`` dropped it)."""
        for index, snapshot in enumerate(self.snapshots):
            if snapshot is self.drawn:
                return self.snapshot_steps[index]
        return -1

    # ------------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Plain tensors and ints: a checkpoint loads with ``weights_only=True``. The installed draw shares its
        tensors with its pool entry, which ``torch.save`` writes once."""
        return {
            "snapshots": self.snapshots,
            "snapshot_steps": self.snapshot_steps,
            "drawn_stage": self.drawn_stage,
            "drawn_index": self.drawn_index,
            "drawn": self.drawn,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.snapshots = [dict(snapshot) for snapshot in state_dict["snapshots"]]
        self.snapshot_steps = list(state_dict["snapshot_steps"])
        self.drawn_stage, self.drawn_index = state_dict["drawn_stage"], state_dict["drawn_index"]
        drawn = state_dict["drawn"]
        in_pool = 0 <= self.drawn_index < len(self.snapshots) and all(
            torch.equal(value, self.snapshots[self.drawn_index][name]) for name, value in drawn.items()
        )
        self.drawn = self.snapshots[self.drawn_index] if in_pool else dict(drawn)
        self.installed = False  # this process's reference is the base model until the next batch reinstalls

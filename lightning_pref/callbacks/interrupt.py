"""SIGTERM (a scheduler's preemption, ``kill``) stops a fit at the end of its step, with a checkpoint."""

from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities.exceptions import SIGTERMException

log = logging.getLogger(__name__)


class SaveOnSigterm(pl.Callback):
    """On SIGTERM, Lightning stops the fit at the end of the running step; this callback then writes
    ``interrupted.ckpt`` (beside the run's other checkpoints), from which ``--ckpt_path`` resumes exactly.

    Should the fit not stop within ``grace_seconds`` of the signal (a wait that never returns), the process
    ends with exit status 143 (128 + SIGTERM), so a signal always stops a run. The method modules add this
    callback by default ([`configure_callbacks`][lightning_pref.methods.base.PreferenceDiffusionModule.configure_callbacks]).

    Args:
        grace_seconds: how long a step may still take after the signal; longer than one training step of
            the model at hand (plus a checkpoint write).
    """

    def __init__(self, grace_seconds: float = 120.0):
        self.grace_seconds = grace_seconds
        self.deadline: threading.Timer | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Put the deadline in front of Lightning's SIGTERM handler. Lightning has registered its handlers by now
        and puts back the ones from before the fit when the fit ends (or fails), so none of this outlives it."""
        previous = signal.getsignal(signal.SIGTERM)

        def start_deadline(signum: int, frame: Any) -> None:
            if self.deadline is None:
                self.deadline = threading.Timer(self.grace_seconds, os._exit, args=(128 + signal.SIGTERM,))
                self.deadline.daemon = True
                self.deadline.start()
            if callable(previous):
                previous(signum, frame)

        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, start_deadline)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException):
            return
        path = self.checkpoint_dir(trainer) / "interrupted.ckpt"
        trainer.save_checkpoint(path)  # every rank calls it, as sharded strategies need
        log.warning(
            "SIGTERM: stopped at step %d and wrote %s (resume with --ckpt_path %s).", trainer.global_step, path, path
        )

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None

    @staticmethod
    def checkpoint_dir(trainer: pl.Trainer) -> Path:
        """The first ModelCheckpoint's folder, else ``<default_root_dir>/checkpoints``."""
        for callback in trainer.checkpoint_callbacks:
            if getattr(callback, "dirpath", None):
                return Path(callback.dirpath)
        return Path(trainer.default_root_dir) / "checkpoints"

"""An exponential moving average of the trained weights, swapped in when training ends."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from lightning_pref.errors import ConfigError


class EMAWeights(pl.Callback):
    """Keeps ``ema = d * ema + (1 - d) * weights`` of the trained parameters after every optimizer step, with
    diffusers' warm-up ``d_n = min(decay, (1 + n) / (10 + n))`` at update ``n`` (the first update copies), and
    replaces the trained weights by the average when training ends (``on_train_end``): what the fit leaves in
    the module (its last samples, an evaluation after it) is the average, which smooths the noise of the last
    updates. The average lives on the CPU, in float32, and is saved in (and restored from) checkpoints.

    Under ZeRO-3 and FSDP2 the parameters are sharded: the callback refuses them.

    Args:
        decay: the largest per-step decay ``d`` (0.99: an average over roughly the last 100 updates).
    """

    def __init__(self, decay: float = 0.99):
        if not 0.0 <= decay < 1.0:
            raise ConfigError(f"decay={decay}: use a decay in [0, 1) (0.99 averages roughly the last 100 updates).")
        self.decay = decay
        self.updates = 0
        self.average: dict[str, Tensor] = {}

    def trained(self, pl_module: pl.LightningModule) -> dict[str, torch.nn.Parameter]:
        return {name: param for name, param in pl_module.named_parameters() if param.requires_grad}

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if any(hasattr(param, "ds_id") or hasattr(param, "to_local") for param in self.trained(pl_module).values()):
            raise ConfigError(
                "EMAWeights needs whole parameters on every rank: use it with DDP or ZeRO-2, not ZeRO-3 or FSDP2."
            )

    @torch.no_grad()
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step == self.updates:  # no optimizer step since the last update (gradient accumulation)
            return
        self.updates = trainer.global_step
        decay = min(self.decay, (1 + self.updates - 1) / (10 + self.updates - 1))
        for name, param in self.trained(pl_module).items():
            value = param.detach().to("cpu", torch.float32)
            if name not in self.average:
                self.average[name] = value.clone()
            else:
                self.average[name].mul_(decay).add_(value, alpha=1 - decay)

    @torch.no_grad()
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for name, param in self.trained(pl_module).items():
            if name in self.average:
                param.copy_(self.average[name].to(param))

    def state_dict(self) -> dict[str, Any]:
        return {"updates": self.updates, "average": self.average}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.updates, self.average = state_dict["updates"], dict(state_dict["average"])

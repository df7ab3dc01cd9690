"""A quiet CPU trainer and a LoRA policy that differs from its reference."""

from __future__ import annotations

import lightning.pytorch as pl
import torch


def trainer(tmp_path, steps, **kwargs) -> pl.Trainer:
    """A CPU trainer for ``steps`` optimizer steps: no logger, checkpoints, progress bar or summary unless asked;
    every step's metrics logged (``callback_metrics`` holds the last step's)."""
    options = dict(
        max_steps=steps,
        log_every_n_steps=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    options.update(kwargs)
    return pl.Trainer(**options)


def perturb_lora(module) -> None:
    """LoRA B starts at zero (policy == reference); give it values so the two differ."""
    with torch.no_grad():
        for name, param in module.denoiser.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)

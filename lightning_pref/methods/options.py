"""The options every method shares, checked once, and what changes when a run resumes with another config."""

from __future__ import annotations

import logging
import math
from typing import Any

from lightning_pref.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)


def check_training_options(
    beta: float,
    lr: float,
    weight_decay: float,
    adam_betas: tuple[float, float],
    warmup_steps: int,
    lora_rank: int,
    lora_alpha: float | None,
    lora_dropout: float,
) -> None:
    """Refuse options that cannot train: a non-positive or non-finite beta (``beta: 0`` learns nothing,
    ``beta: -1000`` trains toward the losers) or learning rate, and the like."""

    def positive(name: str, value: float) -> None:
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ConfigError(f"{name}={value!r}: use a finite number > 0.")

    positive("beta", beta)
    positive("lr", lr)
    if not (math.isfinite(weight_decay) and weight_decay >= 0):
        raise ConfigError(f"weight_decay={weight_decay!r}: use a finite number >= 0.")
    if len(adam_betas) != 2 or not all(0 <= b < 1 for b in adam_betas):
        raise ConfigError(f"adam_betas={adam_betas!r}: use two numbers in [0, 1), e.g. [0.9, 0.999].")
    if warmup_steps < 0:
        raise ConfigError(f"warmup_steps={warmup_steps}: use a number of optimizer steps >= 0.")
    if lora_rank < 1:
        raise ConfigError(f"lora_rank={lora_rank}: use a rank >= 1.")
    if lora_alpha is not None:
        positive("lora_alpha", lora_alpha)
    if not 0 <= lora_dropout < 1:
        raise ConfigError(f"lora_dropout={lora_dropout}: use a probability in [0, 1).")


#: options that decide what the trained tensors are: a resumed run must keep the checkpoint's values
TENSOR_SHAPING_OPTIONS = (
    "finetune",
    "lora_rank",
    "lora_alpha",
    "lora_target_modules",
    "optimizer",
    "user_dim",
    "user_tokens",
    "num_users",
)


def apply_optimizer_options(checkpoint: dict[str, Any], options: dict[str, Any]) -> None:
    """Write the changed ``lr``, ``weight_decay`` or ``betas`` of this run into a checkpoint's optimizer and
    LR-schedule states before Lightning restores them (it would otherwise bring back the old values), keeping
    the schedule's position (the current lr over the base lr). Entries not in ``options`` stay as restored."""
    for state in checkpoint["optimizer_states"]:
        for group in state["param_groups"]:
            position = group["lr"] / group["initial_lr"] if group.get("initial_lr") else 1.0
            group.update({key: value for key, value in options.items() if key in group})
            if "initial_lr" in group and "lr" in options:
                group["initial_lr"], group["lr"] = options["lr"], options["lr"] * position
    if "lr" not in options:
        return
    for schedule in checkpoint.get("lr_schedulers") or []:
        if "base_lrs" in schedule:
            schedule["base_lrs"] = [options["lr"]] * len(schedule["base_lrs"])


def check_resumed_options(saved: dict[str, Any], given: dict[str, Any]) -> set[str]:
    """Refuse to resume with options (``given``) that shape the trained tensors differently from the
    checkpoint's (``saved``); log the other differences, which apply, and return their names."""

    def plain(value: Any) -> Any:
        return list(value) if isinstance(value, (tuple, list)) else value

    changed = {
        key: (saved[key], value)
        for key, value in given.items()
        if key in saved and not key.startswith("_") and plain(saved[key]) != plain(value)
    }
    shaping = {key: pair for key, pair in changed.items() if key in TENSOR_SHAPING_OPTIONS}
    if shaping:
        described = ", ".join(
            f"{key}: {old!r} in the checkpoint, {new!r} in the config" for key, (old, new) in shaping.items()
        )
        raise CheckpointError(
            f"cannot resume: {described}. These options shape the trained tensors: resume with the checkpoint's "
            "values, or start a new run without --ckpt_path."
        )
    for key, (old, new) in changed.items():
        log.info("resuming with %s=%r from the config (the checkpoint trained with %r)", key, new, old)
    return set(changed)


#: the parameter-group entries of the optimizer, and the options they are made from
OPTIMIZER_ENTRIES = {"lr": ("lr", "scale_lr"), "weight_decay": ("weight_decay",), "betas": ("adam_betas",)}


def changed_optimizer_entries(options: dict[str, Any], changed: set[str]) -> dict[str, Any]:
    """The entries of ``options`` (what the optimizer's groups hold) made from options that changed."""
    return {entry: value for entry, value in options.items() if changed & set(OPTIMIZER_ENTRIES[entry])}

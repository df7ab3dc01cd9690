"""The reference model: what the policy is compared with (``p_ref`` of Diffusion-DPO), in one place.

Two kinds, chosen by the fine-tuning mode:

* [`AdaptersDisabled`][lightning_pref.reference.AdaptersDisabled] (LoRA): the policy network itself with its
  adapters switched off. No second copy of the weights, whatever the strategy (under ZeRO-3 and FSDP2 it is the
  sharded policy).
* [`FrozenCopy`][lightning_pref.reference.FrozenCopy] (full fine-tune): a frozen deep copy of the denoiser. It is
  not a submodule of the LightningModule, so it is outside the optimizer and never written to a checkpoint;
  optionally kept on the CPU between its forwards; partitioned under ZeRO-3 and sharded under FSDP2 at fit
  start ([`shard_reference`][lightning_pref.strategies.shard_reference]).

Both answer the two questions every method asks: *predict with the reference*
([`Reference.predict`][lightning_pref.reference.Reference.predict]) and *make these weights the reference*
([`Reference.install`][lightning_pref.reference.Reference.install]): the self-play methods and random checkpoint
replay install a snapshot of earlier trained weights while training. A snapshot holds the trained tensors
only: the adapter weights of a LoRA run (installed as a second, frozen adapter beside the policy's), the
denoiser's weights of a full fine-tune (copied into the frozen copy).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from lightning_pref.backbones.base import Backbone, Conditioning, conditioning_in, parameter_dtype
from lightning_pref.errors import ConfigError


class Reference:
    """Interface of the reference kinds (see the module docstring)."""

    def network(self, device: torch.device) -> contextlib.AbstractContextManager[nn.Module]:
        """The reference network, ready to run on ``device``, for the duration of a ``with`` block."""
        raise NotImplementedError

    @torch.no_grad()
    def predict(self, backbone: Backbone, x_t: Tensor, timesteps: Tensor, conditioning: Conditioning) -> Tensor:
        """The reference's prediction for model timesteps ``timesteps`` (no gradient), with the inputs in the
        reference's dtype (a copy DeepSpeed runs in bfloat16, say)."""
        with self.network(x_t.device) as network:
            dtype = parameter_dtype(network)
            return backbone.predict(network, x_t.to(dtype), timesteps, conditioning_in(conditioning, dtype))

    def install(self, weights: dict[str, Tensor]) -> None:
        """Make ``weights`` (a snapshot of the policy's trained tensors, named as in the denoiser's state dict)
        the reference's."""
        raise NotImplementedError

    # What a frozen copy needs from its module; nothing for the adapters-off kind.
    def apply(self, fn: Callable[[Tensor], Tensor]) -> None:
        """Follow the module's device and dtype moves."""

    def shard(self, strategy: Any, mesh: Any) -> None:
        """Partition the reference the way the strategy shards the policy (ZeRO-3, FSDP2)."""


class AdaptersDisabled(Reference):
    """LoRA: the policy's denoiser with its adapters disabled, or, once a snapshot is installed, with only the
    frozen ``reference`` adapter holding the snapshot's weights active."""

    SNAPSHOT_ADAPTER = "reference"

    def __init__(self, denoiser: nn.Module, adapter_config: Any):
        from peft.tuners.tuners_utils import BaseTunerLayer

        self.denoiser = denoiser
        self.adapter_config = adapter_config
        self.has_snapshot = False
        # The adapted layers, found once: switching them directly costs a quarter of the model-wide
        # `disable_adapters()` / `enable_adapters()`, which walk every module (and check peft's version) each call.
        self.adapter_layers = [module for module in denoiser.modules() if isinstance(module, BaseTunerLayer)]

    @contextlib.contextmanager
    def network(self, device: torch.device) -> Iterator[nn.Module]:
        if self.has_snapshot:
            self.set_active_adapter(self.SNAPSHOT_ADAPTER)
            try:
                yield self.denoiser
            finally:
                self.set_active_adapter("default")  # (peft re-enables training of the policy's adapter only)
            return
        self.enable_adapters(False)
        try:
            yield self.denoiser
        finally:
            self.enable_adapters(True)

    def enable_adapters(self, enabled: bool) -> None:
        for layer in self.adapter_layers:
            layer.enable_adapters(enabled)

    def set_active_adapter(self, name: str) -> None:
        for layer in self.adapter_layers:
            layer.set_adapter(name)

    def install(self, weights: dict[str, Tensor]) -> None:
        """``weights``: the policy's adapter tensors (names holding ``.default``), as a snapshot takes them."""
        if not self.has_snapshot:
            self.denoiser.add_adapter(copy.deepcopy(self.adapter_config), adapter_name=self.SNAPSHOT_ADAPTER)
            self.set_active_adapter("default")
            self.has_snapshot = True
        snapshot_params = dict(self.denoiser.named_parameters())
        with torch.no_grad():
            for name, value in weights.items():
                target = snapshot_params[name.replace(".default.", f".{self.SNAPSHOT_ADAPTER}.")]
                target.requires_grad_(False)
                target.copy_(value)


class FrozenCopy(Reference):
    """Full fine-tune: a frozen deep copy of the denoiser (see the module docstring).

    Args:
        denoiser: the policy's denoiser at the start of training.
        offload: keep the copy on the CPU between its forwards.
    """

    def __init__(self, denoiser: nn.Module, offload: bool = False):
        self.copy = copy.deepcopy(denoiser).requires_grad_(False).eval()
        self.offload = offload
        self.sharded = False

    @contextlib.contextmanager
    def network(self, device: torch.device) -> Iterator[nn.Module]:
        if not self.offload:
            yield self.copy
            return
        self.copy.to(device)
        try:
            yield self.copy
        finally:
            self.copy.to("cpu")

    def apply(self, fn: Callable[[Tensor], Tensor]) -> None:
        if not (
            self.offload or self.sharded
        ):  # an offloaded copy lives on the CPU; a sharded one is placed by its strategy
            self.copy._apply(fn)

    def shard(self, strategy: Any, mesh: Any) -> None:
        from lightning_pref.strategies import engine_dtype, shard_reference

        if self.sharded:
            return
        sharded = shard_reference(self.copy, strategy, mesh)
        if sharded is None:  # replicated; under DeepSpeed in the engine's dtype, like the policy's forward
            dtype = engine_dtype(strategy)
            if dtype is not None and not self.offload:
                self.copy.to(dtype)
            return
        if self.offload:
            raise ConfigError(
                "reference_offload=True moves the whole reference between devices, which a sharded reference "
                f"cannot do under {type(strategy).__name__}: remove reference_offload and use the strategy's "
                "parameter offload (examples/strategies/zero3_offload.yaml) instead."
            )
        self.copy, self.sharded = sharded, True

    def install(self, weights: dict[str, Tensor]) -> None:
        if self.sharded:
            raise ConfigError(
                "installing earlier weights into a reference partitioned by ZeRO-3 or FSDP2 is not supported: train "
                "with LoRA (the snapshot is a second adapter of the sharded policy), or with DDP / ZeRO-2."
            )
        self.copy.load_state_dict(weights, strict=True)

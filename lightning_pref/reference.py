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

A third component holds *other versions of the policy* rather than the reference:
[`EMACopies`][lightning_pref.reference.EMACopies], exponential moving averages of the trained weights that one can
predict with (Adaptive-DPO's "annotators"), as extra frozen adapters (LoRA) or frozen copies (full).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_pref.backbones.base import Backbone, Conditioning, conditioning_in, parameter_dtype
from lightning_pref.errors import CheckpointError, ConfigError


def predict_with(
    network: nn.Module, backbone: Backbone, x_t: Tensor, timesteps: Tensor, conditioning: Conditioning
) -> Tensor:
    """``network``'s prediction through ``backbone``, with the inputs in the network's dtype."""
    dtype = parameter_dtype(network)
    return backbone.predict(network, x_t.to(dtype), timesteps, conditioning_in(conditioning, dtype))


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
            return predict_with(network, backbone, x_t, timesteps, conditioning)

    def install(self, weights: dict[str, Tensor]) -> None:
        """Make ``weights`` (a snapshot of the policy's trained tensors, named as in the denoiser's state dict)
        the reference's."""
        raise NotImplementedError

    # What a frozen copy needs from its module; nothing for the adapters-off kind.
    def apply(self, fn: Callable[[Tensor], Tensor]) -> None:
        """Follow the module's device and dtype moves."""

    def shard(self, strategy: Any, mesh: Any) -> None:
        """Partition the reference the way the strategy shards the policy (ZeRO-3, FSDP2)."""


#: the name of the policy's own (trained) LoRA adapter
POLICY_ADAPTER = "default"


def adapted_layers(denoiser: nn.Module) -> list[nn.Module]:
    """The layers of ``denoiser`` that hold adapters. Found once: switching them directly costs a quarter of the
    model-wide ``disable_adapters()`` / ``enable_adapters()``, which walk every module (and check peft's version)
    each call."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [module for module in denoiser.modules() if isinstance(module, BaseTunerLayer)]


def set_active_adapter(layers: list[nn.Module], name: str) -> None:
    """Make adapter ``name`` the one ``layers`` run (peft makes it the trainable one, the others frozen)."""
    for layer in layers:
        layer.set_adapter(name)


def adapter_tensor_name(policy_name: str, adapter: str) -> str:
    """The name of adapter ``adapter``'s tensor that sits where the policy's tensor ``policy_name`` does."""
    return policy_name.replace(f".{POLICY_ADAPTER}.", f".{adapter}.")


class AdaptersDisabled(Reference):
    """LoRA: the policy's denoiser with its adapters disabled, or, once a snapshot is installed, with only the
    frozen ``reference`` adapter holding the snapshot's weights active."""

    SNAPSHOT_ADAPTER = "reference"

    def __init__(self, denoiser: nn.Module, adapter_config: Any):
        self.denoiser = denoiser
        self.adapter_config = adapter_config
        self.has_snapshot = False
        self.adapter_layers = adapted_layers(denoiser)

    @contextlib.contextmanager
    def network(self, device: torch.device) -> Iterator[nn.Module]:
        if self.has_snapshot:
            self.set_active_adapter(self.SNAPSHOT_ADAPTER)
            try:
                yield self.denoiser
            finally:
                self.set_active_adapter(POLICY_ADAPTER)  # (peft re-enables training of the policy's adapter only)
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
        set_active_adapter(self.adapter_layers, name)

    def install(self, weights: dict[str, Tensor]) -> None:
        """``weights``: the policy's adapter tensors (names holding ``.default``), as a snapshot takes them."""
        if not self.has_snapshot:
            self.denoiser.add_adapter(copy.deepcopy(self.adapter_config), adapter_name=self.SNAPSHOT_ADAPTER)
            self.set_active_adapter(POLICY_ADAPTER)
            self.has_snapshot = True
        snapshot_params = dict(self.denoiser.named_parameters())
        with torch.no_grad():
            for name, value in weights.items():
                target = snapshot_params[adapter_tensor_name(name, self.SNAPSHOT_ADAPTER)]
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


def check_ema_decays(decays: Sequence[float], option: str = "decays") -> None:
    """Raise a ``ConfigError`` naming ``option`` unless ``decays`` is one or more numbers in [0, 1).

    Example:
        >>> check_ema_decays([1.0], "annotator_decays")
        Traceback (most recent call last):
        lightning_pref.errors.ConfigError: annotator_decays=[1.0]: give one or more EMA decays in [0, 1), e.g. [0.9999, 0.5].
    """
    numbers = isinstance(decays, (list, tuple)) and all(isinstance(d, (int, float)) for d in decays)
    if not numbers or not decays or not all(0.0 <= decay < 1.0 for decay in decays):
        raise ConfigError(
            f"{option}={list(decays) if isinstance(decays, (list, tuple)) else decays!r}: give one or more EMA "
            "decays in [0, 1), e.g. [0.9999, 0.5]."
        )


class EMACopies:
    """Exponential moving averages of the policy's trained weights, each a network to predict with: the EMA
    "annotators" of Adaptive-DPO (Zhang et al., arXiv 2503.16921; METHODS.md section 5, ``[code]``).

    Where average ``i`` lives:

    * LoRA: only the adapter tensors are averaged. Average ``i`` is a frozen adapter ``ema_{i}`` beside the
      policy's ``default`` one, as [`AdaptersDisabled.install`][lightning_pref.reference.AdaptersDisabled.install]
      installs a snapshot, and is switched on for its own forwards only. No copy of the base weights.
    * Full fine-tune: average ``i`` is a frozen copy of the denoiser. Like
      [`FrozenCopy`][lightning_pref.reference.FrozenCopy], it is outside the optimizer and the module's state dict.

    [`update`][lightning_pref.reference.EMACopies.update] runs after every optimizer step. It moves each average
    toward the policy's current trained weights, ``ema = d * ema + (1 - d) * weights``, on diffusers' ``EMAModel``
    schedule: after ``n`` earlier updates ``d = min(decay, (1 + n) / (10 + n))``, except that the first update
    (``n = 0``) copies. Before that first update, every average equals the policy it was made from.

    The averages stay in float32 whatever the run's precision, since a decay of 0.9999 moves a weight by 1e-4 of
    its distance, below bfloat16's resolution: ``apply`` casts them back after the module's dtype moves, and
    [`keep_float32`][lightning_pref.reference.EMACopies.keep_float32] after a strategy's cast at fit start.
    ``state_dict()`` holds plain CPU tensors and ints named as the policy's trained tensors, so a checkpoint
    loads with ``weights_only=True``, and a resumed run continues the same averages.

    Strategies: one process, DDP and DeepSpeed ZeRO-2 work, since every rank averages the same whole weights.
    ZeRO-3 and FSDP2 partition the trained weights:
    [`check_strategy`][lightning_pref.reference.EMACopies.check_strategy] refuses them at fit start.

    Args:
        denoiser: the policy's denoiser, with its LoRA adapter ``default`` when ``lora``. Its trainable
            parameters at this call are the tensors averaged.
        decays: one average per decay (Adaptive-DPO: 0.9999 and 0.5).
        lora: whether the trained tensors are adapter tensors (else the whole denoiser's parameters).
    """

    def __init__(self, denoiser: nn.Module, decays: Sequence[float] = (0.9999, 0.5), lora: bool = True):
        check_ema_decays(decays)
        self.denoiser = denoiser
        self.decays = tuple(float(decay) for decay in decays)
        self.lora = lora
        #: optimizer steps averaged so far
        self.updates = 0
        #: the averaged tensors, by their names in the policy's denoiser
        self.names = [name for name, param in denoiser.named_parameters() if param.requires_grad]
        self.adapter_names = [f"ema_{index}" for index in range(len(self.decays))] if lora else []
        self.copies: list[nn.Module] = []
        if lora:
            self.adapter_layers = adapted_layers(denoiser)
            config = denoiser.peft_config[POLICY_ADAPTER]
            with torch.random.fork_rng(devices=[]):  # a new adapter's random init leaves the global stream alone
                for name in self.adapter_names:
                    denoiser.add_adapter(copy.deepcopy(config), adapter_name=name)
            set_active_adapter(self.adapter_layers, POLICY_ADAPTER)
        else:
            self.copies = [copy.deepcopy(denoiser).requires_grad_(False).eval() for _ in self.decays]
        self.keep_float32()
        policy = dict(denoiser.named_parameters())
        with torch.no_grad():
            for index in range(len(self.decays)):
                for name, tensor in self.averages(index).items():
                    tensor.copy_(policy[name])

    def averages(self, index: int) -> dict[str, nn.Parameter]:
        """Average ``index``'s tensors, by the names of the policy's tensors they average."""
        if self.lora:
            params = dict(self.denoiser.named_parameters())
            return {name: params[adapter_tensor_name(name, self.adapter_names[index])] for name in self.names}
        params = dict(self.copies[index].named_parameters())
        return {name: params[name] for name in self.names}

    @staticmethod
    def decay_at(decay: float, updates: int) -> float:
        """The decay of the update that follows ``updates`` earlier ones: 0 (a copy) for the first, then
        ``min(decay, (1 + updates) / (10 + updates))``.

        Example:
            >>> [round(EMACopies.decay_at(0.5, n), 4) for n in range(4)], EMACopies.decay_at(0.5, 20)
            ([0.0, 0.1818, 0.25, 0.3077], 0.5)
        """
        return 0.0 if updates == 0 else min(decay, (1 + updates) / (10 + updates))

    @torch.no_grad()
    def update(self) -> None:
        """Move every average toward the policy's current trained weights (call once per optimizer step)."""
        policy = dict(self.denoiser.named_parameters())
        for index, decay in enumerate(self.decays):
            kept = self.decay_at(decay, self.updates)
            for name, tensor in self.averages(index).items():
                tensor.mul_(kept).add_(policy[name].detach().to(tensor), alpha=1 - kept)
        self.updates += 1

    @contextlib.contextmanager
    def network(self, index: int) -> Iterator[nn.Module]:
        """The network of average ``index``, for the duration of a ``with`` block."""
        if not self.lora:
            yield self.copies[index]
            return
        set_active_adapter(self.adapter_layers, self.adapter_names[index])
        try:
            yield self.denoiser
        finally:
            set_active_adapter(self.adapter_layers, POLICY_ADAPTER)

    @torch.no_grad()
    def predict(
        self, index: int, backbone: Backbone, x_t: Tensor, timesteps: Tensor, conditioning: Conditioning
    ) -> Tensor:
        """Average ``index``'s prediction for model timesteps ``timesteps`` (no gradient)."""
        with self.network(index) as network:
            return predict_with(network, backbone, x_t, timesteps, conditioning)

    def apply(self, fn: Callable[[Tensor], Tensor]) -> None:
        """Follow the module's device moves (the adapters move with the module), keeping the averages float32."""
        for network in self.copies:
            network._apply(fn)
        self.keep_float32()

    def keep_float32(self) -> None:
        """Cast back to float32 the averages a dtype move or a strategy cast (DeepSpeed's bfloat16 engine casts
        every parameter of the module it wraps, the adapters of the averages too)."""
        for network in self.copies:
            network.float()
        for index in range(len(self.adapter_names)):
            for tensor in self.averages(index).values():
                if tensor.dtype != torch.float32:
                    tensor.data = tensor.data.float()

    def check_strategy(self) -> None:
        """Refuse a strategy that partitions the trained weights (ZeRO-3, FSDP2): each rank needs them whole."""
        trained = [param for param in self.denoiser.parameters() if param.requires_grad]
        if any(hasattr(param, "ds_id") or hasattr(param, "to_local") for param in trained):
            raise ConfigError(
                "the EMA annotators need the whole trained weights on every rank, but the strategy partitions them "
                "(ZeRO-3 or FSDP2): use DDP or DeepSpeed ZeRO-2."
            )

    def state_dict(self) -> dict[str, Any]:
        """``{"updates", "decays", "averages"}``: the averages as CPU float32 tensors named as the policy's."""
        return {
            "updates": self.updates,
            "decays": list(self.decays),
            "averages": [
                {name: tensor.detach().to("cpu", copy=True) for name, tensor in self.averages(index).items()}
                for index in range(len(self.decays))
            ],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if list(state["decays"]) != list(self.decays):
            raise CheckpointError(
                f"the checkpoint's EMA annotators have decays {list(state['decays'])}, this run's "
                f"{list(self.decays)}: resume with the checkpoint's annotator_decays, or start a new run."
            )
        for index, saved in enumerate(state["averages"]):
            averages = self.averages(index)
            if set(saved) != set(averages):
                raise CheckpointError(
                    "the checkpoint's EMA annotators average other tensors than this run trains: it was written "
                    "by a different configuration (finetune, LoRA rank or target modules). Resume with that one."
                )
            with torch.no_grad():
                for name, tensor in averages.items():
                    tensor.copy_(saved[name])
        self.updates = int(state["updates"])

"""Sharded training: DeepSpeed ZeRO-2/3 and FSDP2, with the frozen reference model handled deliberately.

The trained weights are sharded by the strategy, as usual. The frozen *reference* of a full fine-tune is the
part that silently costs a whole extra model per GPU if nobody takes care of it (it is not a submodule, so no
strategy sees it). ``shard_reference`` decides what happens to it under each strategy:

* DDP and ZeRO-2: replicated, as every weight is (``reference_offload=True`` moves it to the CPU instead);
* ZeRO-3: partitioned across ranks by a second, optimizer-free DeepSpeed engine with the same ZeRO-3 settings
  (parameter offload included), so each rank holds ``1/N`` of it;
* FSDP2: sharded with ``fully_shard`` like the policy, and all-gathered per block during its forward.

With LoRA there is no copy: the reference is the sharded policy with its adapters disabled.

Both strategy classes here load checkpoints (``fit`` / ``validate --ckpt_path``) as plain data: a pickle that
would run code is refused ([`lightning_pref.checkpoints`][lightning_pref.checkpoints]) unless ``trust_pickled_checkpoint=True``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch.accelerators import CUDAAccelerator
from lightning.pytorch.strategies import DeepSpeedStrategy as LightningDeepSpeedStrategy
from lightning.pytorch.strategies import ModelParallelStrategy as LightningModelParallelStrategy
from torch import Tensor, nn

from lightning_pref import checkpoints

#: How a refusal names the opt-in of the strategies below.
STRATEGY_OPT_IN = "the strategy's trust_pickled_checkpoint=True (trainer.strategy.init_args)"


def mean_across_ranks(value: Tensor) -> Tensor:
    """The mean of a scalar over all processes (itself when not distributed)."""
    if dist.is_available() and dist.is_initialized():
        value = value.detach().clone()
        dist.all_reduce(value)
        value = value / dist.get_world_size()
    return value


class PlainDataCheckpointLoading:
    """Mixin for a Lightning strategy: ``load_checkpoint`` first opens every pickled part of the checkpoint as
    plain data (a one-line refusal otherwise), then lets Lightning load it with DeepSpeed's and
    ``torch.distributed.checkpoint``'s loads kept to plain data too. ``trust_pickled_checkpoint`` restores
    Lightning's unrestricted loading, for checkpoints your own runs wrote."""

    trust_pickled_checkpoint: bool

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        path, trusted = Path(checkpoint_path), self.trust_pickled_checkpoint
        checkpoints.check_readable(path, trusted, STRATEGY_OPT_IN)
        with checkpoints.loading(path, trusted, STRATEGY_OPT_IN):
            return super().load_checkpoint(checkpoint_path, weights_only if trusted else True)


class DeepSpeedStrategy(PlainDataCheckpointLoading, LightningDeepSpeedStrategy):
    """Lightning's DeepSpeed strategy, which also runs on CPU processes (gloo), saves trained weights only, and
    loads ZeRO checkpoints as plain data.

    On GPUs it is Lightning's ``DeepSpeedStrategy`` otherwise unchanged. On CPU (tests, this project's CI) it
    skips the two CUDA-only checks and tells DeepSpeed which rank owns which process.
    ``exclude_frozen_parameters`` defaults to ``True``: frozen encoders, VAE and the LoRA base reload from the
    backbone, so checkpoints hold what was trained. The presets in ``examples/strategies/`` set ``stage`` and the
    offload switches::

        lightning-pref fit --config examples/sd15_diffusion_dpo.yaml --config examples/strategies/zero3.yaml
    """

    def __init__(
        self, *args: Any, exclude_frozen_parameters: bool = True, trust_pickled_checkpoint: bool = False, **kwargs: Any
    ):
        super().__init__(*args, exclude_frozen_parameters=exclude_frozen_parameters, **kwargs)
        self.trust_pickled_checkpoint = trust_pickled_checkpoint

    @property
    def on_cpu(self) -> bool:
        return not isinstance(self.accelerator, CUDAAccelerator)

    def setup_environment(self) -> None:
        if not self.on_cpu:
            return super().setup_environment()
        # Lightning's check refuses anything but CUDA; the rest of the set-up is the parent's parent's.
        super(LightningDeepSpeedStrategy, self).setup_environment()

    def setup_distributed(self) -> None:
        if not self.on_cpu:
            return super().setup_distributed()
        from lightning.fabric.utilities.seed import reset_seed

        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    def _setup_model_and_optimizer(self, model, optimizer, lr_scheduler=None):
        if self.zero_stage_3:
            mark_frozen_encoders_as_leaves(self.lightning_module)
        if self.on_cpu:
            import deepspeed

            engine, deepspeed_optimizer, _, _ = deepspeed.initialize(
                args=argparse.Namespace(device_rank=self.local_rank),
                config=self.config,
                model=model,
                model_parameters=[p for p in model.parameters() if p.requires_grad],
                optimizer=optimizer,
                lr_scheduler=lr_scheduler,
                dist_init_required=False,
            )
        else:
            engine, deepspeed_optimizer = super()._setup_model_and_optimizer(model, optimizer, lr_scheduler)
        if self.zero_stage_3:
            keep_frozen_encoders_whole(self.lightning_module)
        return engine, deepspeed_optimizer

    def reference_engine(self, reference: nn.Module) -> nn.Module:
        """``reference`` partitioned by an optimizer-free ZeRO-3 engine with this run's ZeRO-3 settings."""
        import deepspeed

        zero = dict(self.config["zero_optimization"])
        zero.pop("offload_optimizer", None)  # no optimizer: only the parameter placement matters
        config = {
            "train_micro_batch_size_per_gpu": self.config.get("train_micro_batch_size_per_gpu", 1),
            "zero_optimization": zero,
            **{key: self.config[key] for key in ("bf16", "fp16") if key in self.config},
        }
        device_rank = self.local_rank if self.on_cpu else self.root_device.index
        engine, *_ = deepspeed.initialize(
            args=argparse.Namespace(device_rank=device_rank), model=reference, config=config, dist_init_required=False
        )
        engine.eval()  # (DeepSpeedEngine.train returns None, so no chaining)
        return engine


class ModelParallelStrategy(PlainDataCheckpointLoading, LightningModelParallelStrategy):
    """Lightning's ``ModelParallelStrategy`` (FSDP2), which loads distributed checkpoints as plain data
    (``.metadata`` through a restricted unpickler, every other pickle weights-only). The ``fsdp2`` preset names it."""

    def __init__(self, *args: Any, trust_pickled_checkpoint: bool = False, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.trust_pickled_checkpoint = trust_pickled_checkpoint


def frozen_encoders(module: nn.Module) -> list[nn.Module]:
    """The backbone's frozen parts besides the denoiser: text encoders and VAE."""
    backbone = getattr(module, "backbone", None)
    return [
        part
        for name, part in (backbone.named_children() if backbone is not None else ())
        if name != "denoiser" and not any(p.requires_grad for p in part.parameters())
    ]


def mark_frozen_encoders_as_leaves(module: nn.Module) -> None:
    """Before ZeRO-3 wraps the module: make each frozen encoder one ZeRO-3 *leaf*, whose parameters are fetched
    all together when it is called (CLIP reads a child's weight shape before calling it), and whose inside
    registers no fetch or release hooks (the VAE is entered through ``encode``/``decode``, not ``forward``)."""
    from deepspeed.utils import set_z3_leaf_module

    for part in frozen_encoders(module):
        set_z3_leaf_module(part, True)


def keep_frozen_encoders_whole(module: nn.Module) -> None:
    """After ZeRO-3 wrapped the module: gather the frozen encoders once and keep them whole on every rank.

    As in diffusers' training scripts, the encoders are replicated; precomputed latents and embeddings
    (``lightning-pref data precompute``) keep them out of the training process altogether.
    """
    for part in frozen_encoders(module):
        params = list(part.parameters())
        if params and hasattr(params[0], "ds_id"):
            params[0].all_gather(param_list=params)
            for param in params:
                param.ds_persist = True


def shard_reference(reference: nn.Module, strategy: Any, mesh: Any = None) -> nn.Module | None:
    """The reference copy as ``strategy`` should hold it (see the module docstring), or ``None`` when the
    strategy does not shard parameters and the plain copy stays as it is."""
    if isinstance(strategy, LightningDeepSpeedStrategy) and strategy.zero_stage_3:
        if not isinstance(strategy, DeepSpeedStrategy):
            raise TypeError(
                "Under ZeRO-3 the frozen reference must be partitioned too: use "
                "lightning_pref.strategies.DeepSpeedStrategy (class_path) instead of Lightning's DeepSpeedStrategy."
            )
        return strategy.reference_engine(reference)
    if isinstance(strategy, LightningModelParallelStrategy):
        return fully_shard_blocks(reference, mesh)
    return None


def engine_dtype(strategy: Any) -> torch.dtype | None:
    """The dtype DeepSpeed runs the module's weights in (its config's ``bf16`` or ``fp16``), else ``None``: a
    replicated frozen reference (ZeRO-2) must run in it too, as its inputs do."""
    if not isinstance(strategy, LightningDeepSpeedStrategy):
        return None
    config = strategy.config or {}
    for key, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        if (config.get(key) or {}).get("enabled"):
            return dtype
    return None


def fully_shard_blocks(denoiser: nn.Module, mesh: Any) -> nn.Module:
    """FSDP2: shard each transformer / UNet block of ``denoiser`` on its own, then the rest at the root.

    Per-block units keep only one block's full weights gathered at a time during forward and backward.
    """
    from torch.distributed.fsdp import fully_shard

    for block in transformer_blocks(denoiser):
        fully_shard(block, mesh=mesh)
    fully_shard(denoiser, mesh=mesh)
    return denoiser


def transformer_blocks(denoiser: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a diffusers denoiser: ``transformer_blocks`` / ``blocks`` (DiT, CogVideoX, Wan,
    SD3, FLUX's ``single_transformer_blocks`` too) or a UNet's down / mid / up blocks."""
    blocks: list[nn.Module] = []
    for name in ("transformer_blocks", "single_transformer_blocks", "blocks", "down_blocks", "up_blocks"):
        blocks.extend(getattr(denoiser, name, None) or [])
    if getattr(denoiser, "mid_block", None) is not None:
        blocks.append(denoiser.mid_block)
    return blocks

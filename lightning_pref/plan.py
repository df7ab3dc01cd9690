"""``lightning-pref plan``: per-GPU memory of preference training for a big diffusers backbone.

    lightning-pref plan --model cogvideox-5b --gpus 8 --nodes 1 --finetune full --strategy zero3
    lightning-pref plan                                  # every preset x lora/full x every strategy, 8 GPUs
    lightning-pref plan --config my_model/transformer/config.json --finetune lora

Every number comes from the architecture, built on the meta device (no memory is allocated, even for 14B):

* parameters: counted on the diffusers transformer built from its ``transformer/config.json``; LoRA's
  trainable parameters are counted on the same meta model after peft adds the adapters;
* model states of the *trained* parameters: DeepSpeed's own estimators
  (``estimate_zero2_model_states_mem_needs``, ``estimate_zero3_model_states_mem_needs``: bf16 weights plus
  18 bytes/param of gradients, fp32 master weights and Adam moments, partitioned as the stage says). DDP
  partitions nothing: ZeRO-2's accounting on one GPU, ``20 bytes x trained``;
* frozen weights (the LoRA base) and the frozen reference of a full fine-tune: ``2 bytes x params``,
  replicated under DDP and ZeRO-2, ``2 x params / N + 2 x largest layer`` under ZeRO-3, and only the
  gathered layer ``2 x largest layer`` on the GPU under ZeRO-3 with parameter offload;
* activations of one micro-batch with gradient checkpointing, measured by one forward on the meta device
  at the real token count, recording every tensor autograd saves for backward (attention counted as a
  fused flash kernel saves it: ``q, k, v``, the output and an fp32 log-sum-exp). Checkpointing keeps each
  block's inputs; the backward recomputes one block at a time; the rest of the network is not
  checkpointed. So ``activations = block inputs (all blocks) + one block's saved tensors + the saved
  tensors outside the blocks``. A DPO micro-batch is ``[winners; losers]``: twice the samples of SFT.
  The reference forward runs under ``no_grad`` between the policy's forward and backward: its working
  set is transient and smaller than one recomputed block, so it does not raise the peak.

Not counted: the text encoder and VAE (latents and prompt embeddings precomputed with
``lightning-pref data precompute``), the CUDA context, communication buckets and allocator fragmentation.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from lightning_pref.backbones import CogVideoXBackbone, WanBackbone
from lightning_pref.backbones.video import TextToVideoBackbone, VideoShape
from lightning_pref.errors import ConfigError

GIB = 2**30
STRATEGIES = ("ddp", "zero2", "zero2_offload", "zero3", "zero3_offload")
FINETUNES = ("lora", "full")
OBJECTIVES = ("dpo", "sft")
LORA_TARGETS = TextToVideoBackbone.lora_target_modules  # CogVideoX's and Wan2.1's

# The transformers' diffusers configs, the values of each model's published `transformer/config.json`
# (THUDM/CogVideoX-2b, THUDM/CogVideoX-5b, Wan-AI/Wan2.1-T2V-1.3B-Diffusers, Wan-AI/Wan2.1-T2V-14B-Diffusers),
# written here so that planning needs no download.
_COGVIDEOX = {
    "_class_name": "CogVideoXTransformer3DModel",
    "activation_fn": "gelu-approximate",
    "attention_bias": True,
    "attention_head_dim": 64,
    "dropout": 0.0,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 16,
    "max_text_seq_length": 226,
    "norm_elementwise_affine": True,
    "norm_eps": 1e-05,
    "out_channels": 16,
    "patch_size": 2,
    "sample_frames": 49,
    "sample_height": 60,
    "sample_width": 90,
    "spatial_interpolation_scale": 1.875,
    "temporal_compression_ratio": 4,
    "temporal_interpolation_scale": 1.0,
    "text_embed_dim": 4096,
    "time_embed_dim": 512,
    "timestep_activation_fn": "silu",
}
_WAN = {
    "_class_name": "WanTransformer3DModel",
    "added_kv_proj_dim": None,
    "attention_head_dim": 128,
    "cross_attn_norm": True,
    "eps": 1e-06,
    "freq_dim": 256,
    "image_dim": None,
    "in_channels": 16,
    "out_channels": 16,
    "patch_size": [1, 2, 2],
    "qk_norm": "rms_norm_across_heads",
    "rope_max_seq_len": 1024,
    "text_dim": 4096,
}
# FLUX.1-dev's transformer/config.json (black-forest-labs/FLUX.1-dev): 19 double-stream and 38 single-stream blocks
# of 24 heads x 128, on 2x2-packed latents (64 channels per token), T5 states 4096 wide, CLIP's pooled 768.
_FLUX_DEV = {
    "_class_name": "FluxTransformer2DModel",
    "attention_head_dim": 128,
    "axes_dims_rope": [16, 56, 56],
    "guidance_embeds": True,
    "in_channels": 64,
    "joint_attention_dim": 4096,
    "num_attention_heads": 24,
    "num_layers": 19,
    "num_single_layers": 38,
    "patch_size": 1,
    "pooled_projection_dim": 768,
}
PRESETS: dict[str, dict[str, Any]] = {
    "cogvideox-2b": {
        **_COGVIDEOX,
        "num_attention_heads": 30,
        "num_layers": 30,
        "use_rotary_positional_embeddings": False,
    },
    "cogvideox-5b": {
        **_COGVIDEOX,
        "num_attention_heads": 48,
        "num_layers": 42,
        "use_rotary_positional_embeddings": True,
    },
    "wan2.1-1.3b": {**_WAN, "num_attention_heads": 12, "num_layers": 30, "ffn_dim": 8960},
    "wan2.1-14b": {**_WAN, "num_attention_heads": 40, "num_layers": 40, "ffn_dim": 13824},
    # Wan-AI/Wan2.2-TI2V-5B-Diffusers transformer/config.json: 48 latent channels (the Wan2.2 VAE), 30 layers of
    # 24 heads x 128 (Wan2.2's wan/configs/wan_ti2v_5B.py: dim 3072, ffn_dim 14336, num_layers 30)
    "wan2.2-ti2v-5b": {
        **_WAN,
        "in_channels": 48,
        "out_channels": 48,
        "num_attention_heads": 24,
        "num_layers": 30,
        "ffn_dim": 14336,
    },
    # Wan-AI/Wan2.2-T2V-A14B-Diffusers: two experts, transformer/ (high noise) and transformer_2/ (low noise,
    # below boundary_ratio 0.875 of the schedule), each with Wan2.1-T2V-14B's config. The plan is for ONE expert:
    # one run trains one expert on its own timestep range, its reference being that expert (adapters disabled, or
    # its frozen copy); the other expert is not loaded.
    "wan2.2-a14b": {**_WAN, "num_attention_heads": 40, "num_layers": 40, "ffn_dim": 13824},
    "flux.1-dev": _FLUX_DEV,
}


# ------------------------------------------------------------------------------------------ the denoiser
def load_config(path: str) -> dict[str, Any]:
    """A diffusers ``config.json``; errors name ``--config``."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"--config {path}: no such file (give a diffusers transformer/config.json)")
    try:
        config = json.loads(file.read_text())
    except json.JSONDecodeError as error:
        raise ConfigError(f"--config {path}: not JSON ({error})") from None
    if not isinstance(config, dict) or "_class_name" not in config:
        raise ConfigError(f"--config {path}: no '_class_name' (give a diffusers model's config.json)")
    return config


def preset_config(name: str) -> dict[str, Any]:
    if name not in PRESETS:
        raise ConfigError(f"--model {name!r}: unknown; choose from {', '.join(PRESETS)}, or pass --config")
    return PRESETS[name]


def to_training_dtype(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """``dtype`` weights, except those diffusers keeps in fp32 (``_keep_in_fp32_modules``), as
    ``from_pretrained(..., torch_dtype=dtype)`` loads them."""
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or ())
    for module_name, module in model.named_modules():
        for table in (module._parameters, module._buffers):
            for name, tensor in table.items():
                if tensor is None or not tensor.is_floating_point():
                    continue
                kept = keep & set(f"{module_name}.{name}".split("."))
                cast = tensor.detach().to(torch.float32 if kept else dtype)
                table[name] = nn.Parameter(cast, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else cast
    return model


def build_on_meta(config: dict[str, Any], dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """The diffusers model of ``config['_class_name']``, on the meta device, with ``dtype`` weights."""
    import diffusers

    model_class = getattr(diffusers, config["_class_name"], None)
    if not (isinstance(model_class, type) and issubclass(model_class, diffusers.ModelMixin)):
        raise ConfigError(f"--config: _class_name {config['_class_name']!r} is not a diffusers model class")
    with torch.device("meta"):
        model = model_class.from_config(config)
    return to_training_dtype(model, dtype).train()


def add_lora(model: nn.Module, rank: int, targets: tuple[str, ...]) -> nn.Module:
    """Freeze ``model`` and add peft LoRA adapters of ``rank`` on ``targets``, on the meta device, in the dtype
    of the model's weights (DeepSpeed's accounting: half-precision weights, fp32 master copies in the optimizer)."""
    from peft import LoraConfig

    model.requires_grad_(False)
    with torch.device("meta"):
        model.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(targets)))
    return to_training_dtype(model, model.dtype)


def parameter_counts(model: nn.Module, trainable_only: bool = False) -> tuple[int, int]:
    """``(parameters, largest layer)``; a layer is one module's own parameters, as DeepSpeed's
    ``model_to_params`` counts them (shared parameters once)."""
    wanted = (lambda p: p.requires_grad) if trainable_only else (lambda p: True)
    total = sum(p.numel() for p in model.parameters() if wanted(p))
    largest = max(sum(p.numel() for p in m.parameters(recurse=False) if wanted(p)) for m in model.modules())
    return total, largest


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks, in order: those of every ``nn.ModuleList`` among the model's direct children (one list
    for CogVideoX and Wan; FLUX's double-stream then single-stream blocks)."""
    return [block for child in model.children() if isinstance(child, nn.ModuleList) for block in child]


# --------------------------------------------------------------------------------- inputs of a forward
def cogvideox_inputs(
    model: nn.Module, shape: VideoShape, samples: int, compression: tuple[int, int] = CogVideoXBackbone.vae_compression
) -> dict[str, Any]:
    """Latents ``(B, F, C, H, W)``, T5 embeddings, and 3D rotary embeddings as CogVideoX's trainers pass them."""
    config = model.config
    patch, patch_t = config.patch_size, config.patch_size_t or 1
    frames = math.ceil(((shape.frames - 1) // config.temporal_compression_ratio + 1) / patch_t) * patch_t
    _, spatial = compression
    height, width = shape.height // spatial, shape.width // spatial
    meta = dict(device="meta", dtype=model.dtype)
    inputs = dict(
        hidden_states=torch.empty(samples, frames, config.in_channels, height, width, **meta),
        encoder_hidden_states=torch.empty(samples, shape.text_tokens, config.text_embed_dim, **meta),
        timestep=torch.empty(samples, device="meta", dtype=torch.long),
    )
    if config.use_rotary_positional_embeddings:
        positions = frames // patch_t * (height // patch) * (width // patch)
        cos_sin = (torch.empty(positions, config.attention_head_dim, device="meta") for _ in range(2))
        inputs["image_rotary_emb"] = tuple(cos_sin)
    if config.ofs_embed_dim:
        inputs["ofs"] = torch.empty(samples, device="meta")
    return inputs


def wan_inputs(
    model: nn.Module, shape: VideoShape, samples: int, compression: tuple[int, int] = WanBackbone.vae_compression
) -> dict[str, Any]:
    """Latents ``(B, C, F, H, W)``, UMT5 embeddings (and CLIP image tokens for image-to-video)."""
    config = model.config
    temporal, spatial = compression
    frames = (shape.frames - 1) // temporal + 1
    meta = dict(device="meta", dtype=model.dtype)
    inputs = dict(
        hidden_states=torch.empty(
            samples, config.in_channels, frames, shape.height // spatial, shape.width // spatial, **meta
        ),
        encoder_hidden_states=torch.empty(samples, shape.text_tokens, config.text_dim, **meta),
        timestep=torch.empty(samples, device="meta", dtype=torch.long),
    )
    if config.image_dim:
        inputs["encoder_hidden_states_image"] = torch.empty(samples, 257, config.image_dim, **meta)  # CLIP ViT-H/14
    return inputs


def flux_inputs(
    model: nn.Module, shape: VideoShape, samples: int, compression: tuple[int, int] = (1, 8)
) -> dict[str, Any]:
    """FLUX's inputs as its pipeline passes them: the VAE's latents packed in 2x2 patches ``(B, tokens, 4 C)``, T5
    states, CLIP's pooled projection, the position ids of image and text tokens, and the guidance scale (FLUX.1-dev
    is guidance-distilled). ``shape.frames`` is ignored (an image)."""
    config = model.config
    _, spatial = compression
    tokens = (shape.height // spatial // 2) * (shape.width // spatial // 2)
    meta = dict(device="meta", dtype=model.dtype)
    inputs = dict(
        hidden_states=torch.empty(samples, tokens, config.in_channels, **meta),
        encoder_hidden_states=torch.empty(samples, shape.text_tokens, config.joint_attention_dim, **meta),
        pooled_projections=torch.empty(samples, config.pooled_projection_dim, **meta),
        timestep=torch.empty(samples, **meta),
        img_ids=torch.empty(tokens, 3, **meta),
        txt_ids=torch.empty(shape.text_tokens, 3, **meta),
    )
    if config.guidance_embeds:
        inputs["guidance"] = torch.empty(samples, device="meta", dtype=torch.float32)
    return inputs


@dataclass(frozen=True)
class InputRecipe:
    """How to feed a checkpoint's transformer: its inputs, its training sample and its VAE's ``(time, space)``
    compression."""

    inputs: Callable[[nn.Module, VideoShape, int, tuple[int, int]], dict[str, Any]]
    sample: VideoShape
    vae_compression: tuple[int, int]

    def build(self, model: nn.Module, shape: VideoShape, samples: int) -> dict[str, Any]:
        """The inputs of ``samples`` samples of ``shape``."""
        return self.inputs(model, shape, samples, self.vae_compression)

    def default_shape(self, config: dict[str, Any]) -> VideoShape:
        """The training sample, with the text tokens a transformer's config fixes (CogVideoX's)."""
        return replace(self.sample, text_tokens=config.get("max_text_seq_length", self.sample.text_tokens))


#: by transformer class: the family's published checkpoints (CogVideoX 49x480x720, Wan2.1 81x480x832 and FLUX at
#: 1024x1024 with 512 T5 tokens, FLUX.1-dev's pipeline default)
INPUT_RECIPES = {
    "CogVideoXTransformer3DModel": InputRecipe(
        cogvideox_inputs, CogVideoXBackbone.training_video, CogVideoXBackbone.vae_compression
    ),
    "WanTransformer3DModel": InputRecipe(wan_inputs, WanBackbone.training_video, WanBackbone.vae_compression),
    "FluxTransformer2DModel": InputRecipe(
        flux_inputs, VideoShape(frames=1, height=1024, width=1024, text_tokens=512), (1, 8)
    ),
}
#: presets whose checkpoints train on other samples than their class's first checkpoints (Wan2.2's
#: wan/configs: A14B at 720*1280 with frame_num 81; TI2V-5B at 704*1280, frame_num 121, vae_stride (4, 16, 16))
PRESET_RECIPES = {
    "wan2.2-a14b": replace(INPUT_RECIPES["WanTransformer3DModel"], sample=VideoShape(81, 720, 1280, 512)),
    "wan2.2-ti2v-5b": InputRecipe(wan_inputs, VideoShape(121, 704, 1280, 512), (4, 16)),
}


def input_recipe(model: str, config: dict[str, Any]) -> InputRecipe | None:
    """The recipe of a preset, else of its transformer class; ``None``: activations cannot be measured."""
    return PRESET_RECIPES.get(model) or INPUT_RECIPES.get(config["_class_name"])


# ----------------------------------------------------------------------------------------- activations
@dataclass(frozen=True)
class Activations:
    """Bytes kept for backward with gradient checkpointing, and the tokens one block attends over."""

    block_inputs: int  # the inputs of every block, which checkpointing keeps
    one_block: int  # the saved tensors of the largest block, recomputed during backward
    outside_blocks: int  # saved tensors of the embeddings and output layers (not checkpointed)
    tokens: int  # sequence length of a block's hidden states, per sample

    @property
    def total(self) -> int:
        return self.block_inputs + self.one_block + self.outside_blocks


class SavedTensorLedger(TorchFunctionMode):
    """Adds up the bytes autograd saves, by region (``"inputs"``, a block index, or ``"outside"``).

    A tensor is counted once, with the whole storage it views; parameters are not activations. Attention
    is replaced by what a fused flash kernel saves: ``q, k, v``, the output and an fp32 log-sum-exp. Counted
    tensors are kept referenced, so that no later tensor reuses their ``id``.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.parameters = {id(p) for p in model.parameters()}
        self.counted: dict[int, Tensor] = {}
        self.region: str | int = "outside"
        self.bytes: dict[str | int, int] = {}

    def add(self, tensor: Tensor, region: str | int | None = None) -> None:
        base = tensor if tensor._base is None else tensor._base
        if id(base) in self.parameters or id(base) in self.counted:
            return
        self.counted[id(base)] = base
        region = self.region if region is None else region
        self.bytes[region] = self.bytes.get(region, 0) + base.numel() * base.element_size()

    def pack(self, tensor: Tensor) -> Tensor:
        self.add(tensor)
        return tensor

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        named = {**dict(zip(("query", "key", "value"), args)), **kwargs}
        query, key, value = named["query"], named["key"], named["value"]
        grad = any(t.requires_grad for t in (query, key, value)) and torch.is_grad_enabled()
        *batch, heads, length, _ = query.shape  # flash kernels write (batch, length, heads, dim), viewed transposed
        output = torch.empty(
            *batch, length, heads, value.shape[-1], dtype=query.dtype, device=query.device, requires_grad=grad
        ).transpose(-3, -2)
        if grad:
            for tensor in (query, key, value, output):
                self.add(tensor)
            self.bytes[self.region] = self.bytes.get(self.region, 0) + query.shape[:-1].numel() * 4  # log-sum-exp
        return output


def measure_activations(model: nn.Module, inputs: dict[str, Any]) -> Activations:
    """One forward of ``model`` on the meta device, with every saved tensor attributed to its region."""
    ledger = SavedTensorLedger(model)
    tokens = []

    def enter_block(index: int, args: tuple, kwargs: dict) -> None:
        hidden_states = kwargs.get("hidden_states", args[0] if args else None)
        tokens.append(hidden_states.shape[1])
        for value in [*args, *kwargs.values()]:
            for tensor in value if isinstance(value, (tuple, list)) else [value]:
                if isinstance(tensor, Tensor):
                    ledger.add(tensor, region="inputs")
        ledger.region = index

    hooks = []
    for index, block in enumerate(repeated_blocks(model)):
        hooks.append(
            block.register_forward_pre_hook(
                lambda _, args, kwargs, index=index: enter_block(index, args, kwargs), with_kwargs=True
            )
        )
        hooks.append(block.register_forward_hook(lambda *_: setattr(ledger, "region", "outside")))
    try:
        with torch.autograd.graph.saved_tensors_hooks(ledger.pack, lambda tensor: tensor), ledger:
            model(**inputs)
    finally:
        for hook in hooks:
            hook.remove()
    blocks = [size for region, size in ledger.bytes.items() if isinstance(region, int)]
    return Activations(
        ledger.bytes.get("inputs", 0),
        max(blocks, default=0),
        ledger.bytes.get("outside", 0),
        tokens[0] if tokens else 0,
    )


# --------------------------------------------------------------------------------------------- profile
@dataclass(frozen=True)
class DenoiserProfile:
    """Parameter counts of the denoiser and what one micro-batch saves for backward."""

    parameters: int  # the whole denoiser, without adapters
    largest_layer: int
    trainable: int  # LoRA adapters, or every parameter
    largest_trainable_layer: int
    activations: Activations | None  # None: no input recipe for this class


@functools.cache
def profile_denoiser(
    config_json: str,
    finetune: str,
    samples: int,
    shape: VideoShape | None,
    lora_rank: int,
    lora_targets: tuple[str, ...],
    recipe: InputRecipe | None = None,
) -> DenoiserProfile:
    """Counts on the meta model, and its activations for ``samples`` samples of ``shape`` fed by ``recipe``
    (``None`` for either: not measured)."""
    config = json.loads(config_json)
    model = build_on_meta(config)
    parameters, largest_layer = parameter_counts(model)
    if finetune == "lora":
        add_lora(model, lora_rank, lora_targets)
    trainable, largest_trainable = parameter_counts(model, trainable_only=True)
    activations = None
    if recipe and shape:
        activations = measure_activations(model, recipe.build(model, shape, samples))
    return DenoiserProfile(parameters, largest_layer, trainable, largest_trainable, activations)


# ------------------------------------------------------------------------------------- memory per GPU
def model_states(
    trained: int, largest_trained_layer: int, strategy: str, gpus_per_node: int, nodes: int
) -> tuple[int, int]:
    """``(GPU bytes, CPU bytes per node)`` of the trained parameters' weights, gradients and Adam states,
    from DeepSpeed's estimators (``additional_buffer_factor`` 1.5 on the CPU side, as DeepSpeed prints)."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    offload = strategy.endswith("_offload")
    if strategy == "ddp":  # every rank holds all states: ZeRO-2 on one GPU; every process loads the model
        _, gpu = estimate_zero2_model_states_mem_needs(trained, 1, 1, cpu_offload=False)
        cpu, _ = estimate_zero2_model_states_mem_needs(trained, gpus_per_node, nodes, cpu_offload=False)
    elif strategy.startswith("zero2"):
        cpu, gpu = estimate_zero2_model_states_mem_needs(trained, gpus_per_node, nodes, cpu_offload=offload)
    elif strategy.startswith("zero3"):
        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
            trained, largest_trained_layer, gpus_per_node, nodes, cpu_offload=offload, cpu_offload_params=offload
        )
    else:
        raise ConfigError(f"--strategy {strategy!r}: choose from {', '.join(STRATEGIES)}")
    return gpu, cpu


def frozen_weights(
    parameters: int, largest_layer: int, strategy: str, gpus_per_node: int, nodes: int
) -> tuple[int, int]:
    """``(GPU bytes, CPU bytes per node)`` of frozen bf16 weights: ``2 x params`` replicated (DDP, ZeRO-2),
    ``2 x params / N + 2 x largest layer`` (ZeRO-3), ``2 x largest layer`` with ``2 x params / nodes`` on
    the CPU (ZeRO-3 with parameter offload)."""
    if not strategy.startswith("zero3"):
        return 2 * parameters, 0
    gathered = 2 * largest_layer
    if strategy == "zero3":
        return 2 * parameters // (gpus_per_node * nodes) + gathered, 0
    return gathered, 2 * parameters // nodes


@dataclass(frozen=True)
class MemoryPlan:
    """One configuration's memory, term by term, in bytes (GPU terms per GPU, CPU per node)."""

    model: str
    objective: str
    finetune: str
    strategy: str
    gpus_per_node: int
    nodes: int
    trainable: int
    states: int
    frozen: int
    reference: int
    activations: Activations | None
    cpu: int

    @property
    def gpu(self) -> int:
        """GPU bytes per GPU: ``states + frozen + reference + activations`` (without activations if unmeasured)."""
        return self.states + self.frozen + self.reference + (self.activations.total if self.activations else 0)


def plan_memory(
    model: str,
    config: dict[str, Any],
    finetune: str,
    strategy: str,
    gpus_per_node: int = 8,
    nodes: int = 1,
    objective: str = "dpo",
    pairs_per_gpu: int = 1,
    shape: VideoShape | None = None,
    lora_rank: int = 128,
    lora_targets: tuple[str, ...] = LORA_TARGETS,
) -> MemoryPlan:
    """The memory of training ``config``'s denoiser with ``finetune`` x ``strategy`` on ``gpus_per_node x nodes``.

    ``dpo``: a micro-batch of ``2 x pairs_per_gpu`` samples (``[winners; losers]``) and, with ``full``, a frozen
    reference copy. ``sft``: ``pairs_per_gpu`` samples, no reference. ``shape`` defaults to the preset's
    (or family's) training sample: CogVideoX 49x480x720, Wan2.1 81x480x832, Wan2.2-A14B 81x720x1280, Wan2.2-TI2V-5B
    121x704x1280 (its VAE compresses 16x in space), FLUX 1024x1024 with 512 text tokens.
    """
    for option, value, choices in (
        ("--finetune", finetune, FINETUNES),
        ("--strategy", strategy, STRATEGIES),
        ("--objective", objective, OBJECTIVES),
    ):
        if value not in choices:
            raise ConfigError(f"{option} {value!r}: choose from {', '.join(choices)}")
    if gpus_per_node < 1 or nodes < 1 or pairs_per_gpu < 1:
        raise ConfigError("--gpus, --nodes and --batch-size must be at least 1")
    recipe = input_recipe(model, config)
    shape = shape or (recipe.default_shape(config) if recipe else None)
    samples = pairs_per_gpu * (2 if objective == "dpo" else 1)
    profile = profile_denoiser(
        json.dumps(config, sort_keys=True), finetune, samples, shape, lora_rank, tuple(lora_targets), recipe
    )
    states, states_cpu = model_states(
        profile.trainable, profile.largest_trainable_layer, strategy, gpus_per_node, nodes
    )
    frozen, frozen_cpu = (0, 0)
    if finetune == "lora":
        frozen, frozen_cpu = frozen_weights(profile.parameters, profile.largest_layer, strategy, gpus_per_node, nodes)
    reference, reference_cpu = (0, 0)
    if finetune == "full" and objective == "dpo":
        reference, reference_cpu = frozen_weights(
            profile.parameters, profile.largest_layer, strategy, gpus_per_node, nodes
        )
    return MemoryPlan(
        model,
        objective,
        finetune,
        strategy,
        gpus_per_node,
        nodes,
        profile.trainable,
        states,
        frozen,
        reference,
        profile.activations,
        states_cpu + frozen_cpu + reference_cpu,
    )


# ------------------------------------------------------------------------------------------------ table
TABLE_HEADER = (
    "| model | objective | finetune | strategy | GPUs | trainable | states | frozen | reference "
    "| act. inputs | act. block | act. other | **GPU total** | CPU/node |"
)


def gib(size: int) -> str:
    return f"{size / GIB:.1f}"


def count(parameters: int) -> str:
    return f"{parameters / 1e9:.2f}B" if parameters >= 1e9 else f"{parameters / 1e6:.1f}M"


def table_row(plan: MemoryPlan) -> str:
    act = plan.activations
    activation_cells = (gib(act.block_inputs), gib(act.one_block), gib(act.outside_blocks)) if act else ("n/a",) * 3
    total = gib(plan.gpu) if act else f">= {gib(plan.gpu)}"
    cells = (
        plan.model,
        plan.objective,
        plan.finetune,
        plan.strategy,
        f"{plan.gpus_per_node}x{plan.nodes}",
        count(plan.trainable),
        gib(plan.states),
        gib(plan.frozen),
        gib(plan.reference),
        *activation_cells,
        f"**{total}**",
        gib(plan.cpu),
    )
    return "| " + " | ".join(cells) + " |"


def markdown_table(plans: list[MemoryPlan]) -> str:
    """The plans as a markdown table, GiB per GPU (CPU: GiB per node)."""
    separator = "|" + "|".join("---" if i < 5 else "--:" for i in range(TABLE_HEADER.count("|") - 1)) + "|"
    return "\n".join([TABLE_HEADER, separator, *(table_row(plan) for plan in plans)])


def describe_model(
    name: str,
    config: dict[str, Any],
    lora_rank: int,
    lora_targets: tuple[str, ...],
    shape: VideoShape | None,
    plans: list[MemoryPlan],
) -> str:
    """One line: parameters, LoRA parameters, and the tokens of one sample."""
    counts = profile_denoiser(json.dumps(config, sort_keys=True), "lora", 1, None, lora_rank, lora_targets)
    line = (
        f"{name} ({config['_class_name']}): {count(counts.parameters)} parameters; LoRA rank {lora_rank} on "
        f"{','.join(lora_targets)}: {count(counts.trainable)}"
    )
    measured = [plan.activations for plan in plans if plan.model == name and plan.activations]
    if measured:
        line += f"; a {shape} sample is {measured[0].tokens} tokens in a block's hidden states"
    return line


LEGEND = (
    "GiB per GPU (CPU: GiB per node). states: weights, gradients and Adam states of the trained parameters "
    "(DeepSpeed's estimators); frozen: the LoRA base; reference: DPO's frozen copy (full fine-tuning); "
    "act.: block inputs kept by gradient checkpointing, one recomputed block, the rest of the network."
)


def video_shape(name: str, config: dict[str, Any], options: argparse.Namespace) -> VideoShape | None:
    """The preset's (or family's) default sample with the command line's overrides; ``None`` without an input recipe."""
    recipe = input_recipe(name, config)
    if recipe is None:
        return None
    default = recipe.default_shape(config)
    return VideoShape(
        options.frames or default.frames,
        options.height or default.height,
        options.width or default.width,
        options.text_tokens or default.text_tokens,
    )


def positive_int(text: str) -> int:
    """An argparse type: a whole number >= 1 (a clear error, not a tensor of negative size, otherwise)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def plan_main(args: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="lightning-pref plan",
        description="Per-GPU memory of preference training of a diffusers transformer, term by term: the "
        "architecture built on the meta device, DeepSpeed's model-state estimators, and the activations a meta "
        "forward saves with gradient checkpointing. Prints a markdown table.",
    )
    parser.add_argument("--model", nargs="+", default=None, help=f"presets: {', '.join(PRESETS)} (default: all)")
    parser.add_argument("--config", default=None, help="a diffusers transformer/config.json instead of a preset")
    parser.add_argument("--finetune", nargs="+", default=list(FINETUNES), help="lora and/or full")
    parser.add_argument("--strategy", nargs="+", default=list(STRATEGIES), help=" ".join(STRATEGIES))
    parser.add_argument(
        "--objective",
        nargs="+",
        default=["dpo"],
        help="dpo ([winners; losers] batch, reference) and/or sft (neither, as published figures)",
    )
    parser.add_argument(
        "--gpus", nargs="+", type=positive_int, default=[8], help="GPUs per node (several: rows for each)"
    )
    parser.add_argument("--nodes", type=positive_int, default=1)
    parser.add_argument("--batch-size", type=positive_int, default=1, help="pairs (DPO) or samples (SFT) per GPU")
    cogvideox, wan = CogVideoXBackbone.training_video, WanBackbone.training_video
    parser.add_argument(
        "--frames",
        type=positive_int,
        default=None,
        help=f"pixel frames (default: {cogvideox.frames} CogVideoX, {wan.frames} Wan)",
    )
    parser.add_argument("--height", type=positive_int, default=None, help=f"default: {cogvideox.height}")
    parser.add_argument(
        "--width", type=positive_int, default=None, help=f"default: {cogvideox.width} (CogVideoX), {wan.width} (Wan)"
    )
    parser.add_argument(
        "--text-tokens",
        type=positive_int,
        default=None,
        help=f"default: {cogvideox.text_tokens} (CogVideoX), {wan.text_tokens} (Wan)",
    )
    parser.add_argument("--lora-rank", type=positive_int, default=128, help="default: 128, as CogVideoX's fine-tuning")
    parser.add_argument("--lora-targets", nargs="+", default=list(LORA_TARGETS))
    options = parser.parse_args(args)
    with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed's import logs to stdout; stdout is for the table
        import deepspeed  # noqa: F401
    plans, descriptions = [], []
    try:
        if options.config and options.model:
            raise ConfigError("--config and --model: give one of them")
        models = (
            {options.config: load_config(options.config)}
            if options.config
            else {name: preset_config(name) for name in options.model or PRESETS}
        )
        targets = tuple(options.lora_targets)
        for name, config in models.items():
            shape = video_shape(name, config, options)
            plans += [
                plan_memory(
                    name,
                    config,
                    finetune,
                    strategy,
                    gpus,
                    options.nodes,
                    objective,
                    options.batch_size,
                    shape,
                    options.lora_rank,
                    targets,
                )
                for objective in options.objective
                for finetune in options.finetune
                for gpus in options.gpus
                for strategy in options.strategy
            ]
            descriptions.append(describe_model(name, config, options.lora_rank, targets, shape, plans))
    except ValueError as error:
        parser.error(str(error))
    print(markdown_table(plans), "", LEGEND, *(f"* {line}" for line in descriptions), sep="\n")

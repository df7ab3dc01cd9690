r"""``lightning-pref export``: a training checkpoint (single file, DeepSpeed ZeRO or FSDP2 directory) to diffusers.

    lightning-pref export --config lightning_logs/version_0/config.yaml \\
        --checkpoint lightning_logs/version_0/checkpoints/last.ckpt --out tuned-model [--merge-lora]

The run's ``config.yaml`` (written by every ``lightning-pref fit``) rebuilds the module; only its ``model``
section is read, so no GPUs, strategy or data are needed. The trained weights are then loaded from

* a ZeRO-2/3 checkpoint directory, consolidated to fp32 with DeepSpeed's ``zero_to_fp32``;
* an FSDP2 (distributed checkpoint) directory, read without starting any process group;
* a single ``.ckpt`` file (single device, DDP),

every pickled part as plain data ([`lightning_pref.checkpoints`][lightning_pref.checkpoints]: a crafted checkpoint is refused, not run),
and written as

* a full fine-tune: each denoiser folder (``unet/`` or ``transformer/``; Wan2.2 A14B's high-noise expert in
  ``transformer/``, its low-noise one in ``transformer_2/``, an expert the run did not train unchanged) in
  diffusers format, and, when the base pipeline is a local directory, every other component copied beside
  it: a complete pipeline (``DiffusionPipeline.from_pretrained(out)``);
* LoRA: the adapter in diffusers' LoRA format (``pipe.load_lora_weights(out)``), or with ``--merge-lora`` the
  adapter merged into the denoiser, written like a full fine-tune. For A14B, each trained expert's adapter in
  the sub-directory of its pipeline folder, loaded into the base ``WanPipeline`` with
  ``pipe.load_lora_weights(out / "transformer")`` (high noise) and
  ``pipe.load_lora_weights(out / "transformer_2", load_into_transformer_2=True)`` (low noise).

``--trust-pickled-checkpoint`` unpickles without restriction, for a checkpoint your own run wrote that holds
other objects (the refusal names the one it wanted).
"""

from __future__ import annotations

import argparse
import json
import shutil
import warnings
from pathlib import Path

import torch
import yaml
from torch import Tensor, nn

from lightning_pref import checkpoints
from lightning_pref.backbones.loading import read_model_index
from lightning_pref.checkpoints import PYTHON_OPT_IN, CheckpointFormat
from lightning_pref.errors import CheckpointError
from lightning_pref.methods.base import PreferenceDiffusionModule


def build_module(config_path: Path) -> PreferenceDiffusionModule:
    """The module the run trained, from the ``model`` section of its config (base weights loaded)."""
    from jsonargparse import ArgumentParser

    config = yaml.safe_load(config_path.read_text()) or {}
    if "model" not in config:
        raise KeyError(
            f"{config_path} has no 'model' section: pass the config.yaml the fit wrote (or the one it read)."
        )
    parser = ArgumentParser()
    parser.add_argument("--model", type=PreferenceDiffusionModule)
    return parser.instantiate(parser.parse_object({"model": config["model"]})).model


def read_trained_weights(
    checkpoint: Path, trust_pickle: bool = False, opt_in: str = PYTHON_OPT_IN
) -> dict[str, Tensor]:
    """Module state-dict entries from a ZeRO directory, an FSDP2 directory or a single checkpoint file."""
    kind = checkpoints.checkpoint_format(checkpoint)
    checkpoints.check_readable(checkpoint, trust_pickle, opt_in)
    with checkpoints.loading(checkpoint, trust_pickle, opt_in):
        if kind is CheckpointFormat.DEEPSPEED:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint))
        elif kind is CheckpointFormat.DISTRIBUTED:
            state = read_distributed_module_state(checkpoint)
        else:
            loaded = torch.load(checkpoint, map_location="cpu", weights_only=not trust_pickle)
            if not isinstance(loaded, dict) or "state_dict" not in loaded:
                raise CheckpointError(f"{checkpoint} holds no 'state_dict': it is not a checkpoint Lightning wrote.")
            state = loaded["state_dict"]
    return {key.removeprefix("_forward_module."): value for key, value in state.items()}


def read_distributed_module_state(checkpoint: Path) -> dict[str, Tensor]:
    """The module state (Lightning saves it under ``state_dict``) of an FSDP2 checkpoint, on this process alone."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint import load as load_distributed
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = FileSystemReader(checkpoint).read_metadata()
    state = {
        ".".join(map(str, metadata.planner_data[key][1:])): torch.empty(item.size, dtype=item.properties.dtype)
        for key, item in metadata.state_dict_metadata.items()
        if isinstance(item, TensorStorageMetadata) and metadata.planner_data[key][0] == "state_dict"
    }
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is disabled")  # one process is the intent
        load_distributed({"state_dict": state}, storage_reader=FileSystemReader(checkpoint), no_dist=True)
    return state


def load_trained_weights(module: PreferenceDiffusionModule, state: dict[str, Tensor]) -> None:
    missing = module.trained_state_keys() - set(state)
    if missing:
        raise KeyError(
            f"The checkpoint lacks {len(missing)} weights the config trains (e.g. {sorted(missing)[:3]}): the "
            "config and the checkpoint come from different runs (finetune, LoRA rank or target modules)."
        )
    module.load_state_dict({key: state[key] for key in module.trained_state_keys()}, strict=False)


def adapted(networks: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """The networks that carry a LoRA adapter (an A14B expert the run did not train has none)."""
    return {folder: network for folder, network in networks.items() if getattr(network, "peft_config", None)}


def write_adapters(networks: dict[str, nn.Module], pretrained: str, out: Path) -> None:
    """Each adapter in diffusers' LoRA format: in ``out`` for a pipeline of one denoiser, else in ``out/<folder>``
    of the network it adapts (A14B: ``transformer``, ``transformer_2``)."""
    import diffusers
    from peft.utils import get_peft_model_state_dict

    pipeline_class = getattr(diffusers, read_model_index(pretrained)["_class_name"])
    for folder, network in adapted(networks).items():
        # Saved under the keys of the pipeline's first denoiser: WanPipeline's loader reads those for
        # transformer_2 too (load_into_transformer_2=True). The keys as PEFT names them (diffusers' loaders read
        # them for every family), and the adapter's config beside them: without it a loader assumes alpha == rank.
        name = "unet" if folder == "unet" else "transformer"
        adapter = {
            f"{name}_lora_layers": get_peft_model_state_dict(network),
            f"{name}_lora_adapter_metadata": network.peft_config["default"].to_dict(),
        }
        directory = out if len(networks) == 1 else out / folder
        pipeline_class.save_lora_weights(directory, **adapter, safe_serialization=True)


def export(
    config: Path,
    checkpoint: Path,
    out: Path,
    merge_lora: bool = False,
    trust_pickle: bool = False,
    opt_in: str = PYTHON_OPT_IN,
) -> Path:
    """Write the trained model of ``checkpoint`` to ``out`` (see the module docstring); returns ``out``.

    ``trust_pickle`` unpickles the checkpoint without restriction; ``opt_in`` is how a refusal names that switch.
    """
    state = read_trained_weights(checkpoint, trust_pickle, opt_in)  # before the base model loads: fail fast
    module = build_module(config)
    load_trained_weights(module, state)
    networks, pretrained = module.backbone.pipeline_denoisers(), module.backbone.pretrained
    out.mkdir(parents=True, exist_ok=True)
    if module.finetune == "lora" and not merge_lora:
        write_adapters(networks, pretrained, out)
        return out
    if module.finetune == "lora":
        for network in adapted(networks).values():
            network.fuse_lora()
            network.unload_lora()  # drops the adapter layers, keeps the merged weights
    if Path(pretrained).is_dir():  # the rest of the base pipeline beside it: a complete, loadable pipeline
        for component in Path(pretrained).iterdir():
            if component.is_dir() and component.name not in networks:
                shutil.copytree(component, out / component.name, dirs_exist_ok=True)
            elif component.is_file():
                shutil.copy2(component, out / component.name)
    for folder, network in networks.items():  # an expert the run did not train: its base weights, unchanged
        network.save_pretrained(out / folder, safe_serialization=True)
    (out / "export.json").write_text(
        json.dumps({"checkpoint": str(checkpoint), "config": str(config), "merged_lora": merge_lora})
    )
    return out


def export_main(args: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="lightning-pref export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", type=Path, required=True, help="the run's config.yaml (its model section)")
    parser.add_argument(
        "--checkpoint", type=Path, required=True, help=".ckpt file or ZeRO / FSDP2 checkpoint directory"
    )
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument(
        "--merge-lora", action="store_true", help="merge a LoRA into the denoiser instead of saving the adapter"
    )
    parser.add_argument(
        "--trust-pickled-checkpoint",
        action="store_true",
        help="unpickle the checkpoint without restriction: only for one your own run wrote",
    )
    options = parser.parse_args(args)
    out = export(
        options.config,
        options.checkpoint,
        options.out,
        options.merge_lora,
        options.trust_pickled_checkpoint,
        opt_in="--trust-pickled-checkpoint",
    )
    print(f"wrote {out}")

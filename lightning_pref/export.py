"""``lightning-pref export``: a training checkpoint (single file, DeepSpeed ZeRO or FSDP2 directory) to diffusers.

    lightning-pref export --config lightning_logs/version_0/config.yaml \\
        --checkpoint lightning_logs/version_0/checkpoints/last.ckpt --out tuned-model [--merge-lora]

The run's ``config.yaml`` (written by every ``lightning-pref fit``) rebuilds the module; only its ``model``
section is read, so no GPUs, strategy or data are needed. The trained weights are then loaded from

* a ZeRO-2/3 checkpoint directory, consolidated to fp32 with DeepSpeed's ``zero_to_fp32``;
* an FSDP2 (distributed checkpoint) directory, read without starting any process group;
* a single ``.ckpt`` file (single device, DDP), with ``weights_only=True``.

and written as

* a full fine-tune: the denoiser folder (``unet/`` or ``transformer/``) in diffusers format, and, when the
  base pipeline is a local directory, every other component copied beside it: a complete pipeline;
* LoRA: the adapter in diffusers' LoRA format (``pipe.load_lora_weights(out)``), or with ``--merge-lora`` the
  adapter merged into the denoiser, written like a full fine-tune.

DeepSpeed and FSDP2 checkpoints are pickle-based: export only checkpoints your own runs wrote.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path
import torch
import yaml
from torch import Tensor

from lightning_pref.backbones.stable_diffusion import read_model_index
from lightning_pref.methods.base import PreferenceDiffusionModule


def build_module(config_path: Path) -> PreferenceDiffusionModule:
    """The module the run trained, from the ``model`` section of its config (base weights loaded)."""
    from jsonargparse import ArgumentParser

    config = yaml.safe_load(config_path.read_text()) or {}
    if "model" not in config:
        raise KeyError(f"{config_path} has no 'model' section: pass the config.yaml the fit wrote (or the one it read).")
    parser = ArgumentParser()
    parser.add_argument("--model", type=PreferenceDiffusionModule)
    return parser.instantiate(parser.parse_object({"model": config["model"]})).model


def read_trained_weights(checkpoint: Path) -> dict[str, Tensor]:
    """Module state-dict entries from a ZeRO directory, an FSDP2 directory or a single checkpoint file."""
    if not checkpoint.exists():
        raise FileNotFoundError(f"--checkpoint {checkpoint} does not exist.")
    if checkpoint.is_dir() and (checkpoint / "latest").exists():
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint))
    elif checkpoint.is_dir() and (checkpoint / ".metadata").exists():
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        with tempfile.TemporaryDirectory() as tmp:
            dcp_to_torch_save(checkpoint, Path(tmp) / "state.pt")
            state = torch.load(Path(tmp) / "state.pt", map_location="cpu", weights_only=True)["state_dict"]
    elif checkpoint.is_file():
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    else:
        raise ValueError(
            f"--checkpoint {checkpoint} is a directory but neither a DeepSpeed checkpoint (no 'latest' file) nor a "
            "distributed (FSDP2) checkpoint (no '.metadata'): pass the .ckpt path Lightning wrote."
        )
    return {key.removeprefix("_forward_module."): value for key, value in state.items()}


def load_trained_weights(module: PreferenceDiffusionModule, state: dict[str, Tensor]) -> None:
    missing = module.trained_state_keys() - set(state)
    if missing:
        raise KeyError(
            f"The checkpoint lacks {len(missing)} weights the config trains (e.g. {sorted(missing)[:3]}): the "
            "config and the checkpoint come from different runs (finetune, LoRA rank or target modules)."
        )
    module.load_state_dict({key: state[key] for key in module.trained_state_keys()}, strict=False)


def denoiser_folder(module: PreferenceDiffusionModule) -> str:
    """The pipeline sub-folder the denoiser loads from (``unet`` or ``transformer``)."""
    return "unet" if "UNet" in type(module.denoiser).__name__ else "transformer"


def export(config: Path, checkpoint: Path, out: Path, merge_lora: bool = False) -> Path:
    """Write the trained model of ``checkpoint`` to ``out`` (see the module docstring); returns ``out``."""
    module = build_module(config)
    load_trained_weights(module, read_trained_weights(checkpoint))
    denoiser, folder, pretrained = module.denoiser, denoiser_folder(module), module.backbone.pretrained
    out.mkdir(parents=True, exist_ok=True)
    if module.finetune == "lora" and not merge_lora:
        import diffusers
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        pipeline_class = getattr(diffusers, read_model_index(pretrained)["_class_name"])
        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(denoiser))
        pipeline_class.save_lora_weights(out, **{f"{folder}_lora_layers": layers}, safe_serialization=True)
        return out
    if module.finetune == "lora":
        denoiser.fuse_lora()
        denoiser.unload_lora()  # drops the adapter layers, keeps the merged weights
    if Path(pretrained).is_dir():  # the rest of the base pipeline beside it: a complete, loadable pipeline
        for component in Path(pretrained).iterdir():
            if component.is_dir() and component.name != folder:
                shutil.copytree(component, out / component.name, dirs_exist_ok=True)
            elif component.is_file():
                shutil.copy2(component, out / component.name)
    denoiser.save_pretrained(out / folder, safe_serialization=True)
    (out / "export.json").write_text(json.dumps({"checkpoint": str(checkpoint), "config": str(config), "merged_lora": merge_lora}))
    return out


def export_main(args: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="lightning-pref export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, required=True, help="the run's config.yaml (its model section)")
    parser.add_argument("--checkpoint", type=Path, required=True, help=".ckpt file or ZeRO / FSDP2 checkpoint directory")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--merge-lora", action="store_true", help="merge a LoRA into the denoiser instead of saving the adapter")
    options = parser.parse_args(args)
    print(f"wrote {export(options.config, options.checkpoint, options.out, options.merge_lora)}")

"""``lightning-pref data precompute``: run the VAE and the text encoders once, store latents and prompt
embeddings in shards, and train without encoding anything.

Each input shard (pairs or unpaired, images or videos) becomes an output shard of the same name whose samples
hold the source's ``json`` and ``latents.safetensors`` with ``latents_w`` and ``latents_l`` (or ``latents``)
and the prompt tensors under the backbone's ``prompt_keys`` (SD: ``encoder_hidden_states``; SDXL adds
``text_embeds``), or the same tensors as ``<name>.npy`` files. Every DataModule reads these shards as it
reads pixel shards; the training module then skips the VAE and the text encoders.

Latents are the VAE posterior's **mode** (``backbone.encode_pixels`` without a generator), not a sample:
precomputed latents are then exactly reproducible, and a run on them matches a run that encodes pixels
deterministically. Training on pixels samples the posterior instead (Diffusion-DPO's code does); for SD's
VAE the posterior's standard deviation is small next to the spread of the latents, so the difference is a
slight loss of augmentation. Pixels get the DataModule's deterministic transform (resize, centre crop, first
frames); random crops and flips cannot be applied to stored latents.

The output directory also holds ``precompute.json`` (the settings) and ``empty_prompt.safetensors`` (the
empty prompt's tensors, for caption dropout without a text encoder). Finished shards are skipped on a rerun.
"""

from __future__ import annotations

import importlib
import io
import json
import logging
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import webdataset as wds
import yaml
from safetensors.torch import save as save_safetensors

from lightning_pref.backbones.base import Backbone
from lightning_pref.batch import LATENTS, PIXELS, media_field
from lightning_pref.datamodules.media import FrameSampling, Geometry, MediaDecoder, SkipSample
from lightning_pref.datamodules.shards import PAIR_ROLES
from lightning_pref.datamodules.streaming import SampleDecoder, SkipLog, chunks, collate, decode_samples, expand_shards
from lightning_pref.errors import ConfigError, DataError

log = logging.getLogger(__name__)

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class SourceDecoder(SampleDecoder):
    """A raw pixel sample to its deterministic pixels (named by the roles' stored suffixes), key and json."""

    def __call__(self, sample: dict[str, Any], rng: np.random.Generator) -> list[dict[str, Any]]:
        metadata = self.metadata(sample)
        if any(name.startswith("winner.") for name in sample):
            roles = PAIR_ROLES
        else:
            roles = {"video" if any(name.startswith("video.") for name in sample) else "image": ""}
        pixels = self.media(sample, roles, rng)
        if any(name.startswith(LATENTS) for name in pixels):
            raise SkipSample("already holds precomputed tensors: give pixel shards to precompute")
        return [{**pixels, "key": sample["__key__"], "caption": str(metadata["caption"] or ""), "json": sample["json"]}]


def encode_batch(backbone: Backbone, batch: dict[str, Any], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Latents of every pixel field (``pixels_w`` -> ``latents_w``; one VAE call) and the prompt tensors."""
    suffixes = [name[len(PIXELS) :] for name in batch if name.startswith(PIXELS)]
    pixels = torch.cat([batch[media_field(PIXELS, suffix)] for suffix in suffixes]).to(backbone.device)
    latents = backbone.encode_pixels(pixels).chunk(len(suffixes))
    prompts = backbone.encode_prompts(batch["caption"])
    tensors = {media_field(LATENTS, suffix): value for suffix, value in zip(suffixes, latents)}
    tensors.update({key: prompts[key] for key in backbone.prompt_keys})
    return {name: value.to("cpu", dtype) for name, value in tensors.items()}


def sample_files(tensors: dict[str, torch.Tensor], index: int, file_format: str) -> dict[str, bytes]:
    """The files of one sample's tensors: one ``latents.safetensors`` or one ``<name>.npy`` each."""
    own = {name: value[index].clone(memory_format=torch.contiguous_format) for name, value in tensors.items()}
    if file_format == "safetensors":
        return {"latents.safetensors": save_safetensors(own)}
    files = {}
    for name, value in own.items():
        buffer = io.BytesIO()
        np.save(buffer, value.numpy(), allow_pickle=False)
        files[f"{name}.npy"] = buffer.getvalue()
    return files


@torch.no_grad()
def precompute_shards(
    backbone: Backbone,
    source: str,
    out_dir: str | Path,
    *,
    resolution: int | tuple[int, int] | None = None,
    num_frames: int | None = None,
    frame_stride: int = 1,
    fps: float | None = None,
    batch_size: int = 16,
    dtype: Literal["float16", "bfloat16", "float32"] = "float16",
    file_format: Literal["safetensors", "npy"] = "safetensors",
) -> dict[str, int]:
    """Encode every sample of the shards ``source`` (a glob, directory or brace pattern) with ``backbone``
    and write latent shards of the same names to ``out_dir``. Returns the counts."""
    if dtype not in DTYPES:
        raise ConfigError(f"dtype={dtype!r}: choose one of {sorted(DTYPES)}.")
    if file_format not in ("safetensors", "npy") or (file_format == "npy" and dtype == "bfloat16"):
        raise ConfigError(
            f"file_format={file_format!r} with dtype={dtype!r}: use safetensors, or npy with float16/float32."
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    frames = FrameSampling(num_frames, frame_stride, fps) if num_frames else None
    decoder = SourceDecoder(MediaDecoder(Geometry(resolution), frames))
    settings = {
        "backbone": type(backbone).__name__,
        "pretrained": getattr(backbone, "pretrained", None),
        "resolution": resolution,
        "num_frames": num_frames,
        "frame_stride": frame_stride,
        "fps": fps,
        "dtype": dtype,
        "latents": "posterior mode",
    }
    (out_dir / "precompute.json").write_text(json.dumps(settings, indent=2))
    empty = backbone.encode_prompts([""])
    (out_dir / "empty_prompt.safetensors").write_bytes(
        save_safetensors({key: empty[key][0].cpu() for key in backbone.prompt_keys})
    )

    counts = {"shards": 0, "shards_already_done": 0, "written": 0, "skipped": 0}
    skips = SkipLog()
    for shard in expand_shards(source):
        target = out_dir / Path(shard).name
        if target.exists():
            counts["shards_already_done"] += 1
            continue
        samples = wds.tarfile_to_samples(handler=skips.shard_error)([{"url": shard}])
        partial = target.with_name(target.name + ".partial")
        with wds.TarWriter(str(partial)) as sink:
            for chunk in chunks(decode_samples(samples, decoder, skips, seed=(0,)), batch_size, partial=True):
                batch = collate(chunk)
                tensors = encode_batch(backbone, batch, DTYPES[dtype])
                for index, key in enumerate(batch["key"]):
                    sink.write(
                        {"__key__": key, "json": batch["json"][index], **sample_files(tensors, index, file_format)}
                    )
                counts["written"] += len(chunk)
        partial.rename(target)
        counts["shards"] += 1
        log.info("%s -> %s", shard, target)
    counts["skipped"] = skips.take()
    if counts["skipped"] and not counts["written"]:
        raise DataError(f"No sample of {source!r} could be encoded ({counts}): see the warnings for why.")
    return counts


def load_backbone(spec: str, pretrained: str | None = None, options: dict[str, Any] | None = None) -> Backbone:
    """A backbone from a class name (``StableDiffusionBackbone``), a dotted class path, or a fit config YAML
    (its ``model.init_args.backbone``), with ``pretrained`` and ``options`` as extra init arguments."""
    init_args = dict(options or {})
    if spec.endswith((".yaml", ".yml")):
        config = yaml.safe_load(Path(spec).read_text())
        node = (config.get("model", {}).get("init_args") or {}).get("backbone") or config
        if "class_path" not in node:
            raise ConfigError(
                f"{spec} has no model.init_args.backbone.class_path: give a fit config or a backbone class name."
            )
        spec, init_args = node["class_path"], {**(node.get("init_args") or {}), **init_args}
    module_name, _, class_name = spec.rpartition(".")
    module = importlib.import_module(module_name or "lightning_pref.backbones")
    if not hasattr(module, class_name):
        raise ConfigError(
            f"--backbone {spec!r}: no such class; use e.g. StableDiffusionBackbone or my_package.MyBackbone."
        )
    if pretrained is not None:
        init_args["pretrained"] = pretrained
    return getattr(module, class_name)(**init_args)

"""The shard formats and their writers.

Every shard is a webdataset tar; the files of one sample share a ``__key__``. Three kinds of sample:

* **preference pair**: ``winner.<ext>`` (the preferred image or video, always first), ``loser.<ext>`` and
  ``json``;
* **unpaired sample** (SFT-style data, KTO labels): ``image.<ext>`` or ``video.<ext>`` and ``json``;
* **precomputed** (written by ``lightning-pref data precompute``): ``latents.safetensors`` holding
  ``latents_w``/``latents_l`` (pairs) or ``latents`` (unpaired) plus the prompt tensors under the backbone's
  ``prompt_keys``, and the source's ``json``. The same tensors may instead be stored as one ``<name>.npy``
  file each.

``<ext>`` is an image (``png``, ``jpg``, ``jpeg``, ``webp``) or a video (``mp4``, ``webm``, ``mkv``, ``mov``,
``avi``) extension. The ``json`` holds ``{"caption": str}`` plus whatever provenance the source had
(original labels, ``user_id``, ids, ``label_flipped``, for unpaired data ``label``: 1 desirable, 0 not).

Converters (image and video pair tables, VideoDPO, the toy world) write through
``write_preference_shards`` (Pick-a-Pic's writes its JPEG bytes directly, in the same format);
unpaired data goes through ``write_unpaired_shards``.

Keys and shard names hold letters, digits, ``_`` and ``-`` only: webdataset cuts a tar member's name at its
first dot into key and field, and a slash would make a folder. ``key_part`` makes any text fit.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds
from PIL import Image

from lightning_pref.batch import ROLE_SUFFIXES
from lightning_pref.errors import ConfigError

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")
VIDEO_EXTENSIONS = ("mp4", "webm", "mkv", "mov", "avi")
#: the media roles of a pair sample and the suffix their tensors carry in a batch (the batch schema)
PAIR_ROLES = ROLE_SUFFIXES
UNPAIRED_ROLES = ("image", "video")
NOT_A_KEY_CHARACTER = re.compile(r"[^A-Za-z0-9_-]")


def key_part(text: str) -> str:
    """``text`` fit for a sample key or shard name: every other character becomes ``_``, and a changed text
    gets a short hash of the original appended, so two texts never give the same part."""
    part = NOT_A_KEY_CHARACTER.sub("_", text)
    if part != text:
        part += "-" + hashlib.sha1(text.encode()).hexdigest()[:8]
    return part


def encode_image(image: Image.Image | np.ndarray, image_format: str = "png") -> bytes:
    """PIL image or ``uint8`` HxWx3 array to encoded bytes."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG" if image_format in ("jpg", "jpeg") else image_format.upper())
    return buffer.getvalue()


def media_file(value: Any, image_format: str) -> tuple[str, bytes]:
    """``(extension, bytes)`` of a media value: a file path (bytes copied, extension kept), encoded bytes
    (stored as ``image_format``), a PIL image or a ``uint8`` array (encoded as ``image_format``)."""
    if isinstance(value, Path):
        extension = value.suffix.lstrip(".").lower()
        if extension not in IMAGE_EXTENSIONS + VIDEO_EXTENSIONS:
            raise ValueError(
                f"{value}: unsupported media extension {extension!r}; use one of {IMAGE_EXTENSIONS + VIDEO_EXTENSIONS}."
            )
        return extension, value.read_bytes()
    if isinstance(value, (bytes, bytearray)):
        return image_format, bytes(value)
    return image_format, encode_image(value, image_format)


def write_samples(
    records: Iterable[dict[str, Any]],
    out_dir: str | Path,
    roles: tuple[str, ...],
    samples_per_shard: int = 1000,
    image_format: str = "png",
    prefix: str = "pairs",
) -> list[Path]:
    """Write ``records`` (media under the keys in ``roles``, everything else to the json) to tar shards.

    Keys are ``<prefix>-<index>``, unique across datasets written with different prefixes; ``prefix`` may
    hold letters, digits, ``_`` and ``-`` only. No records, no shard. Returns the shard paths.
    """
    if key_part(prefix) != prefix:
        raise ConfigError(
            f"prefix={prefix!r}: sample keys and shard names take letters, digits, '_' and '-' only (webdataset "
            "cuts a key at its first dot): choose a prefix without dots, slashes or spaces."
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    records = iter(records)
    first = next(records, None)
    if first is None:
        return []
    shards: list[str] = []
    with wds.ShardWriter(
        str(out_dir / f"{prefix}-%06d.tar"), maxcount=samples_per_shard, post=shards.append, verbose=0
    ) as sink:
        for index, record in enumerate(itertools.chain([first], records)):
            present = [role for role in roles if record.get(role) is not None]
            metadata = {key: value for key, value in record.items() if key not in roles}
            if "caption" not in metadata:
                raise KeyError(f"record {index} has no 'caption': every sample needs its prompt.")
            if not present:
                raise KeyError(f"record {index} has none of the media keys {roles}.")
            sample = {"__key__": f"{prefix}-{index:09d}", "json": metadata}
            for role in present:
                extension, data = media_file(record[role], image_format)
                sample[f"{role}.{extension}"] = data
            sink.write(sample)
    return [Path(shard) for shard in shards]


def write_preference_shards(
    pairs: Iterable[dict[str, Any]],
    out_dir: str | Path,
    samples_per_shard: int = 1000,
    image_format: str = "png",
    prefix: str = "pairs",
) -> list[Path]:
    """Write pairs ``{"winner": media, "loser": media, "caption": str, **metadata}`` to tar shards.

    Media may be PIL images, ``uint8`` arrays, already-encoded image bytes, or paths of image or video files
    (copied byte for byte). Returns the shard paths.
    """
    for_writer = (_require_pair(index, pair) for index, pair in enumerate(pairs))
    return write_samples(for_writer, out_dir, tuple(PAIR_ROLES), samples_per_shard, image_format, prefix)


def write_unpaired_shards(
    samples: Iterable[dict[str, Any]],
    out_dir: str | Path,
    samples_per_shard: int = 1000,
    image_format: str = "png",
    prefix: str = "samples",
) -> list[Path]:
    """Write samples ``{"image" or "video": media, "caption": str, "label": 1, **metadata}`` to tar shards."""
    return write_samples(samples, out_dir, UNPAIRED_ROLES, samples_per_shard, image_format, prefix)


def _require_pair(index: int, pair: dict[str, Any]) -> dict[str, Any]:
    missing = [role for role in PAIR_ROLES if pair.get(role) is None]
    if missing:
        raise KeyError(f"pair {index} has no {missing}: every preference pair needs a winner and a loser.")
    return pair

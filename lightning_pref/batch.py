"""The batch schema: the field names DataModules write and methods read, written down once.

A **pair batch** (``B`` preference pairs) holds the winners' and the losers' media as ``pixels_w`` and
``pixels_l`` (``(B, 3, H, W)`` images or ``(B, 3, F, H, W)`` videos in [-1, 1]) or as precomputed
``latents_w`` and ``latents_l``; an **unpaired batch** (``N`` samples) holds ``pixels`` or ``latents``.
Both hold ``prompt`` (a list of strings) or the backbone's precomputed prompt tensors (its
``prompt_keys``), ``key`` and ``user_id``; pair batches ``label_flipped``; unpaired batches ``label``
(1 desirable, 0 not); and any ``metadata_fields`` the DataModule copies from the samples' json.

A media field is a *kind* (``pixels``, ``latents``) followed by the suffix of its role in a pair (``_w``
for the winner, ``_l`` for the loser; none for an unpaired sample). Stored precomputed tensors use the
same names (``latents_w`` in a pair shard's ``latents.safetensors``).
"""

from __future__ import annotations

from typing import Any, Literal

from torch import Tensor

PIXELS, LATENTS = "pixels", "latents"
MEDIA_KINDS = (LATENTS, PIXELS)  # a batch holding both is read as precomputed
#: the suffix each role of a pair gives its media fields (shards name the roles ``winner`` and ``loser``)
ROLE_SUFFIXES = {"winner": "_w", "loser": "_l"}
WINNER, LOSER = ROLE_SUFFIXES["winner"], ROLE_SUFFIXES["loser"]

PROMPT, KEY, USER_ID, LABEL, LABEL_FLIPPED = "prompt", "key", "user_id", "label", "label_flipped"

MediaKind = Literal["pixels", "latents"]


def media_field(kind: MediaKind, suffix: str = "") -> str:
    """``media_field("latents", WINNER) == "latents_w"``."""
    return kind + suffix


def pair_media(batch: dict[str, Any]) -> tuple[MediaKind, Tensor, Tensor] | None:
    """``(kind, winners, losers)`` of a pair batch (latents before pixels), or ``None`` for any other batch."""
    for kind in MEDIA_KINDS:
        winner, loser = media_field(kind, WINNER), media_field(kind, LOSER)
        if winner in batch and loser in batch:
            return kind, batch[winner], batch[loser]
    return None


def sample_media(batch: dict[str, Any]) -> tuple[MediaKind, Tensor] | None:
    """``(kind, samples)`` of an unpaired batch, or ``None``."""
    for kind in MEDIA_KINDS:
        if kind in batch:
            return kind, batch[kind]
    return None


def swap_roles(sample: dict[str, Any]) -> dict[str, Any]:
    """The sample with every winner field exchanged for its loser field (a flipped label)."""
    swapped = dict(sample)
    for name in sample:
        if name.endswith(WINNER):
            loser = name[: -len(WINNER)] + LOSER
            swapped[name], swapped[loser] = sample[loser], sample[name]
    return swapped


def split_roles(sample: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """A pair sample's winner fields and loser fields (suffixes removed), and the fields they share."""
    winner = {name[: -len(WINNER)]: value for name, value in sample.items() if name.endswith(WINNER)}
    loser = {name[: -len(LOSER)]: value for name, value in sample.items() if name.endswith(LOSER)}
    shared = {name: value for name, value in sample.items() if not name.endswith((WINNER, LOSER))}
    return winner, loser, shared


def batch_size_of(batch: dict[str, Any]) -> int:
    """Pairs (or unpaired samples) in a batch: the length of its first tensor field, or of its prompt list."""
    for value in batch.values():
        if isinstance(value, Tensor) and value.ndim > 0:
            return value.shape[0]
    return len(batch[PROMPT])

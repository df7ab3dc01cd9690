"""One hash for every seeded stream of the library: noise per pair, label flips per key, and the like.

A stream is named by a tuple of parts, e.g. ``(seed, "train", global_step, micro_batch, pair_index)``. Its
seed is a 63-bit hash of those parts (BLAKE2b of their ``repr``), so distinct names give independent
streams whatever their values: no packing of counters into one integer, whose fields overflow into each
other (64 micro-batches per step once collided with the next step's). Identical in every process and run,
unlike Python's ``hash``.
"""

from __future__ import annotations

import hashlib
from typing import Any


def _digest(parts: tuple[Any, ...]) -> int:
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little")


def stream_seed(*parts: Any) -> int:
    """A seed in ``[0, 2**63)`` for ``torch.Generator().manual_seed``, from the stream's name ``parts``.

    Example:
        >>> stream_seed(0, "train", 3, 1, 7) == stream_seed(0, "train", 3, 1, 7) != stream_seed(0, "train", 3, 1, 8)
        True
    """
    return _digest(parts) >> 1


def unit_hash(*parts: Any) -> float:
    """A uniform number in ``[0, 1)`` from ``parts`` (a seeded coin for one key: label noise, splits).

    Example:
        >>> 0.0 <= unit_hash("label-noise", 5, "pairs-000000001") < 1.0
        True
    """
    return _digest(parts) / 2**64

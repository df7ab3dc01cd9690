"""One hash for every seeded stream of the library: noise per pair, label flips per key, and the like.

A stream is named by a tuple of parts, e.g. ``(seed, "train", global_step, micro_batch, pair_index)``. Its
seed is a 63-bit hash of those parts (BLAKE2b of their ``repr``), so distinct names give independent
streams whatever their values: no packing of counters into one integer, whose fields overflow into each
other (64 micro-batches per step once collided with the next step's). Identical in every process and run,
unlike Python's ``hash``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor


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


class PairRandomness:
    """The random draws of one step, one seeded stream per pair of the *global* batch.

    Pair ``i`` of the global batch draws from ``torch.Generator().manual_seed(stream_seed(*stream, i))``, whatever
    rank it lands on ([`stream_seed`][lightning_pref.seeding.stream_seed]): one process with a global batch of ``B`` and
    ``N`` processes with ``B / N`` each draw the same timesteps, noise, caption dropout and VAE posterior
    samples, so their losses agree. A resumed run draws what the uninterrupted run would have.
    """

    def __init__(self, generators: list[torch.Generator], pairs: Sequence[int] | None = None, total: int | None = None):
        self.generators = generators
        #: each pair's index in the global batch, and the global batch's size (for stratified timesteps)
        self.pairs = list(pairs) if pairs is not None else list(range(len(generators)))
        self.total = total or len(self.generators)

    @classmethod
    def for_pairs(cls, stream: tuple[Any, ...], pairs: Iterable[int], total: int | None = None) -> PairRandomness:
        """One generator per global pair index in ``pairs`` (of a global batch of ``total`` pairs), for the stream
        named ``stream``."""
        pairs = list(pairs)
        return cls([torch.Generator().manual_seed(stream_seed(*stream, pair)) for pair in pairs], pairs, total)

    def __len__(self) -> int:
        return len(self.generators)

    def rows(self, rows: Sequence[int]) -> PairRandomness:
        """The streams of ``rows`` only (indices into this step's batch): a pair made from row ``i`` keeps row
        ``i``'s stream (a pair source that drops near-ties, say)."""
        return PairRandomness([self.generators[row] for row in rows], [self.pairs[row] for row in rows], self.total)

    def uniform(self) -> Tensor:
        """One ``U[0, 1)`` draw per pair, ``(B,)``."""
        return torch.cat([torch.rand(1, generator=g) for g in self.generators])

    def normal(self, shape: tuple[int, ...]) -> Tensor:
        """One standard normal tensor of ``shape`` per pair, ``(B, *shape)``."""
        return torch.stack([torch.randn(shape, generator=g) for g in self.generators])

    def timesteps(self, process, stratified: bool = False) -> Tensor:
        """One process time per pair, ``(B,)``.

        ``stratified``: pair ``i`` of a global batch of ``n`` draws its quantile ``u`` uniformly from the ``i``-th
        of ``n`` equal strata of [0, 1) (``process.timesteps_at(u)``), so every batch covers the whole schedule
        evenly: the same distribution of times and the same expected loss, with a lower-variance gradient
        (the low-discrepancy sampler of Kingma et al. 2021, "Variational Diffusion Models").
        """
        if not stratified:
            return torch.cat([process.sample_timesteps(1, g) for g in self.generators])
        quantiles = (torch.tensor(self.pairs, dtype=torch.float64) + self.uniform().double()) / self.total
        return process.timesteps_at(quantiles)

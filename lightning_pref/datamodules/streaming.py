"""The streaming machinery every DataModule shares: shards to batches, on every rank and worker.

One *consumer* is one dataloader worker of one rank. Training gives each consumer its own subset of the
shards (``shards[consumer::consumers]``) and draws from that subset with replacement, forever; so consumers
never read the same sample, and every rank yields exactly ``batches_per_epoch`` batches per epoch (DDP ranks
never wait on each other). With fewer shards than consumers, every consumer reads all shards and keeps the
samples whose key hashes to it (correct, but each reads everything: write more shards). Validation reads
each consumer's part once, in order. (``webdataset.WebDataset(resampled=True, nodesplitter=split_by_node)``
would not do: every rank resamples from all shards and the splitter only thins the random draws, so ranks
overlap.) Rank and world size come from the trainer in the main process, so forked and spawned workers
agree on them.

A sample that cannot be used (a truncated shard, a missing field, an image that does not decode, a video
too short for the frame window) is logged with its shard, key and reason, skipped and counted. The counts
travel with the batches (``batch["skipped"]``: samples the batch's worker skipped since its previous batch
left; a worker holds each batch until the next is ready, so the last batch also carries the last skips),
so they add up correctly whatever the worker start method (fork or spawn); the DataModule sums them in the
main process as :attr:`ShardDataModule.skipped_samples`.

Worker pipeline: shard source -> ``webdataset.tarfile_to_samples`` -> key split (if needed) -> shuffle
buffer -> decode (the DataModule's :meth:`~ShardDataModule.sample_decoder`) -> per-user groups (optional)
-> batches.
"""

from __future__ import annotations

import dataclasses
import glob
import itertools
import json
import logging
import os
import random
import zlib
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import lightning.pytorch as pl
import numpy as np
import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from lightning_pref.datamodules.media import FrameSampling, Geometry, MediaDecoder, SkipSample

log = logging.getLogger(__name__)


def expand_shards(spec: str) -> list[str]:
    """Shard paths from a glob (``dir/*.tar``), a directory, a brace pattern (``pairs-{000000..000099}.tar``)
    or URLs, or several of these joined by ``::``. Local paths must exist."""
    paths: list[str] = []
    for part in spec.split("::"):
        if "://" in part:
            paths += wds.shardlists.expand_urls(part)
        elif Path(part).is_dir():
            paths += sorted(str(path) for path in Path(part).glob("*.tar"))
        elif any(ch in part for ch in "*?["):
            paths += sorted(glob.glob(part))
        else:
            paths += wds.shardlists.expand_urls(part)
    if not paths:
        raise FileNotFoundError(f"No shard matches {spec!r}: check the path, or write shards first.")
    missing = [path for path in paths if "://" not in path and not Path(path).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} shard(s) of {spec!r} do not exist, e.g. {missing[0]!r}: check the pattern.")
    return paths


def parse_user_id(value: Any) -> int:
    """An integer user id; ``-1`` when absent; strings that are not numbers map to a stable hash."""
    if value is None:
        return -1
    try:
        return int(value)
    except (TypeError, ValueError):
        return zlib.crc32(str(value).encode()) & 0x7FFFFFFF


class SkipLog:
    """Counts and logs skipped samples in the process that reads them (a dataloader worker or the main one).

    Raises once ``limit`` samples in a row were skipped: a stream whose every sample fails would otherwise
    spin forever without a batch.
    """

    def __init__(self, limit: int = 1000):
        self.limit = limit
        self.pending = 0
        self.in_a_row = 0

    def record(self, where: str, reason: str) -> None:
        log.warning("skipped %s: %s", where, reason)
        self.pending += 1
        self.in_a_row += 1
        if self.in_a_row >= self.limit:
            raise RuntimeError(
                f"the last {self.in_a_row} samples were all skipped (last: {where}: {reason}); the data or the "
                "DataModule options are wrong (see the warnings above)."
            )

    def shard_error(self, exception: Exception) -> bool:
        """webdataset handler: the rest of an unreadable shard is skipped; the stream goes on."""
        url = next((arg for arg in reversed(exception.args) if isinstance(arg, str)), "?")
        self.record(f"the rest of shard {url}", f"{type(exception).__name__}: {exception.args[0] if exception.args else ''}")
        return True

    def take(self) -> int:
        count, self.pending = self.pending, 0
        return count


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack tensors (``uint8`` pixels scaled to [-1, 1]), turn numbers and flags into tensors, list the rest."""
    batch: dict[str, Any] = {}
    for key in samples[0]:
        try:
            values = [sample[key] for sample in samples]
        except KeyError:
            raise ValueError(f"samples of one batch have different fields ({sorted(samples[0])} and others): do not mix "
                             "precomputed and pixel shards, or image and video shards, in one DataModule.") from None
        first = values[0]
        if isinstance(first, torch.Tensor):
            try:
                stacked = torch.stack(values)
            except RuntimeError:
                shapes = sorted({tuple(value.shape) for value in values})
                raise ValueError(f"'{key}' has different shapes in one batch ({shapes}): set `resolution`.") from None
            batch[key] = stacked.float().div_(127.5).sub_(1.0) if stacked.dtype == torch.uint8 else stacked
        elif isinstance(first, (bool, int, float)):
            batch[key] = torch.tensor(values)
        else:
            batch[key] = values
    return batch


def group_by_user(samples: Iterable[dict], batch_size: int, users_per_batch: int, buffer: int) -> Iterator[list[dict]]:
    """Batches made of ``users_per_batch`` groups of ``batch_size // users_per_batch`` samples of one user each.

    Samples wait in per-user buckets; when more than ``buffer`` wait, the bucket opened longest ago is dropped
    (its user had too few samples in reach to fill a group).
    """
    group_size = batch_size // users_per_batch
    buckets: dict[int, list[dict]] = {}
    ready: list[dict] = []
    waiting = 0
    for sample in samples:
        user = sample["user_id"]
        bucket = buckets.setdefault(user, [])
        bucket.append(sample)
        waiting += 1
        if len(bucket) == group_size:
            ready += buckets.pop(user)
            waiting -= group_size
            if len(ready) == batch_size:
                yield ready
                ready = []
        while waiting > buffer:
            dropped = buckets.pop(next(iter(buckets)))
            waiting -= len(dropped)
            log.debug("dropped %d samples of user %s: no full group within user_buffer", len(dropped), dropped[0]["user_id"])


def chunks(samples: Iterable[dict], size: int, partial: bool) -> Iterator[list[dict]]:
    chunk: list[dict] = []
    for sample in samples:
        chunk.append(sample)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk and partial:
        yield chunk


class SampleDecoder:
    """Raw sample (bytes per field) to a list of training samples; subclasses name the media roles.

    Every output holds the role tensors, ``prompt`` (the json caption), ``key``, ``user_id`` (``-1`` when
    absent) and the requested ``metadata_fields`` of the json.
    """

    def __init__(self, media: MediaDecoder, metadata_fields: Sequence[str] = ()):
        self.media = media
        self.metadata_fields = tuple(metadata_fields)

    def metadata(self, sample: dict[str, Any]) -> dict[str, Any]:
        """The sample's json, which must hold a ``caption``."""
        try:
            metadata = json.loads(sample["json"])
        except KeyError:
            raise SkipSample("no 'json' field") from None
        except ValueError as error:
            raise SkipSample(f"its json does not parse ({error})") from None
        if not isinstance(metadata, dict) or "caption" not in metadata:
            raise SkipSample("its json has no 'caption'")
        return metadata

    def common(self, sample: dict[str, Any], metadata: dict[str, Any]) -> dict[str, Any]:
        out = {"prompt": str(metadata["caption"] or ""), "key": sample["__key__"], "user_id": parse_user_id(metadata.get("user_id"))}
        for name in self.metadata_fields:
            if name not in metadata:
                raise SkipSample(f"its json has no '{name}' (a metadata_fields entry)")
            out[name] = metadata[name]
        return out

    def __call__(self, sample: dict[str, Any], rng: np.random.Generator) -> list[dict[str, Any]]:
        raise NotImplementedError


def decode_samples(samples: Iterable[dict[str, Any]], decoder: SampleDecoder, skips: SkipLog, rng: np.random.Generator) -> Iterator[dict[str, Any]]:
    """Decoded samples; a sample whose decoding fails in any way is logged, counted and skipped."""
    for sample in samples:
        try:
            outputs = decoder(sample, rng)
        except Exception as error:  # noqa: BLE001 -- any failure of one sample skips that sample only
            reason = str(error) if isinstance(error, SkipSample) else f"{type(error).__name__}: {error}"
            skips.record(f"sample {sample.get('__key__')!r} of {sample.get('__url__')}", reason)
            continue
        skips.in_a_row = 0
        yield from outputs


class ShardStream(IterableDataset):
    """The per-worker pipeline of one DataModule split (see the module docstring). Picklable for spawn."""

    def __init__(
        self,
        shards: list[str],
        decoder: SampleDecoder,
        batch_size: int,
        train: bool,
        rank: int,
        world_size: int,
        seed: int,
        shuffle_buffer: int = 1000,
        users_per_batch: int | None = None,
        user_buffer: int = 256,
        max_consecutive_skips: int = 1000,
    ):
        super().__init__()
        self.shards, self.decoder, self.batch_size, self.train = shards, decoder, batch_size, train
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.shuffle_buffer, self.users_per_batch, self.user_buffer = shuffle_buffer, users_per_batch, user_buffer
        self.skips = SkipLog(max_consecutive_skips)
        self.iterations = 0  # distinguishes epochs when iterated in the main process (no workers)

    def consumer(self) -> tuple[int, int, int]:
        """(this consumer's index, number of consumers, a seed that differs per epoch)."""
        info = get_worker_info()
        worker, workers, epoch_seed = (0, 1, self.iterations) if info is None else (info.id, info.num_workers, info.seed)
        self.iterations += 1
        return self.rank * workers + worker, self.world_size * workers, epoch_seed

    def __iter__(self) -> Iterator[dict[str, Any]]:
        consumer, consumers, epoch_seed = self.consumer()
        order = random.Random(f"{self.seed}-{consumer}-{epoch_seed}")
        augment = np.random.default_rng([self.seed, consumer, epoch_seed % 2**32])
        own_shards = len(self.shards) >= consumers
        shards = self.shards[consumer::consumers] if own_shards else self.shards
        urls = (order.choice(shards) for _ in itertools.count()) if self.train else iter(shards)
        samples = wds.tarfile_to_samples(handler=self.skips.shard_error)({"url": url} for url in urls)
        if not own_shards:
            samples = (s for s in samples if zlib.crc32(s["__key__"].encode()) % consumers == consumer)
        if self.train and self.shuffle_buffer > 1:
            samples = wds.filters.shuffle(bufsize=self.shuffle_buffer, initial=self.shuffle_buffer, rng=order)(samples)
        decoded = decode_samples(samples, self.decoder, self.skips, augment)
        if self.train and self.users_per_batch:
            groups = group_by_user(decoded, self.batch_size, self.users_per_batch, self.user_buffer)
        else:
            groups = chunks(decoded, self.batch_size, partial=not self.train)
        batch = None
        for group in groups:  # each batch leaves when the next is ready, carrying the skips counted till then
            if batch is not None:
                yield {**batch, "skipped": torch.tensor(self.skips.take())}
            batch = collate(group)
        if batch is not None or self.skips.pending:  # a batch-less marker still reports the last skips
            yield {**(batch or {}), "skipped": torch.tensor(self.skips.take())}


class ShardDataModule(pl.LightningDataModule):
    """Base of the webdataset DataModules: streaming, splitting, shuffling, batching, skip counting.

    Subclasses define :meth:`sample_decoder` (which media roles a sample has and what a batch holds).

    Args:
        train_shards: a glob (``data/*.tar``), a directory, a brace pattern (``data/pairs-{000000..000099}.tar``)
            or URLs, or several of these joined by ``::``.
        val_shards: optional held-out shards, read once in order (last batch may be partial).
        batch_size: samples per batch and device.
        num_workers: dataloader worker processes per device.
        resolution: training size, ``(height, width)`` or one side of a square; ``None`` keeps the stored size.
        random_crop, random_flip: augmentations, identical for all media of a sample (training only).
        shuffle_buffer: samples each worker shuffles among.
        batches_per_epoch: batches per rank per epoch.
        seed: seeds shard sampling, shuffling and augmentation (each rank, worker and epoch differs).
        num_frames, frame_stride, fps, random_temporal_crop: video frame sampling
            (:class:`~lightning_pref.datamodules.media.FrameSampling`); videos need ``num_frames``.
        users_per_batch: group training batches by ``user_id``: each batch holds this many groups of
            ``batch_size // users_per_batch`` samples of one user each (see :func:`group_by_user`).
        user_buffer: samples each worker keeps waiting in per-user buckets.
        metadata_fields: json fields copied into every batch (numbers become tensors).
        max_consecutive_skips: fail after this many skipped samples in a row.
    """

    def __init__(
        self,
        train_shards: str,
        val_shards: str | None = None,
        batch_size: int = 8,
        num_workers: int = 2,
        resolution: int | tuple[int, int] | None = None,
        random_crop: bool = False,
        random_flip: bool = False,
        shuffle_buffer: int = 1000,
        batches_per_epoch: int = 1000,
        seed: int = 0,
        num_frames: int | None = None,
        frame_stride: int = 1,
        fps: float | None = None,
        random_temporal_crop: bool = False,
        users_per_batch: int | None = None,
        user_buffer: int = 256,
        metadata_fields: list[str] | None = None,
        max_consecutive_skips: int = 1000,
    ):
        super().__init__()
        if users_per_batch is not None and (users_per_batch < 1 or batch_size % users_per_batch):
            raise ValueError(f"users_per_batch={users_per_batch} must divide batch_size={batch_size}.")
        self.train_shards, self.val_shards = train_shards, val_shards
        self.batch_size, self.num_workers = batch_size, num_workers
        self.resolution, self.random_crop, self.random_flip = resolution, random_crop, random_flip
        self.shuffle_buffer, self.batches_per_epoch, self.seed = shuffle_buffer, batches_per_epoch, seed
        self.frames = None if num_frames is None else FrameSampling(num_frames, frame_stride, fps, random_temporal_crop)
        self.users_per_batch, self.user_buffer = users_per_batch, user_buffer
        self.metadata_fields = list(metadata_fields or [])
        self.max_consecutive_skips = max_consecutive_skips
        #: samples skipped so far by this rank's workers (summed from ``batch["skipped"]`` in the main process)
        self.skipped_samples = 0

    def media_decoder(self, train: bool) -> MediaDecoder:
        """Pixels (or precomputed tensors) of a sample's media; augmentations and random windows in training only."""
        geometry = Geometry(self.resolution, self.random_crop and train, self.random_flip and train)
        frames = self.frames if self.frames is None or train else dataclasses.replace(self.frames, random_start=False)
        return MediaDecoder(geometry, frames)

    def sample_decoder(self, train: bool) -> SampleDecoder:
        """The decoder of one raw sample for the training (``train=True``) or validation split."""
        raise NotImplementedError

    def rank_and_world_size(self) -> tuple[int, int]:
        if self.trainer is not None:
            return self.trainer.global_rank, self.trainer.world_size
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))

    def stream(self, spec: str, train: bool, num_workers: int) -> ShardStream:
        shards = expand_shards(spec)
        rank, world_size = self.rank_and_world_size()
        consumers = world_size * max(num_workers, 1)
        if len(shards) < consumers and rank == 0:
            log.warning(
                "%d shard(s) for %d consumers (ranks x workers): every worker reads all shards and keeps its share "
                "of the samples. Write at least %d shards to read each once.", len(shards), consumers, consumers,
            )
        return ShardStream(
            shards, self.sample_decoder(train), self.batch_size, train, rank, world_size, self.seed,
            self.shuffle_buffer, self.users_per_batch, self.user_buffer, self.max_consecutive_skips,
        )

    def count_skipped(self, batches: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """Main-process stage: add each batch's skip count to :attr:`skipped_samples`."""
        for batch in batches:
            self.skipped_samples += int(batch["skipped"])
            if len(batch) > 1:
                yield batch

    def loader(self, spec: str, train: bool, num_workers: int) -> wds.WebLoader:
        stream = self.stream(spec, train, num_workers)
        return wds.WebLoader(stream, batch_size=None, num_workers=num_workers).compose(self.count_skipped)

    def train_dataloader(self) -> wds.WebLoader:
        loader = self.loader(self.train_shards, True, self.num_workers)
        return loader.with_epoch(self.batches_per_epoch).with_length(self.batches_per_epoch, silent=True)

    def val_dataloader(self) -> wds.WebLoader | list:
        return [] if self.val_shards is None else self.loader(self.val_shards, False, 0)

    def teardown(self, stage: str) -> None:
        if self.skipped_samples:
            log.warning("%s skipped %d sample(s) so far (see the warnings for which and why).", type(self).__name__, self.skipped_samples)

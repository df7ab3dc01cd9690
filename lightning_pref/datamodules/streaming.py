"""The streaming machinery every DataModule shares: shards to batches, on every rank and worker, resumable.

One *consumer* is one dataloader worker of one rank. Training gives each consumer its own subset of the
shards (``shards[consumer::consumers]``) and reads it in random passes (each pass a fresh permutation of the
subset), forever; so consumers never read the same sample, and every rank yields exactly
``batches_per_epoch`` batches per epoch (DDP ranks never wait on each other). With fewer shards than
consumers, every consumer reads all shards and keeps the samples whose key hashes to it (correct, but each
reads everything: write more shards). Validation reads each consumer's part once, in order.
(``webdataset.WebDataset(resampled=True, nodesplitter=split_by_node)`` would not do: every rank resamples
from all shards and the splitter only thins the random draws, so ranks overlap.) Rank and world size come
from the trainer in the main process, so forked and spawned workers agree on them.

Everything a consumer does is a function of ``(seed, consumer, epoch)`` and, for augmentation, of the
sample's key: the stream does not depend on the worker start method or on torch's worker seeds. That makes
it **resumable**: ``ShardLoader`` records, for every batch the trainer actually consumes, where its
consumer stood (batches formed, raw samples read), and a checkpoint holds those positions for every rank
and worker. A resumed run fast-forwards each consumer to its position (reading, not decoding, the samples it
had already used) and continues with exactly the batches the uninterrupted run would have trained on.

A sample that cannot be used (a truncated shard, a missing field, an image that does not decode, a video
too short for the frame window, non-finite precomputed latents) is logged with its shard, key and reason,
skipped and counted: ``ShardDataModule.skipped_samples``. A stream that can yield nothing fails at
once with a [`DataError`][lightning_pref.errors.DataError] naming the shards: every shard empty, a consumer whose
shards are all empty, a full pass over a consumer's shards without one sample, or
``max_consecutive_skips`` bad samples in a row.

Worker pipeline: shard passes -> ``webdataset.tarfile_to_samples`` -> key split (if needed) -> shuffle
buffer -> decode (the DataModule's ``sample_decoder``) -> per-user groups (optional)
-> batches.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import itertools
import json
import logging
import os
import random
import tarfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from lightning_pref.datamodules.media import FrameSampling, Geometry, MediaDecoder, SkipSample
from lightning_pref.errors import ConfigError, DataError, MissingFileError, UserError, check_whole_numbers

log = logging.getLogger(__name__)

#: what a worker adds to each batch for the main process (removed before the batch leaves the loader)
STREAM_STATE = "__stream_state__"
#: what a worker yields instead of a batch when its stream cannot go on (raised in the main process)
STREAM_ERROR = "__stream_error__"


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
        raise MissingFileError(f"No shard matches {spec!r}: check the path, or write shards first.")
    missing = [path for path in paths if "://" not in path and not Path(path).is_file()]
    if missing:
        raise MissingFileError(
            f"{len(missing)} shard(s) of {spec!r} do not exist, e.g. {missing[0]!r}: check the pattern."
        )
    return paths


def shard_is_empty(path: str) -> bool:
    """Whether a local tar shard holds no member at all (URLs are never called empty: they are not opened)."""
    if "://" in path:
        return False
    try:
        with tarfile.open(path) as tar:
            return tar.next() is None
    except (tarfile.TarError, OSError):
        return False  # unreadable: the stream skips it and counts why


def parse_user_id(value: Any) -> int:
    """An integer user id; ``-1`` when absent; strings that are not numbers map to a stable hash."""
    if value is None:
        return -1
    try:
        return int(value)
    except (TypeError, ValueError):
        return zlib.crc32(str(value).encode()) & 0x7FFFFFFF


def parse_flag(name: str, value: Any) -> bool:
    """A json flag: ``true``/``false``, 0/1, or the strings ``"true"``/``"false"`` (any case); else the sample is skipped."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise SkipSample(f"its json field {name!r} is {value!r}, not true or false")


class SkipLog:
    """Counts and logs skipped samples in the process that reads them (a dataloader worker or the main one).

    Raises a [`DataError`][lightning_pref.errors.DataError] once ``limit`` samples in a row were skipped: a stream
    whose every sample fails would otherwise spin forever without a batch. The message counts the reasons.
    """

    def __init__(self, limit: int = 1000):
        self.limit = limit
        self.pending = 0
        self.in_a_row: collections.Counter[str] = collections.Counter()

    def record(self, where: str, reason: str) -> None:
        log.warning("skipped %s: %s", where, reason)
        self.pending += 1
        self.in_a_row[reason.split(" (")[0]] += 1
        if sum(self.in_a_row.values()) >= self.limit:
            reasons = "; ".join(f"{count} x {why}" for why, count in self.in_a_row.most_common(3))
            raise DataError(
                f"the last {self.limit} samples were all skipped (last: {where}; reasons: {reasons}): the shards or the "
                "DataModule options (resolution, num_frames, fields) are wrong."
            )

    def kept(self) -> None:
        self.in_a_row.clear()

    def shard_error(self, exception: Exception) -> bool:
        """Webdataset handler: the rest of an unreadable shard is skipped; the stream goes on."""
        url = next((arg for arg in reversed(exception.args) if isinstance(arg, str)), "?")
        self.record(
            f"the rest of shard {url}", f"{type(exception).__name__}: {exception.args[0] if exception.args else ''}"
        )
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
            raise DataError(
                f"samples of one batch have different fields ({sorted(samples[0])} and others): do not mix "
                "precomputed and pixel shards, or image and video shards, in one DataModule."
            ) from None
        first = values[0]
        if isinstance(first, torch.Tensor):
            try:
                stacked = torch.stack(values)
            except RuntimeError:
                shapes = sorted({tuple(value.shape) for value in values})
                raise DataError(f"'{key}' has different shapes in one batch ({shapes}): set `resolution`.") from None
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
            log.debug(
                "dropped %d samples of user %s: no full group within user_buffer", len(dropped), dropped[0]["user_id"]
            )


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

    #: training samples one raw sample becomes (a resumed stream replays decoding when it is not 1)
    outputs_per_sample = 1

    def __init__(self, media: MediaDecoder, metadata_fields: Sequence[str] = ()):
        self.media = media
        self.metadata_fields = tuple(metadata_fields)

    def metadata(self, sample: dict[str, Any]) -> dict[str, Any]:
        """The sample's json, which must hold a string ``caption`` (``null`` reads as the empty prompt)."""
        try:
            metadata = json.loads(sample["json"])
        except KeyError:
            fields = sorted(key for key in sample if not key.startswith("__"))
            if any(field.endswith(".json") for field in fields):  # webdataset cut the key at its first dot
                raise SkipSample(
                    f"no 'json' field (fields: {fields}): the key holds a dot; rewrite the shard with "
                    "dot-free keys (the library's converters do)"
                ) from None
            raise SkipSample(f"no 'json' field (fields: {fields})") from None
        except ValueError as error:
            raise SkipSample(f"its json does not parse ({error})") from None
        if not isinstance(metadata, dict) or "caption" not in metadata:
            raise SkipSample("its json has no 'caption'")
        if not isinstance(metadata["caption"], (str, type(None))):
            raise SkipSample(f"its caption is a {type(metadata['caption']).__name__}, not a string")
        return metadata

    def common(self, sample: dict[str, Any], metadata: dict[str, Any]) -> dict[str, Any]:
        out = {
            "prompt": metadata["caption"] or "",
            "key": sample["__key__"],
            "user_id": parse_user_id(metadata.get("user_id")),
        }
        for name in self.metadata_fields:
            if name not in metadata:
                raise SkipSample(f"its json has no '{name}' (a metadata_fields entry)")
            out[name] = metadata[name]
        return out

    def __call__(self, sample: dict[str, Any], rng: np.random.Generator) -> list[dict[str, Any]]:
        raise NotImplementedError


def sample_rng(seed: Sequence[int], key: str) -> np.random.Generator:
    """The augmentation generator of one sample: a function of ``seed`` and its key alone, so a sample gets the
    same crop, flip and frame window whichever worker decodes it and whatever was decoded before."""
    return np.random.default_rng([*seed, zlib.crc32(key.encode())])


def decode_samples(
    samples: Iterable[dict[str, Any]], decoder: SampleDecoder, skips: SkipLog, seed: Sequence[int]
) -> Iterator[dict[str, Any]]:
    """Decoded samples; a sample whose decoding fails in any way is logged, counted and skipped.

    ``seed`` (with each sample's key) seeds its augmentation (``sample_rng``).
    """
    for sample in samples:
        key = str(sample.get("__key__"))
        try:
            outputs = decoder(sample, sample_rng(seed, key))
        except Exception as error:  # noqa: BLE001 -- any failure of one sample skips that sample only
            reason = str(error) if isinstance(error, SkipSample) else f"{type(error).__name__}: {error}"
            skips.record(f"sample {key!r} of {sample.get('__url__')}", reason)
            continue
        skips.kept()
        yield from outputs


@dataclasses.dataclass(frozen=True)
class StreamPosition:
    """Where one consumer's stream of one epoch stands: batches it formed, raw samples it read to form them."""

    batches: int = 0
    samples: int = 0


class ShardStream(IterableDataset):
    """The per-worker pipeline of one DataModule split (see the module docstring). Picklable for spawn.

    Before each iteration the main process sets ``epoch``, ``start`` (the position each consumer continues
    from: empty for a fresh epoch) and ``worker_offset`` (worker ``w`` plays consumer role ``w + offset``, so a
    resumed iterator continues the round-robin of workers where the interrupted one stood).
    """

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
        self.max_consecutive_skips = max_consecutive_skips
        self.epoch = 0
        self.start: dict[int, StreamPosition] = {}
        self.worker_offset = 0

    def consumer(self) -> tuple[int, int]:
        """(this worker's consumer index, number of consumers)."""
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        return self.rank * workers + (worker + self.worker_offset) % workers, self.world_size * workers

    def __iter__(self) -> Iterator[dict[str, Any]]:
        consumer, consumers = self.consumer()
        try:
            yield from self.batches(consumer, consumers)
        except UserError as error:  # reported by the main process, with the message intact
            yield {STREAM_ERROR: str(error)}

    def batches(self, consumer: int, consumers: int) -> Iterator[dict[str, Any]]:
        skips = SkipLog(self.max_consecutive_skips)
        order = random.Random(f"{self.seed}-{consumer}-{self.epoch}")
        own_shards = len(self.shards) >= consumers
        shards = self.shards[consumer::consumers] if own_shards else self.shards
        kept_in_pass = [0]

        def urls() -> Iterator[dict[str, str]]:
            while True:  # passes over this consumer's shards, each in a fresh random order
                kept_in_pass[0] = 0
                for url in order.sample(shards, len(shards)) if self.train else shards:
                    yield {"url": url}
                if not self.train:
                    return
                if kept_in_pass[0] == 0:
                    raise DataError(
                        f"a full pass over the {len(shards)} shard(s) of consumer {consumer} (rank {self.rank}) read no "
                        f"sample (e.g. {shards[0]}): the shards are empty or unreadable"
                        + ("" if own_shards else ", or hold too few samples for every worker to get one")
                        + ": write non-empty shards, or use fewer num_workers."
                    )

        def mine(samples: Iterable[dict]) -> Iterator[dict]:
            for sample in samples:
                if own_shards or zlib.crc32(sample["__key__"].encode()) % consumers == consumer:
                    kept_in_pass[0] += 1
                    yield sample

        samples = mine(wds.tarfile_to_samples(handler=skips.shard_error)(urls()))
        if self.train and self.shuffle_buffer > 1:
            samples = wds.filters.shuffle(bufsize=self.shuffle_buffer, initial=self.shuffle_buffer, rng=order)(samples)
        start = self.start.get(consumer, StreamPosition())
        replay = bool(self.train and self.users_per_batch) or self.decoder.outputs_per_sample != 1
        if not replay:  # fast-forward by reading, without decoding, the samples the earlier batches used
            samples = itertools.islice(samples, start.samples, None)
        reading = ReadCount(0 if replay else start.samples)
        decoded = decode_samples(reading.through(samples), self.decoder, skips, (self.seed, self.epoch))
        if self.train and self.users_per_batch:
            groups = group_by_user(decoded, self.batch_size, self.users_per_batch, self.user_buffer)
        else:
            groups = chunks(decoded, self.batch_size, partial=not self.train)
        if replay:  # a batch may hold part of a raw sample's outputs or of a user's bucket: form the earlier ones again
            groups = itertools.islice(groups, start.batches, None)
        for formed, group in enumerate(groups, start=start.batches + 1):
            yield {**collate(group), STREAM_STATE: (consumer, StreamPosition(formed, reading.count), skips.take())}
        if skips.pending:  # a batch-less marker reports the last skips of a finite stream
            yield {STREAM_STATE: (consumer, None, skips.take())}


class ReadCount:
    """Counts the raw samples a stream has read (after the shuffle buffer)."""

    def __init__(self, start: int):
        self.count = start

    def through(self, samples: Iterable[dict]) -> Iterator[dict]:
        for sample in samples:
            self.count += 1
            yield sample


class ShardLoader:
    """The loader of one split: a ``DataLoader`` over a ``ShardStream``, one epoch per iteration.

    It takes the bookkeeping off every batch (skips, stream positions, a worker's error). For training it is
    resumable in Lightning's sense (``state_dict`` / ``load_state_dict``): ``consumed``, called by the
    DataModule for each batch the trainer actually trains on (not the ones prefetched), advances the state;
    ``state_dict`` gathers the positions of every rank's consumers. Outside a trainer, every batch handed out
    counts as consumed.
    """

    def __init__(
        self,
        stream: ShardStream,
        num_workers: int,
        batches_per_epoch: int | None,
        on_skips: Callable[[int], None],
        counts_own_consumption: bool,
    ):
        self.stream, self.num_workers, self.batches_per_epoch = stream, num_workers, batches_per_epoch
        self.on_skips = on_skips
        self.counts_own_consumption = counts_own_consumption
        self.epoch, self.delivered, self.skipped = 0, 0, 0
        self.positions: dict[int, StreamPosition] = {}
        self.in_flight: collections.deque = collections.deque()  # (consumer, position, skips) of handed-out batches

    @property
    def workers(self) -> int:
        return max(self.num_workers, 1)

    def __len__(self) -> int:
        if self.batches_per_epoch is None:
            raise TypeError("a validation stream has no length until it is read")
        return self.batches_per_epoch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.stream.epoch = self.epoch
        self.stream.start = dict(self.positions) if self.delivered else {}
        self.stream.worker_offset = self.delivered % self.workers
        self.in_flight.clear()
        remaining = None if self.batches_per_epoch is None else self.batches_per_epoch - self.delivered
        batches = iter(DataLoader(self.stream, batch_size=None, num_workers=self.num_workers))
        handed_out = 0
        while remaining is None or handed_out < remaining:
            batch = next(batches, None)
            if batch is None:
                return
            if STREAM_ERROR in batch:
                raise DataError(batch[STREAM_ERROR])
            consumer, position, skips = batch.pop(STREAM_STATE)
            self.on_skips(skips)
            if position is None:
                continue
            self.in_flight.append((consumer, position, skips))
            handed_out += 1
            if self.counts_own_consumption:
                self.consumed()
            yield batch

    def consumed(self) -> None:
        """The oldest handed-out batch was trained on: the state moves past it (and to the next epoch after the last)."""
        if not self.in_flight:
            return
        consumer, position, skips = self.in_flight.popleft()
        self.positions[consumer] = position
        self.delivered += 1
        self.skipped += skips
        if self.delivered == self.batches_per_epoch:
            self.epoch, self.delivered, self.positions = self.epoch + 1, 0, {}

    def state_dict(self) -> dict[str, Any]:
        """Plain numbers only; the positions of every rank's consumers (gathered: a collective under DDP)."""
        positions = {consumer: [p.batches, p.samples] for consumer, p in self.positions.items()}
        if torch.distributed.is_available() and torch.distributed.is_initialized() and self.stream.world_size > 1:
            gathered: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, positions)
            positions = {consumer: position for part in gathered for consumer, position in part.items()}
        return {
            "epoch": self.epoch,
            "delivered": self.delivered,
            "skipped": self.skipped,
            "positions": positions,
            "consumers": self.stream.world_size * self.workers,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        consumers = self.stream.world_size * self.workers
        self.epoch, self.delivered, self.skipped = int(state["epoch"]), int(state["delivered"]), int(state["skipped"])
        self.on_skips(self.skipped)
        self.positions = {}
        if state["consumers"] != consumers and self.delivered:
            log.warning(
                "the checkpoint's data stream had %d consumers (ranks x workers), this run has %d: epoch %d restarts its "
                "stream from the beginning for its remaining %d batches.",
                state["consumers"],
                consumers,
                self.epoch,
                self.batches_per_epoch - self.delivered,
            )
            return
        self.positions = {int(c): StreamPosition(*p) for c, p in state["positions"].items()}


class ShardDataModule(pl.LightningDataModule):
    """Base of the webdataset DataModules: streaming, splitting, shuffling, batching, skip counting, resuming.

    Subclasses define ``sample_decoder`` (which media roles a sample has and what a batch holds).

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
        seed: seeds shard order, shuffling and augmentation (each rank, worker and epoch differs).
        num_frames, frame_stride, fps, random_temporal_crop: video frame sampling
            ([`FrameSampling`][lightning_pref.datamodules.media.FrameSampling]); videos need ``num_frames``.
        users_per_batch: group training batches by ``user_id``: each batch holds this many groups of
            ``batch_size // users_per_batch`` samples of one user each (see ``group_by_user``).
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
        check_whole_numbers(batch_size=batch_size)
        check_whole_numbers(least=0, num_workers=num_workers, shuffle_buffer=shuffle_buffer)
        check_whole_numbers(
            batches_per_epoch=batches_per_epoch, user_buffer=user_buffer, max_consecutive_skips=max_consecutive_skips
        )
        sides = (resolution,) if isinstance(resolution, int) else tuple(resolution or ())
        if any(isinstance(side, bool) or not isinstance(side, int) or side < 1 for side in sides) or len(sides) > 2:
            raise ConfigError(f"resolution={resolution!r}: use one positive side, [height, width], or null.")
        if users_per_batch is not None and (users_per_batch < 1 or batch_size % users_per_batch):
            raise ConfigError(f"users_per_batch={users_per_batch} must divide batch_size={batch_size}.")
        self.train_shards, self.val_shards = train_shards, val_shards
        self.batch_size, self.num_workers = batch_size, num_workers
        self.resolution, self.random_crop, self.random_flip = resolution, random_crop, random_flip
        self.shuffle_buffer, self.batches_per_epoch, self.seed = shuffle_buffer, batches_per_epoch, seed
        self.frames = None if num_frames is None else FrameSampling(num_frames, frame_stride, fps, random_temporal_crop)
        self.users_per_batch, self.user_buffer = users_per_batch, user_buffer
        self.metadata_fields = list(metadata_fields or [])
        self.max_consecutive_skips = max_consecutive_skips
        #: samples skipped so far by this rank's workers, in the batches handed out
        self.skipped_samples = 0
        self.train_loader: ShardLoader | None = None

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
        if train:
            check_every_consumer_has_shards(spec, shards, consumers)
        if len(shards) < consumers and rank == 0:
            log.warning(
                "%d shard(s) for %d consumers (ranks x workers): every worker reads all shards and keeps its share "
                "of the samples. Write at least %d shards to read each once.",
                len(shards),
                consumers,
                consumers,
            )
        return ShardStream(
            shards,
            self.sample_decoder(train),
            self.batch_size,
            train,
            rank,
            world_size,
            self.seed,
            self.shuffle_buffer,
            self.users_per_batch,
            self.user_buffer,
            self.max_consecutive_skips,
        )

    def count_skips(self, count: int) -> None:
        self.skipped_samples += count

    def loader(self, spec: str, train: bool, num_workers: int) -> ShardLoader:
        return ShardLoader(
            self.stream(spec, train, num_workers),
            num_workers,
            self.batches_per_epoch if train else None,
            self.count_skips,
            counts_own_consumption=self.trainer is None,
        )

    def train_dataloader(self) -> ShardLoader:
        self.train_loader = self.loader(self.train_shards, True, self.num_workers)
        return self.train_loader

    def val_dataloader(self) -> ShardLoader | list:
        return [] if self.val_shards is None else self.loader(self.val_shards, False, 0)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Lightning hands this batch to the training step: the training stream's resumable state moves past it."""
        if self.trainer is not None and self.trainer.training and self.train_loader is not None:
            self.train_loader.consumed()
        return batch

    def teardown(self, stage: str) -> None:
        if self.skipped_samples:
            log.warning(
                "%s skipped %d sample(s) so far (see the warnings for which and why).",
                type(self).__name__,
                self.skipped_samples,
            )


def check_every_consumer_has_shards(spec: str, shards: list[str], consumers: int) -> None:
    """Refuse, before any worker starts, shards that are all empty, or a consumer whose own shards all are."""
    empty = [shard_is_empty(shard) for shard in shards]
    if all(empty):
        raise DataError(
            f"every shard of {spec!r} is empty ({len(shards)} shard(s), e.g. {shards[0]}): the converter that wrote them "
            "kept no sample; check its counts and rerun it."
        )
    if len(shards) >= consumers:
        starved = [consumer for consumer in range(consumers) if all(empty[consumer::consumers])]
        if starved:
            raise DataError(
                f"{sum(empty)} of the {len(shards)} shards of {spec!r} are empty, and consumer(s) {starved} (rank x worker) "
                f"would get only empty ones (shards are dealt round-robin to {consumers} consumers): remove the empty "
                "shards or use fewer num_workers."
            )

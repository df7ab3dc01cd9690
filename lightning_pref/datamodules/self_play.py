"""Self-play data: real winners in, one iteration's (real, generated) pairs out (SPIN-Diffusion).

[`SelfPlayDataModule`][lightning_pref.datamodules.self_play.SelfPlayDataModule] reads real images with their
prompts (unpaired shards, or the winners of preference shards) and trains on pairs that the self-play method
makes of them at the start of every iteration
([`SPINDiffusion.start_iteration`][lightning_pref.methods.spin.SPINDiffusion.start_iteration]). One training
epoch is one iteration: with ``trainer.reload_dataloaders_every_n_epochs: 1`` Lightning asks for a new training
dataloader before each epoch (before ``on_train_epoch_start``), and ``train_dataloader`` is where the
iteration's pairs are made, or found on disk when a resumed run reaches an iteration that was already made.

An iteration's pairs are precomputed shards (the format of
[`precompute`][lightning_pref.datamodules.precompute]): each sample holds ``latents.safetensors`` with
``latents_w`` (the real image's latents, the VAE posterior's mode) and ``latents_l`` (the generated loser's
latents, never decoded), and a ``json`` with the prompt as ``caption``. Their writer is
[`write_pair_latents`][lightning_pref.datamodules.self_play.write_pair_latents].
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

import webdataset as wds
from safetensors.torch import save as save_safetensors

from lightning_pref.batch import LABEL
from lightning_pref.datamodules.preference import PairDecoder
from lightning_pref.datamodules.streaming import ShardDataModule, ShardLoader, ShardStream, expand_shards
from lightning_pref.datamodules.unpaired import UnpairedDecoder
from lightning_pref.errors import ConfigError


def write_pair_latents(
    records: Iterable[dict[str, Any]], out_dir: str | Path, prefix: str, samples_per_shard: int = 1000
) -> int:
    """Write pairs of latents to precomputed pair shards ``<prefix>-<index>.tar``; returns how many.

    Each record is ``{"key": str, "latents_w": Tensor, "latents_l": Tensor, "caption": str, **metadata}``; the
    tensors go to ``latents.safetensors`` as stored (in their dtype), the rest to the ``json``. No record, no shard.
    """
    records = iter(records)
    first = next(records, None)
    if first is None:
        return 0
    written = 0
    with wds.ShardWriter(str(Path(out_dir) / f"{prefix}-%06d.tar"), maxcount=samples_per_shard, verbose=0) as sink:
        for record in itertools.chain([first], records):
            tensors = {name: record[name].contiguous() for name in ("latents_w", "latents_l")}
            metadata = {name: value for name, value in record.items() if name not in (*tensors, "key")}
            sink.write({"__key__": record["key"], "json": metadata, "latents.safetensors": save_safetensors(tensors)})
            written += 1
    return written


class SelfPlayDataModule(ShardDataModule):
    """Real winners for a self-play method; each training epoch trains on the pairs of one iteration.

    Args:
        train_shards: the real winners: unpaired shards (``image.<ext>`` + ``json`` with the prompt as
            ``caption``; a ``label`` of 0 is refused) or, with ``source="winners"``, preference shards whose
            winners are the real images (Pick-a-Pic, as the paper trains). Precomputed shards of either kind work
            too (their ``latents`` are the winners' latents).
        source: ``unpaired`` or ``winners``.
        **kwargs: the streaming options of [`ShardDataModule`][lightning_pref.datamodules.streaming.ShardDataModule]
            (``batch_size``: pairs per step and device, also the winners per generation batch; ``num_workers``,
            ``shuffle_buffer``, ``seed``, ``resolution``, ``val_shards``: held-out preference pairs), except
            ``batches_per_epoch``: an epoch is one iteration of the method's ``steps_per_iteration`` optimizer
            steps.
    """

    def __init__(
        self,
        train_shards: str,
        *,
        source: Literal["unpaired", "winners"] = "unpaired",
        batches_per_epoch: None = None,
        **kwargs: Any,
    ):
        if batches_per_epoch is not None:
            raise ConfigError(
                "SelfPlayDataModule: remove batches_per_epoch: an epoch is one self-play iteration of the model's "
                "steps_per_iteration optimizer steps (set model.init_args.steps_per_iteration)."
            )
        if source not in ("unpaired", "winners"):
            raise ConfigError(
                f"source={source!r}: real winners come from 'unpaired' shards or the 'winners' of preference shards."
            )
        super().__init__(train_shards, **kwargs)
        self.batches_per_epoch = None  # each iteration's loader gets the module's step budget instead
        self.source = source

    def sample_decoder(self, train: bool) -> PairDecoder:
        """Pairs: an iteration's (real, generated) latents in training, held-out preference pairs in validation."""
        return PairDecoder(self.media_decoder(train), self.metadata_fields, seed=self.seed)

    def real_winners(self) -> Iterator[dict[str, Any]]:
        """This rank's share of the real winners, each once, in batches of ``batch_size`` (``pixels`` or precomputed
        ``latents``, ``prompt``, ``key``); the ranks' shares are disjoint and together hold every winner."""
        rank, world_size = self.rank_and_world_size()
        decoder = UnpairedDecoder(self.media_decoder(train=False), source=self.source)
        stream = ShardStream(
            expand_shards(self.train_shards),
            decoder,
            self.batch_size,
            train=False,
            rank=rank,
            world_size=world_size,
            seed=self.seed,
            max_consecutive_skips=self.max_consecutive_skips,
        )
        for batch in ShardLoader(stream, 0, None, self.count_skips, counts_own_consumption=True):
            undesirable = [key for key, label in zip(batch["key"], batch[LABEL].tolist()) if label != 1]
            if undesirable:
                raise ConfigError(
                    f"train_shards={self.train_shards!r}: sample {undesirable[0]!r} is labelled {LABEL}=0, but "
                    "self-play trains on real winners only: give shards of real images (label 1 or none), or "
                    "preference shards with source: winners."
                )
            yield batch

    def train_dataloader(self) -> ShardLoader:
        """The pairs of iteration ``current_epoch + 1``, made (or found) by the module's ``start_iteration``."""
        module = self.trainer.lightning_module if self.trainer is not None else None
        if module is None or not hasattr(module, "start_iteration"):
            raise ConfigError(
                "SelfPlayDataModule makes its pairs with a self-play method in a Trainer: use it with "
                "model: lightning_pref.methods.spin.SPINDiffusion."
            )
        pairs = module.start_iteration(self.trainer.current_epoch + 1, self.real_winners)
        self.train_loader = ShardLoader(
            self.stream(pairs, True, self.num_workers),
            self.num_workers,
            module.steps_per_iteration * self.trainer.accumulate_grad_batches,
            self.count_skips,
            counts_own_consumption=False,
        )
        return self.train_loader

"""Preference pairs of many users, for personalized methods (PPD): every batch holds each pair's ``user_id``
and, when the shards carry one, its user's precomputed embedding.

A pair shard's sample (see [`shards`][lightning_pref.datamodules.shards]) names its user in the json
(``"user_id": 17``, an integer from 0; a string id reads as a stable hash of it) and may hold its user's
embedding as the member ``user_embedding.npy`` (a float array ``tokens x dim``, read without pickle;
[`lightning_pref.users`][lightning_pref.users]). A batch of ``B`` pairs holds what
[`PreferenceDataModule`][lightning_pref.datamodules.preference.PreferenceDataModule]'s does plus
``user_embedding`` ``(B, tokens, dim)`` (float32) when present. ``users_per_batch`` groups batches by user; by
default pairs of many users mix in every batch, as PPD trains.

``write_user_embeddings`` (``lightning-pref data user-embeddings``) writes those embeddings: a
[`UserEncoder`][lightning_pref.users.UserEncoder] reads a few pairs of each user, and every pair of the
shards is copied with its user's embedding added.

A sample without a ``user_id`` (or with a negative one), with an unreadable embedding, or (with
``user_embeddings: true``) without one is skipped with a warning naming the field, and counted; a stream of
nothing but such samples fails with the reasons.
"""

from __future__ import annotations

import collections
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from lightning_pref.batch import USER_ID
from lightning_pref.datamodules.media import SkipSample, find_media
from lightning_pref.datamodules.preference import PairDecoder, PreferenceDataModule
from lightning_pref.datamodules.streaming import SkipLog, expand_shards, parse_user_id
from lightning_pref.errors import DataError, check_whole_numbers
from lightning_pref.users import USER_EMBEDDING, UserEncoder, UserExample

#: the shard member holding a pair's user embedding
EMBEDDING_MEMBER = f"{USER_EMBEDDING}.npy"


def read_user_embedding(data: bytes) -> torch.Tensor:
    """A ``user_embedding.npy`` member as a float32 ``(tokens, dim)`` tensor; ``SkipSample`` naming the field
    when it is anything but a finite float array of two dimensions."""
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as error:
        raise SkipSample(f"its '{EMBEDDING_MEMBER}' does not load as a numpy array ({error})") from None
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.floating) or not np.isfinite(array).all():
        raise SkipSample(
            f"its '{EMBEDDING_MEMBER}' is a {array.dtype} array of shape {array.shape}, not a finite float array "
            "(tokens x dim)"
        )
    return torch.from_numpy(array.astype(np.float32))


class UserPairDecoder(PairDecoder):
    """A raw pair to its tensors (``PairDecoder``), its checked ``user_id`` and, when stored, its user embedding.

    Args:
        require_embedding: skip pairs without ``user_embedding.npy``.
        **kwargs: those of [`PairDecoder`][lightning_pref.datamodules.preference.PairDecoder].
    """

    def __init__(self, *args: Any, require_embedding: bool = False, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.require_embedding = require_embedding

    def __call__(self, sample: dict[str, Any], rng: np.random.Generator) -> list[dict[str, Any]]:
        sample = dict(sample)
        member = sample.pop(EMBEDDING_MEMBER, None)  # not a precomputed latent: the media decoder must not see it
        if member is None and self.require_embedding:
            raise SkipSample(f"no '{EMBEDDING_MEMBER}' (user_embeddings: true needs one per pair)")
        (out,) = super().__call__(sample, rng)
        if out[USER_ID] < 0:  # absent (read as -1) or negative
            raise SkipSample("its json has no 'user_id' >= 0: give every pair its user's id")
        if member is not None:
            out[USER_EMBEDDING] = read_user_embedding(member)
        return [out]


class UserPreferenceDataModule(PreferenceDataModule):
    """Preference pairs with their users (see the module docstring), streamed like any preference shards.

    Args:
        train_shards: shard paths: a glob (``data/*.tar``), a directory, a brace pattern or URLs.
        user_embeddings: every pair must carry ``user_embedding.npy`` (PPD without a learned table); pairs
            without one are skipped. ``False`` still reads the embeddings of the pairs that have one.
        **kwargs: the options of [`PreferenceDataModule`][lightning_pref.datamodules.preference.PreferenceDataModule]
            (``users_per_batch`` groups batches by user).
    """

    def __init__(self, train_shards: str, *, user_embeddings: bool = False, **kwargs: Any):
        super().__init__(train_shards, **kwargs)
        self.user_embeddings = user_embeddings

    def sample_decoder(self, train: bool) -> UserPairDecoder:
        return UserPairDecoder(
            self.media_decoder(train),
            self.metadata_fields,
            self.label_noise if train else 0.0,
            self.seed,
            require_embedding=self.user_embeddings,
        )


# ------------------------------------------------------------------------- precomputing the embeddings
def raw_pairs(source: str, skips: SkipLog) -> Iterator[dict[str, Any]]:
    """The raw samples (bytes per member) of the shards ``source``, shard by shard, in order."""
    for shard in expand_shards(source):
        yield from wds.tarfile_to_samples(handler=skips.shard_error)([{"url": shard}])


def pair_user(sample: dict[str, Any]) -> int:
    """The ``user_id`` of a raw sample's json (``-1`` without one, or without a json that parses)."""
    try:
        metadata = json.loads(sample.get("json") or b"{}")
    except ValueError:
        return -1
    return parse_user_id(metadata.get(USER_ID)) if isinstance(metadata, dict) else -1


def user_example(sample: dict[str, Any]) -> UserExample:
    """A raw pair as one example of its user: caption, winner image, loser image."""
    images = [Image.open(io.BytesIO(find_media(sample, role)[1])).convert("RGB") for role in ("winner", "loser")]
    return UserExample(json.loads(sample["json"])["caption"] or "", *images)


def embed_users(source: str, encoder: UserEncoder, examples_per_user: int = 4, seed: int = 0) -> dict[int, np.ndarray]:
    """Each user's embedding ``(tokens, dim)`` from ``examples_per_user`` of their pairs in the pixel shards
    ``source`` (all of them when a user has fewer), chosen by a seeded draw per user (the paper: 4 pairs)."""
    check_whole_numbers(examples_per_user=examples_per_user)
    skips = SkipLog()
    keys_of: dict[int, list[str]] = collections.defaultdict(list)
    for sample in raw_pairs(source, skips):
        keys_of[pair_user(sample)].append(sample["__key__"])
    keys_of.pop(-1, None)
    if not keys_of:
        raise DataError(f"no pair of {source!r} names its user: give every pair's json a user_id.")
    chosen = {}
    for user, keys in keys_of.items():
        picked = np.random.default_rng([seed, user]).choice(len(keys), min(examples_per_user, len(keys)), replace=False)
        chosen.update({keys[index]: user for index in sorted(picked)})
    examples: dict[int, list[UserExample]] = collections.defaultdict(list)
    embeddings = {}
    for sample in raw_pairs(source, skips):
        user = chosen.get(sample["__key__"])
        if user is None:
            continue
        examples[user].append(user_example(sample))
        if len(examples[user]) == min(examples_per_user, len(keys_of[user])):
            embeddings[user] = encoder.encode(examples.pop(user)).numpy()
    return embeddings


def write_user_embeddings(
    source: str,
    out_dir: str | Path,
    encoder: UserEncoder,
    *,
    examples_per_user: int = 4,
    examples_from: str | None = None,
    seed: int = 0,
) -> dict[str, int]:
    """Copy the pair shards ``source`` to ``out_dir`` (same shard names) with each pair's user embedding added
    as ``user_embedding.npy``: ``encoder`` reads ``examples_per_user`` pairs of each user from the pixel shards
    ``examples_from`` (default: ``source``; give the pixel shards here when ``source`` holds precomputed
    latents). Pairs without a ``user_id``, or whose user has no example, are left out and counted. Returns
    the counts."""
    embeddings = embed_users(examples_from or source, encoder, examples_per_user, seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    counts = {"users": len(embeddings), "written": 0, "without_user": 0}
    skips = SkipLog()
    for shard in expand_shards(source):
        partial = out_dir / f"{Path(shard).name}.partial"
        with wds.TarWriter(str(partial)) as sink:
            for sample in wds.tarfile_to_samples(handler=skips.shard_error)([{"url": shard}]):
                embedding = embeddings.get(pair_user(sample))
                if embedding is None:
                    counts["without_user"] += 1
                    continue
                buffer = io.BytesIO()
                np.save(buffer, embedding, allow_pickle=False)
                members = {
                    name: value for name, value in sample.items() if not name.startswith("__") or name == "__key__"
                }
                sink.write({**members, EMBEDDING_MEMBER: buffer.getvalue()})
                counts["written"] += 1
        partial.rename(out_dir / Path(shard).name)
    if not counts["written"]:
        raise DataError(f"no pair of {source!r} has a user with examples ({counts}): check the user_ids.")
    return counts

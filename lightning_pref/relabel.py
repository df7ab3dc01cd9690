"""``lightning-pref data relabel``: relabel preference pairs with a scorer (AI feedback).

Diffusion-DPO (Wallace et al., CVPR 2024, arXiv 2311.12908, "Learning from AI Feedback") trains on
Pick-a-Pic pairs whose labels a reward model chose instead of people. This module makes such data from any
pair shards ([`shards`][lightning_pref.datamodules.shards]) and any
[`RewardModel`][lightning_pref.rewards.RewardModel], named by class path and init arguments as
``lightning-pref evaluate`` names its scorers ([`ScorerSpec`][lightning_pref.evaluation.ScorerSpec]):

    lightning-pref data relabel --in shards/pickapic --out shards/pickapic-warmth \
        --scorer lightning_pref.rewards.toy.WarmthReward [--tie-margin 0.01] [--ties keep|drop]

Winner and loser are decoded as the DataModule decodes them (stored size; a loser of another size is resized
to its winner's) and scored, ``batch_size`` pairs at a time, without gradients. Each input shard becomes an
output shard of the same name with the same sample keys, in which each pair's winner is the higher-scored
sample. A pair whose scores differ by at most ``tie_margin`` is a tie: it keeps its original order
(``ties="keep"``) or is left out (``ties="drop"``). Every member of a sample is copied byte for byte (a
flipped pair's ``winner.<ext>`` and ``loser.<ext>`` exchange names); its json gains

* ``score_winner``, ``score_loser``: the scores of the (new) winner and loser;
* ``relabel_flipped``: whether the scorer reversed the stored order;
* ``label_flipped``: the stored flag (``false`` when absent) exclusive-or ``relabel_flipped``, so it keeps
  the meaning the DataModule gives it: the stored order disagrees with the source's labels.

Other json fields that name the stored order (Pick-a-Pic's ``swapped``, the toy data's ``reward_winner``)
are kept as the source wrote them; ``relabel_flipped`` says when they refer to the other sample.

A sample that does not decode (no json or caption, a missing or corrupt image, precomputed latents, which
no scorer reads) is skipped with a warning and counted, as is the rest of a truncated shard. The output
directory also holds ``relabel.json``, the report: the scorer (name, class path, init args, versions), the
options and the counts: ``read`` (samples read: ``kept + ties_dropped + corrupt``), ``kept``, ``flipped``,
``ties`` (within the margin, kept or not), ``ties_dropped``, ``corrupt``, and ``flip_fraction`` (flipped
pairs per pair scored).
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import webdataset as wds
from tqdm.auto import tqdm

from lightning_pref.batch import LATENTS, LOSER, PIXELS, WINNER, media_field
from lightning_pref.datamodules.media import Geometry, MediaDecoder, SkipSample
from lightning_pref.datamodules.shards import PAIR_ROLES
from lightning_pref.datamodules.streaming import (
    SampleDecoder,
    SkipLog,
    chunks,
    decode_samples,
    expand_shards,
    parse_flag,
)
from lightning_pref.datamodules.users import EMBEDDING_MEMBER
from lightning_pref.errors import ConfigError, DataError, check_whole_numbers
from lightning_pref.evaluation import ScorerSpec, score
from lightning_pref.rewards.base import RewardModel

#: the ``schema`` field of the report
RELABEL_SCHEMA = "lightning-pref-relabel/1"
#: the report's file name in the output directory
REPORT_NAME = "relabel.json"
TIE_POLICIES = ("keep", "drop")


class RelabelDecoder(SampleDecoder):
    """A raw pair to its ``uint8`` pixels (``pixels_w``, ``pixels_l``), prompt, parsed json and raw members.

    A user embedding (``user_embedding.npy``, [`lightning_pref.datamodules.users`][lightning_pref.datamodules.users])
    is copied, not decoded: it is no precomputed latent."""

    def __call__(self, sample: dict[str, Any], rng: np.random.Generator) -> list[dict[str, Any]]:
        metadata = self.metadata(sample)
        parse_flag("label_flipped", metadata.get("label_flipped", False))  # a broken flag skips the sample here
        pixels = self.media(
            {name: value for name, value in sample.items() if name != EMBEDDING_MEMBER}, PAIR_ROLES, rng
        )
        if any(name.startswith(LATENTS) for name in pixels):
            raise SkipSample("holds precomputed latents, which no scorer reads: relabel the pixel shards")
        return [{**pixels, "prompt": metadata["caption"] or "", "metadata": metadata, "sample": sample}]


def pair_scores(scorer: RewardModel, pairs: Sequence[dict[str, Any]]) -> list[tuple[float, float]]:
    """``(winner score, loser score)`` of each decoded pair; pairs of one size go to the scorer together."""
    by_size: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for index, pair in enumerate(pairs):
        by_size[tuple(pair[media_field(PIXELS, WINNER)].shape)].append(index)
    scores: dict[int, tuple[float, float]] = {}
    for indices in by_size.values():
        media = (
            torch.stack([pairs[i][media_field(PIXELS, suffix)] for suffix in (WINNER, LOSER) for i in indices]).float()
            / 255
        )
        prompts = [pairs[i]["prompt"] for i in indices]
        both = score(scorer, media, prompts * 2).tolist()
        winners, losers = both[: len(indices)], both[len(indices) :]
        scores.update({i: pair for i, pair in zip(indices, zip(winners, losers))})
    return [scores[index] for index in range(len(pairs))]


def other_role_name(name: str) -> str:
    """``winner.png`` -> ``loser.png`` and back; members of no role keep their name."""
    role, dot, extension = name.partition(".")
    other = {"winner": "loser", "loser": "winner"}
    return other[role] + dot + extension if role in other else name


def relabelled_sample(pair: dict[str, Any], score_winner: float, score_loser: float, flipped: bool) -> dict[str, Any]:
    """The members to write for one pair, its stored winner and loser exchanged when ``flipped`` (see the module
    docstring); the scores are those of the stored winner and loser."""
    metadata = pair["metadata"]
    members = {name: value for name, value in pair["sample"].items() if not name.startswith("__") or name == "__key__"}
    if flipped:
        members = {other_role_name(name): value for name, value in members.items()}
        score_winner, score_loser = score_loser, score_winner
    members["json"] = json.dumps(
        {
            **metadata,
            "score_winner": score_winner,
            "score_loser": score_loser,
            "relabel_flipped": flipped,
            "label_flipped": parse_flag("label_flipped", metadata.get("label_flipped", False)) != flipped,
        }
    ).encode()
    return members


def check_output_directory(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out {out_dir} is a file: give a new directory for the relabelled shards.")
    if out_dir.is_dir() and any(out_dir.glob("*.tar*")):
        raise ConfigError(
            f"--out {out_dir} already holds shards: relabel into a new (or empty) directory; the input is never "
            "overwritten."
        )


@torch.no_grad()
def relabel_shards(
    source: str,
    out_dir: str | Path,
    scorer: ScorerSpec,
    *,
    tie_margin: float = 0.0,
    ties: Literal["keep", "drop"] = "keep",
    batch_size: int = 32,
    device: str = "cpu",
    progress: bool = False,
) -> dict[str, Any]:
    """Relabel the pair shards ``source`` (a directory, glob or brace pattern) with ``scorer`` into new shards
    in ``out_dir`` (see the module docstring); returns the report, also written to ``out_dir/relabel.json``.

    Args:
        source: the pair shards to read (never written).
        out_dir: a new or empty directory.
        scorer: the reward model, by class path and init arguments.
        tie_margin: scores differing by at most this much are a tie.
        ties: ``keep`` a tie's original order, or ``drop`` the pair.
        batch_size: pairs scored per call (``2 * batch_size`` images).
        device: where the scorer runs.
        progress: show a progress bar of the pairs read.

    Example:
        >>> relabel_shards("data/toy", "data/toy-warmth", ScorerSpec("lightning_pref.rewards.toy.WarmthReward"))
        ... # doctest: +SKIP
        {'schema': 'lightning-pref-relabel/1', ..., 'counts': {'read': 1024, 'kept': 1024, 'flipped': 187, ...}}
    """
    if isinstance(tie_margin, bool) or not isinstance(tie_margin, (int, float)) or not 0 <= tie_margin < math.inf:
        raise ConfigError(f"tie_margin={tie_margin!r}: give a finite number >= 0 (0: only equal scores tie).")
    if ties not in TIE_POLICIES:
        raise ConfigError(f"ties={ties!r}: choose 'keep' (a tie keeps its original order) or 'drop'.")
    check_whole_numbers(batch_size=batch_size)
    out_dir = Path(out_dir)
    check_output_directory(out_dir)
    shards = expand_shards(source)
    model = scorer.load().to(device)
    out_dir.mkdir(parents=True, exist_ok=True)
    decoder = RelabelDecoder(MediaDecoder(Geometry(None)))
    skips = SkipLog(limit=math.inf)  # relabelling reads every sample once: corrupt ones are counted, never fatal
    counts = {"read": 0, "kept": 0, "flipped": 0, "ties": 0, "ties_dropped": 0, "corrupt": 0}
    scored = 0
    with tqdm(desc="relabelling", unit="pair", disable=not progress) as bar:
        for shard in shards:
            target = out_dir / Path(shard).name
            partial = target.with_name(target.name + ".partial")
            samples = wds.tarfile_to_samples(handler=skips.shard_error)([{"url": shard}])
            with wds.TarWriter(str(partial)) as sink:
                for chunk in chunks(decode_samples(samples, decoder, skips, seed=(0,)), batch_size, partial=True):
                    for pair, (score_winner, score_loser) in zip(chunk, pair_scores(model, chunk)):
                        tie = abs(score_winner - score_loser) <= tie_margin
                        counts["ties"] += tie
                        if tie and ties == "drop":
                            counts["ties_dropped"] += 1
                            continue
                        flipped = not tie and score_loser > score_winner
                        sink.write(relabelled_sample(pair, score_winner, score_loser, flipped))
                        counts["kept"] += 1
                        counts["flipped"] += flipped
                    scored += len(chunk)
                    bar.update(len(chunk))
            partial.rename(target)
    counts["corrupt"] = skips.take()
    counts["read"] = scored + counts["corrupt"]
    report = {
        "schema": RELABEL_SCHEMA,
        "source": source,
        "shards": len(shards),
        "scorer": scorer.record(model),
        "tie_margin": tie_margin,
        "ties": ties,
        "counts": counts,
        "flip_fraction": counts["flipped"] / scored if scored else None,
    }
    (out_dir / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
    if not counts["kept"]:
        raise DataError(
            f"no pair of {source!r} was kept ({counts}; report in {out_dir / REPORT_NAME}): see the warnings for why "
            "samples were skipped, or lower --tie-margin."
        )
    return report

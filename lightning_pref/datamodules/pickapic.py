"""Pick-a-Pic (v1/v2 parquet) to preference shards.

Pick-a-Pic rows hold a caption, two encoded images (``jpg_0``, ``jpg_1``) and labels ``label_0``/``label_1``
(1/0, or 0.5/0.5 for a tie), plus provenance (``user_id``, ``ranking_id``, image uids, model names). The
converter writes the winner first, drops ties by default (Diffusion-DPO's recipe), keeps the original JPEG
bytes (no re-encoding) and the provenance in the sample's json. Rows are skipped and counted when they are
unlabelled, show two identical images, or hold images that do not decode; rows whose labels are not numbers
in [0, 1] summing to 1 (``rejected_labels``) or whose caption is not a string (``rejected_captions``) are
skipped with a warning naming the file and the row.

Each parquet file is one *source*, named by its path relative to the source root (the directory given, or
the folder before the first glob character) without ``.parquet``, made fit for keys by
[`key_part`][lightning_pref.datamodules.shards.key_part] (``v1/train-0.parquet`` becomes ``v1_train-0-<hash>``).
A source's shards ``<name>-NNNNNN.tar`` (sample keys ``<name>-<row>``) are written into the folder
``<name>.partial`` and moved into place, with the marker ``<name>.done.json`` holding its counts, once the
file is finished; nothing in place is ever overwritten or deleted. So a conversion is resumable per file: a
rerun skips finished files, finishes an interrupted move and replaces the ``.partial`` folder of an
interrupted conversion. A file that keeps no pair writes nothing; a conversion that keeps no pair at all fails.
"""

from __future__ import annotations

import glob
import json
import logging
import math
import shutil
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import webdataset as wds
from tqdm.auto import tqdm

from lightning_pref.datamodules.media import image_extension
from lightning_pref.datamodules.pairs import TiePolicy, check_ties, nothing_kept, winner_first
from lightning_pref.datamodules.shards import key_part
from lightning_pref.errors import ConfigError, DataError, MissingFileError

log = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0", "label_1")
PROVENANCE_COLUMNS = (
    "has_label",
    "are_different",
    "user_id",
    "ranking_id",
    "best_image_uid",
    "image_0_uid",
    "image_1_uid",
    "model_0",
    "model_1",
    "created_at",
    "num_example_per_prompt",
)
GLOB_CHARACTERS = "*?["


def find_parquet_files(source: str | Path) -> list[Path]:
    """A directory (searched recursively), a single file, or a glob pattern."""
    source = Path(source)
    if source.is_dir():
        files = sorted(source.rglob("*.parquet"))
    else:
        files = sorted(Path(path) for path in glob.glob(str(source), recursive=True))
    files = [file for file in files if file.is_file()]
    if not files:
        raise MissingFileError(f"No parquet file at {str(source)!r}: give a directory, a .parquet file or a glob.")
    return files


def source_root(source: str | Path) -> Path:
    """The folder source names are relative to: ``source`` when it is a directory, else the folder before the
    first part holding a glob character (a single file's folder)."""
    source = Path(source)
    if source.is_dir():
        return source
    for index, part in enumerate(source.parts):
        if any(character in part for character in GLOB_CHARACTERS):
            return Path(*source.parts[:index])
    return source.parent


def source_names(source: str | Path) -> dict[str, Path]:
    """Every parquet file of ``source`` by its name: its path relative to ``source_root``, without
    ``.parquet``, made fit for keys and shard names."""
    root = source_root(source)
    names: dict[str, Path] = {}
    for path in find_parquet_files(source):
        relative = path.relative_to(root)
        name = key_part((relative.with_suffix("") if relative.suffix == ".parquet" else relative).as_posix())
        if name in names:
            raise DataError(
                f"{names[name]} and {path} would both write the shards {name}-NNNNNN.tar: rename one of them."
            )
        names[name] = path
    return names


def label_problem(label_0: Any, label_1: Any) -> str | None:
    """Why a row's labels cannot be used, or ``None``: they must be numbers in [0, 1] summing to 1."""
    try:
        labels = float(label_0), float(label_1)
    except (TypeError, ValueError):
        return f"label_0={label_0!r}, label_1={label_1!r} are not numbers"
    if not all(math.isfinite(label) and 0 <= label <= 1 for label in labels):
        return f"label_0={label_0!r}, label_1={label_1!r} are not both in [0, 1]"
    if not math.isclose(sum(labels), 1):
        return f"label_0={label_0!r}, label_1={label_1!r} do not sum to 1 (1/0 or 0/1 names the winner, 0.5/0.5 a tie)"
    return None


def one_line(error: Exception) -> str:
    """The message of a library's exception, on one line."""
    return " ".join(str(error).split())


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return value


def open_parquet(path: Path) -> tuple[pq.ParquetFile, list[str]]:
    """The parquet file and the columns to read, once it is known to hold the Pick-a-Pic columns."""
    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as error:
        raise DataError(
            f"{path} is not a parquet file ({one_line(error)}): give Pick-a-Pic parquet files; a CSV or JSON table of "
            "pairs goes through `lightning-pref data pairs`."
        ) from None
    columns = parquet.schema_arrow.names
    missing = [column for column in REQUIRED_COLUMNS if column not in columns]
    if missing:
        raise DataError(
            f"{path} lacks the Pick-a-Pic column(s) {missing} (it has {columns}): convert files in the Pick-a-Pic "
            "schema, or use `lightning-pref data pairs` for a CSV/JSON of image pairs."
        )
    return parquet, list(REQUIRED_COLUMNS) + [column for column in PROVENANCE_COLUMNS if column in columns]


def parquet_rows(parquet: pq.ParquetFile, path: Path, columns: list[str]) -> Iterator[dict[str, Any]]:
    """The rows of ``parquet``, one row group after another; a damaged row group is a ``DataError``
    naming its rows."""
    first_row = 0
    for group in range(parquet.num_row_groups):
        group_rows = parquet.metadata.row_group(group).num_rows
        try:
            for batch in parquet.iter_batches(batch_size=256, row_groups=[group], columns=columns):
                yield from batch.to_pylist()
        except (pa.ArrowException, OSError) as error:
            raise DataError(
                f"{path} is damaged in rows {first_row} to {first_row + group_rows - 1} (row group {group}: {one_line(error)}): "
                "download it again; none of its rows were kept."
            ) from None
        first_row += group_rows


def convert_parquet_file(
    path: Path, out_dir: Path, name: str, ties: TiePolicy = "drop", shard_size_mb: float = 1000, seed: int = 0
) -> dict[str, int]:
    """Convert one parquet file into ``out_dir/<name>-NNNNNN.tar`` (sample keys ``<name>-<row>``); returns its counts."""
    parquet, columns = open_parquet(path)
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    counts = {
        "rows": 0,
        "written": 0,
        "ties_dropped": 0,
        "unlabelled": 0,
        "identical": 0,
        "corrupt": 0,
        "rejected_labels": 0,
        "rejected_captions": 0,
    }
    pattern = str(out_dir / f"{name}-%06d.tar")
    rows = tqdm(
        parquet_rows(parquet, path, columns), total=parquet.metadata.num_rows, desc=path.name, unit="row", leave=False
    )
    with wds.ShardWriter(pattern, maxsize=int(shard_size_mb * 2**20), maxcount=10**9, verbose=0) as sink:
        for index, row in enumerate(rows):
            counts["rows"] += 1
            sample = _pair_sample(row, ties, rng, counts, f"{path}, row {index}")
            if sample is not None:
                sample["__key__"] = f"{name}-{index:09d}"
                sink.write(sample)
                counts["written"] += 1
    return counts


def _pair_sample(
    row: dict[str, Any], ties: TiePolicy, rng: np.random.Generator, counts: dict[str, int], where: str
) -> dict | None:
    """The shard sample of one row, or ``None`` (counted) when the row is dropped, rejected or corrupt;
    ``where`` names the row in warnings."""
    if row.get("has_label") is False or row["label_0"] is None or row["label_1"] is None:
        counts["unlabelled"] += 1
        return None
    if row.get("are_different") is False:
        counts["identical"] += 1
        return None
    problem = label_problem(row["label_0"], row["label_1"])
    if problem:
        counts["rejected_labels"] += 1
        log.warning("%s rejected: %s", where, problem)
        return None
    label_0, label_1 = float(row["label_0"]), float(row["label_1"])
    tie = label_0 == label_1
    first_wins = winner_first("tie" if tie else ("first" if label_0 > label_1 else "second"), ties, rng)
    if first_wins is None:
        counts["ties_dropped"] += 1
        return None
    if not isinstance(row["caption"], str):
        counts["rejected_captions"] += 1
        log.warning(
            "%s rejected: its caption %r is not a string: give each row its prompt as text.", where, row["caption"]
        )
        return None
    extensions = image_extension(row["jpg_0"]), image_extension(row["jpg_1"])
    if None in extensions:
        counts["corrupt"] += 1
        return None
    images = [(row["jpg_0"], extensions[0]), (row["jpg_1"], extensions[1])]
    if not first_wins:
        images.reverse()
    (winner, winner_ext), (loser, loser_ext) = images
    metadata = {
        "caption": row["caption"],
        "label_0": label_0,
        "label_1": label_1,
        "tie": tie,
        "swapped": not first_wins,
    }
    metadata.update({column: _jsonable(row[column]) for column in PROVENANCE_COLUMNS if column in row})
    return {
        f"winner.{winner_ext}": bytes(winner),
        f"loser.{loser_ext}": bytes(loser),
        "json": json.dumps(metadata).encode(),
    }


def convert_source(
    path: Path, name: str, out_dir: Path, ties: TiePolicy, shard_size_mb: float, seed: int
) -> dict[str, int]:
    """The counts of one parquet file: read from its marker when it is finished, else converted and published.

    The shards go to the folder ``<name>.partial`` first, its marker last once the file is read to its end;
    then they move into ``out_dir``, the marker last. A rerun finishes an interrupted move and replaces an
    unfinished ``.partial`` folder: both hold this file's output only.
    """
    marker = out_dir / f"{name}.done.json"
    partial = out_dir / f"{name}.partial"
    if marker.exists():
        return json.loads(marker.read_text())
    if not (partial / marker.name).exists():
        counts = convert_to_partial(path, name, partial, ties, shard_size_mb, seed)
        if not counts["written"]:
            log.warning("%s kept no pair: %s", path, counts)
            return counts
    publish(partial, out_dir, path)
    return json.loads(marker.read_text())


def convert_to_partial(
    path: Path, name: str, partial: Path, ties: TiePolicy, shard_size_mb: float, seed: int
) -> dict[str, int]:
    """Convert ``path`` into a new folder ``partial``, ending with the marker ``<name>.done.json``; returns
    the counts. A file that fails or keeps no pair leaves no folder."""
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    try:
        counts = convert_parquet_file(path, partial, name, ties, shard_size_mb, seed)
    except BaseException:
        shutil.rmtree(partial)
        raise
    if not counts["written"]:
        shutil.rmtree(partial)
        return counts
    unfinished_marker = partial / "counts.json"  # renamed once written, so a marker is never half written
    unfinished_marker.write_text(json.dumps(counts))
    unfinished_marker.replace(partial / f"{name}.done.json")
    return counts


def publish(partial: Path, out_dir: Path, source: Path) -> None:
    """Move the shards of the finished folder ``partial`` into ``out_dir``, then its marker, and remove it;
    a file already in the way is an error, never overwritten."""
    for shard in sorted(partial.glob("*.tar")):
        if (out_dir / shard.name).exists():
            raise DataError(
                f"{out_dir / shard.name} exists but was not written for {source}: move it out of {out_dir}, then rerun."
            )
        shard.replace(out_dir / shard.name)
    (marker,) = partial.glob("*.done.json")
    marker.replace(out_dir / marker.name)
    partial.rmdir()


def convert_pickapic(
    source: str | Path, out_dir: str | Path, ties: TiePolicy = "drop", shard_size_mb: float = 1000, seed: int = 0
) -> dict[str, int]:
    """Convert every parquet file of ``source``; finished files (``.done.json``) are skipped on a rerun.
    Fails when the conversion keeps no pair."""
    check_ties(ties)
    if not shard_size_mb > 0:
        raise ConfigError(f"shard_size_mb={shard_size_mb}: give a positive shard size in megabytes.")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    totals: dict[str, int] = {}
    for name, path in source_names(source).items():
        counts = convert_source(path, name, out_dir, ties, shard_size_mb, seed)
        log.info("%s: %s", path, counts)
        for key, value in counts.items():
            totals[key] = totals.get(key, 0) + value
    if not totals.get("written"):
        raise nothing_kept(str(source), totals)
    return totals

"""Preference shards from tables of media files: image folders with a CSV/JSON of pairs, VideoAlign-style
CSVs, and VideoDPO directories.

A table (CSV, JSON list or JSON lines) names two files per row, relative to ``root`` (default: the
table's directory), in one of two ways:

* ``winner`` and ``loser`` columns: the row is already ordered;
* ``first``, ``second`` and ``label`` columns: ``label`` is ``A`` (first wins), ``B`` (second wins) or
  ``same``/``tie``. This is the VideoAlign (VideoReward) training CSV: ``path_A,path_B,prompt,VQ,MQ,TA,...``
  and the VideoGen-RewardBench CSV with an ``Overall`` column.

The prompt comes from a ``caption`` or ``prompt`` column. Every other column is kept in the sample's json.
Files are copied byte for byte (no re-encoding) after a check that they decode. Rows count from 0 in table
order (the json's ``source_row``). A row whose file is missing, undecodable or not a file name (counted
``unreadable``), or whose prompt is not a string (``rejected_captions``) is skipped with a warning naming
the table and the row. A table that cannot be read (not UTF-8, bad JSON, a row that is not an object, a
label other than A/B/same) is a [`DataError`][lightning_pref.errors.DataError] naming the file and the row.

VideoDPO directories hold ``metadata.json`` (a list of videos, ``{"basic": {"clip_path": ...}, "misc":
{"frame_caption": [...]}}``) and ``pair.json`` (a list of ``{"video1": i, "video2": j, "frame_caption": ...}``
indexing ``metadata.json``; ``video1`` is the preferred video; an optional ``score`` is kept, and the pair's
index as ``pair_index``). A pair whose indices are not two distinct integers indexing ``metadata.json`` is
skipped with a warning and counted (``rejected_indices``).

The shards are ``<media>-pairs-NNNNNN.tar`` (``image-pairs-...`` or ``video-pairs-...``); a conversion
refuses an output directory already holding shards of that name, and one that keeps no pair fails and
writes nothing.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from lightning_pref.datamodules.media import image_extension, video_frame_times
from lightning_pref.datamodules.shards import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, write_preference_shards
from lightning_pref.errors import ConfigError, DataError, MissingFileError, UserError

log = logging.getLogger(__name__)

TiePolicy = Literal["drop", "keep", "coin_flip"]
Media = Literal["image", "video"]
OUTCOMES = {"a": "first", "b": "second", "same": "tie", "tie": "tie"}
#: the fix a conversion that kept no pair suggests, by the reason its rows were dropped
FIXES = {
    "ties_dropped": "--ties keep or --ties coin_flip keeps tied pairs",
    "unreadable": "check --root: the files are read relative to it",
}


def check_ties(ties: str) -> None:
    if ties not in ("drop", "keep", "coin_flip"):
        raise ConfigError(f"ties={ties!r}: choose 'drop', 'keep' or 'coin_flip'.")


def nothing_kept(source: str, counts: dict[str, int]) -> UserError:
    """The error of a conversion that kept no pair, naming the source, why its rows were dropped and the fix
    (a ``MissingFileError`` when files were unreadable)."""
    dropped = {reason: number for reason, number in counts.items() if number and reason not in ("rows", "written")}
    why = f"{counts['rows']} row(s), of which " + ", ".join(f"{number} {reason}" for reason, number in dropped.items())
    fixes = [fix for reason, fix in FIXES.items() if reason in dropped]
    if any(reason.startswith("rejected_") for reason in dropped):
        fixes.append("the warnings name each rejected row and why")
    error = MissingFileError if "unreadable" in dropped else DataError
    return error(
        f"{source} kept no pair ({why if dropped else 'it holds no rows'}): "
        f"{'; '.join(fixes) or 'give a source holding usable pairs'}. Nothing was written."
    )


def winner_first(outcome: str, ties: TiePolicy, rng: np.random.Generator) -> bool | None:
    """Whether the first item of a pair is its winner; ``outcome`` is ``first``, ``second`` or ``tie``.

    Ties are dropped (``None``), kept in their stored order (``keep``) or ordered by a seeded coin flip.
    """
    if outcome != "tie":
        return outcome == "first"
    if ties == "drop":
        return None
    return ties == "keep" or bool(rng.random() < 0.5)


@dataclass
class PairColumns:
    """Which columns of a table hold the prompt and the two files (see the module docstring).

    ``label=None`` reads ordered ``winner``/``loser`` columns; otherwise ``first``/``second`` with ``label``.
    ``prompt=None`` takes ``caption`` or ``prompt``, whichever the table has.
    """

    prompt: str | None = None
    winner: str = "winner"
    loser: str = "loser"
    first: str = "path_A"
    second: str = "path_B"
    label: str | None = None

    def check(self, rows: list[dict[str, Any]], table: str) -> None:
        """Refuse a table without the named columns or with a label other than A, B or same, before writing."""
        columns = list(rows[0])
        needed = [self.first, self.second, self.label] if self.label else [self.winner, self.loser]
        missing = [column for column in needed if column not in columns]
        if missing:
            raise DataError(
                f"{table} has no column(s) {missing} (it has {columns}): name the file columns with --winner-column/"
                "--loser-column, or --first-column/--second-column/--label-column."
            )
        if self.prompt_column(columns) not in columns:
            raise DataError(
                f"{table} has no 'caption' or 'prompt' column (it has {columns}): name it with --prompt-column."
            )
        for index, row in enumerate(rows if self.label else []):
            value = str(row.get(self.label)).strip()
            if value.lower() not in OUTCOMES:
                raise DataError(
                    f"{table}, row {index}: {self.label}={value!r}: use A (first wins), B (second wins) or same (a tie)."
                )

    def prompt_column(self, columns: list[str]) -> str:
        return self.prompt or ("caption" if "caption" in columns else "prompt")


def read_table(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a CSV, a JSON list of objects, or JSON lines (one object per line), all UTF-8."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"No table at {str(path)!r}: give a .csv, .json or .jsonl file of pairs.")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return csv_rows(path)
    if suffix == ".json":
        return read_json_list(path)
    if suffix == ".jsonl":
        lines = enumerate(read_text(path).splitlines(), 1)
        return check_objects([parse_json(line, path, number) for number, line in lines if line.strip()], path)
    raise DataError(
        f"{path}: a table of pairs is a .csv, .json or .jsonl file, not {suffix or 'one without extension'}: save it as one of those."
    )


def read_text(path: Path) -> str:
    """The text of a UTF-8 file (without a byte-order mark)."""
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as error:
        bad_byte = error.object[error.start : error.start + 1]
        raise DataError(f"{path} is not UTF-8 text (byte {error.start} is {bad_byte!r}): save it as UTF-8.") from None


def parse_json(text: str, path: Path, line: int = 1) -> Any:
    """``text``, which starts on line ``line`` of ``path``, parsed as JSON."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        where = f"line {line + error.lineno - 1}, column {error.colno}"
        raise DataError(f"{path}, {where}: not valid JSON ({error.msg}): fix the JSON there.") from None
    except RecursionError:
        raise DataError(f"{path}, line {line}: JSON nested too deeply to read: a row is one flat object.") from None


def read_json_list(path: Path) -> list[dict[str, Any]]:
    """The objects of a JSON file holding a list of objects."""
    rows = parse_json(read_text(path), path)
    if not isinstance(rows, list):
        raise DataError(f"{path} holds {json_kind(rows)}, not a list: write a list of objects, [{{...}}, {{...}}].")
    return check_objects(rows, path)


def check_objects(rows: list[Any], path: Path) -> list[dict[str, Any]]:
    """``rows``, once each is known to be an object (a dict)."""
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(
                f'{path}, row {index} is {json_kind(row)}, not an object: write each row as {{"column": value, ...}}.'
            )
    return rows


def json_kind(value: Any) -> str:
    """What a parsed JSON value is, in JSON's words."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    kinds = {dict: "an object", list: "a list", str: "a string", int: "a number", float: "a number"}
    return kinds[type(value)]


def csv_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a CSV file with a header line; a row with more fields than the header is an error."""
    reader = csv.DictReader(io.StringIO(read_text(path), newline=""))
    rows = []
    try:
        for row in reader:
            if None in row:
                raise DataError(
                    f"{path}, row {len(rows)} (line {reader.line_num}) has {len(row[None])} field(s) more than the header's "
                    f"{len(reader.fieldnames)}: quote the fields that hold commas."
                )
            rows.append(row)
    except csv.Error as error:
        raise DataError(f"{path}, line {reader.line_num + 1}: not valid CSV ({error}): fix that line.") from None
    return rows


def media_is_readable(path: Path, media: Media) -> str | None:
    """``None`` when ``path`` is a decodable file of the ``media`` kind, else why not."""
    extensions = IMAGE_EXTENSIONS if media == "image" else VIDEO_EXTENSIONS
    if path.suffix.lstrip(".").lower() not in extensions:
        return f"not a {media} file (extensions: {', '.join(extensions)})"
    if not path.is_file():
        return "missing"
    data = path.read_bytes()
    if media == "image":
        return None if image_extension(data) else "does not decode"
    try:
        return None if video_frame_times(data) else "has no frames"
    except Exception as error:  # noqa: BLE001 -- PyAV raises many types on corrupt files
        return f"does not decode ({type(error).__name__})"


def file_problem(file: Any, root: Path, media: Media) -> str | None:
    """Why a table's ``file`` entry (relative to ``root``) is not a readable ``media`` file; ``None`` when it is."""
    if not isinstance(file, str):
        return f"{file!r} is not a file name"
    problem = media_is_readable(root / file, media)
    return problem and f"{root / file} {problem}"


def ordered_pairs(
    rows: list[dict[str, Any]],
    root: Path,
    columns: PairColumns,
    media: Media,
    ties: TiePolicy,
    seed: int,
    counts: dict[str, int],
    source: str,
) -> Iterator[dict[str, Any]]:
    """``{"winner": Path, "loser": Path, "caption": str, **other columns}`` per usable row (``counts`` updated)."""
    rng = np.random.default_rng(seed)
    names = list(rows[0]) if rows else []
    prompt = columns.prompt_column(names)
    file_columns = (columns.first, columns.second) if columns.label else (columns.winner, columns.loser)
    for index, row in enumerate(rows):
        counts["rows"] += 1
        first_wins = True
        if columns.label:
            first_wins = winner_first(OUTCOMES[str(row.get(columns.label)).strip().lower()], ties, rng)
            if first_wins is None:
                counts["ties_dropped"] += 1
                continue
        files = [row.get(column) for column in file_columns]
        problems = [
            f"{column}: {problem}"
            for column, file in zip(file_columns, files)
            if (problem := file_problem(file, root, media))
        ]
        if problems:
            counts["unreadable"] += 1
            log.warning("%s, row %d skipped: %s", source, index, "; ".join(problems))
            continue
        caption = row.get(prompt)
        if not isinstance(caption, str):
            counts["rejected_captions"] += 1
            log.warning(
                "%s, row %d rejected: its %s %r is not a string: give each row its prompt as text.",
                source,
                index,
                prompt,
                caption,
            )
            continue
        if not first_wins:
            files.reverse()
        winner_file, loser_file = files
        metadata = {key: value for key, value in row.items() if key not in (prompt, "winner", "loser")}
        counts["written"] += 1
        yield {
            **metadata,
            "winner": root / winner_file,
            "loser": root / loser_file,
            "caption": caption,
            "winner_file": winner_file,
            "loser_file": loser_file,
            "swapped": not first_wins,
            "source_row": index,
        }


def convert_pair_rows(
    rows: list[dict[str, Any]],
    out_dir: str | Path,
    root: str | Path,
    media: Media = "image",
    columns: PairColumns | None = None,
    ties: TiePolicy = "drop",
    samples_per_shard: int | None = None,
    seed: int = 0,
    source: str = "table",
    rejected: dict[str, int] | None = None,
) -> dict[str, int]:
    """Write the pairs of ``rows`` (files relative to ``root``) to shards ``<media>-pairs-NNNNNN.tar`` in
    ``out_dir``; returns the counts. ``rejected`` counts rows of ``source`` the caller already rejected, by
    reason. Fails, writing nothing, when no pair is kept or ``out_dir`` already holds such shards."""
    check_ties(ties)
    if samples_per_shard is not None and samples_per_shard < 1:
        raise ConfigError(f"samples_per_shard={samples_per_shard}: give a positive number of samples per shard.")
    columns = columns or PairColumns()
    if rows:
        columns.check(rows, source)
    prefix = f"{media}-pairs"
    earlier = sorted(Path(out_dir).glob(f"{prefix}-*.tar"))
    if earlier:
        raise ConfigError(
            f"{out_dir} already holds {len(earlier)} shard(s) {prefix}-*.tar of an earlier conversion ({earlier[0].name}, ...):"
            " write to an empty --out, or delete those shards to convert again."
        )
    rejected = rejected or {}
    counts = {
        "rows": sum(rejected.values()),
        "written": 0,
        "ties_dropped": 0,
        "unreadable": 0,
        "rejected_captions": 0,
        **rejected,
    }
    pairs = ordered_pairs(rows, Path(root), columns, media, ties, seed, counts, source)
    write_preference_shards(pairs, out_dir, samples_per_shard or (1000 if media == "image" else 100), prefix=prefix)
    if not counts["written"]:
        raise nothing_kept(source, counts)
    return counts


def convert_pair_table(
    table: str | Path, out_dir: str | Path, root: str | Path | None = None, **options: Any
) -> dict[str, int]:
    """A CSV/JSON/JSONL table of pairs to shards; files are relative to ``root`` (default: the table's folder).
    ``options`` are those of ``convert_pair_rows``."""
    table = Path(table)
    return convert_pair_rows(read_table(table), out_dir, root or table.parent, source=str(table), **options)


def videodpo_rows(directory: str | Path) -> tuple[list[dict[str, Any]], int]:
    """The pairs of a VideoDPO directory (``metadata.json`` + ``pair.json``) as ordered table rows, and the
    number of pairs rejected for their indices (each named in a warning)."""
    directory = Path(directory)
    for name in ("metadata.json", "pair.json"):
        if not (directory / name).is_file():
            raise MissingFileError(
                f"{directory / name} is missing: a VideoDPO directory holds metadata.json and pair.json."
            )
    videos = read_json_list(directory / "metadata.json")
    pairs = read_json_list(directory / "pair.json")
    rows, rejected = [], 0
    for index, pair in enumerate(pairs):
        problem = index_problem(pair, len(videos))
        if problem:
            rejected += 1
            log.warning("%s, row %d rejected: %s", directory / "pair.json", index, problem)
            continue
        winner, loser = videos[pair["video1"]], videos[pair["video2"]]
        caption = pair.get("frame_caption") or nested(winner, "misc", "frame_caption")
        rows.append(
            {
                "winner": nested(winner, "basic", "clip_path"),
                "loser": nested(loser, "basic", "clip_path"),
                "caption": caption[0] if isinstance(caption, list) and caption else caption,
                "pair_index": index,
                **{key: pair[key] for key in ("score", "label") if key in pair},
            }
        )
    return rows, rejected


def index_problem(pair: dict[str, Any], num_videos: int) -> str | None:
    """Why ``video1``/``video2`` of a VideoDPO pair do not name two videos of ``metadata.json``; ``None`` when they do."""
    for name in ("video1", "video2"):
        index = pair.get(name)
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < num_videos:
            return (
                f"{name}={index!r} is not an index of metadata.json's {num_videos} videos: "
                f"use an integer from 0 to {num_videos - 1}"
            )
    if pair["video1"] == pair["video2"]:
        return f"video1 and video2 are both video {pair['video1']}: a pair needs two videos"
    return None


def nested(value: Any, *keys: str) -> Any:
    """``value[key][key]...``, or ``None`` where a level is missing or not an object."""
    for key in keys:
        value = value.get(key) if isinstance(value, dict) else None
    return value


def convert_videodpo(directory: str | Path, out_dir: str | Path, **options: Any) -> dict[str, int]:
    """A VideoDPO directory to video preference shards (``video1`` is the winner)."""
    rows, rejected = videodpo_rows(directory)
    return convert_pair_rows(
        rows,
        out_dir,
        directory,
        media="video",
        source=str(Path(directory) / "pair.json"),
        rejected={"rejected_indices": rejected},
        **options,
    )

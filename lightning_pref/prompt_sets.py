"""Readers of the prompt files evaluation benchmarks ship, chosen by the file's extension or by name.

| format     | file                                                  | what is read                              |
|------------|-------------------------------------------------------|-------------------------------------------|
| ``text``     | ``.txt``: one prompt per line                           | every non-blank line                        |
| ``pickapic`` | ``.parquet``: Pick-a-Pic's ``test_unique`` split          | the ``caption`` column                      |
| ``parti``    | ``.tsv``: PartiPrompts (``PartiPrompts.tsv``)             | the ``Prompt`` column                       |
| ``hpsv2``    | ``.json``: the HPSv2 benchmark prompts                  | a list of prompts, or ``{style: [prompts]}`` (styles in file order) |
| ``vbench``   | VBench's ``.txt`` prompt files, or ``VBench_full_info.json`` | every non-blank line, or each entry's ``prompt_en`` |

``vbench`` is never chosen by extension (its ``.txt`` files read the same as ``text``; give ``format="vbench"``
for its ``.json``). A file that cannot be read raises one [`DataError`][lightning_pref.errors.DataError] line
naming the file, the field and the fix:

    prompts = read_prompt_set("PartiPrompts.tsv")             # 1632 prompts
    prompts = read_prompt_set("anime.json", format="hpsv2")   # 800 prompts
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path

from lightning_pref.errors import ConfigError, DataError, MissingFileError

#: the format each extension selects
FORMAT_OF_EXTENSION = {".txt": "text", ".parquet": "pickapic", ".tsv": "parti", ".json": "hpsv2"}


def prompt_format(path: str | Path, format: str | None = None) -> str:
    """The reader's name for ``path``: ``format`` when given (checked), else the one its extension selects."""
    if format is not None:
        if format not in READERS:
            raise ConfigError(f"prompt format {format!r}: choose one of {', '.join(READERS)}.")
        return format
    suffix = Path(path).suffix.lower()
    if suffix not in FORMAT_OF_EXTENSION:
        raise ConfigError(
            f"{path}: no prompt format for the extension {suffix or '(none)'!r}: give the format explicitly "
            f"({', '.join(READERS)}) or use one of {', '.join(FORMAT_OF_EXTENSION)}."
        )
    return FORMAT_OF_EXTENSION[suffix]


def read_prompt_set(path: str | Path, format: str | None = None) -> list[str]:
    """The prompts of ``path``, in file order, read by ``format`` (default: by extension; see the module)."""
    path = Path(path)
    reader = READERS[prompt_format(path, format)]
    if not path.is_file():
        raise MissingFileError(f"prompts file {path} does not exist: check the path.")
    prompts = reader(path)
    if not prompts:
        raise DataError(f"{path} holds no prompt: check that it is the benchmark's prompt file.")
    return prompts


def read_text(path: Path) -> list[str]:
    """One prompt per line; blank lines are skipped, surrounding whitespace dropped."""
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def read_pickapic(path: Path) -> list[str]:
    """The ``caption`` column of a Pick-a-Pic parquet file (the ``test_unique`` split: one row per caption)."""
    import pyarrow.parquet as pq

    try:
        columns = pq.read_schema(path).names
    except Exception as error:
        raise DataError(f"{path} is not a parquet file ({type(error).__name__}): give Pick-a-Pic's parquet.") from error
    if "caption" not in columns:
        raise DataError(
            f"{path} has no 'caption' column (it has {', '.join(columns)}): give a Pick-a-Pic parquet file, or "
            "another format for another benchmark."
        )
    return strings_in(path, "caption", pq.read_table(path, columns=["caption"]).column("caption").to_pylist())


def read_parti(path: Path) -> list[str]:
    """The ``Prompt`` column of the tab-separated PartiPrompts file (its other columns: Category, Challenge, Note)."""
    with path.open(encoding="utf-8", newline="") as stream:
        rows = csv.DictReader(stream, delimiter="\t")
        if "Prompt" not in (rows.fieldnames or []):
            raise DataError(
                f"{path} has no 'Prompt' column in its tab-separated header (it has {rows.fieldnames}): give "
                "PartiPrompts.tsv, whose first line names the columns Prompt, Category, Challenge, Note."
            )
        return strings_in(path, "Prompt", [row["Prompt"] for row in rows])


def read_hpsv2(path: Path) -> list[str]:
    """A list of prompts, or a dict of style -> list of prompts (all styles, in the file's order)."""
    content = read_json(path)
    if isinstance(content, dict):
        prompts = []
        for style, style_prompts in content.items():
            if not isinstance(style_prompts, list):
                raise DataError(
                    f"{path}: style {style!r} holds a {type(style_prompts).__name__}; give a list of prompts."
                )
            prompts += strings_in(path, f"style {style!r}", style_prompts)
        return prompts
    if isinstance(content, list) and content and isinstance(content[0], dict) and "prompt_en" in content[0]:
        raise DataError(
            f"{path} holds objects with a 'prompt_en' field, as VBench's JSON: read it with format 'vbench'."
        )
    if isinstance(content, list):
        return strings_in(path, "the list", content)
    raise DataError(f"{path} holds a {type(content).__name__}: give a list of prompts or a dict of style -> prompts.")


def read_vbench(path: Path) -> list[str]:
    """VBench's prompt ``.txt`` files (one per line), or ``VBench_full_info.json`` (each entry's ``prompt_en``)."""
    if path.suffix.lower() != ".json":
        return read_text(path)
    content = read_json(path)
    if not isinstance(content, list) or not all(isinstance(entry, dict) and "prompt_en" in entry for entry in content):
        raise DataError(
            f"{path}: VBench's JSON is a list of objects with a 'prompt_en' field; this file is not (for the HPSv2 "
            "benchmark's JSON use format 'hpsv2')."
        )
    return strings_in(path, "prompt_en", [entry["prompt_en"] for entry in content])


def read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise DataError(
            f"{path} is not valid JSON (line {error.lineno}: {error.msg}): fix or replace the file."
        ) from None


def strings_in(path: Path, field: str, values: list) -> list[str]:
    """``values`` stripped, refusing any that is not a non-empty string (naming its position in ``field``)."""
    for index, value in enumerate(values):
        if not isinstance(value, str) or not value.strip():
            raise DataError(f"{path}: entry {index} of {field} is {value!r}, not a prompt: remove it or give it text.")
    return [value.strip() for value in values]


READERS: dict[str, Callable[[Path], list[str]]] = {
    "text": read_text,
    "pickapic": read_pickapic,
    "parti": read_parti,
    "hpsv2": read_hpsv2,
    "vbench": read_vbench,
}

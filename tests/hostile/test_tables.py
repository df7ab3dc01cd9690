"""Hostile inputs to the shard converters: Pick-a-Pic parquet files, pair tables and VideoDPO directories.

Every case builds its input in ``tmp_path`` and asserts one exact outcome: a clear error (its
``lightning_pref.errors`` class, a message naming the file, row or field, and nothing written), a counted
rejection (the counts say how many and why, a warning names the row), or correct handling (the shards hold
exactly the right samples, winner first). The classes of input covered:

* sources that collide: two parquet files of one stem in different folders, a stem that is the prefix of
  another (``train`` and ``train-0``), a file added to an already converted folder, two files that would
  share one output name, a file in the way of a shard, a conversion interrupted while moving its shards;
* dotted names: a dotted parquet file name, a dotted table name, a dotted shard prefix;
* Pick-a-Pic labels: NaN, infinite, outside [0, 1], not summing to 1, equal but not 0.5/0.5, not numbers;
  and valid ones (0/1, soft labels, ties);
* captions that are not strings (list, number, object, boolean, null) in tables, parquet files and
  VideoDPO pairs; file entries that are not file names;
* VideoDPO indices out of range, negative, non-integer, boolean, missing or naming one video twice;
* conversions that keep nothing: all ties, all unlabelled, all rejected, all unreadable, a 0-row parquet,
  a header-only CSV, an empty JSON list, an empty JSON-lines file, an empty ``pair.json``;
* encodings and formats: non-UTF-8 CSV, a UTF-8 byte-order mark, CRLF line ends, a bad JSON-lines line,
  invalid or deeply nested JSON, a JSON table that is not a list, a row that is not an object, CSV rows
  with extra fields or an oversized field, an unknown table extension, a CSV named ``.parquet``, an empty
  ``.parquet``, a damaged parquet row group, a missing table, a label other than A/B/same, an output
  directory already holding pair shards.
"""

import io
import json
import logging
import math
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers.shards import read_samples
from PIL import Image

from lightning_pref.datamodules.media import encode_video
from lightning_pref.datamodules.pairs import PairColumns, convert_pair_table, convert_videodpo
from lightning_pref.datamodules.pickapic import convert_pickapic
from lightning_pref.datamodules.shards import key_part, write_preference_shards
from lightning_pref.errors import ConfigError, DataError, MissingFileError


def jpeg(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), value, dtype=np.uint8)).save(buffer, format="JPEG")
    return buffer.getvalue()


BRIGHT, DARK = jpeg(250), jpeg(10)


def pickapic_row(caption="a cat", label_0=1.0, label_1=None, **extra):
    """A Pick-a-Pic row whose bright image wins when ``label_0`` is 1."""
    label_1 = 1 - label_0 if label_1 is None else label_1
    return {
        "caption": caption,
        "jpg_0": BRIGHT,
        "jpg_1": DARK,
        "label_0": label_0,
        "label_1": label_1,
        "has_label": True,
        "are_different": True,
        "user_id": 1,
        **extra,
    }


def write_parquet(path, rows, **options):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path, **options)
    return path


def captions(out):
    return [json.loads(sample["json"])["caption"] for sample in read_samples(out)]


def written_files(out):
    """Every file and folder the conversion left in ``out`` (empty when it wrote nothing)."""
    return sorted(str(path.relative_to(out)) for path in out.rglob("*")) if out.exists() else []


@pytest.fixture
def images(tmp_path):
    """``bright.png`` and ``dark.png`` in ``tmp_path/images``."""
    folder = tmp_path / "images"
    folder.mkdir()
    for name, value in [("bright.png", 250), ("dark.png", 5)]:
        Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(folder / name)
    return folder


def pair(caption="light", winner="bright.png", loser="dark.png"):
    return {"winner": winner, "loser": loser, "caption": caption}


# --------------------------------------------------------------------------------------- colliding sources
@pytest.mark.parametrize(
    "runs",
    [
        pytest.param([["v1/train-00000", "v2/train-00000"]], id="one stem in two folders"),
        pytest.param([["train", "train-0"]], id="a stem that prefixes another"),
        pytest.param([["train-0"], ["train-0", "train"]], id="a file added to a converted folder"),
    ],
)
def test_sources_that_collide_are_all_kept(tmp_path, runs):
    source, out = tmp_path / "source", tmp_path / "out"
    for files in runs:
        for file in files:
            write_parquet(source / f"{file}.parquet", [pickapic_row(f"{file} row {i}") for i in range(2)])
        totals = convert_pickapic(source, out)
        expected = sorted(f"{file} row {i}" for file in files for i in range(2))
        assert totals["written"] == len(expected) and sorted(captions(out)) == expected
    assert all(sample["winner.jpg"] == BRIGHT and sample["loser.jpg"] == DARK for sample in read_samples(out))
    shards = written_files(out)
    assert convert_pickapic(source, out) == totals and written_files(out) == shards  # a rerun changes nothing
    assert not [name for name in shards if name.endswith(".partial")]


def test_a_file_whose_name_another_file_takes_is_refused(tmp_path):
    for name in ("a", "a.parquet"):  # both are parquet files; a glob finds both
        write_parquet(tmp_path / "source" / name, [pickapic_row()])
    with pytest.raises(
        DataError, match=r"source/a and .*source/a.parquet would both write the shards a-NNNNNN.tar: rename one"
    ):
        convert_pickapic(f"{tmp_path}/source/*", tmp_path / "out")
    assert written_files(tmp_path / "out") == []


def test_an_interrupted_move_is_finished_without_converting_again(tmp_path):
    source, out = tmp_path / "source", tmp_path / "out"
    write_parquet(source / "train.parquet", [pickapic_row(f"row {i}") for i in range(3)])
    totals = convert_pickapic(source, out, shard_size_mb=1e-6)  # one sample per shard
    partial = out / "train.partial"
    partial.mkdir()  # as if interrupted after moving the first shard: the rest and the marker still wait
    for name in ("train-000001.tar", "train-000002.tar", "train.done.json"):
        (out / name).replace(partial / name)
    (source / "train.parquet").unlink()
    write_parquet(source / "train.parquet", [pickapic_row("not read again")])
    assert convert_pickapic(source, out) == totals
    assert captions(out) == ["row 0", "row 1", "row 2"] and not partial.exists()


def test_a_file_in_the_way_is_never_overwritten(tmp_path):
    source, out = tmp_path / "source", tmp_path / "out"
    write_parquet(source / "train.parquet", [pickapic_row("row 0")])
    out.mkdir()
    (out / "train-000000.tar").write_bytes(b"someone else's")
    with pytest.raises(
        DataError, match=r"out/train-000000.tar exists but was not written for .*source/train.parquet: move it out"
    ):
        convert_pickapic(source, out)
    assert (out / "train-000000.tar").read_bytes() == b"someone else's"
    assert not (out / "train.done.json").exists()


# --------------------------------------------------------------------------------------------- dotted names
def test_a_dotted_parquet_name_gives_dot_free_keys(tmp_path):
    write_parquet(tmp_path / "pickapic.v2.train.parquet", [pickapic_row(f"row {i}") for i in range(2)])
    convert_pickapic(tmp_path / "pickapic.v2.train.parquet", tmp_path / "out")
    (shard,) = [name for name in written_files(tmp_path / "out") if name.endswith(".tar")]
    assert re.fullmatch(r"pickapic_v2_train-[0-9a-f]{8}-000000\.tar", shard)
    samples = read_samples(tmp_path / "out")
    assert [sorted(sample) for sample in samples] == [["json", "loser.jpg", "winner.jpg"]] * 2
    assert [json.loads(sample["json"])["caption"] for sample in samples] == ["row 0", "row 1"]


def test_a_dotted_table_name_gives_dot_free_keys(images, tmp_path):
    (images / "votes.v2.json").write_text(json.dumps([pair("one"), pair("two")]))
    convert_pair_table(images / "votes.v2.json", tmp_path / "out")
    assert written_files(tmp_path / "out") == ["image-pairs-000000.tar"]
    assert [sorted(sample) for sample in read_samples(tmp_path / "out")] == [["json", "loser.png", "winner.png"]] * 2


@pytest.mark.parametrize(
    "text, part",
    [
        ("train-0", "train-0"),
        ("img.v2.0000", r"img_v2_0000-[0-9a-f]{8}"),
        ("v1/train", r"v1_train-[0-9a-f]{8}"),
        ("a b", r"a_b-[0-9a-f]{8}"),
        ("50%", r"50_-[0-9a-f]{8}"),
    ],
)
def test_key_parts_hold_no_dot_and_stay_unique(text, part):
    assert re.fullmatch(part, key_part(text))
    plainly_sanitised = re.sub(r"[^A-Za-z0-9_-]", "_", text)
    assert (key_part(plainly_sanitised) == key_part(text)) == (plainly_sanitised == text)


@pytest.mark.parametrize("prefix", ["img.v2", "a/b", "50%"])
def test_a_dotted_shard_prefix_is_refused(tmp_path, prefix):
    with pytest.raises(ConfigError, match=re.escape(f"prefix={prefix!r}: sample keys and shard names take letters")):
        write_preference_shards([{"winner": BRIGHT, "loser": DARK, "caption": "x"}], tmp_path / "out", prefix=prefix)
    assert written_files(tmp_path / "out") == []


# ------------------------------------------------------------------------------------------ Pick-a-Pic labels
@pytest.mark.parametrize(
    "label_0, label_1, reason",
    [
        (math.nan, 0.0, r"not both in \[0, 1\]"),
        (math.nan, math.nan, r"not both in \[0, 1\]"),
        (math.inf, 0.0, r"not both in \[0, 1\]"),
        (2.0, 0.0, r"not both in \[0, 1\]"),
        (2.0, -1.0, r"not both in \[0, 1\]"),  # sums to 1, out of range
        (1.0, 1.0, "do not sum to 1"),
        (0.0, 0.0, "do not sum to 1"),
        (0.6, 0.6, "do not sum to 1"),  # equal, not the 0.5/0.5 tie
        ("x", "0", "are not numbers"),
    ],
)
def test_bad_labels_are_rejected_and_counted(tmp_path, caplog, label_0, label_1, reason):
    kind = type(label_0)
    path = write_parquet(
        tmp_path / "labels.parquet", [pickapic_row("kept", kind(1), kind(0)), pickapic_row("bad", label_0, label_1)]
    )
    with caplog.at_level(logging.WARNING):
        totals = convert_pickapic(path, tmp_path / "out")
    assert (totals["rows"], totals["written"], totals["rejected_labels"]) == (2, 1, 1)
    assert captions(tmp_path / "out") == ["kept"]
    (message,) = [record.getMessage() for record in caplog.records if "rejected" in record.getMessage()]
    assert re.search(rf"labels.parquet, row 1 rejected: label_0=.*, label_1=.* {reason}", message)


@pytest.mark.parametrize(
    "label_0, label_1, ties, swapped",
    [
        (1.0, 0.0, "drop", False),
        (0.0, 1.0, "drop", True),
        (0.7, 0.3, "drop", False),  # a soft label: the larger one wins
        (0.25, 0.75, "drop", True),
        (0.5, 0.5, "keep", False),
    ],
)
def test_valid_labels_put_the_winner_first(tmp_path, label_0, label_1, ties, swapped):
    jpg_0, jpg_1 = (DARK, BRIGHT) if swapped else (BRIGHT, DARK)
    path = write_parquet(tmp_path / "labels.parquet", [pickapic_row("x", label_0, label_1, jpg_0=jpg_0, jpg_1=jpg_1)])
    assert convert_pickapic(path, tmp_path / "out", ties=ties)["written"] == 1
    (sample,) = read_samples(tmp_path / "out")
    assert sample["winner.jpg"] == BRIGHT and sample["loser.jpg"] == DARK
    metadata = json.loads(sample["json"])
    assert (metadata["swapped"], metadata["label_0"], metadata["label_1"]) == (swapped, label_0, label_1)


# ------------------------------------------------------------------------------------ captions and file names
@pytest.mark.parametrize("caption", [["a", "red"], 3, {"text": "a"}, True, None])
def test_a_table_caption_that_is_not_a_string_is_rejected(images, tmp_path, caplog, caption):
    (images / "pairs.json").write_text(json.dumps([pair("kept"), pair(caption)]))
    with caplog.at_level(logging.WARNING):
        counts = convert_pair_table(images / "pairs.json", tmp_path / "out")
    assert counts == {"rows": 2, "written": 1, "ties_dropped": 0, "unreadable": 0, "rejected_captions": 1}
    assert captions(tmp_path / "out") == ["kept"]
    assert f"pairs.json, row 1 rejected: its caption {caption!r} is not a string" in caplog.text


def test_a_parquet_caption_that_is_not_a_string_is_rejected(tmp_path, caplog):
    path = write_parquet(tmp_path / "captions.parquet", [pickapic_row("kept"), pickapic_row(None)])
    with caplog.at_level(logging.WARNING):
        totals = convert_pickapic(path, tmp_path / "out")
    assert (totals["written"], totals["rejected_captions"]) == (1, 1) and captions(tmp_path / "out") == ["kept"]
    assert "captions.parquet, row 1 rejected: its caption None is not a string" in caplog.text


@pytest.mark.parametrize("loser", [7, ["dark.png"], None])
def test_a_file_entry_that_is_not_a_file_name_is_unreadable(images, tmp_path, caplog, loser):
    (images / "pairs.json").write_text(json.dumps([pair("kept"), pair("bad", loser=loser)]))
    with caplog.at_level(logging.WARNING):
        counts = convert_pair_table(images / "pairs.json", tmp_path / "out")
    assert (counts["written"], counts["unreadable"]) == (1, 1) and captions(tmp_path / "out") == ["kept"]
    assert f"pairs.json, row 1 skipped: loser: {loser!r} is not a file name" in caplog.text


# ------------------------------------------------------------------------------------------------- VideoDPO
def videodpo_directory(folder, pairs):
    """Three videos (0 is bright, 1 and 2 dark) and ``pairs`` indexing them."""
    videos = []
    for index, value in enumerate([200, 20, 20]):
        (folder / f"{index}.mp4").write_bytes(encode_video(np.full((4, 16, 16, 3), value, np.uint8), fps=8))
        videos.append({"basic": {"clip_path": f"{index}.mp4"}, "misc": {"frame_caption": [f"video {index}"]}})
    (folder / "metadata.json").write_text(json.dumps(videos))
    (folder / "pair.json").write_text(json.dumps(pairs))
    return folder


@pytest.mark.parametrize(
    "video2, reason",
    [
        (-1, "video2=-1 is not an index of metadata.json's 3 videos: use an integer from 0 to 2"),
        (3, "video2=3 is not an index"),
        (1.0, "video2=1.0 is not an index"),
        ("1", "video2='1' is not an index"),
        (True, "video2=True is not an index"),
        (None, "video2=None is not an index"),
        (0, "video1 and video2 are both video 0: a pair needs two videos"),
    ],
)
def test_videodpo_indices_are_checked(tmp_path, caplog, video2, reason):
    directory = videodpo_directory(tmp_path, [{"video1": 0, "video2": 1}, {"video1": 0, "video2": video2}])
    with caplog.at_level(logging.WARNING):
        counts = convert_videodpo(directory, tmp_path / "out")
    assert counts == {
        "rows": 2,
        "written": 1,
        "ties_dropped": 0,
        "unreadable": 0,
        "rejected_captions": 0,
        "rejected_indices": 1,
    }
    (sample,) = read_samples(tmp_path / "out")
    assert sample["winner.mp4"] == (tmp_path / "0.mp4").read_bytes()
    assert json.loads(sample["json"])["pair_index"] == 0
    assert f"pair.json, row 1 rejected: {reason}" in caplog.text


@pytest.mark.parametrize(
    "second_pair, emptied, counted, kept",
    [
        ({"frame_caption": [3]}, None, "rejected_captions", ["kept"]),
        ({"frame_caption": []}, None, None, ["kept", "video 0"]),  # an empty list falls back to the winner's caption
        ({}, (0, "misc"), "rejected_captions", ["kept"]),  # no caption in the pair nor in the winner's metadata
        ({}, (2, "basic"), "unreadable", ["kept"]),  # the loser has no clip_path
    ],
)
def test_videodpo_captions_and_paths(tmp_path, second_pair, emptied, counted, kept):
    """``emptied``: ``(video, field)`` of metadata.json set to ``{}``."""
    directory = videodpo_directory(
        tmp_path, [{"video1": 0, "video2": 1, "frame_caption": "kept"}, {"video1": 0, "video2": 2, **second_pair}]
    )
    if emptied:
        videos = json.loads((directory / "metadata.json").read_text())
        videos[emptied[0]][emptied[1]] = {}
        (directory / "metadata.json").write_text(json.dumps(videos))
    counts = convert_videodpo(directory, tmp_path / "out")
    assert (counts["rows"], counts["written"]) == (2, len(kept))
    assert (counts["rejected_captions"], counts["unreadable"]) == (
        int(counted == "rejected_captions"),
        int(counted == "unreadable"),
    )
    assert captions(tmp_path / "out") == kept


# --------------------------------------------------------------------------------- conversions keeping nothing
def all_ties(tmp_path, images):
    write_parquet(tmp_path / "ties.parquet", [pickapic_row("tie", 0.5), pickapic_row("tie", 0.5)])
    return lambda out: convert_pickapic(tmp_path / "ties.parquet", out)


def zero_rows(tmp_path, images):
    schema = pa.Table.from_pylist([pickapic_row()]).schema
    pq.write_table(pa.Table.from_pylist([], schema=schema), tmp_path / "empty.parquet")
    return lambda out: convert_pickapic(tmp_path / "empty.parquet", out)


def all_unlabelled(tmp_path, images):
    write_parquet(tmp_path / "unlabelled.parquet", [pickapic_row(has_label=False)])
    return lambda out: convert_pickapic(tmp_path / "unlabelled.parquet", out)


def all_bad_labels(tmp_path, images):
    write_parquet(tmp_path / "labels.parquet", [pickapic_row("x", math.nan, 0.0)])
    return lambda out: convert_pickapic(tmp_path / "labels.parquet", out)


def header_only_csv(tmp_path, images):
    (images / "pairs.csv").write_text("winner,loser,caption\n")
    return lambda out: convert_pair_table(images / "pairs.csv", out)


def empty_json_list(tmp_path, images):
    (images / "pairs.json").write_text("[]")
    return lambda out: convert_pair_table(images / "pairs.json", out)


def empty_json_lines(tmp_path, images):
    (images / "pairs.jsonl").write_text("\n  \n")
    return lambda out: convert_pair_table(images / "pairs.jsonl", out)


def table_of_ties(tmp_path, images):
    (images / "votes.csv").write_text("path_A,path_B,caption,label\nbright.png,dark.png,x,same\n")
    return lambda out: convert_pair_table(images / "votes.csv", out, columns=PairColumns(label="label"))


def table_of_missing_files(tmp_path, images):
    (tmp_path / "pairs.json").write_text(json.dumps([pair(), pair()]))  # the images are not next to the table
    return lambda out: convert_pair_table(tmp_path / "pairs.json", out)


def empty_pair_json(tmp_path, images):
    directory = videodpo_directory(images, [])
    return lambda out: convert_videodpo(directory, out)


@pytest.mark.parametrize(
    "build, error, message",
    [
        (
            all_ties,
            DataError,
            r"ties.parquet kept no pair \(2 row\(s\), of which 2 ties_dropped\): --ties keep or --ties coin_flip",
        ),
        (zero_rows, DataError, r"empty.parquet kept no pair \(it holds no rows\): give a source holding usable pairs"),
        (all_unlabelled, DataError, r"unlabelled.parquet kept no pair \(1 row\(s\), of which 1 unlabelled\)"),
        (
            all_bad_labels,
            DataError,
            r"labels.parquet kept no pair \(1 row\(s\), of which 1 rejected_labels\): the warnings name",
        ),
        (header_only_csv, DataError, r"pairs.csv kept no pair \(it holds no rows\)"),
        (empty_json_list, DataError, r"pairs.json kept no pair \(it holds no rows\)"),
        (empty_json_lines, DataError, r"pairs.jsonl kept no pair \(it holds no rows\)"),
        (table_of_ties, DataError, r"votes.csv kept no pair \(1 row\(s\), of which 1 ties_dropped\): --ties keep"),
        (
            table_of_missing_files,
            MissingFileError,
            r"pairs.json kept no pair \(2 row\(s\), of which 2 unreadable\): check --root",
        ),
        (empty_pair_json, DataError, r"pair.json kept no pair \(it holds no rows\)"),
    ],
)
def test_a_conversion_that_keeps_nothing_fails_and_writes_nothing(tmp_path, images, build, error, message):
    convert = build(tmp_path, images)
    with pytest.raises(error, match=message + r".*Nothing was written\.$") as raised:
        convert(tmp_path / "out")
    assert type(raised.value) is error
    assert written_files(tmp_path / "out") == []


# ------------------------------------------------------------------------------------- encodings and formats
def table(name, content, **options):
    """A builder of the table ``name`` holding ``content`` (``None``: no file) next to the images."""

    def build(images):
        if content is not None:
            (images / name).write_bytes(content)
        return lambda out: convert_pair_table(images / name, out, **options)

    return build


def parquet(name, write):
    """A builder of the parquet source ``name``, written by ``write(path)``."""

    def build(images):
        write(images / name)
        return lambda out: convert_pickapic(images / name, out)

    return build


def pair_json(content):
    """A builder of a VideoDPO directory whose pair.json holds ``content``."""

    def build(images):
        videodpo_directory(images, []).joinpath("pair.json").write_bytes(content)
        return lambda out: convert_videodpo(images, out)

    return build


def damaged_row_group(path):
    """A parquet file of 4 row groups of 50 rows whose third group's first page header is overwritten."""
    write_parquet(path, [pickapic_row(f"row {i}") for i in range(200)], row_group_size=50)
    offset = pq.ParquetFile(path).metadata.row_group(2).column(0).data_page_offset
    data = bytearray(path.read_bytes())
    data[offset : offset + 8] = b"\xff" * 8
    path.write_bytes(bytes(data))


ROW = b'{"winner": "bright.png", "loser": "dark.png", "caption": "x"}'


@pytest.mark.parametrize(
    "build, error, message",
    [
        pytest.param(
            table("pairs.csv", b"winner,loser,caption\nbright.png,dark.png,caf\xe9\n"),
            DataError,
            r"pairs.csv is not UTF-8 text \(byte 44 is b'\\xe9'\): save it as UTF-8",
            id="non-UTF-8 CSV",
        ),
        pytest.param(
            table("pairs.jsonl", ROW + b'\n\n{"winner": bright.png}\n'),
            DataError,
            r"pairs.jsonl, line 3, column 12: not valid JSON \(Expecting value\): fix the JSON there",
            id="bad JSON-lines line",
        ),
        pytest.param(
            table("pairs.json", b'[\n  {"winner": "a.png",}\n]'),
            DataError,
            r"pairs.json, line 2, column 22: not valid JSON \(Expecting property name",
            id="invalid JSON",
        ),
        pytest.param(
            table("pairs.json", b"[" * 100000),
            DataError,
            r"pairs.json, line 1: JSON nested too deeply",
            id="deeply nested JSON",
        ),
        pytest.param(
            table("pairs.json", ROW),
            DataError,
            r"pairs.json holds an object, not a list: write a list of objects",
            id="JSON table not a list",
        ),
        pytest.param(
            table("pairs.json", b"[" + ROW + b', "dark.png"]'),
            DataError,
            r"pairs.json, row 1 is a string, not an object: write each row as",
            id="JSON row not an object",
        ),
        pytest.param(
            table("pairs.jsonl", ROW + b"\nnull\n"),
            DataError,
            r"pairs.jsonl, row 1 is null, not an object",
            id="JSON-lines row not an object",
        ),
        pytest.param(
            table("pairs.csv", b"winner,loser,caption\nbright.png,dark.png,a red, cat\n"),
            DataError,
            r"pairs.csv, row 0 \(line 2\) has 1 field\(s\) more than the header's 3: quote the fields",
            id="CSV row with extra fields",
        ),
        pytest.param(
            table("pairs.csv", b"winner,loser,caption\nbright.png,dark.png," + b"x" * 200000 + b"\n"),
            DataError,
            r"pairs.csv, line 2: not valid CSV \(field larger than field limit",
            id="CSV field too large",
        ),
        pytest.param(
            table("pairs.tsv", b"winner\tloser\tcaption\n"),
            DataError,
            r"pairs.tsv: a table of pairs is a .csv, .json or .jsonl file, not .tsv",
            id="unknown table extension",
        ),
        pytest.param(
            table(
                "votes.csv",
                b"path_A,path_B,caption,label\nbright.png,dark.png,x,A\nbright.png,dark.png,y,C\n",
                columns=PairColumns(label="label"),
            ),
            DataError,
            r"votes.csv, row 1: label='C': use A \(first wins\), B \(second wins\) or same",
            id="label other than A/B/same",
        ),
        pytest.param(
            table("absent.csv", None),
            MissingFileError,
            r"No table at '.*absent.csv': give a .csv, .json or .jsonl file",
            id="missing table",
        ),
        pytest.param(
            parquet("pairs.parquet", lambda path: path.write_text("winner,loser,caption\nbright.png,dark.png,x\n")),
            DataError,
            r"pairs.parquet is not a parquet file \(Parquet magic bytes not found.*\): give Pick-a-Pic parquet files",
            id="CSV named .parquet",
        ),
        pytest.param(
            parquet("empty.parquet", lambda path: path.write_bytes(b"")),
            DataError,
            r"empty.parquet is not a parquet file \(Parquet file size is 0 bytes\)",
            id="empty .parquet",
        ),
        pytest.param(
            parquet("bad.parquet", lambda path: write_parquet(path, [{"caption": "x", "jpg_0": BRIGHT}])),
            DataError,
            r"bad.parquet lacks the Pick-a-Pic column\(s\) \['jpg_1', 'label_0', 'label_1'\]",
            id="parquet without the columns",
        ),
        pytest.param(
            parquet("damaged.parquet", damaged_row_group),
            DataError,
            r"damaged.parquet is damaged in rows 100 to 149 \(row group 2: .*\): download it again",
            id="damaged parquet row group",
        ),
        pytest.param(
            pair_json(b'{"video1": 0, "video2": 1}'),
            DataError,
            r"pair.json holds an object, not a list",
            id="pair.json not a list",
        ),
        pytest.param(
            pair_json(b"[0, 1]"),
            DataError,
            r"pair.json, row 0 is a number, not an object",
            id="pair.json entry not an object",
        ),
    ],
)
def test_bad_input_is_one_clear_error(images, tmp_path, build, error, message):
    convert = build(images)
    with pytest.raises(error, match=message) as raised:
        convert(tmp_path / "out")
    assert type(raised.value) is error
    assert written_files(tmp_path / "out") == []


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("\ufeffwinner,loser,caption\r\nbright.png,dark.png,light\r\n", id="byte-order mark and CRLF"),
        pytest.param(
            'winner,loser,caption\nbright.png,dark.png,"light,\nover two lines"\n', id="quoted comma and newline"
        ),
    ],
)
def test_csv_conventions_are_read(images, tmp_path, text):
    (images / "pairs.csv").write_bytes(text.encode())
    assert convert_pair_table(images / "pairs.csv", tmp_path / "out")["written"] == 1
    (sample,) = read_samples(tmp_path / "out")
    assert sample["winner.png"] == (images / "bright.png").read_bytes()
    assert json.loads(sample["json"])["caption"] == text.split("dark.png,")[1].strip().strip('"')


def test_an_output_directory_holding_pair_shards_is_refused(images, tmp_path):
    (images / "pairs.json").write_text(json.dumps([pair("first")]))
    convert_pair_table(images / "pairs.json", tmp_path / "out")
    (images / "pairs.json").write_text(json.dumps([pair("second")]))
    with pytest.raises(
        ConfigError, match=r"out already holds 1 shard\(s\) image-pairs-\*.tar .*write to an empty --out"
    ):
        convert_pair_table(images / "pairs.json", tmp_path / "out")
    assert captions(tmp_path / "out") == ["first"]

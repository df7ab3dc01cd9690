"""Prompt files of the evaluation benchmarks: each format read by extension or by name, bad files refused."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lightning_pref.errors import ConfigError, DataError, MissingFileError
from lightning_pref.prompt_sets import prompt_format, read_prompt_set


def test_plain_text_reads_every_non_blank_line_stripped(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a red circle\n\n  a blue square  \n")
    assert read_prompt_set(path) == ["a red circle", "a blue square"]


def test_pickapic_parquet_reads_the_caption_column(tmp_path):
    path = tmp_path / "test_unique.parquet"
    pq.write_table(pa.table({"caption": ["a cat", "a dog"], "best_image_uid": ["x", "y"]}), path)
    assert read_prompt_set(path) == ["a cat", "a dog"]
    pq.write_table(pa.table({"prompt": ["a cat"]}), tmp_path / "other.parquet")
    with pytest.raises(DataError, match=r"other\.parquet has no 'caption' column \(it has prompt\)"):
        read_prompt_set(tmp_path / "other.parquet")


def test_partiprompts_tsv_reads_the_prompt_column(tmp_path):
    path = tmp_path / "PartiPrompts.tsv"
    path.write_text("Prompt\tCategory\tChallenge\tNote\nbond\tAbstract\tBasic\t\na tree, at dusk\tWorld\tBasic\t\n")
    assert read_prompt_set(path) == ["bond", "a tree, at dusk"]
    (tmp_path / "bad.tsv").write_text("text\tCategory\nbond\tAbstract\n")
    with pytest.raises(DataError, match=r"bad\.tsv has no 'Prompt' column .*give PartiPrompts\.tsv"):
        read_prompt_set(tmp_path / "bad.tsv")


def test_hpsv2_json_is_a_list_or_styles_in_file_order(tmp_path):
    (tmp_path / "anime.json").write_text(json.dumps(["a girl", "a robot"]))
    assert read_prompt_set(tmp_path / "anime.json") == ["a girl", "a robot"]
    styles = {"photo": ["a lake"], "anime": ["a girl", "a robot"]}
    (tmp_path / "all.json").write_text(json.dumps(styles))
    assert read_prompt_set(tmp_path / "all.json") == ["a lake", "a girl", "a robot"]
    (tmp_path / "holes.json").write_text(json.dumps({"photo": ["a lake", ""]}))
    with pytest.raises(DataError, match=r"holes\.json: entry 1 of style 'photo' is '', not a prompt"):
        read_prompt_set(tmp_path / "holes.json")


def test_vbench_reads_its_text_files_and_its_full_info_json_by_name(tmp_path):
    (tmp_path / "all_dimension.txt").write_text("a dog running\na cat sleeping\n")
    assert read_prompt_set(tmp_path / "all_dimension.txt", format="vbench") == ["a dog running", "a cat sleeping"]
    info = [{"prompt_en": "a dog running", "dimension": ["motion"]}, {"prompt_en": "a cat", "dimension": []}]
    (tmp_path / "VBench_full_info.json").write_text(json.dumps(info))
    assert read_prompt_set(tmp_path / "VBench_full_info.json", format="vbench") == ["a dog running", "a cat"]
    with pytest.raises(DataError, match="as VBench's JSON: read it with format 'vbench'"):  # .json: HPSv2's by default
        read_prompt_set(tmp_path / "VBench_full_info.json")


def test_bad_files_and_formats_get_one_line_naming_them(tmp_path):
    (tmp_path / "broken.json").write_text("[1,")
    with pytest.raises(DataError, match=r"broken\.json is not valid JSON \(line 1"):
        read_prompt_set(tmp_path / "broken.json")
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(DataError, match=r"empty\.txt holds no prompt"):
        read_prompt_set(tmp_path / "empty.txt")
    with pytest.raises(MissingFileError, match=r"missing\.txt does not exist"):
        read_prompt_set(tmp_path / "missing.txt")
    with pytest.raises(ConfigError, match=r"prompts\.csv: no prompt format for the extension '\.csv'"):
        prompt_format(tmp_path / "prompts.csv")
    with pytest.raises(ConfigError, match="prompt format 'drawbench': choose one of text, pickapic"):
        prompt_format(tmp_path / "prompts.txt", "drawbench")
    assert prompt_format(tmp_path / "p.csv", "text") == "text"  # an explicit format wins over the extension

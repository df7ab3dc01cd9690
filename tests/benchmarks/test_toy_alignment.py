"""The toy alignment benchmark end to end on a small budget: data, CLI fits in parallel, evaluation, table."""

import json
import shutil
import subprocess
import sys

from helpers.processes import REPO

SCRIPT = REPO / "benchmarks" / "toy_alignment.py"
TINY = ["--seeds", "0", "1", "--eval-seeds", "2", "--pairs", "16", "--heldout-pairs", "8", "--max-steps", "2"]


def run(args, tmp_path):
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args, "--out", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )


def test_rows_record_their_code_drift_and_difference_from_diffusion_dpo_and_never_mix_code(tmp_path):
    for method in ("diffusion_dpo", "kto"):
        result = run(["--method", method, *TINY], tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
    dpo, kto = (json.loads((tmp_path / name / "summary.json").read_text()) for name in ("diffusion_dpo", "kto"))
    assert dpo["code"] == kto["code"] and len(dpo["code"]) == 12 and dpo["commit"]
    # the first row made the shared inputs, timed apart from its own seeds; the second reused them
    assert dpo["shared_inputs_seconds"] > 10 * kto["shared_inputs_seconds"] and kto["wall_seconds"] > 0
    for run_ in dpo["runs"] + kto["runs"]:
        assert 0.0 <= run_["win_rate"] <= 1.0 and run_["samples"] == 8
        assert {"winner_error_change", "loser_error_change"} <= run_.keys() and isinstance(run_["collapsed"], bool)
    assert [run_["seed"] for run_ in kto["runs"]] == [0, 1]
    table = result.stdout[result.stdout.index("| method |") :]
    assert "| diffusion_dpo | 2 |" in table and "(baseline)" in table
    kto_row = next(line for line in table.splitlines() if line.startswith("| kto |"))
    assert kto_row.split(" | ")[3].startswith(("+", "-"))  # a paired difference with its interval
    assert "min making the inputs they share" in table

    # Inversion-DPO's seeds share one inversion store in the row's folder, emptied when the row starts.
    stale = tmp_path / "inversion_dpo" / "inversions" / "stale"
    stale.mkdir(parents=True)
    result = run(["--method", "inversion_dpo", *TINY], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (folder,) = (tmp_path / "inversion_dpo" / "inversions").iterdir()  # one reference, one folder; the stale gone
    assert folder.name != "stale" and len(list(folder.glob("*.safetensors"))) >= 2 * 16

    # PPD trains on two-user pairs (made on first use) and is measured per user: user 0 (warm) in the row,
    # user 1 (cool, under the cool reward) below the table.
    result = run(["--method", "ppd", *TINY], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "users-16" / "info.json").exists()
    ppd = json.loads((tmp_path / "ppd" / "summary.json").read_text())
    for run_ in ppd["runs"]:
        assert run_["user0_warm_win_rate"] == run_["win_rate"] and 0.0 <= run_["user1_cool_win_rate"] <= 1.0
    assert "| ppd | 2 |" in result.stdout and "* ppd, user1 (cool user): win rate vs base" in result.stdout

    # The table refuses rows of different code, and rows whose config changed since they ran: every method's
    # summary present, each a copy of kto's (so only kto's records its own config), one from other code.
    toy_configs = sorted(path.stem for path in (REPO / "examples" / "toy").glob("*.yaml"))
    page = tmp_path / "benchmarks.md"
    page.write_text("<!-- toy-alignment:start -->\n<!-- toy-alignment:end -->\n")
    for other_code in (True, False):
        for name in toy_configs:
            summary = dict(kto, method=name, name=name)
            (tmp_path / name).mkdir(exist_ok=True)
            (tmp_path / name / "summary.json").write_text(
                json.dumps({**summary, "code": "0" * 12} if other_code and name == "mapo" else summary)
            )
        refused = run(["--table", "--docs", str(page)], tmp_path)
        output = refused.stderr + refused.stdout
        assert refused.returncode != 0 and page.read_text().count("\n") == 2
        if other_code:
            assert "different code" in output
        else:
            named = output[output.index("the toy config of ") :].split(" changed since")[0]
            assert named.removeprefix("the toy config of ").split(", ") == [n for n in toy_configs if n != "kto"]


def test_the_committed_table_is_its_summaries_which_ran_the_committed_configs_at_one_code(tmp_path):
    """docs/benchmarks.md's table is what the saved summaries give, one per toy config; ``--table`` refuses rows
    of different code and rows whose config changed since they ran, so every row ran its config as committed,
    all at one code."""
    results = REPO / "benchmarks" / "results" / "toy_alignment"
    configs = {path.stem: path for path in (REPO / "examples" / "toy").glob("*.yaml")}
    summaries = {path.parent.name: json.loads(path.read_text()) for path in results.glob("*/summary.json")}
    assert summaries.keys() == configs.keys()
    for name, summary in summaries.items():
        assert summary["name"] == summary["method"] == name and not summary["overrides"]
        assert len(summary["runs"]) >= 5

    page = tmp_path / "benchmarks.md"
    shutil.copy(REPO / "docs" / "benchmarks.md", page)
    rebuilt = run(["--table", "--docs", str(page)], results)
    assert rebuilt.returncode == 0, rebuilt.stderr[-3000:]
    assert page.read_text() == (REPO / "docs" / "benchmarks.md").read_text()

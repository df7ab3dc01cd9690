"""The sampler benchmark runs on the tiny pipeline at minimal sizes and finds the two samplers agree."""

import json
import subprocess
import sys

from helpers.processes import REPO

SCRIPT = REPO / "benchmarks" / "sampler_throughput.py"


def test_the_benchmark_prints_both_rates_their_ratio_and_agreeing_images(tmp_path):
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--batch", "2", "--steps", "2", "--repeats", "1", "--sample-size", "8"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    rates = summary["samples_per_second"]
    assert rates["library"] > 0 and rates["diffusers"] > 0
    assert summary["ratio"] == rates["library"] / rates["diffusers"]
    assert "ratio library / diffusers" in result.stdout
    # The same float32 operations on the same inputs: at most round-off (float32 eps ~1.2e-7, a few steps).
    assert summary["max_abs_difference"] <= 1e-5

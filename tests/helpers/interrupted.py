"""Helpers of the tests that kill, signal and resume fits run by tests/scripts/interrupted_fit.py."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np

from helpers.processes import SCRIPTS, finish, script_env
from helpers.shards import append_members
from lightning_pref.datamodules import write_preference_shards

SCRIPT = SCRIPTS / "interrupted_fit.py"


def write_resume_shards(out: Path) -> Path:
    """Six shards of five pairs of random 8x8 images; one shard also holds a sample that does not decode."""
    rng = np.random.default_rng(0)
    for index in range(6):
        pairs = [
            {
                "winner": rng.integers(0, 256, (8, 8, 3), dtype=np.uint8),
                "loser": rng.integers(0, 256, (8, 8, 3), dtype=np.uint8),
                "caption": f"a red cat {index}-{i}",
            }
            for i in range(5)
        ]
        write_preference_shards(pairs, out, prefix=f"s{index}")
    append_members(
        out / "s2-000000.tar",
        [("s2bad.winner.png", b"not a png"), ("s2bad.loser.png", b"x"), ("s2bad.json", b'{"caption": "c"}')],
    )
    return out


def script_command(pipeline: Path, shards: Path, out: Path, **options) -> list[str]:
    command = [sys.executable, str(SCRIPT), str(pipeline), str(shards), str(out)]
    for name, value in options.items():
        command += [f"--{name.replace('_', '-')}", str(value)]
    return command


def run_fit(pipeline: Path, shards: Path, out: Path, **options) -> int:
    """Run the script to its end (or its SIGKILL); returns its exit status (``-9`` when killed)."""
    process = subprocess.Popen(
        script_command(pipeline, shards, out, **options),
        env=script_env(),
        cwd=out,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    output = finish(process)
    if process.returncode not in (0, -signal.SIGKILL):
        raise AssertionError(output[-4000:])
    return process.returncode


def losses(out: Path, devices: int = 1) -> list[list[dict]]:
    """Per rank, the ``{"step", "loss", "keys"}`` rows the script recorded, in order."""
    return [
        [json.loads(line) for line in (out / f"losses-rank{rank}.jsonl").read_text().splitlines()]
        for rank in range(devices)
    ]

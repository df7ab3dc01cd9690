"""Signals: SIGTERM and SIGINT stop a fit within seconds; SIGTERM leaves a checkpoint that resumes.

A fit of many steps runs in its own process (tests/scripts/interrupted_fit.py); once it has trained two
steps it is sent the signal. SIGTERM (a scheduler's preemption) stops it at the end of the running step and
:class:`~lightning_pref.callbacks.SaveOnSigterm` writes ``interrupted.ckpt``, from which a run resumes at the
next step. SIGINT (Ctrl-C) stops it through Lightning's graceful shutdown. Nothing hangs.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from helpers.interrupted import losses, script_command, write_resume_shards
from helpers.processes import script_env

from lightning_pref.tiny import write_tiny_sd_pipeline


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    return write_tiny_sd_pipeline(tmp_path_factory.mktemp("pipeline"), pixel_space=True)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_resume_shards(tmp_path_factory.mktemp("shards"))


def start_and_signal(pipeline, shards, out: Path, signum: int) -> tuple[int, float]:
    """Start a 10000-step fit, send ``signum`` after its second step; return its exit status and how long it
    took to stop after the signal. A fit still running 30 s after the signal fails the test with every
    thread's traceback (the script dumps them on SIGUSR1)."""
    stderr = out / "stderr.txt"
    with stderr.open("w") as errors:
        process = subprocess.Popen(
            script_command(pipeline, shards, out, steps=10000),
            cwd=out,
            env=script_env(),
            stdout=subprocess.DEVNULL,
            stderr=errors,
            start_new_session=True,
        )
    record = out / "losses-rank0.jsonl"
    deadline = time.monotonic() + 120
    while not (record.exists() and len(record.read_text().splitlines()) >= 2):
        assert process.poll() is None and time.monotonic() < deadline, "the fit did not start training"
        time.sleep(0.2)
    sent = time.monotonic()
    process.send_signal(signum)
    try:
        status = process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        dump_starts = stderr.stat().st_size
        process.send_signal(signal.SIGUSR1)
        time.sleep(3)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        dump = stderr.read_text()[dump_starts : dump_starts + 8000]  # the threads' tracebacks, not later log lines
        raise AssertionError(f"the fit still ran 30 s after the signal; where its threads were:\n{dump}") from None
    return status, time.monotonic() - sent


def test_sigterm_stops_within_seconds_with_a_checkpoint_that_resumes(pipeline, shards, tmp_path):
    status, seconds = start_and_signal(pipeline, shards, tmp_path, signal.SIGTERM)
    assert seconds < 10
    stopped_at = losses(tmp_path, 1)[0][-1]["step"]
    checkpoint = tmp_path / "checkpoints" / "interrupted.ckpt"
    assert checkpoint.is_file(), f"exit status {status}"
    resumed = subprocess.run(
        script_command(pipeline, shards, tmp_path, steps=stopped_at + 2, resume=checkpoint),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env=script_env(),
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [row["step"] for row in losses(tmp_path, 1)[0]][-2:] == [stopped_at + 1, stopped_at + 2]


def test_sigint_stops_within_seconds(pipeline, shards, tmp_path):
    status, seconds = start_and_signal(pipeline, shards, tmp_path, signal.SIGINT)
    assert seconds < 10 and status != 0

"""A run killed with SIGKILL and resumed from its last checkpoint continues bit for bit.

The data stream's position is part of the checkpoint (every rank's and worker's), the noise of every pair is
a function of the step, and the optimizer and schedule are restored: so the resumed run trains on the same
batches with the same noise and ends with exactly the weights of the run that was never interrupted, on one
process or two (DDP), with or without dataloader workers, mid-epoch or at an epoch's end.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

from lightning_pref.backbones.tiny import write_tiny_sd_pipeline
from lightning_pref.datamodules import write_preference_shards
from shard_helpers import append_members

SCRIPT = Path(__file__).with_name("scripts") / "interrupted_fit.py"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    return write_tiny_sd_pipeline(tmp_path_factory.mktemp("pipeline"), pixel_space=True)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Six shards of five pairs of random 8x8 images; one shard also holds a sample that does not decode."""
    out = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(0)
    for index in range(6):
        pairs = [{"winner": rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), "loser": rng.integers(0, 256, (8, 8, 3), dtype=np.uint8),
                  "caption": f"a red cat {index}-{i}"} for i in range(5)]
        write_preference_shards(pairs, out, prefix=f"s{index}")
    append_members(out / "s2-000000.tar", [("s2bad.winner.png", b"not a png"), ("s2bad.loser.png", b"x"), ("s2bad.json", b'{"caption": "c"}')])
    return out


def fit(pipeline: Path, shards: Path, out: Path, finetune: str, workers: int, devices: int, **options) -> int:
    command = [sys.executable, str(SCRIPT), str(pipeline), str(shards), str(out), "--finetune", finetune,
               "--workers", str(workers), "--devices", str(devices)]
    for name, value in options.items():
        command += [f"--{name.replace('_', '-')}", str(value)]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, env=env, cwd=out, capture_output=True, text=True, timeout=300, start_new_session=True)
    if result.returncode not in (0, -signal.SIGKILL):
        raise AssertionError(result.stderr[-4000:])
    return result.returncode


def losses(out: Path, devices: int) -> list[list[dict]]:
    return [[json.loads(line) for line in (out / f"losses-rank{rank}.jsonl").read_text().splitlines()] for rank in range(devices)]


@pytest.mark.parametrize(
    ("finetune", "workers", "devices", "kill_at"),
    [("full", 0, 1, 2), ("lora", 2, 1, 3), ("full", 2, 2, 4)],
    ids=["full-no-workers-mid-epoch", "lora-2-workers-epoch-end", "ddp-2-workers-second-epoch"],
)
def test_a_killed_run_resumes_bit_for_bit(pipeline, shards, tmp_path, finetune, workers, devices, kill_at):
    whole, interrupted = tmp_path / "whole", tmp_path / "interrupted"
    whole.mkdir(), interrupted.mkdir()
    assert fit(pipeline, shards, whole, finetune, workers, devices) == 0
    assert fit(pipeline, shards, interrupted, finetune, workers, devices, kill_at=kill_at) == -signal.SIGKILL
    assert not (interrupted / "final.safetensors").exists()
    assert [row["step"] for row in losses(interrupted, devices)[0]] == list(range(1, kill_at + 1))
    checkpoint = interrupted / "checkpoints" / f"step={kill_at}.ckpt"
    assert fit(pipeline, shards, interrupted, finetune, workers, devices, resume=checkpoint) == 0

    # the same batches (keys) and the same loss at every step, on every rank...
    assert losses(interrupted, devices) == losses(whole, devices)
    assert [row["step"] for row in losses(whole, devices)[0]] == list(range(1, 9))
    # ...and the same weights, bit for bit
    expected, actual = load_file(whole / "final.safetensors"), load_file(interrupted / "final.safetensors")
    assert expected.keys() == actual.keys()
    assert all((expected[key] == actual[key]).all() for key in expected)

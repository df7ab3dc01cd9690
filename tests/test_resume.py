"""A run killed with SIGKILL and resumed from its last checkpoint continues bit for bit.

The data stream's position is part of the checkpoint (every rank's and worker's), the noise of every pair is
a function of the step, and the optimizer and schedule are restored: so the resumed run trains on the same
batches with the same noise and ends with exactly the weights of the run that was never interrupted, on one
process or two (DDP), with or without dataloader workers, mid-epoch or at an epoch's end.
"""

from __future__ import annotations

import signal

import pytest
from helpers.interrupted import losses, run_fit, write_resume_shards
from safetensors.torch import load_file

from lightning_pref.tiny import write_tiny_sd_pipeline


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    return write_tiny_sd_pipeline(tmp_path_factory.mktemp("pipeline"), pixel_space=True)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_resume_shards(tmp_path_factory.mktemp("shards"))


@pytest.mark.parametrize(
    ("finetune", "workers", "devices", "kill_at"),
    [("full", 0, 1, 2), ("lora", 2, 1, 3), ("full", 2, 2, 4)],
    ids=["full-no-workers-mid-epoch", "lora-2-workers-epoch-end", "ddp-2-workers-second-epoch"],
)
def test_a_killed_run_resumes_bit_for_bit(pipeline, shards, tmp_path, finetune, workers, devices, kill_at):
    whole, interrupted = tmp_path / "whole", tmp_path / "interrupted"
    whole.mkdir(), interrupted.mkdir()
    options = dict(finetune=finetune, workers=workers, devices=devices)
    assert run_fit(pipeline, shards, whole, **options) == 0
    assert run_fit(pipeline, shards, interrupted, **options, kill_at=kill_at) == -signal.SIGKILL
    assert not (interrupted / "final.safetensors").exists()
    assert [row["step"] for row in losses(interrupted, devices)[0]] == list(range(1, kill_at + 1))
    checkpoint = interrupted / "checkpoints" / f"step={kill_at}.ckpt"
    assert run_fit(pipeline, shards, interrupted, **options, resume=checkpoint) == 0

    # the same batches (keys) and the same loss at every step, on every rank...
    assert losses(interrupted, devices) == losses(whole, devices)
    assert [row["step"] for row in losses(whole, devices)[0]] == list(range(1, 9))
    # ...and the same weights, bit for bit
    expected, actual = load_file(whole / "final.safetensors"), load_file(interrupted / "final.safetensors")
    assert expected.keys() == actual.keys()
    assert all((expected[key] == actual[key]).all() for key in expected)

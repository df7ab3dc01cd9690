"""Signals: SIGTERM and SIGINT stop a fit within seconds; SIGTERM leaves a checkpoint that resumes.

A fit of many steps runs in its own process (tests/scripts/interrupted_fit.py); once it has trained two
steps it is sent the signal. SIGTERM (a scheduler's preemption) stops it at the end of the running step and
:class:`~lightning_pref.callbacks.SaveOnSigterm` writes ``interrupted.ckpt``, from which a run resumes at the
next step. SIGINT (Ctrl-C) stops it through Lightning's graceful shutdown. Nothing hangs.
"""

from __future__ import annotations

import inspect
import signal
import subprocess
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest
from helpers.interrupted import losses, script_command, write_resume_shards
from helpers.pairs import pair_loader
from helpers.processes import dump_stacks_and_kill, script_env
from helpers.training import trainer
from lightning.pytorch.trainer.connectors.signal_connector import _HandlersCompose

from lightning_pref.backbones import StableDiffusionBackbone
from lightning_pref.callbacks import SaveOnSigterm
from lightning_pref.methods import DiffusionDPO
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
        masks = signal_masks(process.pid)
        dump_starts = stderr.stat().st_size
        members = dump_stacks_and_kill(process)
        process.wait()
        output = stderr.read_text()
        dump = output[dump_starts : dump_starts + 16000]  # the threads' tracebacks, not later log lines
        swallowed = [line for line in output.splitlines() if line.startswith("Exception ignored")]
        raise AssertionError(
            f"the fit still ran 30 s after the signal; its signal masks: {masks} (this test's: {signal_masks('self')}); "
            f"exceptions Python ignored: {swallowed}; the tracebacks of pids {members}, in that order:\n{dump}"
        ) from None
    return status, time.monotonic() - sent


def signal_masks(pid: int | str) -> str:
    """The blocked, ignored and caught signal masks of a process's main thread, as the kernel reports them."""
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return ", ".join(line.replace("\t", " ") for line in lines if line.startswith(("SigBlk", "SigIgn", "SigCgt")))


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


class RaiseAtStep(pl.Callback):
    """Records the process's SIGTERM handler while training, then fails the fit at ``step`` (if any)."""

    def __init__(self, step: int | None):
        self.step, self.handler_in_training = step, None

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.handler_in_training = signal.getsignal(signal.SIGTERM)
        if trainer.global_step == self.step:
            raise RuntimeError("a failing step")


@pytest.mark.parametrize("fails", [False, True])
def test_a_fit_leaves_the_processs_sigterm_handler_as_it_found_it(tmp_path, pipeline, fails):
    """Two fits in one process (a notebook): each trains under SaveOnSigterm's handler, which starts the deadline
    and then hands on to Lightning's, and each ends, finished or failed, with the handler from before it."""
    before = signal.signal(signal.SIGTERM, signal.default_int_handler)  # a handler the fits must give back
    try:
        for _ in range(2):
            module = DiffusionDPO(StableDiffusionBackbone(pipeline), beta=500.0, finetune="lora", seed=0)
            recorder = RaiseAtStep(step=1 if fails else None)
            fit = trainer(tmp_path, steps=2, callbacks=[recorder])
            if fails:
                with pytest.raises(RuntimeError, match="a failing step"):
                    fit.fit(module, train_dataloaders=pair_loader(num_pairs=4, batch_size=2))
            else:
                fit.fit(module, train_dataloaders=pair_loader(num_pairs=4, batch_size=2))
            deadline = recorder.handler_in_training
            assert deadline.__qualname__.startswith(SaveOnSigterm.__qualname__)
            handed_on = inspect.getclosurevars(deadline).nonlocals["previous"]
            assert isinstance(handed_on, _HandlersCompose)  # Lightning's, which ends the fit at the step's end
            assert signal.getsignal(signal.SIGTERM) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGTERM, before)

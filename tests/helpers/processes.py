"""Launching the scripts of ``tests/scripts/`` in subprocesses: a free port and the environment they need."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
REPO = TESTS.parent
SCRIPTS = TESTS / "scripts"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def script_env(**extra: str) -> dict[str, str]:
    """The environment of a launched script: a fresh rendezvous port, one thread per process, and ``tests/``
    on the path so that scripts (and every rank Lightning's launchers re-execute) import ``helpers``."""
    path = os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))
    return {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": path,
        **extra,
    }


def finish(process: subprocess.Popen, timeout: float = 300) -> str:
    """Wait for a script started with ``start_new_session=True`` and return its output. One that has not ended
    after ``timeout`` seconds is killed with its whole process group (every rank and dataloader worker) and
    fails with the end of its output, so a stuck rendezvous or worker shows where it stopped."""
    try:
        return process.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output = process.communicate()[0]
        raise AssertionError(f"the script did not end within {timeout} s; its output ends:\n{output[-4000:]}") from None

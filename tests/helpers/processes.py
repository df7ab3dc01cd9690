"""Launching the scripts of ``tests/scripts/`` in subprocesses: a free port and the environment they need."""

from __future__ import annotations

import os
import socket
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

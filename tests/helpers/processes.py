"""Launching the scripts of ``tests/scripts/`` in subprocesses: a free port and the environment they need."""

from __future__ import annotations

import contextlib
import faulthandler
import os
import signal
import socket
import subprocess
import time
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


def dump_stacks_on_request() -> None:
    """Called first by every script of ``tests/scripts/``: SIGUSR1 prints every thread's traceback (``finish`` sends
    it to a run that hangs; the process, and the dataloader workers it forks, go on)."""
    faulthandler.register(signal.SIGUSR1, all_threads=True)


def group_members(group: int) -> list[int]:
    """The pids of a process group's live members (read from ``/proc``), leader first."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[2]) == group:
                members.append(int(stat.parent.name))
    return sorted(members, key=lambda pid: (pid != group, pid))


def dump_stacks_and_kill(process: subprocess.Popen) -> list[int]:
    """Ask each live process of the group that ``process`` leads (started with ``start_new_session=True``) for its
    threads' tracebacks, one at a time so the dumps do not interleave, then kill the group; return the pids in
    the order they were asked."""
    members = group_members(process.pid)
    for pid in members:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGUSR1)
        time.sleep(0.5)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    return members


def finish(process: subprocess.Popen, timeout: float = 300) -> str:
    """Wait for a script started with ``start_new_session=True`` and return its output. One that has not ended
    after ``timeout`` seconds is asked for its tracebacks, one process of its group at a time (SIGUSR1: every
    rank and dataloader worker of a script that called ``dump_stacks_on_request`` prints its threads'), then
    killed with the group, and fails with the end of its output, so a stuck rendezvous or worker shows where
    it stopped."""
    try:
        return process.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        members = dump_stacks_and_kill(process)
        output = process.communicate()[0]
        raise AssertionError(
            f"the script did not end within {timeout} s; the tracebacks near its end are of pids {members}, in "
            f"that order (the first is the script, rank 0); its output ends:\n{output[-16000:]}"
        ) from None

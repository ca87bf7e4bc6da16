"""Test helpers shared by the suite: the real command line in a subprocess, one-line errors, kill -9 mid-run, and
the processes a test left behind."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

FACETOOL = [sys.executable, "-m", "facetool"]


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 600, preexec: Callable[[], None] | None = None
) -> subprocess.CompletedProcess:
    """Run ``facetool ARGS`` in a fresh process (``preexec`` runs in it first: limits, signals); its error output
    must never hold a traceback, whatever the exit."""
    proc = subprocess.run(
        [*FACETOOL, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        preexec_fn=preexec,
    )
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr
    return proc


def error_line(
    *args: str, env: dict[str, str] | None = None, timeout: float = 600, preexec: Callable[[], None] | None = None
) -> str:
    """Run ``facetool ARGS``, which must fail with exactly one line on stderr (no traceback); return that line."""
    proc = run_cli(*args, env=env, timeout=timeout, preexec=preexec)
    assert proc.returncode != 0, f"expected an error, got exit 0: {proc.stdout}"
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def kill_when(
    args: Sequence[str], ready: Callable[[], bool], *, env: dict[str, str] | None = None, timeout: float = 240
) -> list[int]:
    """Start ``facetool ARGS``, poll ``ready()`` and send SIGKILL as soon as it holds (the run must still be going:
    a run that finished or failed before it could be killed fails the test, as does the deadline). The run's own
    processes (pool workers) must then end by themselves, their parent gone; returns their pids."""
    proc = subprocess.Popen([*FACETOOL, *args], env={**os.environ, **(env or {})}, start_new_session=True)
    deadline = time.monotonic() + timeout
    children: list[int] = []
    try:
        while not ready():
            assert proc.poll() is None, f"facetool {' '.join(args)} ended (exit {proc.returncode}) before the kill"
            assert time.monotonic() < deadline, f"facetool {' '.join(args)}: not ready after {timeout} s"
            time.sleep(0.002)
        assert proc.poll() is None, "the run finished before it could be killed; make the test's input larger"
        children = descendants(proc.pid)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
    left = wait_gone(children)
    for pid in left:  # leave nothing behind, then fail
        os.kill(pid, signal.SIGKILL)
    assert not left, f"processes of the killed facetool {' '.join(args)} still run: {left}"
    return children


def _parents() -> dict[int, int]:
    """pid -> parent pid of every process (Linux /proc; empty elsewhere)."""
    parents = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # exited meanwhile
        parents[int(entry.name)] = int(stat[stat.rindex(")") + 2 :].split()[1])
    return parents


def descendants(pid: int) -> list[int]:
    """The pids of every live process below ``pid`` (children, grandchildren, ...)."""
    parents = _parents()
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        kids = [c for c, parent in parents.items() if parent == p]
        found += kids
        todo += kids
    return sorted(found)


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not yet reaped, does not count)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def wait_gone(pids: Sequence[int], within: float = 30.0) -> list[int]:
    """Wait (at most ``within`` seconds) for the processes to end; returns those still running."""
    deadline = time.monotonic() + within
    while True:
        left = [p for p in pids if alive(p)]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


def tree_bytes(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative name -> bytes), for byte-identity checks."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for a test's torch.distributed rendezvous)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def loader_params(*kinds: str, portable: bool = False) -> list:
    """Loader kinds (backends) as test parameters: "dali" marked ``dali`` (skipped, saying why, where NVIDIA DALI is
    not installed), the others marked ``portable`` when ``portable`` (run again in the venv without DALI)."""
    marks = {"dali": pytest.mark.dali}
    return [pytest.param(k, marks=marks.get(k, pytest.mark.portable if portable else ())) for k in kinds]

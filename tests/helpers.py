"""Test helpers shared by the suite: the real command line in a subprocess, one-line errors, kill -9 mid-run."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

FACETOOL = [sys.executable, "-m", "facetool"]


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``facetool ARGS`` in a fresh process; its error output must never hold a traceback, whatever the exit."""
    proc = subprocess.run(
        [*FACETOOL, *args], capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
    )
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr
    return proc


def error_line(*args: str, env: dict[str, str] | None = None, timeout: float = 600) -> str:
    """Run ``facetool ARGS``, which must fail with exactly one line on stderr (no traceback); return that line."""
    proc = run_cli(*args, env=env, timeout=timeout)
    assert proc.returncode != 0, f"expected an error, got exit 0: {proc.stdout}"
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def kill_when(
    args: Sequence[str], ready: Callable[[], bool], *, env: dict[str, str] | None = None, timeout: float = 240
) -> None:
    """Start ``facetool ARGS``, poll ``ready()`` and send SIGKILL as soon as it holds (the run must still be going:
    a run that finished or failed before it could be killed fails the test, as does the deadline)."""
    proc = subprocess.Popen([*FACETOOL, *args], env={**os.environ, **(env or {})}, start_new_session=True)
    deadline = time.monotonic() + timeout
    try:
        while not ready():
            assert proc.poll() is None, f"facetool {' '.join(args)} ended (exit {proc.returncode}) before the kill"
            assert time.monotonic() < deadline, f"facetool {' '.join(args)}: not ready after {timeout} s"
            time.sleep(0.002)
        assert proc.poll() is None, "the run finished before it could be killed; make the test's input larger"
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait()


def tree_bytes(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative name -> bytes), for byte-identity checks."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for a test's torch.distributed rendezvous)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]

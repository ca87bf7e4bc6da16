"""Worker processes that die with their parent: a pool worker outliving a killed command would sleep (or run)
forever, holding memory, open files and the output folder's lock.

Every process pool of the library calls :func:`die_with_parent` first thing in its workers (a pool initializer). On
Linux the kernel then kills the worker when its parent dies (``prctl(PR_SET_PDEATHSIG, SIGKILL)``; the parent is the
thread that started the worker, so pools are started from the main thread); elsewhere a daemon thread checks once a
second whether the parent is still the same process and exits the worker when it is not.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import signal
import sys
import threading
import time
from collections.abc import Callable

_PR_SET_PDEATHSIG = 1
_POLL_SECONDS = 1.0


def die_with_parent(parent_pid: int | None = None) -> None:
    """Make this (worker) process end when its parent does. ``parent_pid``, the parent's pid as the parent saw it,
    catches a parent that died before this call (the worker then exits at once)."""
    parent = parent_pid if parent_pid is not None else os.getppid()
    if not (sys.platform.startswith("linux") and _set_parent_death_signal()):
        threading.Thread(target=_watch_parent, args=(parent,), name="facetool-parent-watch", daemon=True).start()
    if os.getppid() != parent:
        os._exit(1)


def worker_init(parent_pid: int) -> Callable[..., None]:
    """A picklable initializer for pools and torch DataLoaders (which pass a worker id, ignored) that calls
    :func:`die_with_parent` with the pid of the process creating the workers."""
    return functools.partial(_init_worker, parent_pid)


def _init_worker(parent_pid: int, *_: object) -> None:
    die_with_parent(parent_pid)


def _set_parent_death_signal() -> bool:
    """``prctl(PR_SET_PDEATHSIG, SIGKILL)``; False where libc or the call is not available."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(_POLL_SECONDS)
    os._exit(1)

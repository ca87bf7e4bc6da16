"""Exclusive locks in an output folder: two commands writing the same files at once would tear each other's
temporary files away (or both finish, each with half of the other's shards).

A lock is a file in the folder (``.facetool-lock``, or a named one such as a cluster part's), held with
``fcntl.flock`` and holding the holder's pid, host and command so that a refused command can say who holds it. The
kernel releases a flock when its holder dies, kill -9 included, so a lock left behind by a dead process is simply
taken over; the file is removed when the command ends. ``wait`` makes a command wait (for a lock that is only ever
held briefly) before it refuses. Lock files are not published data, so they are written in place, not through
``facetool.pipeline.atomic``. Where ``fcntl`` does not exist (Windows) the file is created exclusively instead, and a
stale one must be removed by hand (the message names it).
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from facetool.pipeline.atomic import write_error
from facetool.pipeline.errors import FacetoolError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

LOCK_NAME = ".facetool-lock"
_HELD: set[int] = set()  # the lock files this process holds open (closed in forked children, see below)


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, command: str, *, name: str = LOCK_NAME, wait: float = 0.0) -> Iterator[Path]:
    """Hold the exclusive lock ``name`` in ``folder`` (which must exist) for the block, waiting up to ``wait``
    seconds for another holder to let go; then a FacetoolError naming the folder and the holder's pid and host."""
    path, deadline = Path(folder) / name, time.monotonic() + wait
    while True:
        try:
            fd = _acquire(path, Path(folder)) if fcntl is not None else _create(path, Path(folder))
            break
        except _Held as held:
            if time.monotonic() >= deadline:
                raise held.error from None
            time.sleep(0.05)
    _HELD.add(fd)
    try:
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()} {socket.gethostname()} facetool {command}\n".encode())
        except OSError as err:
            raise write_error(path, err) from None
        yield path
    finally:
        _HELD.discard(fd)
        with contextlib.suppress(OSError):
            os.unlink(path)  # while still holding it: a waiting process then re-opens the path and retries
        os.close(fd)


def lock_holder(path: str | os.PathLike) -> str:
    """Who holds a lock file, as its holder wrote it ("pid 123 on host h, facetool convert")."""
    try:
        fields = Path(path).read_text().split(maxsplit=2)
    except (OSError, UnicodeDecodeError):
        fields = []
    if len(fields) < 2 or not fields[0].isdigit():
        return "pid unknown"
    return f"pid {fields[0]} on host {fields[1]}" + (f", {fields[2].strip()}" if len(fields) > 2 else "")


def check_unlocked(folder: str | os.PathLike, pattern: str) -> None:
    """Refuse (as ``folder_lock`` would) when a live process holds one of the lock files ``pattern`` in ``folder``."""
    for path in sorted(Path(folder).glob(pattern)):
        if fcntl is None:
            raise _Held(path, Path(folder)).error
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            continue  # released meanwhile
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _Held(path, Path(folder)).error from None
        finally:
            os.close(fd)


class _Held(Exception):
    """The lock is held by another live process (``error``: the refusal to report)."""

    def __init__(self, path: Path, folder: Path) -> None:
        super().__init__(str(path))
        self.error = FacetoolError(
            f"{folder}: in use by another facetool command ({lock_holder(path)}); wait for it to end or use another "
            "folder"
        )


def _acquire(path: Path, folder: Path) -> int:
    """Open and flock the lock file, retrying when the file was removed by a holder that just let go."""
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise FacetoolError(f"{path}: cannot create the folder's lock ({err.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise _Held(path, folder) from None
        except OSError as err:
            os.close(fd)
            raise FacetoolError(f"{path}: cannot lock the folder ({err.strerror})") from None
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


def _create(path: Path, folder: Path) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        held = _Held(path, folder)
        held.error = FacetoolError(f"{held.error}; if no such process runs, remove {path}")
        raise held from None
    except OSError as err:
        raise FacetoolError(f"{path}: cannot create the folder's lock ({err.strerror})") from None


def _close_in_child() -> None:
    """A forked worker must not keep its parent's lock alive after the parent died: close its copies."""
    for fd in list(_HELD):
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_in_child)

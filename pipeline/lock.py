"""An exclusive lock on an output folder: two commands writing into one folder at once would tear each other's
temporary files away (or both finish, each with half of the other's shards).

The lock is the file ``FOLDER/.facetool-lock``, held with ``fcntl.flock`` while the command runs, and holding the
holder's pid, host and command so that the refused command can say who holds it. The kernel releases a flock when
its holder dies, kill -9 included, so a lock left behind by a dead process is simply taken over; the file is removed
when the command ends. The lock file is not published data, so it is written in place, not through
``facetool.pipeline.atomic``. Where ``fcntl`` does not exist (Windows) the file is created exclusively instead, and a
stale one must be removed by hand (the message names it).
"""

from __future__ import annotations

import contextlib
import os
import socket
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
def folder_lock(folder: str | os.PathLike, command: str) -> Iterator[Path]:
    """Hold the exclusive lock on ``folder`` (which must exist) for the block; a FacetoolError naming the folder
    and the holder's pid and host when another live process holds it."""
    path = Path(folder) / LOCK_NAME
    fd = _acquire(path, Path(folder)) if fcntl is not None else _create(path, Path(folder))
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


def _refused(path: Path, folder: Path) -> FacetoolError:
    return FacetoolError(
        f"{folder}: in use by another facetool command ({lock_holder(path)}); wait for it to end or use another folder"
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
            raise _refused(path, folder) from None
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
        raise FacetoolError(
            f"{folder}: in use by another facetool command ({lock_holder(path)}); if no such process runs, "
            f"remove {path}"
        ) from None
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

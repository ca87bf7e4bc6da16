"""Atomic file writes, the one way facetool publishes a file: a temporary name in the same folder, fsync, rename.

Readers never see half a file, and a crash (kill -9, power loss) leaves either the old file or the new one. An
``OSError`` while writing (a full disk, a file too large, no permission) becomes a one-line ``FacetoolError`` that
names the file being written.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from .errors import FacetoolError

#: ``progress(done, total)``: the one progress-callback shape of the library (the CLI turns it into a bar).
Progress = Callable[[int, int], None]


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make a rename inside ``folder`` durable (a no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_error(path: str | os.PathLike, err: OSError) -> FacetoolError:
    """The one-line error for a failed write of ``path`` ("out/x.tar: cannot write: No space left on device")."""
    return FacetoolError(f"{path}: cannot write: {err.strerror or err}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, tmp: str | os.PathLike | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block succeeds the file there is fsynced and renamed onto
    ``path`` (and the folder fsynced); when it fails the temporary file is removed.

    ``tmp`` fixes the temporary name (writers that resume look for it); by default it is unique, so concurrent
    writers never share one."""
    path = Path(path)
    if tmp is None:
        tmp_path = _unique_tmp(path)
    else:
        tmp_path = Path(tmp)
    try:
        yield tmp_path
        _fsync_file(tmp_path)
        os.replace(tmp_path, path)
    except OSError as e:
        tmp_path.unlink(missing_ok=True)
        raise write_error(path, e) from None
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", *, tmp: str | os.PathLike | None = None) -> Iterator[IO]:
    """Open a temporary file for writing (``"wb"`` or ``"w"``); it replaces ``path`` when the block succeeds."""
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_open: mode must be 'wb' or 'w', not {mode!r}")
    with atomic_path(path, tmp=tmp) as tmp_path, open(tmp_path, mode) as f:
        yield f


def write_bytes_atomic(path: str | os.PathLike, data: bytes | str) -> None:
    """Write ``data`` (text is UTF-8 encoded) to ``path`` atomically."""
    with atomic_open(path) as f:
        f.write(data.encode() if isinstance(data, str) else data)


def write_json_atomic(path: str | os.PathLike, obj: Any, indent: int | None = 1) -> None:
    """Write ``obj`` as JSON (indented by default, one trailing newline) to ``path`` atomically."""
    text = json.dumps(obj, indent=indent)
    write_bytes_atomic(path, text + "\n" if indent is not None else text)


def _unique_tmp(path: Path) -> Path:
    """Create an empty, unique temporary file beside ``path`` with the permissions of a plain ``open`` (0666 less
    the umask; ``tempfile.mkstemp`` would make it owner-only)."""
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue
        except OSError as e:
            raise write_error(path, e) from None
    raise write_error(path, FileExistsError(f"no free temporary name beside {path.name}"))


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

"""Tar members and DALI index lines, written without ``tarfile`` (it costs ~10 us a member; these headers ~1 us).

``ShardWriter`` streams one tar: members go out in chunks on a background thread that hashes and writes them,
and the DALI index (``wds2idx`` v1.2) is collected beside it. ``tar_headers`` and ``plain_index_lines`` build the
headers and index lines of many members at once with numpy, for the vectorised plain-JPEG path.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from facetool.pipeline.atomic import write_error
from facetool.pipeline.shards.format import BLOCK, JPEG_EXT, LABEL_EXT, MASK_EXT, index_header

RECORD_SIZE = 20 * BLOCK  # tar's record size: archives end on a multiple of it, as GNU tar and tarfile write
ZEROS = bytes(BLOCK)
_TAR_MTIME = 0
_TAR_MODE = 0o444
_FLUSH_BYTES = 1 << 20  # hash and write in chunks that stay in the CPU cache between the two
_WRITEBACK_WINDOW = 16 << 20  # how far behind the newest chunk written pages are dropped from the page cache
_fadvise = getattr(os, "posix_fadvise", None)  # Linux and most Unixes; absent on macOS and Windows


def _header_template() -> tuple[bytes, int]:
    """The fixed fields of our ustar headers, and their byte sum (the checksum counts it as 8 spaces)."""
    header = bytearray(BLOCK)
    header[100:108] = b"%07o\0" % _TAR_MODE
    header[108:116] = b"0000000\0"  # uid
    header[116:124] = b"0000000\0"  # gid
    header[136:148] = b"%011o\0" % _TAR_MTIME
    header[148:156] = b"        "  # checksum placeholder
    header[156:157] = b"0"  # regular file
    header[257:265] = b"ustar\x0000"
    # uname/gname empty, devmajor/devminor NUL for regular files, as tarfile leaves them
    return bytes(header), sum(header)


_HEADER, _HEADER_SUM = _header_template()


def tar_header(name: bytes, size: int) -> bytes:
    """A ustar header for a regular file, byte-identical to ``tarfile.TarInfo.tobuf(USTAR_FORMAT)`` with our fields."""
    if len(name) > 100:
        raise ValueError(f"member name too long for ustar: {name!r}")
    size_field = b"%011o\0" % size
    checksum = _HEADER_SUM + sum(name) + sum(size_field)
    return b"".join(
        (name, _HEADER[len(name) : 124], size_field, _HEADER[136:148], b"%06o\0 " % checksum, _HEADER[156:])
    )


def _octal_digits(values: np.ndarray, width: int) -> np.ndarray:
    """ASCII octal digits of each value, zero-padded to ``width`` (vectorised ``b"%0*o" % v``)."""
    return (((values[:, None] >> (3 * np.arange(width - 1, -1, -1))) & 7) + ord("0")).astype(np.uint8)


def tar_headers(names: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """``tar_header`` for many members at once: names (n, L) uint8 ASCII, sizes (n,) -> (n, 512) uint8."""
    n, width = names.shape
    headers = np.empty((n, BLOCK), dtype=np.uint8)
    headers[:] = np.frombuffer(_HEADER, dtype=np.uint8)
    headers[:, :width] = names
    size_digits = _octal_digits(sizes.astype(np.int64), 11)
    headers[:, 124:135] = size_digits
    checksum = _HEADER_SUM + names.sum(axis=1, dtype=np.int64) + size_digits.sum(axis=1, dtype=np.int64)
    headers[:, 148:154] = _octal_digits(checksum, 6)
    headers[:, 154] = 0
    headers[:, 155] = ord(" ")
    return headers


def key_digits(keys: np.ndarray) -> np.ndarray:
    """The 9-digit zero-padded sample keys as (n, 9) ASCII."""
    return ((keys[:, None] // 10 ** np.arange(8, -1, -1)) % 10 + ord("0")).astype(np.uint8)


def ascii_rows(text: str, n: int) -> np.ndarray:
    """``text`` as ASCII, repeated on ``n`` rows (a read-only (n, len) view)."""
    return np.broadcast_to(np.frombuffer(text.encode(), dtype=np.uint8), (n, len(text)))


def _decimal(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ASCII decimal digits of non-negative values, right-aligned in as many columns as the largest needs, and
    which of them to keep (each number without its leading zeros)."""
    width = len(str(int(values.max()))) if values.size else 1
    digits = (values[:, None] // 10 ** np.arange(width - 1, -1, -1, dtype=np.int64)) % 10
    keep = np.logical_or.accumulate(digits != 0, axis=1)
    keep[:, -1] = True
    return digits.astype(np.uint8) + ord("0"), keep


def plain_index_lines(
    image_names: np.ndarray,
    image_pos: np.ndarray,
    lengths: np.ndarray,
    label_pos: np.ndarray,
    twins: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
) -> bytes:
    """The DALI index lines (``jpg POS SIZE KEY.jpg label.i32 POS 4 KEY.label.i32``) of plain-JPEG samples, all
    at once: laid out in fixed-width columns, then the numbers' leading zeros are dropped. ``twins`` = (which
    samples have one, positions, sizes) adds ``mask.jpg POS SIZE KEY.mask.jpg`` to those lines."""
    n = image_names.shape[0]
    fixed = np.ones(1, dtype=bool)
    columns = [
        (ascii_rows(f"{JPEG_EXT} ", n), fixed),
        _decimal(image_pos),
        (ascii_rows(" ", n), fixed),
        _decimal(lengths),
        (ascii_rows(" ", n), fixed),
        (image_names, fixed),
        (ascii_rows(f" {LABEL_EXT} ", n), fixed),
        _decimal(label_pos),
        (ascii_rows(" 4 ", n), fixed),
        (image_names[:, :9], fixed),
        (ascii_rows(f".{LABEL_EXT}", n), fixed),
    ]
    if twins is not None:
        has, twin_pos, twin_len = twins[0][:, None], twins[1], twins[2]
        (pos, pos_keep), (size, size_keep) = _decimal(twin_pos), _decimal(twin_len)
        columns += [
            (ascii_rows(f" {MASK_EXT} ", n), has),
            (pos, pos_keep & has),
            (ascii_rows(" ", n), has),
            (size, size_keep & has),
            (ascii_rows(" ", n), has),
            (image_names[:, :9], has),
            (ascii_rows(f".{MASK_EXT}", n), has),
        ]
    columns.append((ascii_rows("\n", n), fixed))
    chars = np.concatenate([c for c, _ in columns], axis=1)
    keep = np.concatenate([np.broadcast_to(k, c.shape) for c, k in columns], axis=1)
    return chars[keep].tobytes()


class ShardWriter:
    """Streams members into one tar file, hashing as it goes and collecting the DALI index (wds2idx v1.2).

    It writes ``path`` and closes it; publishing it (fsync, rename) is the caller's, through
    ``facetool.pipeline.atomic.atomic_path``. A failed write (a full disk, a file too large), here or on the
    background thread, is a FacetoolError naming ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._f = open(path, "wb")
        except OSError as err:
            raise write_error(path, err) from None
        self._hash = hashlib.sha256()
        self._parts: list[bytes | memoryview] = []
        self.pos = 0  # the archive's length so far (what has been added, flushed or not)
        self._flushed = 0
        self._index: list[bytes] = []  # DALI index lines, newline-terminated (a sample's, or a block of them)
        self.samples = 0
        # hashing and writing release the GIL: one thread does them while the caller builds the next chunk
        self._io = ThreadPoolExecutor(1, thread_name_prefix="shard-io")
        self._pending: Future | None = None

    def add_sample(self, key: str, members: list[tuple[str, bytes | memoryview]]) -> None:
        """Append one sample's members (adjacent, in the given order) and its index line."""
        pos, entries = self.pos, []
        for ext, data in members:
            name = f"{key}.{ext}"
            size = len(data)
            pad = -size % BLOCK
            self._parts += (tar_header(name.encode(), size), data, ZEROS[:pad])
            entries.append(f"{ext} {pos + BLOCK} {size} {name}")
            pos += BLOCK + size + pad
        self.pos = pos
        self._index.append((" ".join(entries) + "\n").encode())
        self.samples += 1
        if self.pos - self._flushed >= _FLUSH_BYTES:
            self._flush()

    def write_parts(self, parts: list[bytes | memoryview]) -> None:
        """Append bytes laid out by the caller (whole members, starting at ``self.pos``); they are joined now (the
        caller may reuse the buffers behind them), then hashed and written in the background, in order."""
        self._flush()
        self._write_chunk(parts)
        self.pos = self._flushed

    def add_index_lines(self, lines: bytes, samples: int) -> None:
        """Append the (newline-terminated) index lines of ``samples`` samples written with ``write_parts``."""
        self._index.append(lines)
        self.samples += samples

    def _flush(self) -> None:
        if self._parts:
            self._write_chunk(self._parts)
            self._parts = []

    def _write_chunk(self, parts: list[bytes | memoryview]) -> None:
        chunk = b"".join(parts)  # copied now: the caller may reuse the buffers behind ``parts``
        self._drain()
        self._pending = self._io.submit(self._store, chunk, self._flushed)
        self._flushed += len(chunk)

    def _drain(self) -> None:
        """Wait for the chunk in flight (raising its error, if any)."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def _store(self, chunk: bytes, offset: int) -> None:
        try:
            self._write(chunk, offset)
        except OSError as err:
            raise write_error(self.path, err) from None

    def _write(self, chunk: bytes, offset: int) -> None:
        self._hash.update(chunk)
        self._f.write(chunk)
        end = offset + len(chunk)
        if _fadvise is not None:
            # Shards are written once and read much later, so stream them out instead of filling the page cache
            # (as ``dd oflag=nocache`` does): DONTNEED starts the write-back of the newest chunk, so it overlaps our
            # CPU work and the closing fsync finds little left, and drops the pages of the last few MB that have
            # reached the disk, so a long convert recycles a little memory instead of evicting the whole cache.
            self._f.flush()
            start = max(0, offset - _WRITEBACK_WINDOW)
            _fadvise(self._f.fileno(), start, end - start, os.POSIX_FADV_DONTNEED)

    def finish(self) -> tuple[int, str]:
        """Close the archive (two zero blocks, padded to tar's record size) and the file; returns (bytes, sha256)."""
        end = self.pos + 2 * BLOCK
        end += -end % RECORD_SIZE
        self._parts.append(bytes(end - self.pos))
        self.pos = end
        self._flush()
        self._drain()
        self._io.shutdown()
        try:
            self._f.close()
        except OSError as err:
            raise write_error(self.path, err) from None
        return self.pos, self._hash.hexdigest()

    def abort(self) -> None:
        """Stop writing and close the file (after an error; the caller removes it)."""
        self._io.shutdown(wait=True, cancel_futures=True)
        try:
            self._f.close()
        except OSError:
            pass  # the error that made us abort is the one reported

    def index_bytes(self) -> bytes:
        """The DALI index, as ``wds2idx`` writes it."""
        return index_header(self.samples) + b"".join(self._index)

"""The ``.idx`` of a RecordIO file (``key<TAB>offset`` lines), loaded into numpy and checked against the ``.rec``.

An entry is trusted only when it is possible: its key is non-negative and unique, its offset lies in the file and is
no other entry's, its record does not overlap another, and its frames end where the file ends or where a record
starts (RecordIO leaves no gap between records; an index may leave records out, never point between them). A flipped
digit in an index, or a damaged length in a record, is therefore an error naming the file and line, never a record
read twice or read from the wrong place. ``skip=True`` drops such entries instead and lists them.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from facetool.pipeline.recordio.format import LENGTH_MASK, MAGIC, RecordIOError, read_payload

_FRAME_BYTES = 8  # magic and lrecord


@dataclass(frozen=True)
class IndexProblem:
    """An index entry that cannot be right: its key and the one-line error naming the file and line."""

    key: int
    error: str

    def as_skipped(self) -> dict:
        """The entry as the manifest lists a skipped record."""
        return {"key": self.key, "error": self.error}


def load_index(
    idx_path: str | os.PathLike, rec_size: int, rec_path: str | os.PathLike
) -> tuple[np.ndarray, np.ndarray]:
    """Parse ``key<TAB>offset`` lines into int64 arrays (keys, offsets), checking every offset lies in the file."""
    keys, offsets = parse_index(idx_path)
    problems = _first_pass(keys, offsets, rec_size, _Lines(idx_path, keys.size), rec_path)
    if problems:
        raise RecordIOError(problems[0][1].error)
    return keys, offsets


def parse_index(idx_path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """The keys and offsets of an index file, in file order (no check beyond the syntax)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # numpy warns on an empty file; we report that ourselves
            table = np.loadtxt(idx_path, dtype=np.int64, ndmin=2, comments=None)
    except (ValueError, OverflowError) as err:
        raise RecordIOError(f"{idx_path}: not a RecordIO index of 'key<TAB>offset' lines ({err})") from None
    except OSError as err:
        raise RecordIOError(f"{idx_path}: cannot read ({err.strerror})") from None
    if table.size == 0:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    with open(idx_path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) != b"\n":  # every writer ends each line; a file cut short ends inside one
            raise RecordIOError(f"{idx_path}: the last line is incomplete (no line end): the file was cut short")
    if table.shape[1] != 2:
        raise RecordIOError(f"{idx_path}: expected 2 columns (key, offset), found {table.shape[1]}")
    return table[:, 0].copy(), table[:, 1].copy()


class _Lines:
    """Line numbers of the index's entries, worked out only for errors: entry ``i`` is on line ``i + 1`` unless
    the file has blank lines (which the parser skips), and only then are the lines counted one by one."""

    def __init__(self, idx_path: str | os.PathLike | None, rows: int) -> None:
        self.path, self.rows, self._numbers = idx_path, rows, None

    def where(self, row: int) -> str:
        if self.path is None:
            return f"record #{row} of the scan"
        if self._numbers is None:
            text = Path(self.path).read_bytes()
            if text.count(b"\n") == self.rows:
                self._numbers = range(1, self.rows + 1)
            else:
                self._numbers = [n for n, line in enumerate(text.split(b"\n"), 1) if line.strip()]
        return f"line {self._numbers[row]}"


def check_index(
    keys: np.ndarray,
    offsets: np.ndarray,
    buf: bytes | mmap.mmap,
    idx_path: str | os.PathLike | None,
    rec_path: str | os.PathLike,
    skip: bool = False,
) -> tuple[np.ndarray, np.ndarray, list[IndexProblem]]:
    """The entries that are possible, and the problems found in the others (``skip=False``: raise the first).

    ``buf`` is the whole ``.rec`` (bytes or a memory map); ``idx_path`` None means the entries come from a scan."""
    lines = _Lines(idx_path, keys.size)
    where = str(idx_path or rec_path)
    found = _first_pass(keys, offsets, len(buf), lines, rec_path)
    bad = np.zeros(keys.size, dtype=bool)
    bad[[row for row, _ in found]] = True
    ends = np.full(keys.size, -1, dtype=np.int64)
    ends[~bad] = record_ends(buf, offsets[~bad], rec_path)
    found += _overlaps(keys, offsets, ends, bad, len(buf), np.frombuffer(buf, dtype=np.uint8), lines, where)
    if found and not skip:
        raise RecordIOError(min(found, key=lambda f: f[0])[1].error)
    bad[[row for row, _ in found]] = True
    problems, seen = [], set()
    for _, problem in sorted(found, key=lambda f: f[0]):
        if problem.key not in seen:
            seen.add(problem.key)
            problems.append(problem)
    bad |= np.isin(keys, np.fromiter(seen, np.int64, len(seen)))  # every entry of a key with a problem goes
    return keys[~bad], offsets[~bad], problems


def _first_pass(
    keys: np.ndarray, offsets: np.ndarray, size: int, lines: _Lines, rec_path
) -> list[tuple[int, IndexProblem]]:
    """Negative keys, offsets outside the file, keys and offsets given twice: (row, problem) pairs."""
    where = lines.path or rec_path
    found = []
    for row in np.flatnonzero(keys < 0).tolist():
        found.append(
            (row, IndexProblem(int(keys[row]), f"{where}: {lines.where(row)}: record key {keys[row]} is negative"))
        )
    for row in np.flatnonzero((offsets < 0) | (offsets > size - _FRAME_BYTES)).tolist():
        msg = f"record {keys[row]}: byte offset {offsets[row]} is past the end of {rec_path} ({size} bytes)"
        found.append((row, IndexProblem(int(keys[row]), f"{where}: {lines.where(row)}: {msg}")))
    for values, what in ((keys, "record key"), (offsets, "byte offset")):
        order = np.argsort(values, kind="stable")
        twice = np.flatnonzero(np.diff(values[order]) == 0)
        for first, row in zip(order[twice].tolist(), order[twice + 1].tolist(), strict=True):
            if what == "record key":
                msg = f"record key {keys[row]} appears twice (also on {lines.where(first)})"
            else:
                msg = (
                    f"record {keys[row]} has byte offset {offsets[row]}, as record {keys[first]} ({lines.where(first)})"
                )
            found.append((row, IndexProblem(int(keys[row]), f"{where}: {lines.where(row)}: {msg}")))
            found.append((first, IndexProblem(int(keys[first]), f"{where}: {lines.where(row)}: {msg}")))
    return found


def record_ends(buf: bytes | mmap.mmap, offsets: np.ndarray, rec_path: str | os.PathLike) -> np.ndarray:
    """Where the record at each offset (inside the file) ends, after its last frame and padding; -1 where its first
    frame is not well formed (bad magic, a continuation frame, a broken chain): reading that record reports it."""
    u8 = np.frombuffer(buf, dtype=np.uint8)
    magic, lrecord = u32_at(u8, offsets), u32_at(u8, offsets + 4)
    cflag, length = lrecord >> 29, (lrecord & LENGTH_MASK).astype(np.int64)
    ends = np.where((magic == MAGIC) & (cflag == 0), offsets + _FRAME_BYTES + ((length + 3) & ~3), -1)
    for i in np.flatnonzero((magic == MAGIC) & (cflag == 1)).tolist():  # a record split into parts: walk them
        try:
            ends[i] = read_payload(buf, int(offsets[i]), rec_path, -1)[1]
        except RecordIOError:
            ends[i] = -1
    return ends


def u32_at(u8: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """The little-endian uint32 at each byte position (each at least 4 bytes before the end of ``u8``)."""
    out = np.zeros(positions.size, dtype=np.uint32)
    aligned = positions % 4 == 0  # RecordIO pads records to 4 bytes: nearly always aligned, read as words
    out[aligned] = u8[: u8.size - u8.size % 4].view("<u4")[positions[aligned] // 4]
    for i in np.flatnonzero(~aligned).tolist():
        out[i] = int.from_bytes(u8[positions[i] : positions[i] + 4].tobytes(), "little")
    return out


def _overlaps(keys, offsets, ends, bad, size, u8, lines: _Lines, where: str) -> list[tuple[int, IndexProblem]]:
    """Records that start inside another, and records whose frames end where no record starts."""
    rows = np.flatnonzero(~bad)
    rows = rows[np.argsort(offsets[rows], kind="stable")]
    starts, end = offsets[rows], ends[rows]
    reach = np.maximum(end, starts + _FRAME_BYTES)  # a record we cannot frame covers at least its header
    found = []
    for i in np.flatnonzero(starts[1:] < reach[:-1]).tolist():
        a, b = int(rows[i]), int(rows[i + 1])
        msg = (
            f"record {keys[b]} at byte offset {offsets[b]} starts inside record {keys[a]} "
            f"({lines.where(a)}, bytes {offsets[a]}..{reach[i]})"
        )
        found += [(b, IndexProblem(int(keys[b]), f"{where}: {lines.where(b)}: {msg}"))]
        found += [(a, IndexProblem(int(keys[a]), f"{where}: {lines.where(b)}: {msg}"))]
    inner = (end >= 0) & (end < size)
    room = inner & (end + 4 <= size)
    starts_record = np.isin(end, offsets)
    starts_record[room] |= u32_at(u8, end[room]) == MAGIC
    for i in np.flatnonzero(inner & ~starts_record).tolist():
        row = int(rows[i])
        msg = (
            f"record {keys[row]} at byte offset {offsets[row]}: its frames end at byte {end[i]}, where no record "
            "starts (the record's length or its offset is damaged)"
        )
        found.append((row, IndexProblem(int(keys[row]), f"{where}: {lines.where(row)}: {msg}")))
    return found


def index_digest(keys: np.ndarray, offsets: np.ndarray) -> str:
    """A sha256 of an index's entries (in key order): what identifies the records a plan was made from."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(keys, dtype="<i8").tobytes())
    h.update(np.ascontiguousarray(offsets, dtype="<i8").tobytes())
    return h.hexdigest()

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
_U32_MAX = 2**32 - 1
PARSE_BLOCK = 1 << 20  #: bytes of index text parsed at a time (the temporaries are ~8 times this)
CHECK_BLOCK = 1 << 16  #: records checked at a time (the temporaries of a check are a few arrays of this size)


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
    """The keys and offsets of an index file, in file order (no check beyond the syntax), each as ``compact``
    arrays. Plain ``key<TAB>offset`` lines (what every writer emits) are parsed with numpy a block at a time into
    arrays allocated once; anything else (blank lines, spaces, signs, an unfinished last line) by ``np.loadtxt``."""
    plain = _parse_plain(idx_path)
    if plain is not None:
        return plain
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # numpy warns on an empty file; we report that ourselves
            table = np.loadtxt(idx_path, dtype=np.int64, ndmin=2, comments=None)
    except (ValueError, OverflowError) as err:
        raise RecordIOError(f"{idx_path}: not a RecordIO index of 'key<TAB>offset' lines ({err})") from None
    except OSError as err:
        raise RecordIOError(f"{idx_path}: cannot read ({err.strerror})") from None
    if table.size == 0:
        return np.empty(0, np.uint32), np.empty(0, np.uint32)
    with open(idx_path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) != b"\n":  # every writer ends each line; a file cut short ends inside one
            raise RecordIOError(f"{idx_path}: the last line is incomplete (no line end): the file was cut short")
    if table.shape[1] != 2:
        raise RecordIOError(f"{idx_path}: expected 2 columns (key, offset), found {table.shape[1]}")
    return compact(table[:, 0]), compact(table[:, 1])


def compact(values: np.ndarray) -> np.ndarray:
    """``values`` as uint32 when they all fit (4 bytes a record instead of 8), else as int64."""
    if values.size and (values.min() < 0 or values.max() > _U32_MAX):
        return np.asarray(values, dtype=np.int64)
    return values.astype(np.uint32)


def _parse_plain(idx_path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray] | None:
    """Keys and offsets of an index made only of ``DIGITS<TAB>DIGITS<LF>`` lines; None for any other file."""
    try:
        with open(idx_path, "rb") as f:
            rows = sum(block.count(b"\n") for block in iter(lambda: f.read(PARSE_BLOCK), b""))
            if rows == 0 or f.seek(-1, os.SEEK_END) < 0 or f.read(1) != b"\n":
                return None
            f.seek(0)
            keys, offsets = np.empty(rows, np.uint32), np.empty(rows, np.uint32)
            done, rest = 0, b""
            for block in iter(lambda: f.read(PARSE_BLOCK), b""):
                text = rest + block
                cut = text.rfind(b"\n") + 1
                parsed = _plain_lines(np.frombuffer(text, np.uint8, cut)) if cut else (np.empty(0, np.int64),) * 2
                if parsed is None or done + parsed[0].size > rows:
                    return None
                keys, offsets = _put(keys, done, parsed[0]), _put(offsets, done, parsed[1])
                done, rest = done + parsed[0].size, text[cut:]
    except OSError:
        return None  # the general path reports it
    return (keys, offsets) if done == rows else None


def _plain_lines(text: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(keys, offsets) of whole ``DIGITS<TAB>DIGITS<LF>`` lines (int64, at most 18 digits each), else None."""
    ends, tabs = np.flatnonzero(text == 10), np.flatnonzero(text == 9)
    if ends.size != tabs.size or np.count_nonzero(text - 48 < 10) != text.size - 2 * ends.size:
        return None
    starts = np.concatenate([[0], ends[:-1] + 1])
    key_digits, offset_digits = tabs - starts, ends - tabs - 1  # one tab a line, digits on both sides of it
    if key_digits.min() < 1 or offset_digits.min() < 1 or max(key_digits.max(), offset_digits.max()) > 18:
        return None
    return _decimal(text, tabs, key_digits), _decimal(text, ends, offset_digits)


def _decimal(text: np.ndarray, ends: np.ndarray, digits: np.ndarray) -> np.ndarray:
    """The numbers written by the ``digits`` ASCII digits before each of ``ends``."""
    value, scale = np.zeros(ends.size, np.int64), 1
    for j in range(int(digits.max())):
        d = text[np.maximum(ends - 1 - j, 0)].astype(np.int64) - 48
        value += np.where(digits > j, d, 0) * scale
        scale *= 10
    return value


def _put(into: np.ndarray, at: int, values: np.ndarray) -> np.ndarray:
    """Store ``values`` at ``into[at:]``, widening ``into`` to int64 first when they do not fit its dtype."""
    if values.size and into.dtype != np.int64 and values.max() > _U32_MAX:
        into = into.astype(np.int64)
    into[at : at + values.size] = values
    return into


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
    found += _overlaps(keys, offsets, bad, buf, lines, where, rec_path)
    if found and not skip:
        raise RecordIOError(min(found, key=lambda f: f[0])[1].error)
    if not found:
        return keys, offsets, []
    bad[[row for row, _ in found]] = True
    problems, seen = [], set()
    for _, problem in sorted(found, key=lambda f: f[0]):
        if problem.key not in seen:
            seen.add(problem.key)
            problems.append(problem)
    bad |= np.isin(keys, np.fromiter(seen, np.int64, len(seen)))  # every entry of a key with a problem goes
    return keys[~bad], offsets[~bad], problems


def sort_by_key(keys: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The (unique) keys in ascending order with their offsets. An index in key order already, or in key order
    but for a last stretch of smaller keys (MXNet's layout-A writers add the header record 0 last), needs no
    argsort: its 8 bytes a record of temporary order are saved."""
    descents = np.flatnonzero(keys[1:] < keys[:-1])
    if descents.size == 0:
        return keys, offsets
    if descents.size == 1 and keys[-1] < keys[0]:
        cut = int(descents[0]) + 1
        return _rotate(keys, cut), _rotate(offsets, cut)
    order = np.argsort(keys, kind="stable")
    return keys[order], offsets[order]


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
        if not _repeats(values):
            continue
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


def _rotate(values: np.ndarray, cut: int) -> np.ndarray:
    """``values[cut:]`` then ``values[:cut]``: in place, a block at a time, when the part moved to the front is
    short (no second copy of the index), else as a new array."""
    tail = values[cut:].copy()
    if tail.size > CHECK_BLOCK:
        return np.concatenate([tail, values[:cut]])
    for stop in range(cut, 0, -CHECK_BLOCK):  # back to front, each block shifted right past the tail
        start = max(stop - CHECK_BLOCK, 0)
        values[start + tail.size : stop + tail.size] = values[start:stop]
    values[: tail.size] = tail
    return values


def _repeats(values: np.ndarray) -> bool:
    """Whether a value appears twice; without sorting a copy when the values are in order, or in two ordered runs
    (an index in key order with the header record 0 last), as in nearly every index."""
    descents = np.flatnonzero(values[1:] <= values[:-1])
    if descents.size == 0:
        return False
    if descents.size == 1:
        cut = int(descents[0]) + 1
        small, big = sorted((values[:cut], values[cut:]), key=len)
        if small.size <= CHECK_BLOCK and (big[1:] > big[:-1]).all() and (small[1:] > small[:-1]).all():
            return bool((big[np.minimum(np.searchsorted(big, small), big.size - 1)] == small).any())
    ordered = np.sort(values)
    return bool((ordered[1:] == ordered[:-1]).any())


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


def _overlaps(keys, offsets, bad, buf, lines: _Lines, where: str, rec_path) -> list[tuple[int, IndexProblem]]:
    """Records that start inside another, and records whose frames end where no record starts: the good rows in
    offset order, a block at a time (with the next block's first start), so that no array spans the index."""
    order = _offset_order(offsets, bad)
    count, size, u8 = keys.size if order is None else order.size, len(buf), np.frombuffer(buf, dtype=np.uint8)
    found = []
    for first in range(0, count, CHECK_BLOCK):
        last = min(first + CHECK_BLOCK, count)
        rows = np.arange(first, min(last + 1, count)) if order is None else order[first : last + 1]
        starts = offsets[rows].astype(np.int64)
        end = record_ends(buf, starts[: last - first], rec_path)
        reach = np.maximum(end, starts[: last - first] + _FRAME_BYTES)  # a record we cannot frame covers its header
        for i in np.flatnonzero(starts[1:] < reach[: starts.size - 1]).tolist():
            a, b = int(rows[i]), int(rows[i + 1])
            msg = (
                f"record {keys[b]} at byte offset {offsets[b]} starts inside record {keys[a]} "
                f"({lines.where(a)}, bytes {offsets[a]}..{reach[i]})"
            )
            found += [(b, IndexProblem(int(keys[b]), f"{where}: {lines.where(b)}: {msg}"))]
            found += [(a, IndexProblem(int(keys[a]), f"{where}: {lines.where(b)}: {msg}"))]
        inner = (end >= 0) & (end < size)
        room = inner & (end + 4 <= size)
        starts_record = np.zeros(end.size, dtype=bool)
        starts_record[room] = u32_at(u8, end[room]) == MAGIC
        loose = np.flatnonzero(inner & ~starts_record)  # rare: then look the end up among the offsets
        for i in (loose[~np.isin(end[loose], offsets)] if loose.size else loose).tolist():
            row = int(rows[i])
            msg = (
                f"record {keys[row]} at byte offset {offsets[row]}: its frames end at byte {end[i]}, where no record "
                "starts (the record's length or its offset is damaged)"
            )
            found.append((row, IndexProblem(int(keys[row]), f"{where}: {lines.where(row)}: {msg}")))
    return found


def _offset_order(offsets: np.ndarray, bad: np.ndarray) -> np.ndarray | None:
    """The good rows sorted by offset; None when that is every row in file order (an index written as its records
    were, nearly always)."""
    if not bad.any() and (offsets.size < 2 or bool((offsets[1:] > offsets[:-1]).all())):
        return None
    rows = np.flatnonzero(~bad)
    return rows[np.argsort(offsets[rows], kind="stable")]


def index_digest(keys: np.ndarray, offsets: np.ndarray) -> str:
    """A sha256 of an index's entries (in key order, as little-endian int64 whatever the arrays' dtype): what
    identifies the records a plan was made from."""
    h = hashlib.sha256()
    for values in (keys, offsets):
        for first in range(0, values.size, CHECK_BLOCK):
            h.update(np.ascontiguousarray(values[first : first + CHECK_BLOCK], dtype="<i8"))
    return h.hexdigest()

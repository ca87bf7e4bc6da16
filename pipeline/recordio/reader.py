"""Reading InsightFace ``.rec`` files (layouts A and B) and their ``.idx`` and ``property`` files, memory-mapped.

Layouts: A (MS1MV2-style: record 0 is a header whose label ``[a, b]`` says images are records 1..a-1 and
identity records a..b-1) and B (every record is an image, the label possibly a vector). The layout is told by what
record 0 *is* (a label range with no image bytes), not by its flag alone.

The index lives in numpy arrays of the smallest dtype (uint32 keys; uint32 offsets in a file under 4 GiB, else int64:
8 or 12 bytes a record; layout A's image records are views of them): 42 million records cost 0.35-0.5 GB, not ~5 GB
of dicts.
"""

from __future__ import annotations

import math
import mmap
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from facetool.pipeline.errors import FacetoolError
from facetool.pipeline.recordio.format import (
    IR_HEADER,
    LENGTH_MASK,
    MAGIC,
    IRHeader,
    Record,
    RecordIOError,
    read_payload,
    unpack_payload,
)
from facetool.pipeline.recordio.index import (
    CHECK_BLOCK,
    IndexProblem,
    check_index,
    compact,
    index_digest,
    parse_index,
    sort_by_key,
    u32_at,
)


class RecordFile:
    """Random access to the image records of an InsightFace ``.rec`` (layouts A and B), memory-mapped.

    ``idx_path=None`` scans the file sequentially instead of reading an index; keys then come from the IRHeader's
    ``id`` field (where MXNet's writers put the record key), or from file order when those are not unique.
    Index entries that cannot be right (see ``facetool.pipeline.recordio.index``) are an error naming the line, or
    with ``on_index_error="skip"`` are left out and listed in ``index_problems``.
    """

    def __init__(
        self, rec_path: str | os.PathLike, idx_path: str | os.PathLike | None, on_index_error: str = "fail"
    ) -> None:
        self.path = Path(rec_path)
        self.idx_path = Path(idx_path) if idx_path is not None else None
        self._skip = on_index_error == "skip"
        self.index_problems: list[IndexProblem] = []
        try:
            self._file = open(self.path, "rb")
        except OSError as err:
            raise RecordIOError(f"{self.path}: cannot open ({err.strerror})") from None
        self.size = os.fstat(self._file.fileno()).st_size
        if self.size == 0:
            self._file.close()
            raise RecordIOError(f"{self.path}: empty file, no records")
        self._buf = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
        self._view = memoryview(self._buf)
        self._bytes = np.frombuffer(self._buf, dtype=np.uint8)
        if self.idx_path is not None:
            if not self.idx_path.is_file():
                self.close()
                raise RecordIOError(f"{self.idx_path}: index file not found")
        try:
            keys, offsets = parse_index(self.idx_path) if self.idx_path is not None else self._scan()
            keys, offsets, self.index_problems = check_index(
                keys, offsets, self._buf, self.idx_path, self.path, skip=self._skip
            )
            if keys.size == 0:
                raise RecordIOError(f"{self.idx_path or self.path}: no records")
            self._all_keys, self._all_offsets = sort_by_key(keys, offsets)
            del keys, offsets  # an index out of key order: drop the unsorted arrays before the layout is read
            self._detect_layout()
        except BaseException:
            self.close()
            raise

    # -- construction helpers -------------------------------------------------------------------------------
    def _scan(self) -> tuple[np.ndarray, np.ndarray]:
        """Walk the file record by record (no index), collecting offsets and header ids."""
        offsets: list[int] = []
        ids: list[int] = []
        pos, n = 0, 0
        while pos < self.size:
            payload, nxt = read_payload(self._buf, pos, self.path, n)
            offsets.append(pos)
            ids.append(IR_HEADER.unpack_from(payload, 0)[2] if len(payload) >= IR_HEADER.size else -1)
            pos, n = nxt, n + 1
        if len(set(ids)) != len(ids) or min(ids) < 0 or max(ids) >= 2**63:
            return compact(np.arange(len(offsets), dtype=np.int64)), compact(np.asarray(offsets, dtype=np.int64))
        return compact(np.asarray(ids, dtype=np.int64)), compact(np.asarray(offsets, dtype=np.int64))

    def _offset_of(self, key: int) -> int | None:
        if not 0 <= key <= np.iinfo(self._all_keys.dtype).max:
            return None  # and a probe in the keys' own dtype: another would convert the whole index to search it
        i = int(np.searchsorted(self._all_keys, self._all_keys.dtype.type(key)))
        if i < self._all_keys.size and self._all_keys[i] == key:
            return int(self._all_offsets[i])
        return None

    def _detect_layout(self) -> None:
        first_key = int(self._all_keys[0])
        header, labels, image = self._unpack(first_key, int(self._all_offsets[0]))
        self.header_label: np.ndarray | None = None
        if first_key == 0 and header.flag > 0 and len(image) == 0 and labels.size >= 2:
            self._layout_a(labels)
        else:
            self.layout = "B"
            self.keys, self.offsets = self._all_keys, self._all_offsets
            self.num_identities = None

    def _find(self, wanted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Which of the sorted ``wanted`` keys (>= 0) the index holds, and their offsets (meaningful where held)."""
        if wanted.size and wanted[-1] <= np.iinfo(self._all_keys.dtype).max:
            wanted = wanted.astype(self._all_keys.dtype)  # searched in another dtype, the index would be converted
        pos = np.minimum(np.searchsorted(self._all_keys, wanted), self._all_keys.size - 1)
        return self._all_keys[pos] == wanted, self._all_offsets[pos]

    def _layout_a(self, labels: np.ndarray) -> None:
        """Layout A from the header's label ``[a, b)``: images 1..a-1, identity records a..b-1, all checked to be
        there (and the counts against the index before anything is allocated)."""
        where = self.idx_path or self.path
        lo, hi = float(labels[0]), float(labels[1])
        if not (math.isfinite(lo) and math.isfinite(hi) and 1 <= lo <= hi):
            raise RecordIOError(f"{self.path}: record 0: header label range [{lo}, {hi}) is not valid")
        a, b = int(lo), int(hi)
        if b - 1 > self._all_keys.size + len(self.index_problems):
            raise RecordIOError(
                f"{where}: the header record 0 announces {a - 1} images and {b - a} identity records, but the "
                f"index lists only {self._all_keys.size} records"
            )
        held, offsets = self._find(np.arange(a, b, dtype=np.int64))
        if not held.all():
            raise RecordIOError(
                f"{where}: the header record 0 announces identity records {a}..{b - 1} but record "
                f"{a + int(np.flatnonzero(~held)[0])} is not in the index"
            )
        self._check_identities(a, lo, offsets)
        self.layout, self.header_label, self.num_identities = "A", labels, b - a
        first = int(np.searchsorted(self._all_keys, self._all_keys.dtype.type(1)))
        if a == 1 or (first + a - 1 <= self._all_keys.size and self._all_keys[first + a - 2] == a - 1):
            # the (sorted, unique) keys from 1 hold a - 1 ... : every image is there, as views of the index
            self.keys, self.offsets = self._all_keys[first : first + a - 1], self._all_offsets[first : first + a - 1]
            return
        wanted = np.arange(1, a, dtype=np.int64)
        held, offsets = self._find(wanted)
        if not held.all():
            listed = {p.key for p in self.index_problems}
            missing = [k for k in wanted[~held].tolist() if k not in listed]
            if missing and not self._skip:
                raise RecordIOError(
                    f"{where}: header announces images 1..{a - 1} but record {missing[0]} is not in the index"
                )
            self.index_problems += [
                IndexProblem(k, f"{where}: record {k}: announced by the header record 0 but not in the index")
                for k in missing
            ]
        self.keys, self.offsets = compact(wanted[held]), offsets[held]

    def _check_identities(self, a: int, lo: float, offsets: np.ndarray) -> None:
        """Each identity record holds only a label range ``[first, end)`` with 1 <= first <= end <= a (checked with
        numpy on the mapped bytes: one gather per field, a block of identities at a time)."""
        for block in range(0, offsets.size, CHECK_BLOCK):
            at = offsets[block : block + CHECK_BLOCK].astype(np.int64)
            inside = at + 40 <= self.size
            at[~inside] = 0
            lrecord, flag = u32_at(self._bytes, at + 4), u32_at(self._bytes, at + 8)
            first = u32_at(self._bytes, at + 32).view(np.float32)
            end = u32_at(self._bytes, at + 36).view(np.float32)
            with np.errstate(invalid="ignore"):
                ok = inside & (u32_at(self._bytes, at) == MAGIC) & (lrecord >> 29 == 0) & (flag >= 2)
                ok &= ((lrecord & LENGTH_MASK) == IR_HEADER.size + 4 * flag.astype(np.int64)) & (first >= 1)
                ok &= (first <= end) & (end <= np.float32(lo))
            if not ok.all():
                i = block + int(np.flatnonzero(~ok)[0])
                raise RecordIOError(
                    f"{self.path}: record {a + i} at byte offset {offsets[i]}: not an identity record (a label range "
                    f"[first, end) within the images 1..{a - 1} that the header record 0 announces)"
                )

    def _unpack(self, key: int, offset: int) -> tuple[IRHeader, np.ndarray, bytes]:
        payload, _ = read_payload(self._buf, offset, self.path, key)
        try:
            return unpack_payload(payload)
        except ValueError as err:
            raise RecordIOError(f"{self.path}: record {key} at byte offset {offset}: {err}") from None

    # -- public API -----------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.keys.size)

    def __getitem__(self, i: int) -> Record:
        """The i-th image record (in key order), checked to carry image bytes."""
        key, offset = int(self.keys[i]), int(self.offsets[i])
        _, labels, image = self._unpack(key, offset)
        if not image:
            raise RecordIOError(f"{self.path}: record {key} at byte offset {offset}: no image bytes")
        return Record(key, labels, image)

    def __iter__(self) -> Iterator[Record]:
        for i in range(len(self)):
            yield self[i]

    def read_key(self, key: int) -> Record:
        """The record stored under ``key`` (any record, image or not)."""
        offset = self._offset_of(key)
        if offset is None:
            raise RecordIOError(f"{self.idx_path or self.path}: record {key} is not in the index")
        _, labels, image = self._unpack(key, offset)
        return Record(key, labels, image)

    def identity_ranges(self) -> np.ndarray:
        """Layout A only: (num_identities, 2) int64 array of each identity's [first, end) image records."""
        if self.layout != "A" or self.header_label is None:
            raise RecordIOError(f"{self.path}: layout {self.layout} has no identity records")
        a, b = int(self.header_label[0]), int(self.header_label[1])
        return np.array([self.read_key(k).label[:2] for k in range(a, b)], dtype=np.int64).reshape(-1, 2)

    def read_at(self, key: int, offset: int) -> tuple[tuple[float, ...], bytes]:
        """Labels (as a tuple) and image bytes of the record at ``offset``, fully checked; for bulk writers that
        already hold the key and offset."""
        _, labels, image = self._unpack(key, offset)
        return tuple(labels.tolist()), image

    def where(self, key: int) -> str:
        """A record as error messages name it: the file and the record's key."""
        return f"{self.path}: record {key}"

    def index_digest(self) -> str:
        """A sha256 of the index this reader uses (every key and offset): what identifies its records."""
        return index_digest(self._all_keys, self._all_offsets)

    @property
    def view(self) -> memoryview:
        """The whole file as a read-only, zero-copy view (valid until ``close``)."""
        return self._view

    def simple_jpegs(self, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Vectorised parse of the records at ``offsets``: which are plain single-part JPEG records with a scalar
        label (the common case), and for those the image's start, length and the label. Anything else (multi-part,
        vector label, PNG, corrupt) is left to the checked per-record path.
        Returns (ok, image_start, image_length, label)."""
        offsets = np.asarray(offsets, dtype=np.int64)
        # MXNet pads records to 4 bytes, so a record's words are aligned: gather the 5 we need, not 36 bytes
        words = self._bytes[: self.size - self.size % 4].view("<u4")
        head_words = (0, 1, 2, 3, 8)  # magic, lrecord, IRHeader flag, IRHeader label, the image's first 4 bytes
        inside = (offsets % 4 == 0) & (offsets >= 0) & (offsets + 4 * (head_words[-1] + 1) <= words.size * 4)
        if not inside.any():
            inside, words = np.zeros_like(inside), np.zeros(head_words[-1] + 1, dtype="<u4")
        head = words[np.where(inside, offsets // 4, 0)[:, None] + np.array(head_words)]
        magic, lrecord, flag, image_start = head[:, 0], head[:, 1], head[:, 2], head[:, 4]
        label = head[:, 3].view("<f4")
        length = (lrecord & LENGTH_MASK).astype(np.int64)
        ok = (
            inside
            & (magic == MAGIC)
            & (lrecord >> 29 == 0)
            & (flag == 0)
            & (length >= IR_HEADER.size + 3)
            & (offsets + 8 + length <= self.size)
            & (image_start & 0xFFFFFF == 0xFFD8FF)  # the JPEG SOI marker and the next marker's first byte
        )
        return ok, offsets + 8 + IR_HEADER.size, length - IR_HEADER.size, label

    def close(self) -> None:
        """Release the mapping and the file."""
        buf = getattr(self, "_buf", None)
        if buf is not None:
            self._bytes = None
            try:
                self._view.release()
                buf.close()
            except BufferError:
                pass  # a caller still holds a view of a record; the mapping goes when the last view does
            self._buf = None
        self._file.close()

    def __enter__(self) -> RecordFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_property(path: str | os.PathLike) -> tuple[int, int, int]:
    """``num_classes,height,width`` from an InsightFace ``property`` file (extra lines are tolerated)."""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError as err:
        raise FacetoolError(f"{path}: cannot read ({err.strerror})") from None
    line = text.strip().splitlines()[0] if text.strip() else ""
    fields = [f.strip() for f in line.split(",")]
    try:
        if len(fields) != 3:
            raise ValueError
        num_classes, height, width = (int(f) for f in fields)
        if num_classes <= 0 or height <= 0 or width <= 0:
            raise ValueError
    except ValueError:
        raise FacetoolError(f"{path}: first line must be 'num_classes,height,width', got {line!r}") from None
    return num_classes, height, width

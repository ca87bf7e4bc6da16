"""MXNet RecordIO as InsightFace writes it, read and written without MXNet.

Framing (dmlc-core): each record is ``magic u32, lrecord u32, payload, zero padding to 4 bytes``; ``lrecord`` holds
a 3-bit continuation flag and a 29-bit length. A payload that contains the magic word at a 4-byte-aligned position
is split there by MXNet's writer (flags 1, 2, 3) and the magic dropped; the reader re-inserts it.
Payload: ``IRHeader <IfQQ`` (flag, label, id, id2), then ``flag`` float32 labels when flag > 0, then image bytes.

Layouts: A (MS1MV2-style: record 0 is a header whose label ``[a, b]`` says images are records 1..a-1 and
identity records a..b-1) and B (every record is an image, the label possibly a vector). The layout is told by what
record 0 *is* (a label range with no image bytes), not by its flag alone.

The index lives in numpy arrays (16 bytes a record), so 42 million records cost ~0.7 GB, not ~5 GB of dicts.
"""

from __future__ import annotations

import mmap
import os
import struct
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from facetool.pipeline.errors import FacetoolError

MAGIC = 0xCED7230A
MAGIC_BYTES = struct.pack("<I", MAGIC)
_FRAME = struct.Struct("<II")
IR_HEADER = struct.Struct("<IfQQ")
_LENGTH_MASK = (1 << 29) - 1
_MAX_LENGTH = _LENGTH_MASK

JPEG_SIGNATURE = b"\xff\xd8\xff"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class RecordIOError(FacetoolError):
    """A corrupt, truncated or inconsistent RecordIO file; the message names file, record and offset."""


@dataclass(frozen=True, slots=True)
class IRHeader:
    """MXNet's image-record header: ``flag`` is the number of float labels that follow it (0: scalar label)."""

    flag: int
    label: float
    id: int
    id2: int


@dataclass(frozen=True, slots=True)
class Record:
    """One image record: its key in the ``.idx``, its label vector (float32, length >= 1) and the image bytes."""

    key: int
    label: np.ndarray
    image: bytes

    @property
    def class_id(self) -> int:
        """The class: the scalar label, or the first value of a label vector (InsightFace's rule)."""
        return int(self.label[0])


def image_extension(image: bytes | memoryview) -> str | None:
    """``"jpg"`` or ``"png"`` from the payload's signature; None for anything else."""
    head = bytes(image[:8])
    if head.startswith(JPEG_SIGNATURE):
        return "jpg"
    if head.startswith(PNG_SIGNATURE):
        return "png"
    return None


def pack_payload(label: float | Sequence[float] | np.ndarray, image: bytes, id: int = 0, id2: int = 0) -> bytes:
    """An IRHeader plus image, as ``mxnet.recordio.pack`` builds it (vector labels go after the header)."""
    if np.ndim(label) == 0:
        return IR_HEADER.pack(0, float(label), id, id2) + image
    vec = np.asarray(label, dtype="<f4").ravel()
    return IR_HEADER.pack(len(vec), 0.0, id, id2) + vec.tobytes() + image


def unpack_payload(payload: bytes) -> tuple[IRHeader, np.ndarray, bytes]:
    """Split a payload into header, label vector (float32) and image bytes; raises ValueError if too short."""
    if len(payload) < IR_HEADER.size:
        raise ValueError(f"payload of {len(payload)} bytes is shorter than the 24-byte IRHeader")
    flag, label, id_, id2 = IR_HEADER.unpack_from(payload, 0)
    header = IRHeader(flag, label, id_, id2)
    if flag == 0:
        return header, np.array([label], dtype=np.float32), payload[IR_HEADER.size :]
    end = IR_HEADER.size + 4 * flag
    if len(payload) < end:
        raise ValueError(f"IRHeader announces {flag} labels but the payload holds only {len(payload)} bytes")
    labels = np.frombuffer(payload, dtype="<f4", count=flag, offset=IR_HEADER.size).astype(np.float32)
    return header, labels, payload[end:]


def frame_record(payload: bytes) -> bytes:
    """dmlc framing of one payload, splitting it wherever the magic sits at an aligned position (as MXNet does)."""
    if len(payload) > _MAX_LENGTH:
        raise ValueError(f"a record payload is limited to {_MAX_LENGTH} bytes, got {len(payload)}")
    out = bytearray()
    start = 0
    pos = payload.find(MAGIC_BYTES)
    while pos != -1:
        if pos % 4 == 0 and pos + 4 <= len(payload):
            out += _FRAME.pack(MAGIC, ((1 if start == 0 else 2) << 29) | (pos - start))
            out += payload[start:pos]
            start = pos + 4
            pos = payload.find(MAGIC_BYTES, start)
        else:
            pos = payload.find(MAGIC_BYTES, pos + 1)
    out += _FRAME.pack(MAGIC, ((3 if start else 0) << 29) | (len(payload) - start))
    out += payload[start:]
    out += b"\0" * (-len(out) % 4)
    return bytes(out)


def read_payload(buf: bytes | mmap.mmap, offset: int, path: str | os.PathLike, key: int) -> tuple[bytes, int]:
    """Read the (possibly multi-part) record at ``offset``; returns the payload and the offset after it."""
    size = len(buf)
    parts: list[bytes] = []
    pos = offset
    while True:
        if pos + 8 > size:
            raise RecordIOError(f"{path}: record {key}: truncated at byte offset {pos} (file has {size} bytes)")
        magic, lrecord = _FRAME.unpack_from(buf, pos)
        if magic != MAGIC:
            raise RecordIOError(
                f"{path}: record {key}: bad magic 0x{magic:08x} at byte offset {pos} (expected 0x{MAGIC:08x})"
            )
        cflag, length = lrecord >> 29, lrecord & _LENGTH_MASK
        expected = (0, 1) if not parts else (2, 3)
        if cflag not in expected:
            raise RecordIOError(
                f"{path}: record {key}: continuation flag {cflag} at byte offset {pos} breaks a multi-part record"
            )
        start = pos + 8
        if start + length > size:
            raise RecordIOError(
                f"{path}: record {key}: truncated at byte offset {pos}: {length} bytes announced, "
                f"{size - start} left in the file"
            )
        parts.append(buf[start : start + length])
        pos = start + ((length + 3) & ~3)
        if cflag in (0, 3):
            break
    payload = parts[0] if len(parts) == 1 else MAGIC_BYTES.join(parts)
    return payload, pos


class RecordIOWriter:
    """Writes ``.rec`` and ``.idx`` as MXNet's ``MXIndexedRecordIO`` does, under temporary names renamed at close."""

    def __init__(self, rec_path: str | os.PathLike, idx_path: str | os.PathLike) -> None:
        self.rec_path, self.idx_path = Path(rec_path), Path(idx_path)
        self._rec_tmp = self.rec_path.with_name(self.rec_path.name + ".tmp")
        self._idx_tmp = self.idx_path.with_name(self.idx_path.name + ".tmp")
        self._rec = open(self._rec_tmp, "wb")
        self._idx = open(self._idx_tmp, "w")
        self._pos = 0

    def write(self, key: int, payload: bytes) -> None:
        """Append one record under ``key`` (any order of keys, as MXNet allows)."""
        data = frame_record(payload)
        self._rec.write(data)
        self._idx.write(f"{key}\t{self._pos}\n")
        self._pos += len(data)

    def close(self) -> None:
        """Flush and publish both files (atomic renames)."""
        for f in (self._rec, self._idx):
            f.flush()
            os.fsync(f.fileno())
            f.close()
        os.replace(self._rec_tmp, self.rec_path)
        os.replace(self._idx_tmp, self.idx_path)

    def abort(self) -> None:
        """Drop the temporary files."""
        for f, p in ((self._rec, self._rec_tmp), (self._idx, self._idx_tmp)):
            f.close()
            p.unlink(missing_ok=True)

    def __enter__(self) -> RecordIOWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def load_index(
    idx_path: str | os.PathLike, rec_size: int, rec_path: str | os.PathLike
) -> tuple[np.ndarray, np.ndarray]:
    """Parse ``key<TAB>offset`` lines into int64 arrays (keys, offsets), checking every offset lies in the file."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # numpy warns on an empty file; we report that ourselves
            table = np.loadtxt(idx_path, dtype=np.int64, ndmin=2)
    except ValueError as err:
        raise RecordIOError(f"{idx_path}: not a RecordIO index of 'key<TAB>offset' lines ({err})") from None
    if table.size == 0:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    if table.shape[1] != 2:
        raise RecordIOError(f"{idx_path}: expected 2 columns (key, offset), found {table.shape[1]}")
    keys, offsets = table[:, 0].copy(), table[:, 1].copy()
    bad = np.flatnonzero((offsets < 0) | (offsets + 8 > rec_size))
    if bad.size:
        i = int(bad[0])
        raise RecordIOError(
            f"{idx_path}: record {keys[i]}: byte offset {offsets[i]} is past the end of {rec_path} ({rec_size} bytes)"
        )
    return keys, offsets


class RecordFile:
    """Random access to the image records of an InsightFace ``.rec`` (layouts A and B), memory-mapped.

    ``idx_path=None`` scans the file sequentially instead of reading an index; keys then come from the IRHeader's
    ``id`` field (where MXNet's writers put the record key), or from file order when those are not unique.
    """

    def __init__(self, rec_path: str | os.PathLike, idx_path: str | os.PathLike | None) -> None:
        self.path = Path(rec_path)
        self.idx_path = Path(idx_path) if idx_path is not None else None
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
            keys, offsets = load_index(self.idx_path, self.size, self.path)
        else:
            keys, offsets = self._scan()
        if keys.size == 0:
            self.close()
            raise RecordIOError(f"{self.idx_path or self.path}: no records")
        order = np.argsort(keys, kind="stable")
        self._all_keys, self._all_offsets = keys[order], offsets[order]
        if np.any(np.diff(self._all_keys) == 0):
            dup = int(self._all_keys[np.flatnonzero(np.diff(self._all_keys) == 0)[0]])
            self.close()
            raise RecordIOError(f"{self.idx_path or self.path}: record key {dup} appears twice")
        self._detect_layout()

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
        keys = np.asarray(ids, dtype=np.int64)
        if np.unique(keys).size != keys.size or keys.min() < 0:
            keys = np.arange(len(offsets), dtype=np.int64)
        return keys, np.asarray(offsets, dtype=np.int64)

    def _offset_of(self, key: int) -> int | None:
        i = int(np.searchsorted(self._all_keys, key))
        if i < self._all_keys.size and self._all_keys[i] == key:
            return int(self._all_offsets[i])
        return None

    def _detect_layout(self) -> None:
        first_key = int(self._all_keys[0])
        header, labels, image = self._unpack(first_key, int(self._all_offsets[0]))
        self.header_label: np.ndarray | None = None
        if first_key == 0 and header.flag > 0 and len(image) == 0 and labels.size >= 2:
            a, b = int(labels[0]), int(labels[1])
            if not (1 <= a <= b):
                raise RecordIOError(f"{self.path}: record 0: header label range [{a}, {b}) is not valid")
            self.layout = "A"
            self.header_label = labels
            wanted = np.arange(1, a, dtype=np.int64)
            pos = np.searchsorted(self._all_keys, wanted)
            pos = np.minimum(pos, self._all_keys.size - 1)
            missing = np.flatnonzero(self._all_keys[pos] != wanted)
            if missing.size:
                raise RecordIOError(
                    f"{self.idx_path or self.path}: header announces images 1..{a - 1} but record "
                    f"{int(wanted[missing[0]])} is not in the index"
                )
            self.keys, self.offsets = wanted, self._all_offsets[pos]
            self.num_identities = b - a
        else:
            self.layout = "B"
            self.keys, self.offsets = self._all_keys, self._all_offsets
            self.num_identities = None

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
        length = (lrecord & _LENGTH_MASK).astype(np.int64)
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

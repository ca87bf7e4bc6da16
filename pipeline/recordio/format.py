"""RecordIO framing and payloads (dmlc-core and MXNet's ``IRHeader``), the part shared by the reader and the writer.

Framing: each record is ``magic u32, lrecord u32, payload, zero padding to 4 bytes``; ``lrecord`` holds a 3-bit
continuation flag and a 29-bit length. A payload that contains the magic word at a 4-byte-aligned position is split
there by MXNet's writer (flags 1, 2, 3) and the magic dropped; the reader re-inserts it.
Payload: ``IRHeader <IfQQ`` (flag, label, id, id2), then ``flag`` float32 labels when flag > 0, then image bytes.
"""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from facetool.pipeline.errors import FacetoolError

MAGIC = 0xCED7230A
MAGIC_BYTES = struct.pack("<I", MAGIC)
_FRAME = struct.Struct("<II")
IR_HEADER = struct.Struct("<IfQQ")
#: The 29-bit length field of ``lrecord`` (the top 3 bits are the continuation flag).
LENGTH_MASK = (1 << 29) - 1
_MAX_LENGTH = LENGTH_MASK

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
        cflag, length = lrecord >> 29, lrecord & LENGTH_MASK
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

"""`facetool bench make-rec`: a large InsightFace layout-A dataset in seconds, for convert at scale.

Every image is the same tiny valid JPEG (a 112x112 solid colour, a few hundred bytes); only the record key and the
label change. One record of each kind is framed by ``facetool.pipeline.recordio`` (``pack_payload``,
``frame_record``) and repeated with numpy, the key and label fields written into each copy, so millions of
records take seconds. The files are those ``write_layout_a`` writes for the same images: images as records 1..n,
one identity record per class holding its ``[first, end)`` image range, then the header record 0, and
``property``.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import numpy as np

from facetool.pipeline.atomic import Progress, atomic_open, write_bytes_atomic
from facetool.pipeline.errors import FacetoolError
from facetool.pipeline.recordio import IR_HEADER, frame_record, pack_payload

CHUNK = 1 << 16  # records framed, indexed and written at a time
_LABEL_AT, _ID_AT = 12, 16  # byte positions in a framed record: 8 bytes of frame, then IRHeader <IfQQ
_VECTOR_AT = 8 + IR_HEADER.size  # an identity record's label vector [first, end) follows its IRHeader
_EXACT = 1 << 24  # float32 labels hold integers exactly up to here


def tiny_jpeg(size: int = 112) -> bytes:
    """A valid ``size`` x ``size`` RGB JPEG of one colour (~360 bytes at 112x112)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (size, size), (128, 100, 90)).save(buf, format="JPEG", quality=75, optimize=True)
    return buf.getvalue()


def make_rec(out: str | os.PathLike, records: int, identities: int, progress: Progress | None = None) -> dict:
    """Write ``train.rec``/``train.idx``/``property`` of ``records`` images in ``identities`` classes (as even as
    the division allows) into ``out``; returns what was written (counts, bytes)."""
    if identities < 1 or records < identities:
        raise FacetoolError(f"make-rec: need 1 <= identities <= records, got {identities} and {records}")
    if records + identities + 1 > _EXACT:
        raise FacetoolError(f"make-rec: at most {_EXACT - 1} records and identities together (float32 labels)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    image = _template(frame_record(pack_payload(0.0, tiny_jpeg(), id=0, id2=0)))
    identity = _template(frame_record(pack_payload([0.0, 0.0], b"", id=0, id2=0)))
    first = 1 + np.arange(identities + 1, dtype=np.int64) * records // identities  # class c: [first[c], first[c+1])
    labels = np.repeat(np.arange(identities, dtype=np.int32), np.diff(first))
    total = records + identities + 1
    with atomic_open(out / "train.rec") as rec, atomic_open(out / "train.idx") as idx:
        pos = 0
        for keys, body in _image_chunks(image, labels):
            pos = _write_chunk(rec, idx, keys, body, pos)
            if progress:
                progress(int(keys[-1]), total)
        for keys, body in _identity_chunks(identity, first, records + 1):
            pos = _write_chunk(rec, idx, keys, body, pos)
            if progress:
                progress(int(keys[-1]), total)
        header = frame_record(pack_payload([records + 1, records + 1 + identities], b"", id=0, id2=1))
        _write_chunk(rec, idx, np.zeros(1, np.int64), np.frombuffer(header, np.uint8)[None], pos)
    write_bytes_atomic(out / "property", f"{identities},112,112\n")
    if progress:
        progress(total, total)
    return {"records": records, "identities": identities, "rec_bytes": (out / "train.rec").stat().st_size}


def _template(framed: bytes) -> np.ndarray:
    """The framed record as bytes to repeat; it must be one frame, so that its fields sit where we write them."""
    row = np.frombuffer(framed, dtype=np.uint8)
    assert int(row[4:8].view("<u4")[0]) >> 29 == 0, "the template record was split into frames"
    return row


def _image_chunks(template: np.ndarray, labels: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(keys, framed records) of the images, ``CHUNK`` at a time: key ``i + 1`` carries ``labels[i]``."""
    body = np.empty((CHUNK, template.size), dtype=np.uint8)
    body[:] = template
    for start in range(0, labels.size, CHUNK):
        n = min(CHUNK, labels.size - start)
        keys = np.arange(start + 1, start + 1 + n, dtype=np.int64)
        body[:n, _LABEL_AT : _LABEL_AT + 4] = labels[start : start + n].astype("<f4").view(np.uint8).reshape(n, 4)
        body[:n, _ID_AT : _ID_AT + 8] = keys.astype("<u8").view(np.uint8).reshape(n, 8)
        yield keys, body[:n]


def _identity_chunks(template: np.ndarray, first: np.ndarray, key0: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(keys, framed records) of the identity records: key ``key0 + c`` holds ``[first[c], first[c + 1])``."""
    body = np.empty((CHUNK, template.size), dtype=np.uint8)
    body[:] = template
    count = first.size - 1
    for start in range(0, count, CHUNK):
        n = min(CHUNK, count - start)
        keys = np.arange(key0 + start, key0 + start + n, dtype=np.int64)
        ranges = np.stack([first[start : start + n], first[start + 1 : start + n + 1]], axis=1)
        body[:n, _ID_AT : _ID_AT + 8] = keys.astype("<u8").view(np.uint8).reshape(n, 8)
        body[:n, _VECTOR_AT : _VECTOR_AT + 8] = ranges.astype("<f4").view(np.uint8).reshape(n, 8)
        yield keys, body[:n]


def _write_chunk(rec: IO[bytes], idx: IO[bytes], keys: np.ndarray, body: np.ndarray, pos: int) -> int:
    """Append framed records (one row each, all the same length) and their ``key<TAB>offset`` lines."""
    offsets = pos + np.arange(keys.size, dtype=np.int64) * body.shape[1]
    rec.write(memoryview(np.ascontiguousarray(body)).cast("B"))
    idx.write("".join(map("{}\t{}\n".format, keys.tolist(), offsets.tolist())).encode())
    return pos + body.size

"""Writing RecordIO as MXNet does (``.rec`` plus ``.idx``) and whole InsightFace layout-A datasets."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from pathlib import Path

from facetool.pipeline.atomic import atomic_path, write_bytes_atomic
from facetool.pipeline.recordio.format import frame_record, pack_payload


class RecordIOWriter:
    """Writes ``.rec`` and ``.idx`` as MXNet's ``MXIndexedRecordIO`` does, under the temporary names ``NAME.tmp``,
    published with ``facetool.pipeline.atomic`` at close (a write error names the file)."""

    def __init__(self, rec_path: str | os.PathLike, idx_path: str | os.PathLike) -> None:
        self.rec_path, self.idx_path = Path(rec_path), Path(idx_path)
        self._files = contextlib.ExitStack()
        with self._files:  # on an error here, what was entered so far is undone
            # entered idx first, so that at close the .rec is published first, then its index
            idx_tmp = self._files.enter_context(atomic_path(self.idx_path, tmp=_tmp_name(self.idx_path)))
            rec_tmp = self._files.enter_context(atomic_path(self.rec_path, tmp=_tmp_name(self.rec_path)))
            self._rec = self._files.enter_context(open(rec_tmp, "wb"))
            self._idx = self._files.enter_context(open(idx_tmp, "w"))
            self._files = self._files.pop_all()
        self._pos = 0

    def write(self, key: int, payload: bytes) -> None:
        """Append one record under ``key`` (any order of keys, as MXNet allows)."""
        data = frame_record(payload)
        self._rec.write(data)
        self._idx.write(f"{key}\t{self._pos}\n")
        self._pos += len(data)

    def close(self) -> None:
        """Flush and publish both files (fsync, atomic renames)."""
        self._files.close()

    def abort(self) -> None:
        """Drop the temporary files."""
        with contextlib.suppress(_Aborted):
            self._files.__exit__(_Aborted, _Aborted(), None)

    def __enter__(self) -> RecordIOWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._files.__exit__(exc_type, exc, tb)  # removes the temporary files; the error goes on


class _Aborted(Exception):
    """Thrown into the pending atomic writes by ``abort`` so that they drop their temporary files."""


def _tmp_name(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")


def write_layout_a(
    out: str | os.PathLike, identities: Iterable[Iterable[bytes]], image_size: tuple[int, int] = (112, 112)
) -> tuple[int, int]:
    """Write an InsightFace layout-A dataset into the folder ``out``: ``train.rec``/``train.idx`` (images as records
    1..n labelled with their identity, then one record per identity holding its [first, end) image range, then the
    header record 0 pointing at those) and ``property`` (``classes,height,width``). ``identities`` yields each
    identity's encoded images in order (it may be lazy); returns (images, identities)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ranges: list[tuple[int, int]] = []
    key = 1
    with RecordIOWriter(out / "train.rec", out / "train.idx") as writer:
        for label, images in enumerate(identities):
            first = key
            for image in images:
                writer.write(key, pack_payload(float(label), image, id=key, id2=0))
                key += 1
            ranges.append((first, key))
        for c, (first, end) in enumerate(ranges):
            writer.write(key + c, pack_payload([first, end], b"", id=key + c, id2=0))
        writer.write(0, pack_payload([key, key + len(ranges)], b"", id=0, id2=1))
    height, width = image_size
    write_bytes_atomic(out / "property", f"{len(ranges)},{height},{width}\n")
    return key - 1, len(ranges)

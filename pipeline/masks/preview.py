"""A contact sheet of faces and their masked twins, one column per kind, for people to look at."""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from facetool.pipeline.atomic import atomic_path
from facetool.pipeline.errors import FacetoolError
from facetool.pipeline.masks.jpeg import mask_jpeg
from facetool.pipeline.masks.kinds import KINDS
from facetool.pipeline.template import TEMPLATE_SIZE

_HEADER = 14  # pixels of column titles


def sample_faces(src: str | os.PathLike | None, count: int, seed: int = 0) -> list[bytes]:
    """``count`` encoded faces: evenly spaced records of the RecordIO dataset ``src`` (a folder with train.rec
    and train.idx, or a .rec file), or, without ``src``, the first image of ``count`` synthetic identities."""
    if count < 1:
        raise FacetoolError(f"--count must be >= 1, got {count}")
    if src is None:
        from facetool.pipeline.synth import render

        return [render(seed, i, 0) for i in range(count)]
    from facetool.pipeline.recordio import RecordFile
    from facetool.pipeline.shards import Source

    path = Path(src)
    source = Source.locate(path, use_index=(path / "train.idx").is_file() or path.with_suffix(".idx").is_file())
    with RecordFile(source.rec, source.idx) as rf:
        n = len(rf)
        if n == 0:
            raise FacetoolError(f"{source.rec}: no image records")
        positions = np.unique(np.linspace(0, n - 1, min(count, n)).round().astype(int))
        return [bytes(rf.read_at(int(rf.keys[p]), int(rf.offsets[p]))[1]) for p in positions]


def contact_sheet(faces: Sequence[bytes], seed: int = 0) -> Image.Image:
    """One row per face: the original, then its masked twin for each kind (key = the row), as stored in shards
    (JPEG re-encoded like the source). Tiles are shown at 112x112."""
    size = TEMPLATE_SIZE
    titles = ("original", *KINDS)
    sheet = Image.new("RGB", (len(titles) * size, _HEADER + len(faces) * size), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for c, title in enumerate(titles):
        draw.text((c * size + 4, 1), title, fill=(0, 0, 0))
    for r, face in enumerate(faces):
        tiles = [face] + [mask_jpeg(face, seed, r, kind=kind) for kind in KINDS]
        for c, data in enumerate(tiles):
            tile = Image.open(io.BytesIO(data)).convert("RGB")
            if tile.size != (size, size):
                tile = tile.resize((size, size), Image.BILINEAR)
            sheet.paste(tile, (c * size, _HEADER + r * size))
    return sheet


def write_preview(
    out: str | os.PathLike, src: str | os.PathLike | None = None, count: int = 6, seed: int = 0
) -> Image.Image:
    """Write the contact sheet of ``count`` faces (from ``src`` or synthetic) to the PNG ``out`` atomically."""
    sheet = contact_sheet(sample_faces(src, count, seed), seed)
    with atomic_path(out) as tmp:
        sheet.save(tmp, format="PNG", optimize=True)
    return sheet

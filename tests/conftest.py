"""Shared fixtures: small RecordIO datasets written with our writer (the MXNet-written ones live in fixtures/)."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from facetool.pipeline.recordio import RecordIOWriter, pack_payload

FIXTURES = Path(__file__).parent / "fixtures"
MXNET_FIXTURES = FIXTURES / "mxnet"

os.environ.setdefault("OMP_NUM_THREADS", "2")


def random_jpeg(rng: np.random.Generator, size: int = 112, quality: int = 90) -> bytes:
    """A small noisy JPEG (distinct bytes per call)."""
    base = rng.integers(0, 255, (size // 8, size // 8, 3), dtype=np.uint8)
    img = Image.fromarray(base).resize((size, size), Image.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def write_layout_a(out: Path, classes: int, per_class: int, seed: int = 0) -> list[tuple[int, int, bytes]]:
    """An InsightFace layout-A dataset (images, identity records, header record 0 last); returns (key, label, jpeg)."""
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    with RecordIOWriter(out / "train.rec", out / "train.idx") as w:
        key = 1
        for c in range(classes):
            for _ in range(per_class):
                img = random_jpeg(rng)
                w.write(key, pack_payload(float(c), img, id=key))
                records.append((key, c, img))
                key += 1
        n = key - 1
        for c in range(classes):
            w.write(n + 1 + c, pack_payload([1 + c * per_class, 1 + (c + 1) * per_class], b"", id=n + 1 + c))
        w.write(0, pack_payload([n + 1, n + 1 + classes], b"", id=0, id2=1))
    (out / "property").write_text(f"{classes},112,112\n")
    return records


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory) -> tuple[Path, list[tuple[int, int, bytes]]]:
    """A 24-class x 10-image layout-A dataset, shared (read-only) by the tests of a session."""
    out = tmp_path_factory.mktemp("small_dataset")
    return out, write_layout_a(out, 24, 10)

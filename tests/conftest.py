"""Shared fixtures: small RecordIO datasets written with our writer (the MXNet-written ones live in fixtures/)."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from facetool.pipeline import recordio

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
    """An InsightFace layout-A dataset of noise JPEGs (the library's writer); returns (key, label, jpeg)."""
    rng = np.random.default_rng(seed)
    images = [[random_jpeg(rng) for _ in range(per_class)] for _ in range(classes)]
    recordio.write_layout_a(out, images)
    return [(1 + c * per_class + k, c, img) for c, imgs in enumerate(images) for k, img in enumerate(imgs)]


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory) -> tuple[Path, list[tuple[int, int, bytes]]]:
    """A 24-class x 10-image layout-A dataset, shared (read-only) by the tests of a session."""
    out = tmp_path_factory.mktemp("small_dataset")
    return out, write_layout_a(out, 24, 10)

"""JPEG in, JPEG out: the masked twin of an encoded face, encoded with the source's own quantisation tables and
chroma subsampling, so that it carries the same compression artefacts."""

from __future__ import annotations

import io
from collections.abc import Mapping

import numpy as np
from PIL import Image, JpegImagePlugin

from facetool.pipeline.masks.render import MaskError, render_mask


def decode_image(data: bytes | memoryview) -> tuple[np.ndarray, Image.Image]:
    """Decode JPEG/PNG bytes to an (H, W, 3) uint8 RGB array (and the PIL image, for its JPEG settings)."""
    try:
        im = Image.open(io.BytesIO(data))
        im.load()
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError... for bad bytes
        raise MaskError(f"cannot decode the image ({type(err).__name__}: {err})") from None
    arr = np.asarray(im if im.mode == "RGB" else im.convert("RGB"))
    return arr, im


def encode_like(arr: np.ndarray, source: Image.Image) -> bytes:
    """JPEG-encode ``arr`` with the source JPEG's quantisation tables and subsampling (so the twin carries the
    same compression artefacts); a grey source stays grey; a PNG source gets quality 95."""
    out = Image.fromarray(arr)
    if source.mode == "L":
        out = out.convert("L")
    buf = io.BytesIO()
    if source.format == "JPEG" and getattr(source, "quantization", None):
        tables = [source.quantization[k] for k in sorted(source.quantization)]
        sampling = JpegImagePlugin.get_sampling(source)
        out.save(buf, format="JPEG", qtables=tables, subsampling=sampling if sampling >= 0 else 2)
    else:
        out.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def mask_jpeg(
    data: bytes | memoryview,
    seed: int,
    key: int | str,
    *,
    weights: Mapping[str, float] | None = None,
    kind: str | None = None,
) -> bytes:
    """The masked twin of an encoded aligned face: decode, :func:`render_mask`, JPEG-encode like the source."""
    arr, im = decode_image(data)
    return encode_like(render_mask(arr, seed, key, weights=weights, kind=kind).image, im)

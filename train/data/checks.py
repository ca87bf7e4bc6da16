"""What both loaders check of every sample they hand to training, and the one-line error naming the shard and the
sample's key: a label outside ``[0, classes)`` (the head would index out of range, or train a class that does
not exist) and an image that does not decode."""

from __future__ import annotations

import io
import os

from PIL import Image

from facetool.pipeline.errors import FacetoolError


def sample_error(tar: str | os.PathLike, key: str, what: str) -> FacetoolError:
    """``SHARD.tar: sample KEY: WHAT``, the form of every error about one sample."""
    return FacetoolError(f"{tar}: sample {key}: {what}")


def check_label(tar: str | os.PathLike, key: str, label: int, classes: int) -> None:
    """A label must name one of the manifest's classes."""
    if not 0 <= label < classes:
        raise sample_error(tar, key, f"label {label} outside [0, {classes}) (the manifest's source.classes)")


def decode_rgb(data: bytes, tar: str | os.PathLike, key: str) -> Image.Image:
    """Decode an image completely (Pillow decodes lazily: a truncated JPEG fails only when its pixels are read)
    as RGB, or raise the sample's error."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
        return image.convert("RGB") if image.mode != "RGB" else image
    except Exception as err:  # Pillow raises OSError, ValueError, SyntaxError, ... for damaged data
        raise sample_error(tar, key, f"cannot decode: {err}") from None

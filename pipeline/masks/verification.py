"""SMFRD-style masked verification sets: pair k is images 2k and 2k+1; ``one`` masks the second image of every
pair (masked against holistic), ``both`` every image."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from facetool.pipeline.atomic import Progress
from facetool.pipeline.errors import FacetoolError
from facetool.pipeline.masks.jpeg import mask_jpeg
from facetool.pipeline.masks.params import normalise_weights
from facetool.pipeline.masks.render import MaskError

MODES = ("one", "both")


def masked_positions(count: int, mode: str) -> range:
    """The images of a verification list that get a mask: the second of each pair (``one``) or all (``both``)."""
    if mode not in MODES:
        raise FacetoolError(f"mask mode must be 'one' or 'both', got {mode!r}")
    return range(1, count, 2) if mode == "one" else range(count)


def mask_verification_images(
    images: Sequence[bytes],
    mode: str,
    seed: int = 0,
    *,
    weights: Mapping[str, float] | None = None,
    progress: Progress | None = None,
) -> list[bytes]:
    """SMFRD-style masked copy of a verification set's images (pair k = images 2k, 2k+1): ``mode="one"`` masks
    the second image of every pair, ``"both"`` every image. Image ``i`` is masked with key ``i``, so the result
    depends only on (images, mode, seed, weights); ``facetool masks bin`` and the masked benchmark share it.
    ``progress(done, total)`` is called every 256 images and at the end."""
    out = list(images)
    w = normalise_weights(weights)
    positions = masked_positions(len(out), mode)
    for n, i in enumerate(positions):
        try:
            out[i] = mask_jpeg(out[i], seed, i, weights=w)
        except MaskError as err:
            raise MaskError(f"image {i}: {err}") from None
        if progress is not None and n % 256 == 255:
            progress(n + 1, len(positions))
    if progress is not None:
        progress(len(positions), len(positions))
    return out


def mask_bin(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    mode: str = "one",
    seed: int = 0,
    *,
    weights: Mapping[str, float] | None = None,
    progress: Progress | None = None,
) -> dict:
    """Write a masked copy of the verification ``.bin`` ``src`` to ``dst`` (read with the restricted unpickler,
    written atomically); returns ``{"pairs", "images", "masked"}``."""
    from facetool.pipeline.verification_bin import load_bin, write_bin

    vs = load_bin(src)
    try:
        images = mask_verification_images(vs.images, mode, seed, weights=weights, progress=progress)
    except MaskError as err:
        raise MaskError(f"{src}: set {vs.name!r}, {err}") from None
    write_bin(Path(dst), images, vs.issame)
    return {"pairs": vs.num_pairs, "images": len(images), "masked": len(masked_positions(len(images), mode))}

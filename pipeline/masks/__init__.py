"""Synthetic face masks for ArcFace-aligned faces: no landmark detector, no downloaded weights, vectorised numpy.

The faces are aligned to the ArcFace template, so its five points are the landmarks (scaled for sizes other than
112x112). Four kinds, drawn with configurable weights (:data:`DEFAULT_WEIGHTS`): ``surgical`` (pleats, bindings,
nose wire, ear loops), ``kn95`` (centre seam, planar halves, welded edges, pointed chin), ``n95`` (moulded dome,
rim, optional exhalation valve, head straps) and ``cloth`` (solid, stripes, checks, dots or floral fabric with a
weave, optional centre seam). Each variant of a kind draws its coverage (top edge between the nose bridge and the
nose tip, sides at the cheeks, bottom at or below the chin) and a small pose (tilt, scale, offset, asymmetric
width); each image draws colours, light, a whole-pixel shift and mirror, and takes illumination, colour cast,
noise and blur from the face itself (``render.py``). Geometry lives in a sprite bank built on first use
(``sprites.py``), so a mask costs a few dozen array operations on the rows it covers.

Guarantees (checked by ``tests/test_masks.py`` over 1,000 renders per kind on synthetic aligned faces; run it
with ``-s`` to see the statistics):

- rows above the nose bridge (y < 56.6 in 112x112 template units: eyes, brows, forehead) are never changed;
- the nose tip, both mouth corners and the chin point (56, 106) are always inside the mask region;
- the mask region covers between 14 % and 32 % of the image (measured per-kind means: surgical 21 %, KN95
  19.5 %, N95 24.5 %, cloth 23 %); its top edge on the centre line lies on rows 57-71 (between the bridge and
  the nose tip, measured 60-70) and it reaches row 106 or lower (the chin);
- the same (seed, key) gives the same pixels and bytes in any process; kind frequencies follow the weights
  (chi-square test).

Public API: :func:`render_mask` (array in, :class:`MaskResult` out: image, region bitmap, parameters),
:func:`mask_jpeg` (encoded face in, masked JPEG out), :func:`select_masked` (which keys get a mask for a
fraction and seed), :func:`mask_verification_images` / :func:`mask_bin` (SMFRD-style masked verification sets).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path

from facetool.pipeline.masks.render import (
    DEFAULT_WEIGHTS,
    MODES,
    MaskError,
    MaskParams,
    MaskResult,
    decode_image,
    encode_like,
    key_number,
    mask_jpeg,
    mask_verification_images,
    masked_positions,
    normalise_weights,
    parse_weights,
    render_mask,
    select_masked,
)
from facetool.pipeline.masks.sprites import CHIN, EYE_LIMIT_Y, KINDS, TEMPLATE, eye_limit_row


def mask_bin(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    mode: str = "one",
    seed: int = 0,
    *,
    weights: Mapping[str, float] | None = None,
    progress: Callable[[int, int], None] | None = None,
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


__all__ = [
    "CHIN",
    "DEFAULT_WEIGHTS",
    "EYE_LIMIT_Y",
    "KINDS",
    "MODES",
    "MaskError",
    "MaskParams",
    "MaskResult",
    "TEMPLATE",
    "decode_image",
    "encode_like",
    "eye_limit_row",
    "key_number",
    "mask_bin",
    "mask_jpeg",
    "mask_verification_images",
    "masked_positions",
    "normalise_weights",
    "parse_weights",
    "render_mask",
    "select_masked",
]

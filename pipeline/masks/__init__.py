"""Synthetic face masks for ArcFace-aligned faces: no landmark detector, no downloaded weights, vectorised numpy.

The faces are aligned to the ArcFace template, so its five points are the landmarks (scaled for sizes other than
112x112). Four kinds, drawn with configurable weights (:data:`DEFAULT_WEIGHTS`): ``surgical`` (pleats, bindings,
nose wire, ear loops), ``kn95`` (centre seam, planar halves, welded edges, pointed chin), ``n95`` (moulded dome,
rim, optional exhalation valve, head straps) and ``cloth`` (solid, stripes, checks, dots or floral fabric with a
weave, optional centre seam). Each variant of a kind draws its coverage (top edge between the nose bridge and the
nose tip, sides at the cheeks, bottom at or below the chin) and a small pose (tilt, scale, offset, asymmetric
width); each image draws colours, light, a whole-pixel shift and mirror, and takes illumination, colour cast,
noise and blur from the face itself (``render.py``). Geometry (``kinds.py``) lives in a sprite bank built on first
use (``sprites.py``), so a mask costs a few dozen array operations on the rows it covers. ``selection.py`` says
which samples get a mask, ``params.py`` holds the kinds' weights, ``jpeg.py`` the JPEG in and out,
``verification.py`` the masked verification sets.

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

from facetool.pipeline.masks.jpeg import decode_image, encode_like, mask_jpeg
from facetool.pipeline.masks.params import DEFAULT_WEIGHTS, MaskParams, MaskResult, normalise_weights, parse_weights
from facetool.pipeline.masks.render import MaskError, render_mask
from facetool.pipeline.masks.selection import key_number, select_masked
from facetool.pipeline.masks.sprites import CHIN, EYE_LIMIT_Y, KINDS, eye_limit_row
from facetool.pipeline.masks.verification import MODES, mask_bin, mask_verification_images, masked_positions
from facetool.pipeline.template import TEMPLATE

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

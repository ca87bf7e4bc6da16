"""Mask geometry: a deterministic bank of pre-rendered sprites per (image size, kind, variant), built on first use.

A sprite holds everything about one mask that does not depend on the face it is put on: the anti-aliased coverage
(body and straps), the surface normals, a multiplicative detail field (pleats, seams, bindings, welds, fabric grain),
a colour-mix field (cloth patterns, the N95 valve), where the straps are, and the soft contact shadow it casts on
the skin. The per-image renderer (``render.py``) only picks a sprite, shifts or mirrors it by whole pixels and does
cheap arithmetic on these fields; the geometry never has to be evaluated per image.

The geometry of each kind is drawn in ``kinds.py``. ``row0`` records the first row a sprite touches, so that the
renderer never shifts it above ``EYE_LIMIT_Y`` (the eyes stay untouched).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from facetool.pipeline.errors import FacetoolError
from facetool.pipeline.masks.kinds import KINDS, draw_mask
from facetool.pipeline.template import TEMPLATE, TEMPLATE_SIZE

EYE_Y = float(TEMPLATE[:2, 1].mean())  # 51.6
NOSE_Y = float(TEMPLATE[2, 1])  # 71.74
#: The nose bridge: a quarter of the way from the eye line to the nose tip. Rows above it (the eyes, brows and
#: forehead) are never touched, not even by a strap or a shadow.
EYE_LIMIT_Y = EYE_Y + 0.25 * (NOSE_Y - EYE_Y)  # 56.6
#: The chin point used by the coverage checks (the chin of an aligned face falls at y ~ 105-115).
CHIN = (56.0, 106.0)

VARIANTS = 32  # sprites per kind and image size

#: Edge softness levels (Gaussian sigma, pixels) each sprite is kept at; the renderer picks the one that matches
#: the sharpness of the face it masks.
BLUR_LEVELS = (0.0, 0.6, 1.1)


@dataclass(frozen=True)
class Sprite:
    """One pre-rendered mask on a canvas that covers image rows ``row0 - pad_y .. H + pad_y`` and columns
    ``-pad_x .. W + pad_x`` (``row0``: the first image row it touches when not shifted). float32 fields."""

    kind: str
    variant: int
    row0: int
    pad_x: int
    pad_y: int
    normals: np.ndarray  # (rows, cols, 3): surface normal (x right, y down, z towards the camera)
    alpha: np.ndarray  # (levels, rows, cols): coverage of body and straps, 0..1, at each blur level
    detail: np.ndarray  # (levels, rows, cols): multiplicative shading detail (1 = none)
    mix: np.ndarray | None  # (rows, cols): 0 main colour, 1 second colour (pattern, valve); None if unused
    strap: np.ndarray  # (rows, cols): share of the strap colour
    shadow: np.ndarray  # (rows, cols): contact shadow on the skin, already times (1 - alpha)
    geometry: dict = field(default_factory=dict)  # the drawn geometry, template units (for the parameters)


def _gaussian_blur(a: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of a 2-D field (edges replicated); build time only."""
    if sigma <= 0:
        return a
    r = max(1, math.ceil(3 * sigma))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    for axis in (0, 1):
        p = np.pad(a, [(r, r) if ax == axis else (0, 0) for ax in range(2)], mode="edge")
        n = a.shape[axis]
        a = sum(w * np.take(p, np.arange(i, i + n), axis=axis) for i, w in enumerate(k))
    return a


def _normalise(nx: np.ndarray, ny: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    norm2 = nx * nx + ny * ny
    scale = np.where(norm2 > 0.9, np.sqrt(0.9 / np.maximum(norm2, 1e-9)), 1.0)
    nx, ny = nx * scale, ny * scale
    return nx, ny, np.sqrt(1.0 - nx * nx - ny * ny)


@lru_cache(maxsize=2 * len(KINDS) * VARIANTS)  # two image sizes' banks (~30 MB each at 112x112)
def get_sprite(height: int, width: int, kind: str, variant: int) -> Sprite:
    """The sprite ``variant`` of ``kind`` for ``height`` x ``width`` faces (built once per process, then cached).

    The geometry depends only on (kind, variant), never on the image size, so a 128x128 face gets the 112x112
    mask scaled; the result is the same in every process.
    """
    if kind not in KINDS:
        raise FacetoolError(f"unknown mask kind {kind!r}; expected one of {', '.join(KINDS)}")
    cv, geo, out = draw_mask(kind, variant, height, width)
    body, strap_cover, strap_d = out["body"], out["strap_cover"], out["strap_d"]
    strap = strap_cover * (1.0 - body)
    alpha = np.clip(body + strap, 0.0, 1.0)
    nx, ny, nz = _normalise(out["nx"] * body, out["ny"] * body)
    outside = np.maximum(out["d"], 0.0)
    w = 0.9 * cv.px_per_unit  # a contact shadow: a pixel or two of darkened skin around the edge
    shadow = np.maximum(np.exp(-outside / w), 0.5 * np.exp(-np.maximum(strap_d, 0.0) / 0.7))
    shadow *= 1.0 - alpha
    shadow[shadow < 0.06] = 0.0
    detail = np.where(body > 0, out["detail"], 1.0)
    # an elastic strap is a thin cylinder: darker towards its edges
    roundness = np.clip(-strap_d / (0.5 * out["strap_w"] * cv.px_per_unit), 0.0, 1.0)
    detail = np.where(strap > body, 0.8 + 0.25 * np.sqrt(roundness), detail)
    alphas = np.stack([np.clip(_gaussian_blur(alpha, sg), 0.0, 1.0) for sg in BLUR_LEVELS])
    details = np.stack([_gaussian_blur(detail, sg) for sg in BLUR_LEVELS])
    # the first image row the sprite touches unshifted; the renderer shifts it down if that is above the bridge
    touched = np.nonzero(((alphas > 1e-3).any(axis=0) | (shadow > 0)).any(axis=1))[0]
    row0 = int(cv.rows[touched[0]])
    keep = slice(row0 - cv.pad_y - int(cv.rows[0]), None)
    geo = {k: (round(math.degrees(v), 3) if k == "tilt" else v) for k, v in geo.items()}
    geo = {k: (round(float(v), 3) if isinstance(v, float) else v) for k, v in geo.items()}

    def f32(a: np.ndarray) -> np.ndarray:
        a = np.ascontiguousarray(a[..., keep, :], dtype=np.float32)
        a.flags.writeable = False
        return a

    mix = out["mix"] * body
    normals = np.ascontiguousarray(f32(np.stack([nx, ny, nz])).transpose(1, 2, 0))
    normals.flags.writeable = False
    return Sprite(
        kind=kind,
        variant=variant,
        row0=row0,
        pad_x=cv.pad_x,
        pad_y=cv.pad_y,
        normals=normals,
        alpha=f32(alphas),
        detail=f32(details),
        mix=f32(mix) if mix.any() else None,
        strap=f32(strap / np.maximum(alpha, 1e-6)),
        shadow=f32(shadow),
        geometry=geo,
    )


def eye_limit_row(height: int) -> int:
    """The first image row a mask may touch: every row whose centre lies above the nose bridge is left alone."""
    sy = height / TEMPLATE_SIZE
    return math.ceil((EYE_LIMIT_Y + 0.5) * sy - 0.5)

"""Putting a mask on one aligned face: per-image parameters, illumination transfer, compositing.

Per image, everything is drawn from ``default_rng([seed, 0x6D, key])``: the kind (by the configured weights), one
of the kind's sprites, a mirror flip, a whole-pixel shift, colours (a palette per kind with hue, saturation and
value jitter), a light direction and ambient level, and the contact shadow's strength. From the face itself come
the illumination (a low-order fit of its luminance over a 7x7 grid of blocks, so its own light gradient and
exposure carry over to the mask without imprinting its features), a colour cast, and the noise and blur levels the
mask layer is given so that it is not the one crisp thing in a soft image. The composite is numpy arithmetic on the
mask's rows only.
"""

from __future__ import annotations

import bisect
import colorsys
import itertools
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from facetool.pipeline.errors import FacetoolError
from facetool.pipeline.masks.params import DEFAULT_PROBABILITIES, MaskResult, normalise_weights
from facetool.pipeline.masks.selection import key_number
from facetool.pipeline.masks.sprites import KINDS, TEMPLATE_SIZE, VARIANTS, Sprite, eye_limit_row, get_sprite

_TAG_RENDER = 0x6D  # keeps the per-image stream apart from other uses of (seed, key)
_SKIN_CHROMA = (1.17, 0.98, 0.85)  # typical skin RGB over its mean: the cast is measured against it
_GRID = 7  # blocks per side of the illumination analysis


class MaskError(FacetoolError):
    """An image that cannot be masked (undecodable bytes, wrong shape)."""


# ---------------------------------------------------------------------------------------------------------------
# per-size tables
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _SizeTables:
    sample_rows: np.ndarray | slice  # a 28x28 grid of pixels: 7x7 blocks of 4x4 samples for the analysis
    sample_cols: np.ndarray | slice
    analysis: np.ndarray  # (10, 28*28*3): samples -> illumination fit (4), mean RGB of the face (3) and all (3)
    xn: np.ndarray  # (W,) normalised x of each column, and its square
    xn2: np.ndarray
    yn: np.ndarray  # (H,) normalised y of each row
    patch_rows: np.ndarray  # cheek/nose patch whose noise and sharpness are measured
    patch_cols: slice
    differences: np.ndarray  # (cols*3, 2*(cols-2)): RGB row -> second and first differences of its luminance
    noise: np.ndarray  # (2H, 2W) standard normal bank
    limit_row: int


def _normalised(t: np.ndarray, axis: str) -> np.ndarray:
    return (t - 56.0) / 56.0 if axis == "x" else (t - 80.0) / 56.0


@lru_cache(maxsize=8)
def _tables(height: int, width: int) -> _SizeTables:
    sx, sy = width / TEMPLATE_SIZE, height / TEMPLATE_SIZE
    n = 4 * _GRID

    def samples(size: int) -> np.ndarray | slice:
        if size % n == 0:  # a strided view: cheaper than gathering
            step = size // n
            return slice(step // 2, size, step)
        return ((np.arange(n) + 0.5) * size / n).astype(np.intp)

    block_of = np.arange(n) // 4
    block = (block_of[:, None] * _GRID + block_of[None, :]).ravel()  # the block of each of the 784 samples
    block_luma = (block[None, :] == np.arange(_GRID * _GRID)[:, None]).astype(np.float32) / 16.0
    centres = (np.arange(_GRID) + 0.5) * TEMPLATE_SIZE / _GRID  # template coordinates of the block centres
    by, bx = np.meshgrid(centres, centres, indexing="ij")
    face = ((bx >= 20) & (bx <= 92) & (by >= 36) & (by <= 96)).ravel()
    xb, yb = _normalised(bx.ravel()[face], "x"), _normalised(by.ravel()[face], "y")
    design = np.stack([np.ones_like(xb), xb, yb, xb * xb], axis=1)
    fit = np.linalg.pinv(design).astype(np.float32)
    face_weights = np.isin(block, np.nonzero(face)[0]).astype(np.float32)
    face_weights /= face_weights.sum()
    all_weights = np.full(n * n, 1.0 / (n * n), dtype=np.float32)
    # one linear map from the samples (28*28 pixels x RGB) to everything the analysis needs
    luma = np.array([0.299, 0.587, 0.114])
    to_fit = (fit @ block_luma[face])[:, :, None] * luma  # (4, 784, 3)
    eye = np.eye(3)
    to_face = face_weights[None, :, None] * eye[:, None, :]  # (3, 784, 3)
    to_all = all_weights[None, :, None] * eye[:, None, :]
    analysis = np.concatenate([to_fit, to_face, to_all]).reshape(10, -1).astype(np.float32)
    xn = _normalised((np.arange(width) + 0.5) / sx - 0.5, "x").astype(np.float32)
    yn = _normalised((np.arange(height) + 0.5) / sy - 0.5, "y").astype(np.float32)
    patch_rows = np.arange(round(58 * sy), round(84 * sy), 3)
    patch_cols = slice(round(30 * sx), round(82 * sx))
    m = patch_cols.stop - patch_cols.start
    second = np.zeros((m, m - 2))
    first = np.zeros((m, m - 2))
    for j in range(m - 2):
        second[j : j + 3, j] = (1.0, -2.0, 1.0)
        first[[j, j + 2], j] = (-1.0, 1.0)
    differences = (np.concatenate([second, first], axis=1)[:, None, :] * luma[None, :, None]).reshape(3 * m, -1)
    noise = np.random.default_rng(0x6E6F697365).standard_normal((2 * height, 2 * width)).astype(np.float32)
    return _SizeTables(
        samples(height),
        samples(width),
        analysis,
        xn,
        xn * xn,
        yn,
        patch_rows,
        patch_cols,
        differences.astype(np.float32),
        noise,
        eye_limit_row(height),
    )


# ---------------------------------------------------------------------------------------------------------------
# colours
# ---------------------------------------------------------------------------------------------------------------
_PALETTES: dict[str, tuple[list[tuple[int, int, int]], list[float]]] = {
    "surgical": (
        [(160, 205, 230), (238, 240, 242), (135, 200, 188), (40, 40, 44), (236, 184, 202), (192, 182, 226)],
        [0.42, 0.2, 0.1, 0.15, 0.07, 0.06],
    ),
    "kn95": ([(242, 242, 240), (36, 36, 40), (172, 174, 178), (0, 0, 0)], [0.55, 0.2, 0.1, 0.15]),
    "n95": ([(240, 240, 236), (208, 210, 213), (236, 228, 206), (172, 186, 202)], [0.55, 0.15, 0.15, 0.15]),
}
_STRAP_COLORS = [(232, 200, 64), (232, 132, 52), (74, 122, 204), (236, 236, 236), (92, 172, 96), (200, 180, 140)]
_VALVE_COLORS = [(186, 188, 192), (236, 236, 236), (226, 140, 56), (72, 112, 172), (92, 94, 98)]
_VALVE_WEIGHTS = [0.35, 0.25, 0.1, 0.15, 0.15]


def _hsv_jitter(u: Iterator[float], rgb: Sequence[float]) -> tuple[float, float, float]:
    """Hue +-10 degrees, saturation x0.7..1.3, value x0.85..1.05 (``u``: uniforms in [0, 1))."""
    h, s, v = colorsys.rgb_to_hsv(rgb[0] / 255.0, rgb[1] / 255.0, rgb[2] / 255.0)
    h = (h + (20.0 * next(u) - 10.0) / 360.0) % 1.0
    s = min(1.0, s * (0.7 + 0.6 * next(u)))
    v = min(1.0, v * (0.85 + 0.2 * next(u)))
    r, g, b = colorsys.hsv_to_rgb(h, s, v)
    return 255.0 * r, 255.0 * g, 255.0 * b


def _random_hue(u: Iterator[float], s: tuple[float, float], v: tuple[float, float]) -> tuple[float, float, float]:
    h, sat, val = next(u), s[0] + (s[1] - s[0]) * next(u), v[0] + (v[1] - v[0]) * next(u)
    r, g, b = colorsys.hsv_to_rgb(h, sat, val)
    return 255.0 * r, 255.0 * g, 255.0 * b


def _colours(u: Iterator[float], kind: str) -> tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]]:
    """(main, second, strap) colours for ``kind``."""
    if kind == "cloth":
        main = _random_hue(u, (0.15, 0.85), (0.18, 0.92))
        pick = next(u)
        if pick < 0.35:
            second = _hsv_jitter(u, (236, 234, 228))
        elif pick < 0.55:
            second = _hsv_jitter(u, (34, 34, 38))
        else:
            second = _random_hue(u, (0.2, 0.9), (0.3, 0.95))
        return main, second, (0.9 * main[0], 0.9 * main[1], 0.9 * main[2])
    colours, weights = _PALETTES[kind]
    i = _pick(next(u), weights)
    main = _random_hue(u, (0.15, 0.35), (0.8, 0.95)) if colours[i] == (0, 0, 0) else _hsv_jitter(u, colours[i])
    if kind == "n95":
        second = _hsv_jitter(u, _VALVE_COLORS[_pick(next(u), _VALVE_WEIGHTS)])
        strap = _hsv_jitter(u, _STRAP_COLORS[_pick(next(u), [1.0] * len(_STRAP_COLORS))])
    else:
        second = main
        dark = sum(main) < 240
        strap = main if (dark or next(u) < 0.3) else _hsv_jitter(u, (240, 240, 240))
    return main, second, strap


# ---------------------------------------------------------------------------------------------------------------
# rendering
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Analysis:
    gain_rows: np.ndarray  # (H,) and (W,): the face's illumination relative to the mask's centre is
    gain_cols: np.ndarray  # gain_rows[:, None] + gain_cols[None, :]
    exposure: float
    cast: tuple[float, float, float]  # colour cast of the light
    sigma: float  # noise level, grey levels
    level: int  # index into BLUR_LEVELS


def _analyse(img: np.ndarray, t: _SizeTables) -> _Analysis:
    """What the mask should inherit from the face: its low-frequency illumination (a fit of [1, x, y, x^2] to a
    7x7 grid of block luminances over the face, so the light's direction and fall-off carry over but no feature
    does), overall exposure, colour cast, noise level and sharpness. Scalars stay Python floats: numpy's per-call
    overhead on scalars would cost more than the arithmetic on the arrays."""
    small = img[t.sample_rows][:, t.sample_cols].astype(np.float32)  # 28x28 samples
    c0, c1, c2, c3, fr, fg, fb, ar, ag, ab = (t.analysis @ small.ravel()).tolist()
    c0 = max(c0, 1.0)
    # clipped per axis (0.7..1.3 down the face, +-0.3 across it) so that no per-pixel clip is needed
    gain_rows = ((c2 / c0) * t.yn + 1.0).clip(0.7, 1.3)
    gain_cols = ((c1 / c0) * t.xn + (c3 / c0) * t.xn2).clip(-0.3, 0.3)
    face_luma = 0.299 * fr + 0.587 * fg + 0.114 * fb
    all_luma = 0.299 * ar + 0.587 * ag + 0.114 * ab
    exposure = min(max(((0.6 * face_luma + 0.4 * all_luma) / 135.0) ** 0.45, 0.55), 1.1)
    fm, am = (fr + fg + fb) / 3.0 + 1.0, (ar + ag + ab) / 3.0 + 1.0
    cast = [
        ((f + 1.0) / fm / sk) ** 0.35 * ((a + 1.0) / am) ** 0.1
        for f, a, sk in zip((fr, fg, fb), (ar, ag, ab), _SKIN_CHROMA, strict=True)
    ]
    cm = sum(cast) / 3.0
    cast = [min(max(c / cm, 0.92), 1.08) for c in cast]
    patch = img[t.patch_rows, t.patch_cols].astype(np.float32)
    d = np.abs(patch.reshape(patch.shape[0], -1) @ t.differences)  # |second| and |first| differences of luminance
    half = d.shape[1] // 2
    d2 = d[:, :half].ravel()
    mid = d2.size // 2
    sigma = min(max(1.4826 * float(np.partition(d2, mid)[mid]) / math.sqrt(6.0), 0.5), 8.0)
    sums = d.reshape(-1, 2, half).sum(axis=(0, 2)).tolist()
    sharp = sums[0] / (sums[1] + 1e-3)  # ~1 for a sharp face, lower the softer it is
    level = 0 if sharp >= 0.75 else 1 if sharp >= 0.52 else 2
    return _Analysis(gain_rows, gain_cols, exposure, tuple(cast), sigma, level)


def _pick(u: float, probabilities: Sequence[float]) -> int:
    """Index drawn from ``probabilities`` (need not sum to 1) by the uniform ``u``."""
    i = bisect.bisect_right(list(itertools.accumulate(probabilities)), u * sum(probabilities))
    return min(i, len(probabilities) - 1)


def _draw_params(rng: np.random.Generator, weights: dict[str, float], kind: str | None) -> dict:
    """Everything drawn per image, from one call to the generator (24 uniforms, in a fixed order)."""
    u = iter(rng.random(24).tolist())
    first = next(u)
    if kind is None:
        kind = KINDS[_pick(first, [weights[k] for k in KINDS])]
    elif kind not in KINDS:
        raise FacetoolError(f"unknown mask kind {kind!r}; expected one of {', '.join(KINDS)}")
    variant, flip, dx, dy = int(next(u) * VARIANTS), next(u) < 0.5, 2.0 * next(u) - 1.0, 2.0 * next(u) - 1.0
    az, el = math.radians(120.0 * next(u) - 60.0), math.radians(45.0 * next(u))
    return {
        "kind": kind,
        "variant": variant,
        "flip": flip,
        "dx": dx,  # -1..1, scaled to the room around the sprite
        "dy": dy,
        "light": (math.sin(az) * math.cos(el), -math.sin(el), math.cos(az) * math.cos(el)),
        "ambient": 0.35 + 0.25 * next(u),
        "shadow": 0.12 + 0.16 * next(u),
        "noise_at": (next(u), next(u)),
        "colors": _colours(u, kind),
    }


def render_mask(
    image: np.ndarray,
    seed: int,
    key: int | str,
    *,
    weights: Mapping[str, float] | None = None,
    kind: str | None = None,
) -> MaskResult:
    """Put a mask on an aligned face ``image`` ((H, W, 3) uint8 RGB, ArcFace-aligned at any size).

    Deterministic in (image, seed, key, weights, kind): the same inputs give the same array. ``kind`` forces a kind
    (the preview uses it); otherwise it is drawn with ``weights`` (default :data:`DEFAULT_WEIGHTS`).
    """
    w = DEFAULT_PROBABILITIES if weights is None else normalise_weights(weights)
    return _render(image, np.random.default_rng([seed, _TAG_RENDER, key_number(key)]), w, kind)


def _render(img: np.ndarray, rng: np.random.Generator, weights: dict[str, float], kind: str | None) -> MaskResult:
    """The mask drawn from ``rng`` on ``img``, composited on the rows it covers."""
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise MaskError(f"expected an (H, W, 3) uint8 RGB image, got {img.dtype} {img.shape}")
    h, w, _ = img.shape
    if not (32 <= h <= 256 and 32 <= w <= 256):  # the sprite bank grows with the area (~39 MB at 112x112)
        raise MaskError(f"image of {w}x{h}: masks are drawn on aligned faces of 32 to 256 pixels a side")
    t = _tables(h, w)
    p = _draw_params(rng, weights, kind)
    sp: Sprite = get_sprite(h, w, p["kind"], p["variant"])
    an = _analyse(img, t)

    # Everything is computed in the sprite's orientation; a mirrored mask is mirrored as its planes are written.
    flip = p["flip"]
    dx = round(p["dx"] * sp.pad_x)
    dy = max(round(p["dy"] * sp.pad_y), t.limit_row - sp.row0)  # never above the nose bridge
    r0 = sp.row0 + dy
    n = h - r0
    rows = slice(sp.pad_y, sp.pad_y + n)
    cols = slice(sp.pad_x - dx, sp.pad_x - dx + w)
    shade = _shade(sp, p, an, rows, cols, r0, flip)
    alpha = sp.alpha[an.level, rows, cols]
    # colour: one small matrix product of the planes [alpha*shade, ...*mix, ...*strap, alpha*noise] and the colours
    colours = _colour_matrix(p["colors"], an, sp.mix is not None)
    planes = np.empty((len(colours), n, w), dtype=np.float32)
    view = [q[:, ::-1] for q in planes] if flip else list(planes)  # written in the sprite's orientation
    np.multiply(shade, alpha, out=view[0])
    if sp.mix is not None:
        np.multiply(view[0], sp.mix[rows, cols], out=view[1])
    np.multiply(view[0], sp.strap[rows, cols], out=view[-2])
    oy, ox = int(p["noise_at"][0] * h), int(p["noise_at"][1] * w)
    np.multiply(alpha, t.noise[oy : oy + n, ox : ox + w], out=view[-1])
    layer = planes.reshape(len(colours), -1).T @ np.array(colours, dtype=np.float32)
    # what is left of the face: (1 - alpha), darkened by the contact shadow
    keep = np.float32(-p["shadow"]) * sp.shadow[rows, cols]
    keep += 1.0
    keep -= alpha
    if flip:
        keep, alpha = keep[:, ::-1], alpha[:, ::-1]
    result = img[r0:].astype(np.float32)
    result *= keep.repeat(3).reshape(n, w, 3)
    result += layer.reshape(n, w, 3)
    result.clip(0.0, 255.0, out=result)
    result += 0.5
    out = img.copy()
    out[r0:] = result
    return MaskResult(out, alpha, (p, an, sp.geometry, dx, dy))


def _shade(sp: Sprite, p: dict, an: _Analysis, rows: slice, cols: slice, r0: int, flip: bool) -> np.ndarray:
    """Shading of the mask's rows: Lambert on the sprite's normals, times its detail and the face's own
    illumination (in the sprite's orientation)."""
    lx, ly, lz = p["light"]
    amb = p["ambient"]
    norm = 0.95 / (amb + (1.0 - amb) * (0.5 + 0.5 * lz))
    k = (1.0 - amb) * norm
    light = np.array([lx * k, ly * k, lz * k], dtype=np.float32)
    n = rows.stop - rows.start
    shade = (sp.normals[rows].reshape(-1, 3) @ light).reshape(n, -1)[:, cols]
    np.maximum(shade, 0.0, out=shade)
    shade += np.float32(amb * norm)
    shade *= sp.detail[an.level, rows, cols]
    gain = an.gain_rows[r0:, None] + (an.gain_cols[::-1] if flip else an.gain_cols)
    shade *= gain
    return shade


def _colour_matrix(colors: tuple, an: _Analysis, mix: bool) -> list[list[float]]:
    """Rows of RGB per plane: the main colour, (second - main) if the sprite mixes, (strap - main), the noise
    level; each scaled by the face's exposure and colour cast."""
    (m0, m1, m2), second, strap = colors
    scale = [c * an.exposure for c in an.cast]
    colours = [[m0 * scale[0], m1 * scale[1], m2 * scale[2]]]
    if mix:
        colours.append([(c - m) * f for c, m, f in zip(second, (m0, m1, m2), scale, strict=True)])
    colours.append([(c - m) * f for c, m, f in zip(strap, (m0, m1, m2), scale, strict=True)])
    colours.append([an.sigma] * 3)
    return colours

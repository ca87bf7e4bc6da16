"""Mask geometry: a deterministic bank of pre-rendered sprites per (image size, kind, variant), built on first use.

A sprite holds everything about one mask that does not depend on the face it is put on: the anti-aliased coverage
(body and straps), the surface normals, a multiplicative detail field (pleats, seams, bindings, welds, fabric grain),
a colour-mix field (cloth patterns, the N95 valve), where the straps are, and the soft contact shadow it casts on
the skin. The per-image renderer (``render.py``) only picks a sprite, shifts or mirrors it by whole pixels and does
cheap arithmetic on these fields; the geometry never has to be evaluated per image.

Geometry is set in the coordinates of the ArcFace 112x112 template and scaled to the image size, so the five
template points are the landmarks. Each variant draws, from a generator that depends only on (kind, variant):
the top edge between the nose bridge and the nose tip, the side edges at the cheeks, the bottom at or below the
chin, a small tilt, scale, horizontal offset and left/right asymmetry (a yaw proxy). ``row0`` records the first
row a sprite touches, so that the renderer never shifts it above ``EYE_LIMIT_Y`` (the eyes stay untouched).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

TEMPLATE_SIZE = 112
#: ArcFace 112x112 template: left eye, right eye, nose tip, left and right mouth corners.
TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float64,
)
EYE_Y = float(TEMPLATE[:2, 1].mean())  # 51.6
NOSE_Y = float(TEMPLATE[2, 1])  # 71.74
#: The nose bridge: a quarter of the way from the eye line to the nose tip. Rows above it (the eyes, brows and
#: forehead) are never touched, not even by a strap or a shadow.
EYE_LIMIT_Y = EYE_Y + 0.25 * (NOSE_Y - EYE_Y)  # 56.6
#: The chin point used by the coverage checks (the chin of an aligned face falls at y ~ 105-115).
CHIN = (56.0, 106.0)

KINDS = ("surgical", "kn95", "n95", "cloth")
VARIANTS = 32  # sprites per kind and image size
_BANK_SEED = 0x6D61736B
_PIVOT = (56.0, 82.0)  # tilt and scale act about the middle of the mask
_SHIFT_X, _SHIFT_Y = 3.0, 2.0  # per-image whole-pixel jitter (template units), room kept around each sprite


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


# ---------------------------------------------------------------------------------------------------------------
# field helpers (build time only: the sprites are made once per process)
# ---------------------------------------------------------------------------------------------------------------
def _pixel_distance(f: np.ndarray) -> np.ndarray:
    """An implicit function (negative inside) turned into an approximate signed distance in pixels."""
    gy, gx = np.gradient(f)
    return f / np.maximum(np.hypot(gx, gy), 1e-6)


def _coverage(d: np.ndarray, soft: float = 1.0) -> np.ndarray:
    """Anti-aliased coverage of the region ``d < 0`` (a one-pixel ramp)."""
    return np.clip(0.5 - d / soft, 0.0, 1.0)


def _gauss(x: np.ndarray, width: float) -> np.ndarray:
    return np.exp(-0.5 * (x / width) ** 2)


def _smoothstep(e0: float, e1: float, x: np.ndarray) -> np.ndarray:
    t = np.clip((x - e0) / (e1 - e0), 0.0, 1.0)
    return t * t * (3 - 2 * t)


def _polyline_distance(px: np.ndarray, py: np.ndarray, pts: np.ndarray, reach: float = 4.0) -> np.ndarray:
    """Distance from every point to a polyline (local units); points farther than ``reach`` from its bounding
    box are left at infinity (they are never drawn)."""
    best = np.full(px.shape, np.inf)
    (x_lo, y_lo), (x_hi, y_hi) = pts.min(axis=0) - reach, pts.max(axis=0) + reach
    near = (px >= x_lo) & (px <= x_hi) & (py >= y_lo) & (py <= y_hi)
    qx, qy = px[near], py[near]
    d = np.full(qx.shape, np.inf)
    for (x0, y0), (x1, y1) in zip(pts[:-1], pts[1:], strict=True):
        vx, vy = x1 - x0, y1 - y0
        t = np.clip(((qx - x0) * vx + (qy - y0) * vy) / (vx * vx + vy * vy), 0.0, 1.0)
        d = np.minimum(d, np.hypot(qx - x0 - t * vx, qy - y0 - t * vy))
    best[near] = d
    return best


def _bezier(p0, p1, p2, n: int = 24) -> np.ndarray:
    t = np.linspace(0.0, 1.0, n)[:, None]
    return (1 - t) ** 2 * np.asarray(p0) + 2 * (1 - t) * t * np.asarray(p1) + t * t * np.asarray(p2)


class _Canvas:
    """The pixel grid of a sprite and its local (mask-aligned) coordinates."""

    def __init__(self, height: int, width: int, geo: dict) -> None:
        sx, sy = width / TEMPLATE_SIZE, height / TEMPLATE_SIZE
        self.px_per_unit = 0.5 * (sx + sy) * geo["scale"]
        self.pad_x, self.pad_y = math.ceil(_SHIFT_X * sx), math.ceil(_SHIFT_Y * sy)
        rows = np.arange(-self.pad_y, height + self.pad_y)
        cols = np.arange(-self.pad_x, width + self.pad_x)
        self.rows = rows
        ty = (rows + 0.5) / sy - 0.5  # template coordinates of the pixel centres
        tx = (cols + 0.5) / sx - 0.5
        X, Y = np.meshgrid(tx, ty)
        c, s = math.cos(geo["tilt"]), math.sin(geo["tilt"])
        xr, yr = X - _PIVOT[0] - geo["cx"], Y - _PIVOT[1]
        self.x = (c * xr + s * yr) / geo["scale"]  # local x: 0 on the mask's centre line
        self.y = (-s * xr + c * yr) / geo["scale"] + _PIVOT[1]  # local y: template rows
        self.ty = ty


def _strap(cv: _Canvas, pts: np.ndarray, width: float) -> tuple[np.ndarray, np.ndarray]:
    """Coverage and signed pixel distance of a strap (a polyline of the given width, local units); it fades out
    over its last 3 units, where it goes behind the ear or round the head."""
    d = (_polyline_distance(cv.x, cv.y, pts) - 0.5 * width) * cv.px_per_unit
    end = abs(float(pts[-1, 0]))
    return _coverage(d) * np.clip((end - np.abs(cv.x)) / 3.0, 0.0, 1.0), d


def _ear_loops(rng: np.random.Generator, sgn: float, upper: tuple, lower: tuple) -> list[np.ndarray]:
    """Two loops on one side, from the mask's upper and lower corners to the ear (beside the face, y ~ 60-80)."""
    ear_x = sgn * rng.uniform(44.0, 49.0)
    ear_top, ear_bot = rng.uniform(61.0, 66.0), rng.uniform(73.0, 79.0)
    mid_up = (0.5 * (upper[0] + ear_x), min(upper[1], ear_top) - rng.uniform(0.0, 1.5))
    mid_lo = (0.5 * (lower[0] + ear_x), 0.5 * (lower[1] + ear_bot) + rng.uniform(0.0, 2.0))
    return [_bezier(upper, mid_up, (ear_x, ear_top)), _bezier(lower, mid_lo, (ear_x, ear_bot))]


def _side_factor(x: np.ndarray, asym: float) -> np.ndarray:
    """Half-widths scaled by (1 + asym) on the left and (1 - asym) on the right: a narrower far side under yaw."""
    return np.where(x < 0, 1.0 + asym, 1.0 - asym)


def _normalise(nx: np.ndarray, ny: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    norm2 = nx * nx + ny * ny
    scale = np.where(norm2 > 0.9, np.sqrt(0.9 / np.maximum(norm2, 1e-9)), 1.0)
    nx, ny = nx * scale, ny * scale
    return nx, ny, np.sqrt(1.0 - nx * nx - ny * ny)


# ---------------------------------------------------------------------------------------------------------------
# the kinds
# ---------------------------------------------------------------------------------------------------------------
def _common_geometry(rng: np.random.Generator) -> dict:
    return {
        "tilt": math.radians(rng.uniform(-3.0, 3.0)),
        "scale": rng.uniform(0.95, 1.05),
        "cx": rng.uniform(-2.0, 2.0),
        "asym": rng.uniform(-0.1, 0.1),
    }


def _surgical(rng: np.random.Generator, geo: dict, cv: _Canvas) -> dict:
    """Rectangular pleated mask: straight top with a nose-wire bump, three pleats, bindings, ear loops."""
    top = geo["top"] = rng.uniform(61.5, 67.0)
    peak, droop = rng.uniform(1.0, 2.5), rng.uniform(0.5, 4.0)
    hw_top, hw_mid = rng.uniform(31.0, 37.0), rng.uniform(28.0, 32.5)
    y_mid, y_bot = rng.uniform(84.0, 90.0), rng.uniform(108.0, 121.0)
    geo.update(bottom=y_bot, half_width=hw_top)
    x, y = cv.x, cv.y
    side = _side_factor(x, geo["asym"])
    ax = np.abs(x) / side
    y_corner = top + droop
    ytop = top - peak * np.exp(-((x / 9.0) ** 2)) + droop * (ax / hw_top) ** 2
    t = np.clip((y - y_corner) / (y_mid - y_corner), 0.0, 1.0)
    lower = np.clip((y - y_mid) / (y_bot - y_mid), 0.0, 1.0)
    hw = np.where(y < y_mid, hw_top + (hw_mid - hw_top) * t, hw_mid * np.sqrt(np.maximum(1.0 - lower**2, 0.0)))
    d_top = _pixel_distance(ytop - y)
    d_side = _pixel_distance(ax - hw)
    d = np.maximum(d_top, d_side)
    # fabric coordinates: u across (-1..1), v down (0 at the top edge, 1 at the chin)
    u = np.clip(x / (hw_top * side), -1.0, 1.0)
    ybot_x = y_mid + (y_bot - y_mid) * np.sqrt(np.maximum(1.0 - (ax / hw_mid) ** 2, 0.0))
    v = np.clip((y - ytop) / np.maximum(ybot_x - ytop, 4.0), 0.0, 1.2)
    nx = np.sin(1.0 * u) * 0.95
    ny = -0.18 * (1.0 - np.clip(v / 0.3, 0, 1)) ** 2 + 0.55 * np.clip((v - 0.6) / 0.4, 0.0, 1.0) ** 1.5
    detail = np.ones_like(x)
    pleat_px = 1.6 * cv.px_per_unit
    for v0 in (0.3, 0.5, 0.7):
        v_i = 0.5 + (v0 + rng.uniform(-0.03, 0.03) - 0.5) * (1.0 - 0.3 * u**2)  # pleats gather at the sides
        dist = (v - v_i) * np.maximum(ybot_x - ytop, 4.0) * cv.px_per_unit  # pixels below the fold line
        amp = rng.uniform(0.07, 0.12) * (0.45 + 0.55 * np.abs(u))
        detail *= 1.0 + amp * (0.8 * _gauss(dist + pleat_px, pleat_px) - 1.3 * _gauss(dist - 0.4, 0.8))
        ny = ny + 0.25 * amp * np.sign(-dist) * _gauss(dist, 2 * pleat_px)  # each fold tilts the fabric
    inside_top, inside_side = -d_top, -d_side
    band = 2.2 * cv.px_per_unit
    detail *= 1.0 - 0.07 * ((inside_top > 0) & (inside_top < band)) - 0.1 * _gauss(inside_top - band, 0.5)
    side_band = 1.3 * band
    detail *= 1.0 - 0.06 * ((inside_side > 0) & (inside_side < side_band)) - 0.08 * _gauss(inside_side - side_band, 0.5)
    wire = np.exp(-((x / 12.0) ** 4)) * _gauss(inside_top - 1.6 * cv.px_per_unit, 0.7 * cv.px_per_unit)
    detail *= 1.0 + 0.06 * wire
    # ear loops: from the top and bottom corners to the ears
    straps = []
    for sgn in (-1.0, 1.0):
        f = 1.0 + geo["asym"] * (-sgn)
        cx_top = sgn * (hw_top * f - 0.8)
        y_low = y_mid + rng.uniform(4.0, 9.0)
        lower_hw = hw_mid * math.sqrt(max(1.0 - ((y_low - y_mid) / (y_bot - y_mid)) ** 2, 0.0))
        straps += _ear_loops(rng, sgn, (cx_top, y_corner + 1.2), (sgn * (lower_hw * f - 0.8), y_low))
    return {"d": d, "nx": nx, "ny": ny, "detail": detail, "mix": np.zeros_like(x), "straps": straps, "strap_w": 1.1}


def _kn95(rng: np.random.Generator, geo: dict, cv: _Canvas) -> dict:
    """Folded respirator: top rising to the nose, a vertical centre seam, two planar halves, a pointed chin,
    embossed welded edges, ear loops."""
    top = geo["top"] = rng.uniform(62.0, 67.0)
    hw = rng.uniform(32.0, 37.0)
    h_side = rng.uniform(5.0, 10.0)
    y_side = top + h_side + rng.uniform(5.0, 11.0)
    y_bot, p = rng.uniform(112.0, 121.0), rng.uniform(1.5, 2.2)
    geo.update(bottom=y_bot, half_width=hw)
    x, y = cv.x, cv.y
    side = _side_factor(x, geo["asym"])
    ax = np.abs(x) / side
    ytop = top + h_side * (ax / hw) ** 1.25
    t = np.clip((y - y_side) / (y_bot - y_side), 0.0, 1.0)
    half = hw * (1.0 - t**p)
    d_top = _pixel_distance(ytop - y)
    d_side = _pixel_distance(ax - half)
    d = np.maximum(d_top, d_side)
    u = np.clip(x / (hw * side), -1.0, 1.0)
    alpha_plane = rng.uniform(0.45, 0.65)
    seam_px = np.abs(x) * cv.px_per_unit
    ridge = _smoothstep(0.0, 1.8, seam_px)
    nx = np.sign(x) * math.sin(alpha_plane) * ridge + 0.35 * np.sign(x) * np.clip((np.abs(u) - 0.8) / 0.2, 0, 1)
    v = np.clip((y - ytop) / np.maximum(y_bot - ytop, 4.0), 0.0, 1.0)
    ny = -0.25 + 0.75 * v**1.3
    detail = 1.0 - 0.16 * _gauss(seam_px, 0.55) + 0.05 * _gauss(seam_px - 1.2, 0.6)
    inside = -d
    band = 2.4 * cv.px_per_unit
    px_x, px_y = cv.x * cv.px_per_unit, cv.y * cv.px_per_unit
    emboss = 0.5 + 0.5 * np.cos(2 * np.pi * px_x / 2.3) * np.cos(2 * np.pi * px_y / 2.3)
    in_band = (inside > 0) & (inside < band)
    detail *= 1.0 - in_band * (0.05 + 0.08 * emboss) - 0.08 * _gauss(inside - band, 0.5)
    detail *= 1.0 - 0.07 * _gauss(seam_px, 1.6) * in_band
    straps = []
    for sgn in (-1.0, 1.0):
        f = 1.0 + geo["asym"] * (-sgn)
        y_corner = top + h_side * f**1.25 + 1.5
        y_low = y_side + rng.uniform(3.0, 8.0)
        hw_low = hw * f * (1.0 - ((y_low - y_side) / (y_bot - y_side)) ** p)
        straps += _ear_loops(rng, sgn, (sgn * (hw * f - 1.0), y_corner), (sgn * (hw_low - 1.0), y_low))
    return {"d": d, "nx": nx, "ny": ny, "detail": detail, "mix": np.zeros_like(x), "straps": straps, "strap_w": 1.0}


def _n95(rng: np.random.Generator, geo: dict, cv: _Canvas) -> dict:
    """Moulded cup: a dome with a rim, an optional exhalation valve, two head straps."""
    a, b = rng.uniform(33.0, 38.0), rng.uniform(25.0, 29.0)
    top = geo["top"] = rng.uniform(61.0, 65.0)
    cy = top + b
    geo.update(bottom=cy + b, half_width=a)
    x, y = cv.x, cv.y
    side = _side_factor(x, geo["asym"])
    ey = (y - cy) / b
    ex = np.abs(x) / (a * side * (1.0 - 0.22 * np.clip(ey, 0.0, 1.0)))  # narrower towards the chin
    flat = np.where(ey < 0, 1.0 + 0.15 * ex**2, 1.0)  # a flatter top over the nose and cheeks
    r = (ex**2.8 + np.abs(ey * flat) ** 2.6) ** (1 / 2.7)
    d = _pixel_distance(r - 1.0)
    nx = np.clip(x / (a * side * 1.02), -0.97, 0.97)
    ny = np.clip((y - cy + 0.1 * b) / (b * 1.3), -0.97, 0.97)
    inside = -d
    band = 1.8 * cv.px_per_unit
    detail = 1.0 - 0.05 * ((inside > 0) & (inside < band)) - 0.14 * _gauss(inside - band, 0.45)
    detail = detail - 0.12 * _gauss(inside - 0.3, 0.5)
    nose = np.exp(-((x / 10.0) ** 4)) * _gauss(y - (top + 3.5), 1.0)
    detail *= 1.0 + 0.06 * nose
    mix = np.zeros_like(x)
    geo["valve"] = bool(rng.random() < 0.45)
    if geo["valve"]:
        sgn = -1.0 if rng.random() < 0.5 else 1.0
        vx, vy, vr = sgn * rng.uniform(11.0, 15.0), cy + rng.uniform(2.0, 8.0), rng.uniform(6.0, 8.0)
        dv = _pixel_distance(np.hypot(x - vx, y - vy) / vr - 1.0)
        cover = _coverage(dv)
        rr = np.clip(np.hypot(x - vx, y - vy) / vr, 0.0, 1.0)
        mix = cover
        nx = nx * (1 - cover) + cover * (x - vx) / vr * 0.7
        ny = ny * (1 - cover) + cover * (y - vy) / vr * 0.7
        slots = 0.5 + 0.5 * np.cos(2 * np.pi * (y - vy) / (vr * 0.33))
        detail = detail * (1 - cover) + cover * (1.0 - 0.12 * _gauss(rr - 0.72, 0.06) - 0.08 * slots * (rr < 0.55))
        detail -= 0.25 * _gauss(dv + 0.3, 0.7) * (d < 0)
    straps = []
    for sgn in (-1.0, 1.0):
        f = 1.0 + geo["asym"] * (-sgn)
        y_up, y_lo = cy - b * rng.uniform(0.35, 0.5), cy + b * rng.uniform(0.3, 0.45)
        x_up = a * f * math.sqrt(max(1.0 - ((y_up - cy) / b) ** 2, 0.0)) - 1.5
        x_lo = a * f * math.sqrt(max(1.0 - ((y_lo - cy) / b) ** 2, 0.0)) - 1.5
        straps.append(_bezier((sgn * x_up, y_up), (sgn * 55.0, y_up - 1.0), (sgn * 72.0, rng.uniform(60.0, 66.0))))
        straps.append(_bezier((sgn * x_lo, y_lo), (sgn * 55.0, y_lo), (sgn * 72.0, rng.uniform(92.0, 104.0))))
    return {"d": d, "nx": nx, "ny": ny, "detail": detail, "mix": mix, "straps": straps, "strap_w": 1.9}


def _cloth_pattern(rng: np.random.Generator, xs: np.ndarray, ys: np.ndarray, px: float) -> tuple[str, np.ndarray]:
    """A fabric pattern in surface coordinates (local units): 0 main colour, 1 second colour."""
    kind = ("solid", "stripes", "checks", "dots", "floral")[int(rng.choice(5, p=[0.25, 0.2, 0.2, 0.15, 0.2]))]
    aa = 0.6 / px  # a little over half a pixel, in local units
    if kind == "solid":
        return kind, np.zeros_like(xs)
    if kind == "stripes":
        period, ang = rng.uniform(3.0, 8.0), rng.choice([0.0, math.pi / 2, math.pi / 4, -math.pi / 4])
        s = (xs * math.cos(ang) + ys * math.sin(ang)) / period
        tri = np.abs((s - np.floor(s)) - 0.5)  # 0..0.5
        return kind, np.clip((tri - 0.25 * rng.uniform(0.6, 1.4)) / (aa / period) + 0.5, 0.0, 1.0)
    if kind == "checks":
        period = rng.uniform(4.0, 8.0)
        a = np.clip((np.abs((xs / period) % 1.0 - 0.5) - 0.25) / (aa / period) + 0.5, 0, 1)
        b = np.clip((np.abs((ys / period) % 1.0 - 0.5) - 0.25) / (aa / period) + 0.5, 0, 1)
        return kind, 0.5 * (a + b)
    if kind == "dots":
        period, radius = rng.uniform(5.0, 9.0), rng.uniform(1.0, 2.2)
        gx = xs / period - np.round(xs / period)
        row = np.round(ys / period)
        gx = np.where(row % 2 == 0, gx, (xs / period + 0.5) - np.round(xs / period + 0.5))
        gy = ys / period - row
        dist = np.hypot(gx, gy) * period
        return kind, np.clip((radius - dist) / aa + 0.5, 0.0, 1.0)
    # floral: smooth random blobs (sums of a few oriented waves), thresholded
    field_ = np.zeros_like(xs)
    for _ in range(6):
        ang, freq, ph = rng.uniform(0, np.pi), rng.uniform(0.25, 0.6), rng.uniform(0, 2 * np.pi)
        field_ += np.cos(freq * (xs * math.cos(ang) + ys * math.sin(ang)) + ph)
    field_ /= 6**0.5
    return kind, np.clip((field_ - rng.uniform(0.3, 0.7)) / (aa * 0.5) + 0.5, 0.0, 1.0)


def _cloth(rng: np.random.Generator, geo: dict, cv: _Canvas) -> dict:
    """Contoured fabric mask: rounded top and chin, optional centre seam, a woven pattern, fabric ear loops."""
    top = geo["top"] = rng.uniform(61.5, 66.5)
    hw, h_side = rng.uniform(31.0, 37.0), rng.uniform(3.0, 8.0)
    y_mid, y_bot = rng.uniform(82.0, 90.0), rng.uniform(109.0, 121.0)
    geo.update(bottom=y_bot, half_width=hw)
    x, y = cv.x, cv.y
    side = _side_factor(x, geo["asym"])
    ax = np.abs(x) / side
    ytop = top + h_side * (ax / hw) ** 2
    lower = np.clip((y - y_mid) / (y_bot - y_mid), 0.0, 1.0)
    half = np.where(y < y_mid, hw, hw * np.sqrt(np.maximum(1.0 - lower**2.2, 0.0)))
    d_top = _pixel_distance(ytop - y)
    d = np.maximum(d_top, _pixel_distance(ax - half))
    u = np.clip(x / (hw * side), -1.0, 1.0)
    seam = rng.random() < 0.6
    nx = np.sin(1.05 * u) * 0.95
    v = np.clip((y - ytop) / np.maximum(y_bot - ytop, 4.0), 0.0, 1.0)
    ny = -0.2 * (1 - np.clip(v / 0.35, 0, 1)) ** 2 + 0.5 * np.clip((v - 0.55) / 0.45, 0, 1) ** 1.5
    seam_px = np.abs(x) * cv.px_per_unit
    detail = np.ones_like(x)
    if seam:
        nx = nx + np.sign(x) * 0.25 * _smoothstep(0.0, 2.0, seam_px) * (1 - np.abs(u))
        detail *= 1.0 - 0.14 * _gauss(seam_px, 0.6)
    # wrinkles: low-frequency folds running from the ear loops towards the centre
    for _ in range(2):
        f, ph = rng.uniform(0.15, 0.3), rng.uniform(0, 2 * np.pi)
        detail *= 1.0 + 0.035 * np.sin(f * (y + 0.35 * np.abs(x)) + ph) * np.abs(u)
    xs = hw * np.arcsin(u) / (np.pi / 2) * 1.3  # surface coordinate: the pattern compresses towards the sides
    pattern, mix = _cloth_pattern(rng, xs, y, cv.px_per_unit)
    geo["pattern"] = pattern
    inside = -d
    detail *= 1.0 - 0.08 * _gauss(inside - 1.8 * cv.px_per_unit, 0.6)  # hem stitch
    weave = np.cos(2 * np.pi * cv.x * cv.px_per_unit / 2.1) * np.cos(2 * np.pi * cv.y * cv.px_per_unit / 2.1)
    detail *= 1.0 + 0.035 * weave
    straps = []
    for sgn in (-1.0, 1.0):
        f = 1.0 + geo["asym"] * (-sgn)
        y_c = top + h_side * f**2 + 1.5
        y_low = y_mid + rng.uniform(2.0, 7.0)
        straps += _ear_loops(rng, sgn, (sgn * (hw * f - 1.0), y_c), (sgn * (hw * f - 1.0), y_low))
    return {"d": d, "nx": nx, "ny": ny, "detail": detail, "mix": mix, "straps": straps, "strap_w": 1.5}


_BUILDERS = {"surgical": _surgical, "kn95": _kn95, "n95": _n95, "cloth": _cloth}


@lru_cache(maxsize=2 * len(KINDS) * VARIANTS)  # two image sizes' banks (~30 MB each at 112x112)
def get_sprite(height: int, width: int, kind: str, variant: int) -> Sprite:
    """The sprite ``variant`` of ``kind`` for ``height`` x ``width`` faces (built once per process, then cached).

    The geometry depends only on (kind, variant), never on the image size, so a 128x128 face gets the 112x112
    mask scaled; the result is the same in every process.
    """
    if kind not in _BUILDERS:
        raise ValueError(f"unknown mask kind {kind!r}; expected one of {', '.join(KINDS)}")
    rng = np.random.default_rng([_BANK_SEED, KINDS.index(kind), variant])
    geo = _common_geometry(rng)
    cv = _Canvas(height, width, geo)
    out = _BUILDERS[kind](rng, geo, cv)
    body = _coverage(out["d"])
    strap_cover = np.zeros_like(body)
    strap_d = np.full(body.shape, np.inf)
    for pts in out["straps"]:
        c, d = _strap(cv, pts, out["strap_w"])
        strap_cover = np.maximum(strap_cover, c)
        strap_d = np.minimum(strap_d, d)
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

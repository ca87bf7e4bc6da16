"""The four kinds of mask as geometry: implicit fields on a sprite's canvas, drawn once per (kind, variant).

Geometry is set in the coordinates of the ArcFace 112x112 template and scaled to the image size, so the five
template points are the landmarks. Each variant draws, from a generator that depends only on (kind, variant):
the top edge between the nose bridge and the nose tip, the side edges at the cheeks, the bottom at or below the
chin, a small tilt, scale, horizontal offset and left/right asymmetry (a yaw proxy). Build time only: ``sprites.py``
turns the fields into a sprite once per process.
"""

from __future__ import annotations

import math

import numpy as np

from facetool.pipeline.template import TEMPLATE_SIZE

KINDS = ("surgical", "kn95", "n95", "cloth")
_BANK_SEED = 0x6D61736B
_PIVOT = (56.0, 82.0)  # tilt and scale act about the middle of the mask
_SHIFT_X, _SHIFT_Y = 3.0, 2.0  # per-image whole-pixel jitter (template units), room kept around each sprite


# ---------------------------------------------------------------------------------------------------------------
# field helpers
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


class Canvas:
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


def _strap(cv: Canvas, pts: np.ndarray, width: float) -> tuple[np.ndarray, np.ndarray]:
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


def _surgical(rng: np.random.Generator, geo: dict, cv: Canvas) -> dict:
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


def _kn95(rng: np.random.Generator, geo: dict, cv: Canvas) -> dict:
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


def _n95(rng: np.random.Generator, geo: dict, cv: Canvas) -> dict:
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


def _cloth(rng: np.random.Generator, geo: dict, cv: Canvas) -> dict:
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


def draw_mask(kind: str, variant: int, height: int, width: int) -> tuple[Canvas, dict, dict]:
    """Variant ``variant`` of ``kind`` on the canvas of a ``height`` x ``width`` face: the canvas, the drawn
    geometry (template units) and the fields (``d``: signed pixel distance to the edge, ``body``: its coverage,
    ``nx``, ``ny``, ``detail``, ``mix``, and the straps' ``strap_cover``, ``strap_d`` and ``strap_w``)."""
    rng = np.random.default_rng([_BANK_SEED, KINDS.index(kind), variant])
    geo = _common_geometry(rng)
    cv = Canvas(height, width, geo)
    out = _BUILDERS[kind](rng, geo, cv)
    out["body"] = _coverage(out["d"])
    out["strap_cover"] = np.zeros_like(out["body"])
    out["strap_d"] = np.full(out["body"].shape, np.inf)
    for pts in out["straps"]:
        c, d = _strap(cv, pts, out["strap_w"])
        out["strap_cover"] = np.maximum(out["strap_cover"], c)
        out["strap_d"] = np.minimum(out["strap_d"], d)
    return cv, geo, out

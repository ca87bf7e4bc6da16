"""Drawing one synthetic face: its parts as polygons in template coordinates, posed and painted on the 2x canvas.

Faces are drawn as polygons at 2x with PIL, the pose (rotation, scale, shift) applied to the polygon points (no
image resampling), so the five landmarks stay on the ArcFace template up to the per-identity offset and the
per-image pose. The shapes that depend only on the identity are built once per process and cached.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import ImageDraw

from facetool.pipeline.synth.identity import STYLES, Color, FaceIdentity

#: Supersampling factor of the drawing canvas (the face is averaged 2x2 down to 112 afterwards).
SUPERSAMPLE = 2
_CENTER = np.array([56.0, 62.0])  # pose rotates and scales about this point


def _unit_circle(n: int) -> np.ndarray:
    t = np.linspace(0.0, 2.0 * np.pi, n, endpoint=False)
    return np.stack([np.cos(t), np.sin(t)], axis=1)


_CIRCLE24 = _unit_circle(24)
_CIRCLE12 = _unit_circle(12)
_T9 = np.linspace(0.0, 1.0, 9)
_T13 = np.linspace(0.0, 1.0, 13)


def _rgb(c: Color | np.ndarray, k: float = 1.0) -> tuple[int, int, int]:
    return tuple(int(min(255.0, max(0.0, v * k))) for v in c)  # type: ignore[return-value]


def _mix(a: Color, b: Color, t: float) -> tuple[int, int, int]:
    return tuple(int(min(255.0, max(0.0, x * (1 - t) + y * t))) for x, y in zip(a, b, strict=True))  # type: ignore


_Group = tuple[np.ndarray, list[tuple[int, tuple[int, int, int], float]]]


class _Shapes:
    """Polygons and polylines in template coordinates, to be posed and drawn in one go by ``_Painter``."""

    def __init__(self) -> None:
        self.items: list[tuple[np.ndarray, tuple[int, int, int], float]] = []

    def poly(self, p: np.ndarray, fill: tuple[int, int, int]) -> None:
        self.items.append((p, fill, 0.0))

    def line(self, p: np.ndarray, fill: tuple[int, int, int], width: float, closed: bool = False) -> None:
        self.items.append((np.concatenate([p, p[:2]]) if closed else p, fill, width))

    def ellipse(self, cx: float, cy: float, rx: float, ry: float, fill: tuple[int, int, int], n: int = 24) -> None:
        circle = _CIRCLE24 if n == 24 else _CIRCLE12
        self.items.append((circle * (rx, ry) + (cx, cy), fill, 0.0))

    def group(self) -> _Group:
        """All points in one array plus (count, fill, line width or 0 for a filled polygon) per shape."""
        if not self.items:
            return np.empty((0, 2)), []
        pts = np.concatenate([it[0] for it in self.items])
        return pts, [(len(it[0]), it[1], it[2]) for it in self.items]


class _Painter:
    """Draws shape groups on the 2x canvas, the pose (rotation, scale, shift) applied to the points."""

    def __init__(self, draw: ImageDraw.ImageDraw, angle: float, scale: float, shift: np.ndarray) -> None:
        c, s = np.cos(angle), np.sin(angle)
        self.m = SUPERSAMPLE * scale * np.array([[c, -s], [s, c]])
        self.t = SUPERSAMPLE * (_CENTER + shift) - self.m @ _CENTER + (SUPERSAMPLE - 1) / 2.0
        self.k = SUPERSAMPLE * scale
        self.draw = draw

    def paint(self, group: _Group, dy: float = 0.0) -> None:
        pts, meta = group
        t = self.t + self.m[:, 1] * dy if dy else self.t
        flat = (pts @ self.m.T + t).ravel().tolist()
        pos = 0
        for n, fill, width in meta:
            seg = flat[pos : pos + 2 * n]
            pos += 2 * n
            if width:
                self.draw.line(seg, fill=fill, width=max(1, int(round(width * self.k))), joint="curve")
            else:
                self.draw.polygon(seg, fill=fill)


def _face_outline(idn: FaceIdentity) -> np.ndarray:
    """Closed outline of the face (skull above y=50, superellipse jaw below), from the left temple."""
    cx, w = 56.0, idn.face_w
    top = np.linspace(np.pi, 2 * np.pi, 17)
    upper = np.stack([cx + w * 0.96 * np.cos(top), 50.0 + (50.0 - idn.face_top) * np.sin(top)], axis=1)
    th = np.linspace(0.0, np.pi, 25)
    e = 2.0 / idn.jaw_square
    cs, sn = np.cos(th), np.sin(th)
    fy = sn**e
    x = w * np.sign(cs) * np.abs(cs) ** e * (1.0 - idn.jaw_taper * fy**2)
    lower = np.stack([cx + x, 50.0 + (idn.chin_y - 50.0) * fy], axis=1)
    return np.concatenate([upper, lower[1:-1]])


def _hairline(idn: FaceIdentity, xs: np.ndarray) -> np.ndarray:
    """y of the hairline at each x across the forehead, per style."""
    d = (xs - 56.0) / idn.face_w  # -1..1
    style = STYLES[idn.hair_style]
    h = idn.hairline + 6.0 * d**2  # lower at the temples
    if style == "fringe":
        h = idn.hairline + 3.0 * idn.part * d + 1.5 * np.cos(d * 14.0)
    elif style == "side_part":
        h = idn.hairline + 5.0 * idn.part * d - 3.0 * np.abs(d - idn.part * 0.5) + 6.0 * d**2
    elif style == "receding":
        h = idn.hairline + 2.0 - 8.0 * np.exp(-(((np.abs(d) - 0.55) / 0.2) ** 2)) + 10.0 * d**2
    elif style == "widow_peak":
        h = idn.hairline + 4.0 * np.exp(-((d / 0.12) ** 2)) + 7.0 * d**2
    elif style == "curly":
        h = idn.hairline + 6.0 * d**2 + 1.2 * np.sin(d * 20.0)
    return h


def _draw_hair_back(p: _Shapes, idn: FaceIdentity) -> None:
    if not idn.hair_long:
        return
    w = idn.face_w + idn.hair_volume + 4.0
    t = np.linspace(np.pi, 2 * np.pi, 17)
    top = np.stack([56.0 + w * np.cos(t), 48.0 + (48.0 - idn.face_top + idn.hair_volume) * np.sin(t)], axis=1)
    bottom = np.array([[56.0 + w + 4.0, 130.0], [56.0 - w - 4.0, 130.0]])
    p.poly(np.concatenate([top, bottom]), _rgb(idn.hair, 0.8))


def _draw_hair_top(p: _Shapes, idn: FaceIdentity, outline: np.ndarray) -> None:
    style = STYLES[idn.hair_style]
    w = idn.face_w
    vol = 0.6 if style == "buzz" else (1.0 if style == "bald" else idn.hair_volume)
    n = 21
    t = np.linspace(np.pi * 0.92, np.pi * 2.08, n)
    rad_x = w * 0.96 + vol * 0.7
    rad_y = 50.0 - idn.face_top + vol
    if style == "curly":
        bump = 1.0 + 0.06 * np.sin(np.linspace(0, 18 * np.pi, n))
    else:
        bump = np.ones(n)
    outer = np.stack([56.0 + rad_x * np.cos(t) * bump, 50.0 + rad_y * np.sin(t) * bump], axis=1)
    outer[0, 1] = outer[-1, 1] = idn.sideburn  # hair at the temples runs down to the sideburn
    outer[0, 0] -= 0.5
    outer[-1, 0] += 0.5
    color = _rgb(idn.hair)
    if style == "buzz":
        color = _mix(idn.skin, idn.hair, 0.6)
    if style == "bald":
        # hair only at the sides, around the ears
        for side in (-1.0, 1.0):
            x0 = 56.0 + side * w * 0.97
            patch = np.array(
                [[x0 + side * 1.5, 38.0], [x0 + side * 2.5, idn.sideburn + 4.0],
                 [x0 - side * 4.0, idn.sideburn], [x0 - side * 3.0, 42.0]]
            )  # fmt: skip
            p.poly(patch, color)
        return
    xs = np.linspace(56.0 + w * 0.9, 56.0 - w * 0.9, 15)
    inner = np.stack([xs, _hairline(idn, xs)], axis=1)
    side_r = np.array([[56.0 + w * 0.86, idn.sideburn], [56.0 + w * 0.88, 40.0]])
    side_l = np.array([[56.0 - w * 0.88, 40.0], [56.0 - w * 0.86, idn.sideburn]])
    inner[:, 1] = np.minimum(inner[:, 1], 44.0)
    p.poly(np.concatenate([outer, side_r, inner, side_l]), color)
    if style in ("short", "side_part", "curly", "widow_peak"):
        # a darker strand or two for texture
        strand = np.stack([xs[3:12], inner[3:12, 1] - 4.0 - 2.0 * np.sin(np.linspace(0, np.pi, 9))], axis=1)
        p.line(strand, _rgb(idn.hair, 0.75), 1.0)


def _draw_ears(p: _Shapes, idn: FaceIdentity) -> None:
    for side in (-1.0, 1.0):
        cx = 56.0 + side * (idn.face_w * 0.97 + 2.0 * idn.ear_size)
        p.ellipse(cx, idn.ear_y, 4.2 * idn.ear_size, 9.0 * idn.ear_size, _rgb(idn.skin, 0.88))
        p.ellipse(cx + side * 0.6, idn.ear_y, 2.2 * idn.ear_size, 6.0 * idn.ear_size, _rgb(idn.skin, 0.7), 12)


def _draw_brows(p: _Shapes, idn: FaceIdentity, lm: np.ndarray, raise_: float) -> None:
    for side, (ex, ey) in ((-1.0, lm[0]), (1.0, lm[1])):
        x = ex + side * (-idn.eye_w * 0.6 + _T9 * idn.eye_w * 1.3)
        y = ey - idn.brow_gap - raise_ - idn.brow_arch * np.sin(np.pi * _T9**0.8) - idn.brow_tilt * (_T9 - 0.3)
        th = idn.brow_thick * (1.0 - 0.55 * _T9)
        top = np.stack([x, y - th / 2], axis=1)
        bottom = np.stack([x, y + th / 2], axis=1)[::-1]
        p.poly(np.concatenate([top, bottom]), _rgb(idn.brow_color))


def _draw_eyes(p: _Shapes, idn: FaceIdentity, lm: np.ndarray, blink: float, gaze: np.ndarray) -> None:
    open_ = max(0.08, 1.0 - blink)
    for side, (ex, ey) in ((-1.0, lm[0]), (1.0, lm[1])):
        x = ex + side * (-0.5 + _T13) * idn.eye_w
        tilt = -idn.eye_tilt * (_T13 - 0.5)
        env = np.sin(np.pi * _T13)
        upper = ey + tilt - idn.eye_h * open_ * env**0.7 * 0.62
        lower = ey + tilt + idn.eye_h * env * 0.38 * (0.5 + 0.5 * open_)
        almond = np.concatenate([np.stack([x, upper], 1), np.stack([x, lower], 1)[::-1]])
        p.poly(almond, (236, 232, 226) if open_ > 0.25 else _rgb(idn.skin, 0.8))
        if open_ > 0.25:
            ix, iy = ex + gaze[0], ey + gaze[1] - 0.4
            for r, col in ((idn.iris_r, _rgb(idn.iris)), (idn.iris_r * 0.45, (14, 12, 12))):
                c = _CIRCLE24 * r + (ix, iy)
                # clip the disc vertically to the lids (both shapes are vertically convex)
                xo, lo_o, up_o = (x, lower, upper) if side > 0 else (x[::-1], lower[::-1], upper[::-1])
                lo, up = np.interp(c[:, 0], xo, lo_o), np.interp(c[:, 0], xo, up_o)
                c[:, 1] = np.clip(c[:, 1], up, lo)
                p.poly(c, col)
            p.ellipse(ix + 0.9, iy - 0.9, 0.7, 0.7, (250, 250, 250), 12)
        p.line(np.stack([x, upper], 1), (30, 22, 20), 1.3)
        p.line(np.stack([x, lower], 1)[2:-2], _rgb(idn.skin, 0.7), 0.6)


def _draw_nose(p: _Shapes, idn: FaceIdentity, lm: np.ndarray) -> None:
    nx, ny = lm[2]
    w = idn.nose_w
    shade = _rgb(idn.skin, 0.7)
    p.ellipse(nx, ny + 0.5, w * 0.5, 4.0, _rgb(idn.skin, 0.9))
    for side in (-1.0, 1.0):
        bridge = np.array([[nx + side * 3.0, ny - idn.nose_len], [nx + side * 3.5, ny - idn.nose_len * 0.4],
                           [nx + side * w * 0.45, ny + 0.5]])  # fmt: skip
        p.line(bridge, shade, 1.0)
        p.ellipse(nx + side * w * 0.22, ny + 2.2, w * 0.1 + 0.7, 1.3, _rgb(idn.skin, 0.35), 12)
    p.ellipse(nx, ny - 0.6, w * 0.16 + 1.0, 2.2, _rgb(idn.skin, 1.06), 12)


def _draw_beard(p: _Shapes, idn: FaceIdentity, outline: np.ndarray, lm: np.ndarray) -> None:
    if idn.beard == 0 and not idn.moustache:
        return
    color = _rgb(idn.beard_color) if idn.beard != 1 else _mix(idn.skin, idn.beard_color, 0.35)
    if idn.beard in (1, 2):
        d = (outline[:, 0] - 56.0) / idn.face_w
        top = idn.beard_top - 14.0 * d**2
        lower = outline[(outline[:, 1] > top) & (outline[:, 1] > 50.0)]
        xs = np.linspace(lower[-1, 0], lower[0, 0], 9)
        cap = np.stack([xs, idn.beard_top - 14.0 * ((xs - 56.0) / idn.face_w) ** 2], 1)
        p.poly(np.concatenate([lower, cap]), color)
    elif idn.beard == 3:
        my = (lm[3, 1] + lm[4, 1]) / 2
        p.ellipse(56.0, my + 10.0, 10.0, 8.0, color)
    if idn.moustache or idn.beard == 2:
        (lx, ly), (rx, ry) = lm[3], lm[4]
        xs = np.linspace(lx - 1.5, rx + 1.5, 9)
        yb = np.interp(xs, [lx, rx], [ly, ry]) - idn.lip_upper - 0.5
        yt = yb - 3.5 * np.sin(np.pi * np.linspace(0, 1, 9)) ** 0.5 - 0.5
        yb[[0, -1]] += 2.5
        p.poly(np.concatenate([np.stack([xs, yt], 1), np.stack([xs, yb], 1)[::-1]]), _rgb(idn.beard_color))


def _draw_mouth(p: _Shapes, idn: FaceIdentity, lm: np.ndarray, smile: float, open_: float) -> None:
    (lx, ly), (rx, ry) = lm[3] + (-smile, -smile * 1.5), lm[4] + (smile, -smile * 1.5)
    x = lx + (rx - lx) * _T13
    base = ly + (ry - ly) * _T13
    env = np.sin(np.pi * _T13)
    line = base + (1.0 + 2.2 * smile) * env**0.8
    bow = idn.lip_upper * env**0.6 * (1.0 - 0.35 * np.exp(-(((_T13 - 0.5) / 0.08) ** 2)))
    gap = open_ * 5.0 * env**0.8
    upper_top = line - bow - gap * 0.3
    upper_bot = line - gap * 0.3
    lower_top = line + gap * 0.7
    lower_bot = lower_top + idn.lip_lower * env**0.7
    if open_ > 0.05:
        inside = np.concatenate([np.stack([x, upper_bot], 1), np.stack([x, lower_top], 1)[::-1]])
        p.poly(inside, (60, 20, 24))
        xt, yt = x[2:-2], upper_bot[2:-2]
        teeth = np.concatenate([np.stack([xt, yt], 1), np.stack([xt, yt + gap[2:-2] * 0.45], 1)[::-1]])
        p.poly(teeth, (238, 236, 226))
    lip = _rgb(idn.lip_color)
    p.poly(
        np.concatenate([np.stack([x, upper_top], 1), np.stack([x, upper_bot], 1)[::-1]]),
        _rgb(idn.lip_color, 0.9),
    )
    p.poly(np.concatenate([np.stack([x, lower_top], 1), np.stack([x, lower_bot], 1)[::-1]]), lip)
    p.line(np.stack([x, line - gap * 0.3], 1), _rgb(idn.lip_color, 0.55), 0.7)


def _draw_glasses(p: _Shapes, idn: FaceIdentity, lm: np.ndarray) -> None:
    if idn.glasses == 0:
        return
    col = _rgb(idn.glasses_color)
    rx, ry = 11.0 * idn.glasses_size, (9.0 if idn.glasses == 1 else 7.5) * idn.glasses_size
    e = 1.0 if idn.glasses == 1 else 0.45  # superellipse: round or rounded rectangle
    c = np.sign(_CIRCLE24) * np.abs(_CIRCLE24) ** e
    for side, (ex, ey) in ((-1.0, lm[0]), (1.0, lm[1])):
        ring = c * (rx, ry) + (ex, ey + 0.5)
        if idn.glasses_tint > 0:
            p.poly(ring, _mix(idn.skin, (40, 40, 60), idn.glasses_tint))
        p.line(ring, col, 1.3, closed=True)
        arm = np.array([[ex + side * rx, ey - 1.0], [56.0 + side * idn.face_w * 0.98, ey - 2.0]])
        p.line(arm, col, 1.3)
    bridge = np.array(
        [
            [lm[0, 0] + rx * 0.92, lm[0, 1] - 1.0],
            [56.0, lm[0, 1] - 2.5],
            [lm[1, 0] - rx * 0.92, lm[1, 1] - 1.0],
        ]
    )
    p.line(bridge, col, 1.3)


_STATIC: dict[FaceIdentity, tuple[_Group, _Group, _Group, _Group]] = {}


def _static_geometry(idn: FaceIdentity) -> tuple[_Group, _Group, _Group, _Group]:
    """The shapes that only depend on the identity (cached per process): back, head, brows, glasses."""
    got = _STATIC.get(idn)
    if got is not None:
        return got
    lm = np.asarray(idn.landmarks, dtype=np.float64).reshape(5, 2)
    outline = _face_outline(idn)
    back, head, brows, glasses = _Shapes(), _Shapes(), _Shapes(), _Shapes()
    _draw_hair_back(back, idn)
    neck_w = idn.face_w * 0.62
    neck = np.array([[56 - neck_w, 80.0], [56 + neck_w, 80.0], [56 + neck_w, 130.0], [56 - neck_w, 130.0]])
    back.poly(neck, _rgb(idn.skin, 0.78))
    _draw_ears(head, idn)
    head.poly(outline, _rgb(idn.skin, 0.84))
    head.poly((outline - (56.0, 60.0)) * (0.93, 0.95) + (56.0, 59.0), _rgb(idn.skin))
    if idn.blush > 0.05:
        for side in (-1.0, 1.0):
            head.ellipse(56.0 + side * idn.face_w * 0.55, 78.0, 7.0, 5.0, _mix(idn.skin, (214, 90, 96), idn.blush))
    for mx, my, mr in idn.moles:
        head.ellipse(mx, my, mr, mr, _rgb(idn.skin, 0.45), 12)
    _draw_beard(head, idn, outline, lm)
    _draw_hair_top(head, idn, outline)
    _draw_nose(head, idn, lm)
    _draw_brows(brows, idn, lm, 0.0)
    _draw_glasses(glasses, idn, lm)
    if len(_STATIC) >= 4096:
        _STATIC.clear()
    got = _STATIC[idn] = (back.group(), head.group(), brows.group(), glasses.group())
    return got


@dataclass(frozen=True)
class Pose:
    """What one image changes about the face: head pose (radians, scale, template-pixel shift) and expression."""

    angle: float
    scale: float
    shift: np.ndarray
    smile: float
    mouth_open: float
    blink: float
    brow_raise: float
    gaze: np.ndarray

    @classmethod
    def sample(cls, rng: np.random.Generator) -> Pose:
        """The image's pose and expression: the first draws of its generator, in this order."""
        angle = np.deg2rad(rng.normal(0.0, 2.5))
        scale = 1.0 + rng.uniform(-0.05, 0.05)
        shift = rng.uniform(-2.5, 2.5, 2)
        smile = float(rng.uniform(0, 1.6)) if rng.random() < 0.45 else 0.0
        mouth_open = float(rng.uniform(0.2, 1.0)) if rng.random() < 0.25 else 0.0
        blink = float(rng.uniform(0.5, 1.0)) if rng.random() < 0.12 else float(rng.uniform(0.0, 0.2))
        brow_raise = float(rng.uniform(0.5, 2.5)) if rng.random() < 0.25 else 0.0
        gaze = rng.uniform(-0.9, 0.9, 2) * (1.0, 0.5)
        return cls(angle, scale, shift, smile, mouth_open, blink, brow_raise, gaze)


def paint_face(draw: ImageDraw.ImageDraw, idn: FaceIdentity, pose: Pose, shirt: tuple[int, int, int]) -> None:
    """Paint ``idn`` in ``pose`` (a ``shirt`` of that colour below the neck) on the 2x canvas behind ``draw``."""
    lm = np.asarray(idn.landmarks, dtype=np.float64).reshape(5, 2)
    p = _Painter(draw, pose.angle, pose.scale, pose.shift)
    back, head, brows, glasses = _static_geometry(idn)
    p.paint(back)
    neck_w = idn.face_w * 0.62
    cloth = _Shapes()
    outline = np.array(
        [[-20.0, 112.0], [56 - neck_w * 0.9, 106.0], [56.0, 118.0], [56 + neck_w * 0.9, 106.0],
         [132.0, 112.0], [132.0, 140.0], [-20.0, 140.0]]
    )  # fmt: skip
    cloth.poly(outline, shirt)
    p.paint(cloth.group())
    p.paint(head)
    p.paint(brows, dy=-pose.brow_raise)
    face = _Shapes()
    _draw_eyes(face, idn, lm, pose.blink, pose.gaze)
    _draw_mouth(face, idn, lm, pose.smile, pose.mouth_open)
    p.paint(face.group())
    p.paint(glasses)

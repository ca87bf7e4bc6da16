"""Procedurally drawn synthetic faces, ArcFace-aligned, written as an InsightFace layout-A dataset.

The built-in dataset of the project (``facetool synth``, ``make demo``, the tests). Every identity is a
frozen set of strong, stable traits (face shape, skin tone, hair colour and style, brows, eyes, nose, lips,
ears, beard, glasses, moles); every image adds pose, expression, lighting, background, noise, blur and JPEG
variation. Faces are drawn as polygons at 2x with PIL, the pose applied to the polygon points (no image
resampling), then averaged 2x2 down to 112 (supersampling anti-aliasing; a LANCZOS resize would cost 15x as
much), so the five landmarks stay on the ArcFace 112x112 template up to the per-identity offset (<= 1.2 px)
and the per-image pose.

Determinism: identity ``i``'s traits come from ``default_rng([seed, 1, i])`` and its image ``k`` from
``default_rng([seed, 2, i, k])`` (the middle word keeps the two streams apart), so the output bytes do not
depend on the number of worker processes.

Verification set (``synth.bin``): made of held-out identities ``C .. C+E-1`` (``E = max(50, pairs // 10)``,
never among the ``C`` training identities); pair ``p`` uses image indices ``2p`` and ``2p+1`` of its
identities; the same/different flags are a seeded permutation of ``pairs // 2`` positives and the rest
negatives.
"""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from facetool.pipeline.recordio import RecordIOWriter, pack_payload
from facetool.pipeline.verification_bin import write_bin

SIZE = 112
#: ArcFace 112x112 template: left eye, right eye, nose tip, left and right mouth corners.
TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float64,
)
_SS = 2  # supersampling factor of the drawing canvas
_CENTER = np.array([56.0, 62.0])  # pose rotates and scales about this point
_TAG_IDENTITY, _TAG_IMAGE, _TAG_PAIRS = 1, 2, 3

Color = tuple[float, float, float]

_SKIN = np.array(
    [[255, 228, 206], [246, 206, 178], [236, 188, 156], [222, 170, 130], [205, 150, 110],
     [180, 126, 88], [150, 98, 66], [118, 74, 48], [88, 56, 38], [64, 42, 30]], dtype=np.float64,
)  # fmt: skip
_HAIR = np.array(
    [[22, 18, 16], [48, 32, 22], [88, 58, 36], [130, 92, 58], [176, 136, 86], [222, 196, 140],
     [238, 228, 200], [128, 52, 26], [184, 88, 40], [128, 128, 128], [214, 214, 210], [44, 70, 160],
     [210, 84, 150], [40, 130, 90], [110, 50, 140]], dtype=np.float64,
)  # fmt: skip
_HAIR_P = np.array([14, 14, 12, 9, 7, 5, 3, 5, 5, 6, 5, 2, 2, 1, 2], dtype=np.float64)
_IRIS = np.array(
    [
        [70, 42, 22],
        [40, 26, 18],
        [120, 88, 44],
        [72, 116, 64],
        [64, 112, 176],
        [112, 128, 144],
        [150, 104, 40],
    ],
    dtype=np.float64,
)
_FRAMES = np.array([[20, 20, 22], [92, 58, 30], [196, 166, 80], [184, 186, 196], [160, 30, 40], [40, 60, 150]])

# Hair styles (top of the head): how the hairline runs over the forehead.
_STYLES = ("short", "fringe", "side_part", "receding", "bald", "buzz", "widow_peak", "curly")


def _unit_circle(n: int) -> np.ndarray:
    t = np.linspace(0.0, 2.0 * np.pi, n, endpoint=False)
    return np.stack([np.cos(t), np.sin(t)], axis=1)


_CIRCLE24 = _unit_circle(24)
_CIRCLE12 = _unit_circle(12)
_T9 = np.linspace(0.0, 1.0, 9)
_T13 = np.linspace(0.0, 1.0, 13)


@dataclass(frozen=True)
class FaceIdentity:
    """All per-identity traits of one synthetic person (template coordinates, RGB colours in 0..255)."""

    landmarks: tuple[float, ...]  # 10 values: the template's 5 points plus a small per-identity offset
    skin: Color
    face_w: float  # half width at the cheekbones
    face_top: float  # y of the crown of the skull
    chin_y: float
    jaw_square: float  # superellipse exponent of the lower face (2: round, 4: square)
    jaw_taper: float  # narrows the jaw towards the chin (V shape)
    ear_size: float
    ear_y: float
    hair: Color
    hair_style: int  # index into _STYLES
    hairline: float  # y of the hairline at the centre of the forehead
    hair_volume: float
    hair_long: bool
    sideburn: float  # y where the hair at the temples ends
    part: float  # side part / fringe slant (-1..1)
    brow_color: Color
    brow_thick: float
    brow_arch: float
    brow_tilt: float
    brow_gap: float
    eye_w: float
    eye_h: float
    eye_tilt: float
    iris: Color
    iris_r: float
    nose_w: float
    nose_len: float
    lip_color: Color
    lip_upper: float
    lip_lower: float
    beard: int  # 0 none, 1 stubble, 2 full, 3 goatee
    beard_color: Color
    beard_top: float
    moustache: bool
    glasses: int  # 0 none, 1 round, 2 rectangular
    glasses_color: Color
    glasses_size: float
    glasses_tint: float
    moles: tuple[tuple[float, float, float], ...]
    blush: float

    @classmethod
    def sample(cls, rng: np.random.Generator) -> FaceIdentity:
        """Draw one identity's traits from ``rng`` (call with ``default_rng([seed, 1, i])``)."""
        u = rng.uniform
        lm = TEMPLATE + rng.uniform(-1.2, 1.2, size=(5, 2))
        lm[1, 1] = TEMPLATE[1, 1] + np.clip(lm[0, 1] - TEMPLATE[0, 1] + u(-0.4, 0.4), -1.2, 1.2)  # level eyes
        j = int(rng.integers(len(_SKIN) - 1))
        skin = _SKIN[j] + (_SKIN[j + 1] - _SKIN[j]) * u() + rng.uniform(-10, 10, 3) * np.array([1.0, 0.8, 0.8])
        skin = np.clip(skin, 30, 255)
        hair = _HAIR[rng.choice(len(_HAIR), p=_HAIR_P / _HAIR_P.sum())] + rng.uniform(-14, 14, 3)
        hair = np.clip(hair, 8, 245)
        style = int(rng.integers(len(_STYLES)))
        female_ish = u() < 0.5
        hairline = {"fringe": u(30, 38), "receding": u(14, 20), "bald": u(8, 14)}.get(_STYLES[style], u(17, 27))
        brow_dark = u(0.45, 0.95)
        brow = np.clip(hair * brow_dark + skin * (1 - brow_dark) * 0.35, 10, 230)
        if _STYLES[style] == "bald" or hair.mean() > 150:
            brow = np.clip(skin * u(0.35, 0.65), 10, 200)
        lip_mix = u(0.25, 0.6)
        lip_tone = np.array([196, 72, 84]) if u() < 0.8 else np.array([150, 20, 50])
        lip = skin * (1 - lip_mix) + lip_tone * lip_mix - u(0, 25)
        beard = 0 if female_ish else int(rng.choice(4, p=[0.45, 0.2, 0.22, 0.13]))
        n_moles = int(rng.choice(4, p=[0.35, 0.35, 0.2, 0.1]))
        moles = []
        for _ in range(n_moles):
            side = rng.choice([-1.0, 1.0])
            moles.append((56.0 + side * u(8, 30), u(30, 100), u(0.8, 1.6)))
        glasses = int(rng.choice(3, p=[0.6, 0.2, 0.2]))
        return cls(
            landmarks=tuple(float(v) for v in lm.ravel()),
            skin=_color(skin),
            face_w=u(35.0, 45.0),
            face_top=u(-6.0, 4.0),
            chin_y=u(105.0, 113.0),
            jaw_square=u(1.9, 3.6),
            jaw_taper=u(0.0, 0.35),
            ear_size=u(0.8, 1.25),
            ear_y=u(58.0, 68.0),
            hair=_color(hair),
            hair_style=style,
            hairline=hairline,
            hair_volume=u(2.0, 11.0),
            hair_long=bool(u() < (0.7 if female_ish else 0.12)) and _STYLES[style] != "bald",
            sideburn=u(45.0, 72.0),
            part=u(-1.0, 1.0),
            brow_color=_color(brow),
            brow_thick=u(1.4, 4.2),
            brow_arch=u(0.5, 4.5),
            brow_tilt=u(-2.5, 3.5),
            brow_gap=u(7.0, 12.0),
            eye_w=u(13.5, 18.0),
            eye_h=u(4.6, 7.4),
            eye_tilt=u(-2.0, 2.5),
            iris=_color(_IRIS[rng.integers(len(_IRIS))] + rng.uniform(-12, 12, 3)),
            iris_r=u(2.9, 4.0),
            nose_w=u(10.0, 19.0),
            nose_len=u(10.0, 20.0),
            lip_color=_color(np.clip(lip, 20, 240)),
            lip_upper=u(1.8, 4.5),
            lip_lower=u(2.5, 6.5),
            beard=beard,
            beard_color=_color(hair * u(0.8, 1.0)),
            beard_top=u(74.0, 84.0),
            moustache=bool(not female_ish and u() < 0.35),
            glasses=glasses,
            glasses_color=_color(_FRAMES[rng.integers(len(_FRAMES))]),
            glasses_size=u(0.9, 1.15),
            glasses_tint=u(0.0, 0.5) if u() < 0.25 else 0.0,
            moles=tuple(moles),
            blush=u(0.0, 0.25),
        )


def _color(c: Iterable[float]) -> Color:
    r, g, b = (float(round(v, 2)) for v in c)
    return (r, g, b)


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
        self.m = _SS * scale * np.array([[c, -s], [s, c]])
        self.t = _SS * (_CENTER + shift) - self.m @ _CENTER + (_SS - 1) / 2.0
        self.k = _SS * scale
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
    style = _STYLES[idn.hair_style]
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
    style = _STYLES[idn.hair_style]
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


def _background(rng: np.random.Generator) -> Image.Image:
    """A low-frequency background at 2x: a bilinear blow-up of a random 3x3 grid of related colours."""
    grey = rng.uniform(30, 225)
    base = grey + (rng.uniform(20, 235, 3) - grey) * rng.uniform(0.1, 0.6)
    grid = np.clip(base + rng.normal(0, 22, (3, 3, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(grid).resize((56, 56), Image.BILINEAR).resize((SIZE * _SS, SIZE * _SS), Image.NEAREST)


def _noise_bank() -> np.ndarray:
    global _NOISE
    if _NOISE is None:
        _NOISE = np.random.default_rng(20240607).standard_normal((256, 256, 3), dtype=np.float32)
    return _NOISE


_NOISE: np.ndarray | None = None
# light-gradient coordinates in -1..1, laid out as rows of 112*3 values (RGB interleaved) for fast arithmetic
_YY3, _XX3 = (np.repeat(g, 3, axis=1) for g in np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) / np.float32(SIZE / 2) - 1)


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


def draw_face(identity: FaceIdentity, rng: np.random.Generator) -> np.ndarray:
    """One image of ``identity`` with this image's pose, expression, light, background and noise from ``rng``.

    Returns a (112, 112, 3) uint8 RGB array aligned to the ArcFace template (before JPEG encoding).
    """
    idn = identity
    lm = np.asarray(idn.landmarks, dtype=np.float64).reshape(5, 2)
    angle = np.deg2rad(rng.normal(0.0, 2.5))
    scale = 1.0 + rng.uniform(-0.05, 0.05)
    shift = rng.uniform(-2.5, 2.5, 2)
    smile = float(rng.uniform(0, 1.6)) if rng.random() < 0.45 else 0.0
    mouth_open = float(rng.uniform(0.2, 1.0)) if rng.random() < 0.25 else 0.0
    blink = float(rng.uniform(0.5, 1.0)) if rng.random() < 0.12 else float(rng.uniform(0.0, 0.2))
    brow_raise = float(rng.uniform(0.5, 2.5)) if rng.random() < 0.25 else 0.0
    gaze = rng.uniform(-0.9, 0.9, 2) * (1.0, 0.5)

    img = _background(rng)
    draw = ImageDraw.Draw(img)
    # clutter: a few shapes behind the head
    for _ in range(int(rng.integers(0, 4))):
        x0, y0 = rng.uniform(-20, SIZE * _SS, 2)
        w, h = rng.uniform(20, 120, 2)
        col = tuple(int(v) for v in np.clip(rng.uniform(30, 225) + rng.normal(0, 35, 3), 0, 255))
        if rng.random() < 0.5:
            draw.rectangle((x0, y0, x0 + w, y0 + h), fill=col)
        else:
            draw.ellipse((x0, y0, x0 + w, y0 + h), fill=col)
    p = _Painter(draw, angle, scale, shift)
    back, head, brows, glasses = _static_geometry(idn)
    p.paint(back)
    neck_w = idn.face_w * 0.62
    cloth = _Shapes()
    shirt = np.array(
        [[-20.0, 112.0], [56 - neck_w * 0.9, 106.0], [56.0, 118.0], [56 + neck_w * 0.9, 106.0],
         [132.0, 112.0], [132.0, 140.0], [-20.0, 140.0]]
    )  # fmt: skip
    cloth.poly(shirt, tuple(int(v) for v in rng.integers(10, 240, 3)))
    p.paint(cloth.group())
    p.paint(head)
    p.paint(brows, dy=-brow_raise)
    face = _Shapes()
    _draw_eyes(face, idn, lm, blink, gaze)
    _draw_mouth(face, idn, lm, smile, mouth_open)
    p.paint(face.group())
    p.paint(glasses)

    # 2x2 box average (the anti-aliasing of supersampling), optional slight blur, then light: brightness,
    # contrast, colour cast, a directional gradient (one multiplier per row of 112*3 values), sensor noise
    x = np.asarray(img.reduce(_SS), dtype=np.float32)
    if rng.random() < 0.4:
        x = _blur(x, float(rng.uniform(0.08, 0.25)))
    contrast = rng.uniform(0.8, 1.15)
    gain = rng.uniform(0.8, 1.15) * contrast * (1.0 + rng.uniform(-0.07, 0.07, 3))
    offset = (1.0 - contrast) * 128.0 + rng.uniform(-12, 12)
    theta = rng.uniform(0, 2 * np.pi)
    g = rng.uniform(0.0, 0.3)
    light = np.float32(g * np.cos(theta)) * _XX3 + np.float32(g * np.sin(theta)) * _YY3 + np.float32(1.0)
    light *= np.tile(gain.astype(np.float32), SIZE)
    oy, ox = rng.integers(0, 256 - SIZE, 2)
    noise = _noise_bank()[oy : oy + SIZE, ox : ox + SIZE].reshape(SIZE, 3 * SIZE) * np.float32(rng.uniform(1.0, 6.0))
    noise += np.float32(offset)
    x = x.reshape(SIZE, 3 * SIZE)
    x *= light
    x += noise
    x = x.reshape(SIZE, SIZE, 3)
    return np.clip(x, 0, 255, out=x).astype(np.uint8)


def _blur(x: np.ndarray, a: float) -> np.ndarray:
    """Separable 3-tap blur [a, 1-2a, a] (edges replicated), much cheaper than PIL's filters at this size."""
    a32 = np.float32(a)
    for axis in (0, 1):
        y = x * np.float32(1.0 - 2.0 * a)
        lo = [slice(None)] * 3
        hi = [slice(None)] * 3
        lo[axis], hi[axis] = slice(None, -1), slice(1, None)
        y[tuple(hi)] += a32 * x[tuple(lo)]
        y[tuple(lo)] += a32 * x[tuple(hi)]
        first, last = [slice(None)] * 3, [slice(None)] * 3
        first[axis], last[axis] = slice(0, 1), slice(-1, None)
        y[tuple(first)] += a32 * x[tuple(first)]
        y[tuple(last)] += a32 * x[tuple(last)]
        x = y
    return x


def render_jpeg(identity: FaceIdentity, rng: np.random.Generator) -> bytes:
    """``draw_face`` then JPEG-encode with a quality drawn from [70, 95]: one record's image bytes."""
    arr = draw_face(identity, rng)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=int(rng.integers(70, 96)))
    return buf.getvalue()


def identity_rng(seed: int, i: int) -> np.random.Generator:
    """The generator of identity ``i``'s traits."""
    return np.random.default_rng([seed, _TAG_IDENTITY, i])


def image_rng(seed: int, i: int, k: int) -> np.random.Generator:
    """The generator of image ``k`` of identity ``i``."""
    return np.random.default_rng([seed, _TAG_IMAGE, i, k])


def make_identity(seed: int, i: int) -> FaceIdentity:
    """Identity ``i`` of the dataset made with ``seed``."""
    return FaceIdentity.sample(identity_rng(seed, i))


def render(seed: int, i: int, k: int) -> bytes:
    """JPEG bytes of image ``k`` of identity ``i`` (depends only on seed, i, k)."""
    return render_jpeg(make_identity(seed, i), image_rng(seed, i, k))


def _render_many(seed: int, jobs: list[tuple[int, int]]) -> list[bytes]:
    cache: dict[int, FaceIdentity] = {}
    out = []
    for i, k in jobs:
        if i not in cache:
            cache[i] = make_identity(seed, i)
        out.append(render_jpeg(cache[i], image_rng(seed, i, k)))
    return out


def _ordered_map(fn: Callable, args: list, workers: int) -> Iterator:
    """``map(fn, args)`` in order, on a process pool when ``workers > 1``, with a bounded number in flight."""
    if workers <= 1:
        for a in args:
            yield fn(*a)
        return
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        pending: deque[Future] = deque()
        it = iter(args)
        for a in it:
            pending.append(pool.submit(fn, *a))
            if len(pending) >= 4 * workers:
                break
        while pending:
            yield pending.popleft().result()
            for a in it:
                pending.append(pool.submit(fn, *a))
                break


def plan_pairs(seed: int, first: int, count: int, pairs: int) -> tuple[list[tuple[int, int]], np.ndarray]:
    """Identities of each verification pair among ``first .. first+count-1`` and the issame flags."""
    rng = np.random.default_rng([seed, _TAG_PAIRS])
    issame = rng.permutation(np.arange(pairs) < pairs // 2)
    who = []
    for same in issame:
        a = int(rng.integers(count))
        b = a if same else (a + 1 + int(rng.integers(count - 1))) % count
        who.append((first + a, first + b))
    return who, issame


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_synth(
    out: str | Path,
    identities: int = 200,
    images_per_identity: int = 40,
    pairs: int = 1000,
    seed: int = 0,
    workers: int = 1,
    progress: bool = True,
) -> dict:
    """Write the synthetic dataset to ``out``: train.rec/.idx/property (layout A), synth.bin, synth_meta.json.

    Returns a summary: records (training images), identities, pairs, seconds, images_per_s (every image
    rendered, training and verification, over the wall time of the whole call).
    """
    if identities < 1 or images_per_identity < 1 or pairs < 2 or workers < 1:
        raise ValueError("identities and images_per_identity must be >= 1, pairs >= 2, workers >= 1")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    n_ids, per_id = identities, images_per_identity
    n_img = n_ids * per_id
    held_count = max(50, pairs // 10)
    held = list(range(n_ids, n_ids + held_count))
    who, issame = plan_pairs(seed, n_ids, held_count, pairs)

    per_chunk = max(1, 512 // per_id)
    train_chunks = [
        (seed, [(i, k) for i in range(i0, min(n_ids, i0 + per_chunk)) for k in range(per_id)])
        for i0 in range(0, n_ids, per_chunk)
    ]
    pair_jobs = [(i, 2 * p + j) for p, ids in enumerate(who) for j, i in enumerate(ids)]
    pair_chunks = [(seed, pair_jobs[s : s + 512]) for s in range(0, len(pair_jobs), 512)]

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n_img + len(pair_jobs), unit="img", desc="synth", disable=None)
    t0 = time.perf_counter()
    results = _ordered_map(_render_many, train_chunks + pair_chunks, workers)
    key = 1
    with RecordIOWriter(out / "train.rec", out / "train.idx") as writer:
        for _ in train_chunks:
            got = next(results)
            for jpeg in got:
                writer.write(key, pack_payload(float((key - 1) // per_id), jpeg, id=key, id2=0))
                key += 1
            if bar is not None:
                bar.update(len(got))
        for c in range(n_ids):
            rk = n_img + 1 + c
            writer.write(rk, pack_payload([1 + c * per_id, 1 + (c + 1) * per_id], b"", id=rk, id2=0))
        writer.write(0, pack_payload([n_img + 1, n_img + n_ids + 1], b"", id=0, id2=1))
    bin_images: list[bytes] = []
    for _ in pair_chunks:
        got = next(results)
        bin_images.extend(got)
        if bar is not None:
            bar.update(len(got))
    if bar is not None:
        bar.close()
    write_bin(out / "synth.bin", bin_images, issame)
    _write_atomic(out / "property", f"{n_ids},{SIZE},{SIZE}\n".encode())
    seconds = time.perf_counter() - t0
    total = n_img + len(bin_images)
    summary = {
        "records": n_img,
        "identities": n_ids,
        "pairs": pairs,
        "seconds": round(seconds, 3),
        "images_per_s": round(total / seconds, 1) if seconds > 0 else None,
    }
    meta = {
        "format": "insightface-layout-A",
        "arguments": {"identities": n_ids, "images_per_identity": per_id, "pairs": pairs, "seed": seed},
        "records": n_img,
        "identities": n_ids,
        "image_size": [SIZE, SIZE],
        "template": TEMPLATE.tolist(),
        "pairs": pairs,
        "positive_pairs": int(issame.sum()),
        "heldout_rule": "identities C .. C+E-1 with E = max(50, pairs // 10); pair p uses images 2p, 2p+1",
        "heldout_identities": held,
    }
    _write_atomic(out / "synth_meta.json", (json.dumps(meta, indent=1) + "\n").encode())
    return summary


def contact_sheet(seed: int = 0, identities: int = 8, images: int = 8, first: int = 0) -> Image.Image:
    """A grid of faces: one row per identity, ``images`` images of it per row (for docs and eyeballing)."""
    sheet = Image.new("RGB", (images * SIZE, identities * SIZE))
    for r in range(identities):
        for c in range(images):
            jpeg = render(seed, first + r, c)
            sheet.paste(Image.open(io.BytesIO(jpeg)).convert("RGB"), (c * SIZE, r * SIZE))
    return sheet


__all__ = [
    "FaceIdentity",
    "TEMPLATE",
    "contact_sheet",
    "draw_face",
    "make_identity",
    "plan_pairs",
    "render",
    "render_jpeg",
    "write_synth",
]

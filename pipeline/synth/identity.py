"""Who a synthetic person is: the frozen traits of one identity and the seeded generators of the dataset.

Every identity is a frozen set of strong, stable traits (face shape, skin tone, hair colour and style, brows, eyes,
nose, lips, ears, beard, glasses, moles) in the coordinates of the ArcFace 112x112 template. Identity ``i``'s traits
come from ``default_rng([seed, 1, i])`` and its image ``k`` from ``default_rng([seed, 2, i, k])`` (the middle word
keeps the streams apart; 3 is the verification pairs'), so the output does not depend on the number of workers.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from facetool.pipeline.template import TEMPLATE, TEMPLATE_SIZE

#: Synthetic faces are drawn at the template's own size.
SIZE = TEMPLATE_SIZE
_TAG_IDENTITY, _TAG_IMAGE = 1, 2

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

#: Hair styles (top of the head): how the hairline runs over the forehead.
STYLES = ("short", "fringe", "side_part", "receding", "bald", "buzz", "widow_peak", "curly")


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
    hair_style: int  # index into STYLES
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
        f = _first_draws(rng)
        return cls(
            landmarks=tuple(float(v) for v in f.lm.ravel()),
            skin=_color(f.skin),
            face_w=u(35.0, 45.0),
            face_top=u(-6.0, 4.0),
            chin_y=u(105.0, 113.0),
            jaw_square=u(1.9, 3.6),
            jaw_taper=u(0.0, 0.35),
            ear_size=u(0.8, 1.25),
            ear_y=u(58.0, 68.0),
            hair=_color(f.hair),
            hair_style=f.style,
            hairline=f.hairline,
            hair_volume=u(2.0, 11.0),
            hair_long=bool(u() < (0.7 if f.female_ish else 0.12)) and STYLES[f.style] != "bald",
            sideburn=u(45.0, 72.0),
            part=u(-1.0, 1.0),
            brow_color=_color(f.brow),
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
            lip_color=_color(np.clip(f.lip, 20, 240)),
            lip_upper=u(1.8, 4.5),
            lip_lower=u(2.5, 6.5),
            beard=f.beard,
            beard_color=_color(f.hair * u(0.8, 1.0)),
            beard_top=u(74.0, 84.0),
            moustache=bool(not f.female_ish and u() < 0.35),
            glasses=f.glasses,
            glasses_color=_color(_FRAMES[rng.integers(len(_FRAMES))]),
            glasses_size=u(0.9, 1.15),
            glasses_tint=u(0.0, 0.5) if u() < 0.25 else 0.0,
            moles=tuple(f.moles),
            blush=u(0.0, 0.25),
        )


class _FirstDraws(NamedTuple):
    lm: np.ndarray
    skin: np.ndarray
    hair: np.ndarray
    style: int
    female_ish: bool
    hairline: float
    brow: np.ndarray
    lip: np.ndarray
    beard: int
    moles: list[tuple[float, float, float]]
    glasses: int


def _first_draws(rng: np.random.Generator) -> _FirstDraws:
    """The identity's first draws (landmarks, colours, style, beard, moles, glasses), in their fixed order; the
    traits that depend on them are derived here too."""
    u = rng.uniform
    lm = TEMPLATE + rng.uniform(-1.2, 1.2, size=(5, 2))
    lm[1, 1] = TEMPLATE[1, 1] + np.clip(lm[0, 1] - TEMPLATE[0, 1] + u(-0.4, 0.4), -1.2, 1.2)  # level eyes
    j = int(rng.integers(len(_SKIN) - 1))
    skin = _SKIN[j] + (_SKIN[j + 1] - _SKIN[j]) * u() + rng.uniform(-10, 10, 3) * np.array([1.0, 0.8, 0.8])
    skin = np.clip(skin, 30, 255)
    hair = _HAIR[rng.choice(len(_HAIR), p=_HAIR_P / _HAIR_P.sum())] + rng.uniform(-14, 14, 3)
    hair = np.clip(hair, 8, 245)
    style = int(rng.integers(len(STYLES)))
    female_ish = u() < 0.5
    hairline = {"fringe": u(30, 38), "receding": u(14, 20), "bald": u(8, 14)}.get(STYLES[style], u(17, 27))
    brow_dark = u(0.45, 0.95)
    brow = np.clip(hair * brow_dark + skin * (1 - brow_dark) * 0.35, 10, 230)
    if STYLES[style] == "bald" or hair.mean() > 150:
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
    return _FirstDraws(lm, skin, hair, style, female_ish, hairline, brow, lip, beard, moles, glasses)


def _color(c: Iterable[float]) -> Color:
    r, g, b = (float(round(v, 2)) for v in c)
    return (r, g, b)


def identity_rng(seed: int, i: int) -> np.random.Generator:
    """The generator of identity ``i``'s traits."""
    return np.random.default_rng([seed, _TAG_IDENTITY, i])


def image_rng(seed: int, i: int, k: int) -> np.random.Generator:
    """The generator of image ``k`` of identity ``i``."""
    return np.random.default_rng([seed, _TAG_IMAGE, i, k])


def make_identity(seed: int, i: int) -> FaceIdentity:
    """Identity ``i`` of the dataset made with ``seed``."""
    return FaceIdentity.sample(identity_rng(seed, i))

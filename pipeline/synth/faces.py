"""One synthetic face image: background and clutter, the painted face, then light, blur, noise and JPEG.

The face is painted at 2x (``draw.py``), then averaged 2x2 down to 112 (supersampling anti-aliasing; a LANCZOS
resize would cost 15x as much); every image adds its own pose, expression, lighting, background, noise, blur and
JPEG quality, all from the image's generator in a fixed order.
"""

from __future__ import annotations

import io
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

from facetool.pipeline.synth.draw import SUPERSAMPLE, Pose, paint_face
from facetool.pipeline.synth.identity import SIZE, FaceIdentity, image_rng, make_identity

# light-gradient coordinates in -1..1, laid out as rows of 112*3 values (RGB interleaved) for fast arithmetic
_YY3, _XX3 = (np.repeat(g, 3, axis=1) for g in np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) / np.float32(SIZE / 2) - 1)


@lru_cache(maxsize=1)
def _noise_bank() -> np.ndarray:
    """Sensor noise to crop from (one fixed bank per process: a crop per image is much cheaper than a draw)."""
    return np.random.default_rng(20240607).standard_normal((256, 256, 3), dtype=np.float32)


def _background(rng: np.random.Generator) -> Image.Image:
    """A low-frequency background at 2x: a bilinear blow-up of a random 3x3 grid of related colours."""
    grey = rng.uniform(30, 225)
    base = grey + (rng.uniform(20, 235, 3) - grey) * rng.uniform(0.1, 0.6)
    grid = np.clip(base + rng.normal(0, 22, (3, 3, 3)), 0, 255).astype(np.uint8)
    canvas = SIZE * SUPERSAMPLE
    return Image.fromarray(grid).resize((56, 56), Image.BILINEAR).resize((canvas, canvas), Image.NEAREST)


def _clutter(draw: ImageDraw.ImageDraw, rng: np.random.Generator) -> None:
    """A few shapes behind the head."""
    for _ in range(int(rng.integers(0, 4))):
        x0, y0 = rng.uniform(-20, SIZE * SUPERSAMPLE, 2)
        w, h = rng.uniform(20, 120, 2)
        col = tuple(int(v) for v in np.clip(rng.uniform(30, 225) + rng.normal(0, 35, 3), 0, 255))
        if rng.random() < 0.5:
            draw.rectangle((x0, y0, x0 + w, y0 + h), fill=col)
        else:
            draw.ellipse((x0, y0, x0 + w, y0 + h), fill=col)


def draw_face(identity: FaceIdentity, rng: np.random.Generator) -> np.ndarray:
    """One image of ``identity`` with this image's pose, expression, light, background and noise from ``rng``.

    Returns a (112, 112, 3) uint8 RGB array aligned to the ArcFace template (before JPEG encoding).
    """
    pose = Pose.sample(rng)
    img = _background(rng)
    draw = ImageDraw.Draw(img)
    _clutter(draw, rng)
    paint_face(draw, identity, pose, shirt=tuple(int(v) for v in rng.integers(10, 240, 3)))
    return _develop(img, rng)


def _develop(img: Image.Image, rng: np.random.Generator) -> np.ndarray:
    """2x2 box average (the anti-aliasing of supersampling), optional slight blur, then light: brightness,
    contrast, colour cast, a directional gradient (one multiplier per row of 112*3 values), sensor noise."""
    x = np.asarray(img.reduce(SUPERSAMPLE), dtype=np.float32)
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


def render(seed: int, i: int, k: int) -> bytes:
    """JPEG bytes of image ``k`` of identity ``i`` (depends only on seed, i, k)."""
    return render_jpeg(make_identity(seed, i), image_rng(seed, i, k))

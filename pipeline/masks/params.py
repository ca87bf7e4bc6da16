"""What the renderer is asked for and what it reports: the kinds' weights (defaults, parsing, normalising) and the
parameters drawn for one masked image."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

import numpy as np

from facetool.pipeline.errors import FacetoolError
from facetool.pipeline.masks.sprites import BLUR_LEVELS, KINDS

#: Default share of each kind (loosely InsightFace's 0.4/0.4/0.1/0.1 colour mix, spread over four shapes).
DEFAULT_WEIGHTS: dict[str, float] = {"surgical": 0.5, "kn95": 0.2, "n95": 0.15, "cloth": 0.15}


@dataclass(frozen=True)
class MaskParams:
    """What was drawn for one image (all plain values, JSON-ready with ``to_dict``)."""

    kind: str
    variant: int
    flip: bool
    shift: tuple[int, int]  # (dx, dy) pixels
    color: tuple[float, float, float]
    second_color: tuple[float, float, float]
    strap_color: tuple[float, float, float]
    light: tuple[float, float, float]
    ambient: float
    shadow: float
    noise_sigma: float
    blur: float  # Gaussian sigma of the mask's edges and detail, pixels
    exposure: float
    cast: tuple[float, float, float]
    geometry: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """The parameters as plain JSON-ready values."""
        return asdict(self)


class MaskResult:
    """A masked face: ``image`` (H, W, 3) uint8, ``region`` (H, W) bool (the pixels the mask or its straps cover
    at least half), and ``params`` (:class:`MaskParams`, built on first access: the JPEG path never needs it)."""

    __slots__ = ("image", "_alpha", "_region", "_raw", "_params")

    def __init__(self, image: np.ndarray, alpha: np.ndarray, raw: tuple) -> None:
        self.image, self._alpha, self._raw = image, alpha, raw  # alpha: the mask's coverage of the rows it touches
        self._region = self._params = None

    @property
    def region(self) -> np.ndarray:
        """(H, W) bool: the pixels the mask or its straps cover at least half."""
        if self._region is None:
            h, w, _ = self.image.shape
            self._region = np.zeros((h, w), dtype=bool)
            self._region[h - self._alpha.shape[0] :] = self._alpha > 0.5
        return self._region

    @property
    def params(self) -> MaskParams:
        """What was drawn for this image, in image coordinates (a mirrored mask's shift and light mirrored)."""
        if self._params is None:
            p, an, geometry, dx, dy = self._raw
            lx, ly, lz = p["light"]
            flip = p["flip"]
            r = {
                **p,
                "shift": (-dx if flip else dx, dy),
                "light": (-lx if flip else lx, ly, lz),  # in image coordinates
                "sigma": an.sigma,
                "level": an.level,
                "exposure": an.exposure,
                "cast": an.cast,
                "geometry": geometry,
            }
            self._params = MaskParams(
                kind=r["kind"],
                variant=r["variant"],
                flip=r["flip"],
                shift=r["shift"],
                color=tuple(round(float(c), 1) for c in r["colors"][0]),
                second_color=tuple(round(float(c), 1) for c in r["colors"][1]),
                strap_color=tuple(round(float(c), 1) for c in r["colors"][2]),
                light=tuple(round(float(c), 4) for c in r["light"]),
                ambient=round(r["ambient"], 4),
                shadow=round(r["shadow"], 4),
                noise_sigma=round(r["sigma"], 3),
                blur=BLUR_LEVELS[r["level"]],
                exposure=round(r["exposure"], 4),
                cast=tuple(round(float(c), 4) for c in r["cast"]),
                geometry=dict(r["geometry"]),
            )
        return self._params


def normalise_weights(weights: Mapping[str, float] | None = None) -> dict[str, float]:
    """Kind weights as probabilities in ``KINDS`` order (missing kinds get 0); ``None`` gives the defaults."""
    if weights is None:
        weights = DEFAULT_WEIGHTS
    unknown = sorted(set(weights) - set(KINDS))
    if unknown:
        raise FacetoolError(f"unknown mask kind(s) {', '.join(unknown)}; expected some of {', '.join(KINDS)}")
    try:
        values = [float(weights.get(k, 0.0)) for k in KINDS]
    except (TypeError, ValueError):
        raise FacetoolError(f"mask weights must be numbers, got {dict(weights)}") from None
    if any(not math.isfinite(v) or v < 0 for v in values) or sum(values) <= 0:
        raise FacetoolError(f"mask weights must be non-negative with a positive sum, got {dict(weights)}")
    total = sum(values)
    return {k: v / total for k, v in zip(KINDS, values, strict=True)}


#: :data:`DEFAULT_WEIGHTS` as probabilities in ``KINDS`` order.
DEFAULT_PROBABILITIES = normalise_weights(DEFAULT_WEIGHTS)


def parse_weights(text: str) -> dict[str, float]:
    """``"surgical=0.5,kn95=0.2,n95=0.15,cloth=0.15"`` -> normalised weights (for the command line)."""
    out: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        try:
            if not sep:
                raise ValueError
            out[name.strip().lower()] = float(value)
        except ValueError:
            raise FacetoolError(f"mask weights: expected KIND=WEIGHT[,KIND=WEIGHT...], got {part!r}") from None
    return normalise_weights(out)

"""Which samples get a mask, and the number a sample's key stands for: decided by hashes of (seed, key) alone, so
the choice does not depend on shard layout, worker count or order."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

from facetool.pipeline.errors import FacetoolError

_TAG_SELECT = 0x5E1EC7


def key_number(key: int | str) -> int:
    """A non-negative integer for a sample key (ints as they are; strings by a stable hash)."""
    if isinstance(key, int | np.integer):
        if key < 0:
            raise FacetoolError(f"mask keys must be >= 0, got {key}")
        return int(key)
    return int.from_bytes(hashlib.sha256(str(key).encode()).digest()[:8], "little")


def _mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, vectorised (wrapping uint64 arithmetic)."""
    z = z + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def select_masked(keys: Sequence[int] | np.ndarray, fraction: float, seed: int = 0) -> np.ndarray:
    """Which of ``keys`` get a masked twin: each key independently with probability ``fraction``, decided by a
    hash of (seed, key), so the choice does not depend on shard layout, worker count or order."""
    if not 0.0 <= fraction <= 1.0:
        raise FacetoolError(f"mask fraction must be in [0, 1], got {fraction}")
    keys = np.atleast_1d(np.asarray(keys, dtype=np.uint64))
    if fraction == 0.0:
        return np.zeros(keys.shape, dtype=bool)
    if fraction == 1.0:
        return np.ones(keys.shape, dtype=bool)
    with np.errstate(over="ignore"):
        salt = _mix64(np.array([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64) ^ np.uint64(_TAG_SELECT))
        u = (_mix64(keys ^ salt) >> np.uint64(11)).astype(np.float64) * 2.0**-53
    return u < fraction

"""Epoch rules shared by both loaders: how many batches a rank yields, and how seeds are derived."""

from __future__ import annotations

import numpy as np


def derive_seed(*parts: int) -> int:
    """A 31-bit seed mixed from integers (seed, purpose, epoch, rank, ...); DALI seeds are int32."""
    h = 0x345678
    for p in parts:
        h = (h * 1_000_003 ^ (p & 0xFFFFFFFF)) & 0xFFFFFFFFFFFF
    return h % (2**31 - 1)


def tar_order(count: int, seed: int, epoch: int) -> list[int]:
    """The order in which every rank's reader takes the ``count`` tar files in ``epoch`` (both loaders)."""
    return np.random.default_rng(derive_seed(seed, 2, epoch)).permutation(count).tolist()


def batches_per_epoch(samples: int, world_size: int, batch_size: int, last_batch: str) -> int:
    """Batches each rank yields per epoch: ceil(largest part / B) under "partial", floor(smallest part / B) under
    "drop". The parts are the contiguous cuts of the samples over the ranks (DALI's reader cuts them so: part k
    is ``[k * N // W, (k + 1) * N // W)``), so they differ by at most one sample."""
    largest, smallest = -(-samples // world_size), samples // world_size
    if last_batch == "partial":
        return -(-largest // batch_size)
    return smallest // batch_size

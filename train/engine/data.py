"""What the engine trains on: the shard loaders of :mod:`facetool.train.data`, or synthetic batches.

The synthetic source (``data.source = "synthetic"``) measures the model-only step rate (no decoding): a pool of
P = 64 smooth random images, already on the device. Its batches depend only on the step and the global row, not
on the number of ranks: global row i of step k is image ``pool[(k * G + i) % P]`` with label hash(k * G + i) mod
classes, and rank r takes rows [r B, (r + 1) B). A run on W ranks of batch B therefore sees exactly the batches
of one process of batch W B.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from facetool.train.data import Batch

_POOL = 64


class SyntheticLoader:
    """Epochs of ``samples // (W B)`` synthetic batches; ``loader.epoch`` selects the epoch, as for the shards."""

    def __init__(
        self, samples: int, classes: int, batch_size: int, rank: int, world_size: int, seed: int, device: torch.device
    ) -> None:
        self.batch_size, self.rank, self.world_size, self.classes = batch_size, rank, world_size, classes
        self.global_batch = batch_size * world_size
        self.steps = max(1, samples // self.global_batch)
        gen = torch.Generator().manual_seed(seed)
        # smooth random images (14x14 noise, bilinearly enlarged), not per-pixel noise: on the CPU a network's
        # step on noise is ~10% slower than on faces (its activations' signs flip from pixel to pixel), while on
        # smooth images it is within a few per cent of faces, so the model-only rate stays an upper bound
        coarse = torch.rand(_POOL, 3, 14, 14, generator=gen) * 2 - 1
        pool = torch.nn.functional.interpolate(coarse, size=(112, 112), mode="bilinear", align_corners=False)
        self.pool = pool.to(device)
        self.device = device
        self.epoch = 0

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[Batch]:
        for k in range(self.steps):
            start = (self.epoch * self.steps + k) * self.global_batch + self.rank * self.batch_size
            rows = torch.arange(start, start + self.batch_size, dtype=torch.int64)
            labels = (rows * 2654435761) % 4294967296 % self.classes
            yield Batch(
                self.pool[rows % _POOL].to(self.device),
                labels.to(self.device),
                torch.zeros(self.batch_size, dtype=torch.bool, device=self.device),
            )
        self.epoch += 1

"""What a training loader yields."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from facetool.train.data.config import LoaderConfig


class Batch(NamedTuple):
    """One batch on the training device: images (N, 3, H, W) float32/float16 in [-1, 1] ((x - 127.5) / 127.5,
    RGB), labels (N,) int64 class ids, masked (N,) bool (True where the masked twin was shown)."""

    images: torch.Tensor
    labels: torch.Tensor
    masked: torch.Tensor


def empty_batch(config: LoaderConfig, device: torch.device | str = "cpu") -> Batch:
    """A batch of no samples, of ``config``'s image size and dtype: what a rank yields when its part of an epoch
    ran out before the other ranks', so every rank takes the same number of steps."""
    S = config.image_size
    images = torch.empty((0, 3, S, S), dtype=getattr(torch, config.dtype), device=device)
    empty = [torch.empty(0, dtype=kind, device=device) for kind in (torch.int64, torch.bool)]
    return Batch(images, *empty)


def move_batch(batch: Sequence[torch.Tensor], device: torch.device) -> Batch:
    """``batch`` on ``device`` (its tensors as they are when already there): a loader may deliver elsewhere than
    the model lives (DALI decoding on the CPU for a GPU run, say). Copies to a GPU do not block; copies from one do,
    so the CPU never reads a tensor still being copied."""
    images, labels, masked = batch
    blocking = torch.device(device).type != "cuda"
    return Batch(*(t.to(device, non_blocking=not blocking) for t in (images, labels, masked)))

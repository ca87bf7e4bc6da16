"""What a training loader yields."""

from __future__ import annotations

from typing import NamedTuple

import torch


class Batch(NamedTuple):
    """One batch on the training device: images (N, 3, H, W) float32/float16 in [-1, 1] ((x - 127.5) / 127.5,
    RGB), labels (N,) int64 class ids, masked (N,) bool (True where the masked twin was shown)."""

    images: torch.Tensor
    labels: torch.Tensor
    masked: torch.Tensor

"""Backbones for tests: images in [-1, 1] and fresh backbones whose BatchNorm statistics come from one batch."""

from __future__ import annotations

import torch
from torch import nn

from facetool.train.models import create_backbone


def images(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 112, 112, generator=g) * 2 - 1


def calibrated(name: str, **options) -> nn.Module:
    """A fresh backbone whose BatchNorm statistics come from one batch, so its embeddings are of order 1
    (a fresh IResNet's default running statistics overflow) and a 1e-4 tolerance means something."""
    torch.manual_seed(0)
    model = create_backbone(name, **options)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = None  # running statistics = this batch's
    model.train()
    with torch.no_grad():
        model(images(4, seed=1), torch.tensor([False, True, False, True]))
    return model.eval()

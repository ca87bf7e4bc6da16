"""IR-SE-50/100 as InsightFace_Pytorch (TreB1eN) builds them: IR units with squeeze-excitation, BN-Dropout-FC-BN."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .registry import register_backbone


class SqueezeExcite(nn.Module):
    """Channel gate: global average pool -> 1x1 conv (C/r, no bias) -> ReLU -> 1x1 conv (C) -> sigmoid."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, channels // reduction, 1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(channels // reduction, channels, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(self.fc2(self.relu(self.fc1(self.pool(x)))))


class BottleneckIRSE(nn.Module):
    """BN -> conv3x3 -> PReLU -> conv3x3 (stride) -> BN -> SE, plus a max-pool or conv1x1-BN shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        if cin == cout:
            self.shortcut: nn.Module = nn.MaxPool2d(1, stride)
        else:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        self.residual = nn.Sequential(
            nn.BatchNorm2d(cin),
            nn.Conv2d(cin, cout, 3, 1, 1, bias=False),
            nn.PReLU(cout),
            nn.Conv2d(cout, cout, 3, stride, 1, bias=False),
            nn.BatchNorm2d(cout),
            SqueezeExcite(cout, 16),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.residual(x) + self.shortcut(x)


class IRSE(nn.Module):
    """Input conv-BN-PReLU, four stages whose first unit has stride 2, then BN2d-Dropout-Flatten-Linear-BN1d."""

    uses_masked = False
    stem_weight = "input_layer.0.weight"  # the layer that sees the image's colour channels

    def __init__(self, units: tuple[int, int, int, int], embedding_size: int = 512, dropout: float = 0.6) -> None:
        super().__init__()
        self.input_layer = nn.Sequential(nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.PReLU(64))
        body = []
        cin = 64
        for cout, n in zip((64, 128, 256, 512), units, strict=True):
            body.append(BottleneckIRSE(cin, cout, 2))
            body.extend(BottleneckIRSE(cout, cout, 1) for _ in range(n - 1))
            cin = cout
        self.body = nn.Sequential(*body)
        self.output_layer = nn.Sequential(
            nn.BatchNorm2d(512),
            nn.Dropout(dropout),
            nn.Flatten(),
            nn.Linear(512 * 7 * 7, embedding_size),
            nn.BatchNorm1d(embedding_size),
        )

    def forward(self, images: Tensor, masked: Tensor | None = None) -> Tensor:
        """Embed ``images`` (N,3,112,112) in [-1,1]; ``masked`` is accepted and ignored."""
        return self.output_layer(self.body(self.input_layer(images)))


@register_backbone("irse50")
def irse50(embedding_size: int = 512, dropout: float = 0.6) -> IRSE:
    """IR-SE-50, units (3, 4, 14, 3): 43,797,696 parameters; dropout 0.6 as in InsightFace_Pytorch."""
    return IRSE((3, 4, 14, 3), embedding_size, dropout)


@register_backbone("irse100")
def irse100(embedding_size: int = 512, dropout: float = 0.6) -> IRSE:
    """IR-SE-100, units (3, 13, 30, 3): 65,502,016 parameters; dropout 0.6 as in InsightFace_Pytorch."""
    return IRSE((3, 13, 30, 3), embedding_size, dropout)

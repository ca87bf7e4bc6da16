"""IResNet-18/34/50/100/200 as InsightFace's arcface_torch builds them: same modules, same state-dict keys and
shapes, same parameter counts (deepinsight/insightface, recognition/arcface_torch/backbones/iresnet.py at commit
7fadd420c2351d0ffa8cac403421c1a3ed733365: ``iresnet18`` .. ``iresnet200``), so its released ``backbone.pth``
files load as they are."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .registry import register_backbone


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


class IBasicBlock(nn.Module):
    """Improved residual unit: BN -> conv3x3 -> BN -> PReLU -> conv3x3 (stride) -> BN, plus a shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin, eps=1e-5)
        self.conv1 = _conv3x3(cin, cout)
        self.bn2 = nn.BatchNorm2d(cout, eps=1e-5)
        self.prelu = nn.PReLU(cout)
        self.conv2 = _conv3x3(cout, cout, stride)
        self.bn3 = nn.BatchNorm2d(cout, eps=1e-5)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout, eps=1e-5)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return out + shortcut


class IResNet(nn.Module):
    """Stem (conv3x3, BN, PReLU at 112x112), four stride-2 stages (64..512 ch) and the BN-flatten-FC-BN head.

    The final BatchNorm1d keeps its weight frozen at 1 (a parameter without gradient), as arcface_torch does.
    """

    uses_masked = False
    stem_weight = "conv1.weight"  # the layer that sees the image's colour channels

    def __init__(self, layers: tuple[int, int, int, int], embedding_size: int = 512, dropout: float = 0.0) -> None:
        super().__init__()
        self.conv1 = _conv3x3(3, 64)
        self.bn1 = nn.BatchNorm2d(64, eps=1e-5)
        self.prelu = nn.PReLU(64)
        stages = []
        cin = 64
        for cout, blocks in zip((64, 128, 256, 512), layers, strict=True):
            units = [IBasicBlock(cin, cout, 2)] + [IBasicBlock(cout, cout, 1) for _ in range(blocks - 1)]
            stages.append(nn.Sequential(*units))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.bn2 = nn.BatchNorm2d(512, eps=1e-5)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(512 * 7 * 7, embedding_size)
        self.features = nn.BatchNorm1d(embedding_size, eps=1e-5)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.1)
            elif isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        self.features.weight.requires_grad_(False)

    def forward(self, images: Tensor, masked: Tensor | None = None) -> Tensor:
        """Embed ``images`` (N,3,112,112) in [-1,1]; ``masked`` is accepted and ignored."""
        x = self.prelu(self.bn1(self.conv1(images)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.bn2(x), 1)
        return self.features(self.fc(self.dropout(x)))


@register_backbone("ir18")
def ir18(embedding_size: int = 512, dropout: float = 0.0) -> IResNet:
    """IResNet-18, blocks (2, 2, 2, 2): 24,025,600 parameters at 512-d."""
    return IResNet((2, 2, 2, 2), embedding_size, dropout)


@register_backbone("ir34")
def ir34(embedding_size: int = 512, dropout: float = 0.0) -> IResNet:
    """IResNet-34, blocks (3, 4, 6, 3): 34,139,328 parameters at 512-d."""
    return IResNet((3, 4, 6, 3), embedding_size, dropout)


@register_backbone("ir50")
def ir50(embedding_size: int = 512, dropout: float = 0.0) -> IResNet:
    """IResNet-50, blocks (3, 4, 14, 3): 43,590,848 parameters at 512-d."""
    return IResNet((3, 4, 14, 3), embedding_size, dropout)


@register_backbone("ir100")
def ir100(embedding_size: int = 512, dropout: float = 0.0) -> IResNet:
    """IResNet-100, blocks (3, 13, 30, 3): 65,156,160 parameters at 512-d."""
    return IResNet((3, 13, 30, 3), embedding_size, dropout)


@register_backbone("ir200")
def ir200(embedding_size: int = 512, dropout: float = 0.0) -> IResNet:
    """IResNet-200, blocks (6, 26, 60, 6): 118,833,920 parameters at 512-d."""
    return IResNet((6, 26, 60, 6), embedding_size, dropout)

"""MobileFaceNet as InsightFace_Pytorch builds it, with a 512-d output: 1,200,512 parameters."""

from __future__ import annotations

from torch import Tensor, nn

from .registry import register_backbone


def _conv_bn(cin: int, cout: int, kernel: int, stride: int, groups: int = 1, act: bool = True) -> nn.Sequential:
    """Conv (no bias) -> BN -> PReLU per channel (``act``) or Conv -> BN (a linear bottleneck)."""
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2 if kernel == 3 else 0, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if act:
        layers.append(nn.PReLU(cout))
    return nn.Sequential(*layers)


class DepthWise(nn.Module):
    """Inverted bottleneck: 1x1 expand to ``width`` -> 3x3 depthwise (stride) -> linear 1x1 project."""

    def __init__(self, cin: int, cout: int, width: int, stride: int, residual: bool) -> None:
        super().__init__()
        self.residual = residual
        self.expand = _conv_bn(cin, width, 1, 1)
        self.dw = _conv_bn(width, width, 3, stride, groups=width)
        self.project = _conv_bn(width, cout, 1, 1, act=False)

    def forward(self, x: Tensor) -> Tensor:
        y = self.project(self.dw(self.expand(x)))
        return x + y if self.residual else y


def _residual(channels: int, blocks: int, width: int) -> nn.Sequential:
    return nn.Sequential(*(DepthWise(channels, channels, width, 1, True) for _ in range(blocks)))


class MobileFaceNet(nn.Module):
    """Stride-2 stem, bottleneck stages at 56/28/14/7 px, 1x1 conv to 512, 7x7 global depthwise conv,
    Linear (no bias) and BatchNorm1d."""

    uses_masked = False
    stem_weight = "conv1.0.weight"  # the layer that sees the image's colour channels

    def __init__(self, embedding_size: int = 512) -> None:
        super().__init__()
        self.conv1 = _conv_bn(3, 64, 3, 2)
        self.conv2_dw = _conv_bn(64, 64, 3, 1, groups=64)
        self.conv_23 = DepthWise(64, 64, 128, 2, False)
        self.conv_3 = _residual(64, 4, 128)
        self.conv_34 = DepthWise(64, 128, 256, 2, False)
        self.conv_4 = _residual(128, 6, 256)
        self.conv_45 = DepthWise(128, 128, 512, 2, False)
        self.conv_5 = _residual(128, 2, 256)
        self.conv_6_sep = _conv_bn(128, 512, 1, 1)
        self.conv_6_dw = _conv_bn(512, 512, 7, 1, groups=512, act=False)
        self.flatten = nn.Flatten()
        self.linear = nn.Linear(512, embedding_size, bias=False)
        self.bn = nn.BatchNorm1d(embedding_size)

    def forward(self, images: Tensor, masked: Tensor | None = None) -> Tensor:
        """Embed ``images`` (N,3,112,112) in [-1,1]; ``masked`` is accepted and ignored."""
        x = self.conv_23(self.conv2_dw(self.conv1(images)))
        x = self.conv_45(self.conv_4(self.conv_34(self.conv_3(x))))
        x = self.conv_6_dw(self.conv_6_sep(self.conv_5(x)))
        return self.bn(self.linear(self.flatten(x)))


@register_backbone("mobilefacenet")
def mobilefacenet(embedding_size: int = 512) -> MobileFaceNet:
    """MobileFaceNet, InsightFace_Pytorch's variant (512-d Linear + BN1d head): 1,200,512 parameters."""
    return MobileFaceNet(embedding_size)

"""A small plain CNN for CPU demos and tests: four stride-2 stages (16-32-64-128 channels, 3x3 conv, BN, PReLU,
one extra conv per stage after the first) to 7x7, then Linear to the embedding and BatchNorm1d. About 3.5 M
parameters, of which 3.2 M in the final Linear, and ~40 M multiply-adds per face: a few hundred training
images/s on two CPU cores, enough to learn the synthetic faces of ``facetool synth`` in minutes."""

from __future__ import annotations

from torch import Tensor, nn

from .registry import register_backbone


def _conv(cin: int, cout: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.PReLU(cout)]


class TinyNet(nn.Module):
    """Stages of (stride-2 conv [+ conv]) at 56/28/14/7 px, flatten, Linear (no bias), BatchNorm1d."""

    uses_masked = False
    stem_weight = "body.0.weight"  # the layer that sees the image's colour channels

    def __init__(self, widths: tuple[int, ...] = (16, 32, 64, 128), embedding_size: int = 512) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for i, w in enumerate(widths):
            layers += _conv(cin, w, 2)
            if i > 0:
                layers += _conv(w, w, 1)
            cin = w
        self.body = nn.Sequential(*layers)
        side = 112 // 2 ** len(widths)
        self.flatten = nn.Flatten()
        self.linear = nn.Linear(cin * side * side, embedding_size, bias=False)
        self.bn = nn.BatchNorm1d(embedding_size)

    def forward(self, images: Tensor, masked: Tensor | None = None) -> Tensor:
        """Embed ``images`` (N,3,112,112) in [-1,1]; ``masked`` is accepted and ignored."""
        return self.bn(self.linear(self.flatten(self.body(images))))


@register_backbone("tinynet")
def tinynet(embedding_size: int = 512, width: int = 16) -> TinyNet:
    """TinyNet with stage widths width x (1, 2, 4, 8) (default 16-32-64-128): for CPU demos and tests."""
    return TinyNet((width, 2 * width, 4 * width, 8 * width), embedding_size)

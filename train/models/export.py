"""ONNX export of a backbone: input ``images`` (N,3,112,112), output ``embeddings`` (N,D), dynamic batch axis.

Backbones whose output depends on the mask flag (FaceT with prompts) take a second input ``masked``: bool (N,).
"""

from __future__ import annotations

import os
import warnings

import torch
from torch import Tensor, nn

from facetool.pipeline.atomic import atomic_open

OPSET = 17


class _WithFlag(nn.Module):
    """Gives the exporter a two-input forward (images, masked)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor, masked: Tensor) -> Tensor:
        return self.model(images, masked)


class _ImagesOnly(nn.Module):
    """Gives the exporter a one-input forward (images) for backbones that ignore the mask flag."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> Tensor:
        return self.model(images)


def onnx_input_names(model: nn.Module) -> list[str]:
    """The exported graph's inputs: ``images`` plus ``masked`` when the backbone uses the flag."""
    return ["images", "masked"] if getattr(model, "uses_masked", False) else ["images"]


def export_onnx(model: nn.Module, path: str | os.PathLike, batch_size: int = 2) -> list[str]:
    """Write ``model`` (put in eval mode) to ``path`` as ONNX with TorchScript tracing; returns the input names."""
    model = model.eval()
    names = onnx_input_names(model)
    images = torch.zeros(batch_size, 3, 112, 112)
    if len(names) == 2:
        wrapper: nn.Module = _WithFlag(model)
        args: tuple[Tensor, ...] = (images, torch.zeros(batch_size, dtype=torch.bool))
    else:
        wrapper, args = _ImagesOnly(model), (images,)
    wrapper.eval()  # the exporter restores the wrapper's mode afterwards, recursively: keep it eval
    axes = {name: {0: "batch"} for name in [*names, "embeddings"]}
    with torch.no_grad(), warnings.catch_warnings(), atomic_open(path, "wb") as f:
        warnings.simplefilter("ignore")  # tracer warnings about Python scalars that are constants here
        torch.onnx.export(
            wrapper,
            args,
            f,
            input_names=names,
            output_names=["embeddings"],
            dynamic_axes=axes,
            opset_version=OPSET,
            dynamo=False,
        )
    return names

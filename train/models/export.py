"""ONNX export of a backbone: input ``images`` (N,3,112,112), output ``embeddings`` (N,D), dynamic batch axis.

Backbones whose output depends on the mask flag (FaceT with prompts) take a second input ``masked``: bool (N,).
The graph always takes RGB (InsightFace's model-zoo convention): weights that expect BGR (``input_channels``, e.g.
imported from InsightFace_Pytorch) get the channel reversal as the graph's first operation.
"""

from __future__ import annotations

import copy
import os
import warnings
from typing import Any

import torch
from torch import Tensor, nn

from facetool.pipeline.atomic import atomic_open

from .checkpoint import load_backbone
from .state_dict import BGR, RGB

OPSET = 17


def _as_model_expects(model: nn.Module, images: Tensor) -> Tensor:
    """RGB ``images`` in the channel order ``model``'s weights expect: reversed inside the graph for BGR weights."""
    return images[:, [2, 1, 0]] if getattr(model, "input_channels", RGB) == BGR else images


class _WithFlag(nn.Module):
    """Gives the exporter a two-input forward (images, masked)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor, masked: Tensor) -> Tensor:
        return self.model(_as_model_expects(self.model, images), masked)


class _ImagesOnly(nn.Module):
    """Gives the exporter a one-input forward (images) for backbones that ignore the mask flag."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> Tensor:
        return self.model(_as_model_expects(self.model, images))


def onnx_input_names(model: nn.Module) -> list[str]:
    """The exported graph's inputs: ``images`` plus ``masked`` when the backbone uses the flag."""
    return ["images", "masked"] if getattr(model, "uses_masked", False) else ["images"]


def cpu_float_copy(model: nn.Module) -> nn.Module:
    """``model`` itself when its floating-point tensors are all float32 on the CPU, else a copy that is (the
    export traces with CPU float32 inputs); the original, on a GPU or in half precision, stays as it is. The
    tensors are copied straight to the CPU: the GPU never holds a second copy."""
    tensors = [*model.parameters(), *model.buffers()]
    if all(t.device.type == "cpu" and (t.dtype == torch.float32 or not t.is_floating_point()) for t in tensors):
        return model

    def on_cpu(t: Tensor) -> Tensor:
        return t.detach().to("cpu", torch.float32 if t.is_floating_point() else t.dtype, copy=True)

    memo: dict[int, Any] = {id(b): on_cpu(b) for b in model.buffers()}
    memo.update({id(p): nn.Parameter(on_cpu(p), requires_grad=p.requires_grad) for p in model.parameters()})
    return copy.deepcopy(model, memo)


def export_onnx(model: nn.Module, path: str | os.PathLike, batch_size: int = 2) -> list[str]:
    """Write ``model`` (put in eval mode) to ``path`` as ONNX with TorchScript tracing; returns the input names.
    A model on a GPU or in half precision is exported from a CPU float32 copy (it stays where it is)."""
    model = cpu_float_copy(model.eval())
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


def export_backbone(checkpoint: str | os.PathLike, out: str | os.PathLike, arch: str | None = None) -> dict[str, Any]:
    """``facetool export``: the backbone in ``checkpoint`` (through the one backbone-file reader; ``arch`` for a
    bare state dict) written to ``out`` as ONNX. Returns what was written: backbone, options, inputs, channels."""
    model, name, options = load_backbone(checkpoint, arch)
    inputs = export_onnx(model, out)
    return {"backbone": name, "options": options, "inputs": inputs, "input_channels": model.input_channels}

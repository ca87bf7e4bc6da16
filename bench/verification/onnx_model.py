"""ONNX face models as backbones: InsightFace's model zoo (``w600k_r50.onnx``, ``glintr100.onnx``, ...) and what
``facetool export`` writes, run by onnxruntime behind the interface the embedding code uses for torch backbones.

The conventions are those of InsightFace's ``ArcFaceONNX`` (deepinsight/insightface,
python-package/insightface/model_zoo/arcface_onnx.py @ 7fadd420c235): 112x112 RGB, NCHW, ``(x - 127.5) / 127.5``,
except for graphs converted from MXNet that normalise inside (a ``Sub``/``_minus`` and a ``Mul``/``_mul`` node
among their first eight), which take 0..255. The input's name and shape come from the graph; a fixed batch size is
met by padding the last batch. onnxruntime is imported only here (``pip install 'facetool[onnx]'``).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from facetool.pipeline.errors import FacetoolError
from facetool.train.models.state_dict import RGB

from .embed import IMAGE_SIZE


def _onnxruntime(path: str | os.PathLike) -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise FacetoolError(f"{path}: running an ONNX model needs onnxruntime (pip install 'facetool[onnx]')") from None
    return onnxruntime


def normalises_inside(path: str | os.PathLike) -> bool:
    """Whether the graph subtracts and scales by itself (MXNet-converted zoo models): then it takes 0..255."""
    import onnx

    try:
        graph = onnx.load(str(path), load_external_data=False).graph
    except Exception as err:  # a protobuf that does not parse
        raise FacetoolError(f"{path}: not an ONNX model ({type(err).__name__}: {err})") from None
    names = [node.name for node in graph.node[:8]]
    return any(n.startswith(("Sub", "_minus")) for n in names) and any(n.startswith(("Mul", "_mul")) for n in names)


class OnnxBackbone:
    """An ONNX face model with a torch backbone's interface: called with (N,3,112,112) RGB in [-1,1] (a torch
    tensor) and an optional mask flag (N,), it returns (N,D) float32 embeddings as a torch tensor."""

    def __init__(self, path: str | os.PathLike, threads: int = 0) -> None:
        self.path = str(path)
        ort = _onnxruntime(path)
        self.raw_pixels = normalises_inside(path)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(self.path, options, providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime's own exception types
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise FacetoolError(f"{path}: onnxruntime cannot load the model ({reason[:200]})") from None
        self.images, self.flag = self._inputs()
        self.output = self.session.get_outputs()[0].name
        shape = self.images.shape
        self.batch = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None
        self.dtype = np.float16 if self.images.type == "tensor(float16)" else np.float32
        self.training = False
        self.input_channels = RGB  # the model zoo's convention, and what facetool export's graphs take

    def _inputs(self) -> tuple[Any, Any]:
        """(the image input, the mask-flag input or None), checked against the conventions above."""
        inputs = self.session.get_inputs()
        images = [i for i in inputs if len(i.shape) == 4]
        flags = [i for i in inputs if len(i.shape) == 1]
        if len(images) != 1 or len(inputs) != 1 + len(flags) or len(flags) > 1:
            shown = ", ".join(f"{i.name} {i.shape}" for i in inputs)
            raise FacetoolError(f"{self.path}: expected one image input (N, 3, 112, 112) [and a mask flag (N,)], "
                                f"got {shown}")  # fmt: skip
        shape = images[0].shape
        fixed = [d for d in shape[1:] if isinstance(d, int)]
        if len(fixed) == 3 and fixed != [3, IMAGE_SIZE, IMAGE_SIZE]:
            raise FacetoolError(f"{self.path}: input {images[0].name} has shape {shape}, expected (N, 3, 112, 112)")
        if images[0].type not in ("tensor(float)", "tensor(float16)"):
            raise FacetoolError(f"{self.path}: input {images[0].name} is {images[0].type}, expected float")
        return images[0], (flags[0] if flags else None)

    @property
    def uses_masked(self) -> bool:
        """Whether the graph takes the mask flag (``facetool export`` of FaceT with prompts)."""
        return self.flag is not None

    def describe(self) -> dict[str, Any]:
        """What a report shows as the backbone's options."""
        return {"input": self.images.name, "batch": self.batch or "dynamic", "pixels": "0..255" if self.raw_pixels
                else "[-1, 1]"}  # fmt: skip

    def eval(self) -> OnnxBackbone:
        return self

    def train(self, mode: bool = True) -> OnnxBackbone:
        return self

    def to(self, device: Any) -> OnnxBackbone:
        """On ``cuda``, onnxruntime's CUDA provider when its build has one; the CPU otherwise."""
        ort = _onnxruntime(self.path)
        if str(device).startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
            self.session.set_providers(["CUDAExecutionProvider", "CPUExecutionProvider"])
        return self

    def __call__(self, images: Any, masked: Any = None) -> Any:
        import torch

        x = images.detach().float().cpu().numpy()
        if self.raw_pixels:
            x = x * 127.5 + 127.5
        x = x.astype(self.dtype, copy=False)
        flags = None
        if self.flag is not None:
            flags = np.zeros(len(x), bool) if masked is None else masked.detach().cpu().numpy().astype(bool)
        return torch.from_numpy(self.run(x, flags))

    def run(self, x: np.ndarray, flags: np.ndarray | None) -> np.ndarray:
        """Embeddings of the normalised batch ``x`` (float32), in chunks of the graph's fixed batch (the last one
        padded with zeros) or at once."""
        step = self.batch or len(x)
        out = []
        for start in range(0, len(x), step):
            chunk = x[start : start + step]
            pad = step - len(chunk)
            feed = {self.images.name: np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), chunk.dtype)])}
            if self.flag is not None:
                feed[self.flag.name] = np.concatenate([flags[start : start + step], np.zeros(pad, bool)])
            emb = np.asarray(self.session.run([self.output], feed)[0], dtype=np.float32)
            if emb.ndim != 2 or emb.shape[0] != step:
                raise FacetoolError(f"{self.path}: output {self.output} has shape {emb.shape}, expected ({step}, D)")
            out.append(emb[: len(chunk)])
        return np.concatenate(out)


__all__ = ["OnnxBackbone", "normalises_inside"]

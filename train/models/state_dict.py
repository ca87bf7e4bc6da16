"""Backbone weights that facetool did not write: a bare ``torch.save(model.state_dict())`` (the format of
arcface_torch's released ``backbone.pth``), the containers other trainers nest one in, and the colour channel order
that a backbone file records.

Nothing here builds a model or reads a file: :mod:`.checkpoint` (the one backbone-file reader) and :mod:`.layouts`
(``facetool import-model``) call these on what ``torch.load(weights_only=True)`` returned.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from facetool.pipeline.errors import FacetoolError

RGB, BGR = "rgb", "bgr"
#: The channel orders a backbone file may record (``input_channels``; absent means RGB, as in every older file).
CHANNEL_ORDERS = (RGB, BGR)
#: Keys under which other trainers nest a backbone's state dict: arcface_torch's ``checkpoint_gpu_N.pt``
#: (``state_dict_backbone``), FaceT's ``checkpoint-*.pth`` (``model``) and the common ``state_dict``.
CONTAINER_KEYS = ("state_dict_backbone", "model", "state_dict")
#: What ``nn.DataParallel`` / DDP put in front of every key when the wrapper itself was saved.
WRAPPER_PREFIX = "module."


def is_tensor_dict(obj: object) -> bool:
    """Whether ``obj`` is a non-empty dict of string keys to tensors: what ``model.state_dict()`` is."""
    return (
        isinstance(obj, dict) and bool(obj) and all(isinstance(k, str) and torch.is_tensor(v) for k, v in obj.items())
    )


def bare_state_dict(obj: object) -> dict[str, Tensor] | None:
    """The tensors of ``obj`` when it is a bare state dict, or one nested under a :data:`CONTAINER_KEYS` key (with
    tensors or not beside it), with a ``module.`` prefix on every key removed; else None."""
    if isinstance(obj, dict) and not is_tensor_dict(obj):
        inner = [obj[k] for k in CONTAINER_KEYS if is_tensor_dict(obj.get(k))]
        obj = inner[0] if len(inner) == 1 else None
    if not is_tensor_dict(obj):
        return None
    state: dict[str, Tensor] = dict(obj)  # type: ignore[arg-type]
    if all(k.startswith(WRAPPER_PREFIX) for k in state):
        state = {k[len(WRAPPER_PREFIX) :]: v for k, v in state.items()}
    return state


def no_arch_message(path: object, state: dict[str, Tensor]) -> str:
    """The one-line error for a bare state dict read without an architecture to build."""
    return (
        f"{path}: not a facetool checkpoint but a bare state dict ({len(state)} tensors) that names no "
        "architecture: give it with --arch NAME (run.init_arch in a config, arch= in Python), or convert it once "
        "with facetool import-model"
    )


def check_channels(value: Any, path: object) -> str:
    """A recorded ``input_channels`` value, checked (``rgb`` or ``bgr``)."""
    if value not in CHANNEL_ORDERS:
        raise FacetoolError(f"{path}: input_channels must be one of {', '.join(CHANNEL_ORDERS)}, not {value!r}")
    return value


def flip_input_channels(weight: Tensor) -> Tensor:
    """The first layer's ``weight`` for images of the other channel order (RGB <-> BGR), exactly: a convolution's
    (out, 3, kh, kw) input channels reversed, or the columns of a patch embedding (out, p*p*3) whose patch vectors
    are channel-last. Zero padding is the same in every channel, so the outputs do not change."""
    if weight.ndim == 4 and weight.shape[1] == 3:
        return weight.flip(1)
    if weight.ndim == 2 and weight.shape[1] % 3 == 0:
        return weight.reshape(weight.shape[0], -1, 3).flip(-1).reshape(weight.shape)
    raise FacetoolError(f"cannot reverse the colour channels of a first layer of shape {tuple(weight.shape)}")


def to_rgb(state: dict[str, Tensor], model: torch.nn.Module, channels: str, where: str) -> dict[str, Tensor]:
    """``state`` (of ``model``'s architecture) for RGB images: unchanged for ``rgb``, else with the first layer
    (the class's ``stem_weight``) turned by :func:`flip_input_channels`."""
    if channels == RGB:
        return state
    stem = getattr(model, "stem_weight", None)
    if stem is None or stem not in state:
        raise FacetoolError(f"{where}: weights for {channels.upper()} images, and {type(model).__name__} names no "
                            "first layer to turn to RGB")  # fmt: skip
    return {**state, stem: flip_input_channels(state[stem])}


__all__ = [
    "BGR",
    "CHANNEL_ORDERS",
    "CONTAINER_KEYS",
    "RGB",
    "WRAPPER_PREFIX",
    "bare_state_dict",
    "check_channels",
    "flip_input_channels",
    "is_tensor_dict",
    "no_arch_message",
    "to_rgb",
]

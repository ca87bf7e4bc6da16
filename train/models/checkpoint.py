"""Backbone files: the architecture's name and options travel with the weights, so a file rebuilds itself.

One resolver reads every file a backbone can come from (:func:`read_backbone_file`): an exported backbone
(``backbone.pt``, what :func:`save_backbone` writes) or a training / MAE checkpoint holding one. ``bench
verification``, ``bench ijb``, ``export`` and ``run.init_from`` all go through it, so they accept the same files and
fail with the same one-line errors. A bare state dict (arcface_torch's ``backbone.pth``) is read too when the caller
names its architecture (``arch``: ``--arch``, ``run.init_arch``); a file may record that its weights expect BGR
images (``input_channels``, see :mod:`.state_dict`), which every consumer honours.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from typing import Any

import torch
from torch import nn

from facetool.pipeline.atomic import atomic_open
from facetool.pipeline.errors import FacetoolError

from .registry import create_backbone
from .state_dict import RGB, bare_state_dict, check_channels, no_arch_message, to_rgb

FORMAT = "facetool-backbone"
VERSION = 1


def backbone_payload(model: nn.Module, name: str, options: dict[str, Any], input_channels: str = RGB) -> dict[str, Any]:
    """What :func:`save_backbone` writes, as a dict of CPU tensors (also stored inside training checkpoints)."""
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return state_payload(state, name, options, input_channels)


def state_payload(
    state: dict[str, torch.Tensor], name: str, options: dict[str, Any], input_channels: str = RGB
) -> dict[str, Any]:
    """The payload of the weights ``state`` of backbone ``name``; ``input_channels`` is stored only when not RGB
    (files without it are RGB)."""
    payload = {"format": FORMAT, "version": VERSION, "backbone": name, "options": dict(options), "state_dict": state}
    if check_channels(input_channels, name) != RGB:
        payload["input_channels"] = input_channels
    return payload


def save_payload(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    """Write a backbone payload (:func:`state_payload`); atomic (temp file, fsync, rename)."""
    with atomic_open(path) as f:
        torch.save(payload, f)


def save_backbone(
    path: str | os.PathLike, model: nn.Module, name: str, options: dict[str, Any], input_channels: str = RGB
) -> None:
    """Write ``model``'s weights with its registry ``name`` and ``options``; atomic (temp file, fsync, rename)."""
    save_payload(path, backbone_payload(model, name, options, input_channels))


def is_backbone_payload(obj: object) -> bool:
    """Whether ``obj`` (something ``torch.load`` returned) is what :func:`save_backbone` writes."""
    return isinstance(obj, dict) and obj.get("format") == FORMAT


def read_backbone_file(path: str | os.PathLike, arch: str | None = None) -> dict[str, Any]:
    """The backbone payload in ``path``, loaded with ``torch.load(weights_only=True)``: an exported backbone, or a
    training / MAE checkpoint holding exactly one, or with ``arch`` a bare state dict (:func:`bare_payload`).
    Anything else is a one-line :class:`FacetoolError` naming the file; the payload's name, options and tensors are
    checked for type (not yet against the architecture); ``arch`` must agree with a name the file records."""
    try:
        with warnings.catch_warnings():  # torch warns about foreign pickles before failing on them: we say why
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as err:
        raise FacetoolError(f"{path}: cannot read ({err.strerror or err})") from None
    except Exception as err:  # foreign bytes fail inside the unpickler in many ways
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise FacetoolError(f"{path}: not a facetool checkpoint ({reason[:200]})") from None
    if not is_backbone_payload(obj) and isinstance(obj, dict):
        nested = [v for v in obj.values() if is_backbone_payload(v)]
        if len(nested) > 1:
            raise FacetoolError(f"{path}: checkpoint holds {len(nested)} backbones; expected one")
        obj = nested[0] if nested else obj
    bare = None if is_backbone_payload(obj) else bare_state_dict(obj)
    if bare is not None:
        return bare_payload(path, bare, arch)
    if not is_backbone_payload(obj):
        raise FacetoolError(
            f"{path}: not a facetool checkpoint (neither a backbone saved by facetool nor a training checkpoint "
            "holding one)"
        )
    if obj.get("version") != VERSION:
        raise FacetoolError(f"{path}: unsupported backbone checkpoint version {obj.get('version')!r}")
    name, options, state = obj.get("backbone"), obj.get("options"), obj.get("state_dict")
    if not isinstance(name, str) or not isinstance(options, dict) or not isinstance(state, dict):
        raise FacetoolError(f"{path}: backbone checkpoint lacks a name, options or state_dict")
    if not all(isinstance(k, str) for k in options):
        raise FacetoolError(f"{path}: backbone options must be named, got {sorted(map(repr, options))}")
    bad = next((k for k, v in state.items() if not isinstance(k, str) or not torch.is_tensor(v)), None)
    if bad is not None:
        raise FacetoolError(f"{path}: backbone state_dict entry {bad!r} is not a tensor")
    if arch is not None and arch != name:
        raise FacetoolError(f"{path}: holds a {name!r} backbone, not the {arch!r} asked for")
    check_channels(obj.get("input_channels", RGB), path)
    return obj


def bare_payload(path: str | os.PathLike, state: dict[str, torch.Tensor], arch: str | None) -> dict[str, Any]:
    """A bare state dict read as the payload of backbone ``arch`` with its default options, RGB; without ``arch``
    a one-line error saying how to name it."""
    if arch is None:
        raise FacetoolError(no_arch_message(path, state))
    return state_payload(state, arch, {})


def build_from_payload(payload: dict[str, Any], path: str | os.PathLike, device: str | None = None) -> nn.Module:
    """A fresh (untrained) backbone of the architecture and options that ``payload`` names; on ``device`` when
    given (``"meta"``: shapes without memory)."""
    name = payload["backbone"]
    try:
        with torch.device(device) if device is not None else contextlib.nullcontext():
            return create_backbone(name, **payload["options"])
    except FacetoolError as err:
        reason = str(err).removeprefix(f"backbone {name!r}: ")
        raise FacetoolError(f"{path}: cannot build backbone {name!r}: {reason}") from None


def check_fits(payload: dict[str, Any], path: str | os.PathLike) -> None:
    """The tensors of ``payload`` must fit the backbone its name and options describe, strictly. Checked on a
    model built on the "meta" device, before any memory is allocated: the options are read from the file, and
    ``embedding_size = 1e6`` would otherwise allocate a 100 GB layer before the shapes are compared."""
    name, state = payload["backbone"], payload["state_dict"]
    largest = max((v.numel() for v in state.values()), default=0)
    for key, value in payload["options"].items():
        if type(value) is int and abs(value) > max(largest, len(state)):  # a size or a count, bounded by the file
            raise FacetoolError(f"{path}: backbone option {key} = {value} exceeds every tensor in the file")
    missing, unexpected, wrong = state_mismatch(build_from_payload(payload, path, "meta").state_dict(), state)
    if missing or unexpected or wrong:
        parts = [
            f"{label} {len(keys)} (e.g. {keys[0]})"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
            if keys
        ]
        raise FacetoolError(f"{path}: state dict does not fit backbone {name!r}: {'; '.join(parts)}")


def state_mismatch(own: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> tuple[list, list, list]:
    """(missing, unexpected, wrong-shape) keys of ``state`` against a model's own state dict ``own``, sorted."""
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    return missing, unexpected, wrong


def load_backbone(path: str | os.PathLike, arch: str | None = None) -> tuple[nn.Module, str, dict[str, Any]]:
    """Rebuild the backbone in ``path`` (see :func:`read_backbone_file`; ``arch`` for a bare state dict); returns
    (model in eval mode, name, options). Every stored tensor must fit the named architecture, strictly; a mismatch
    is a one-line error. ``model.input_channels`` is the channel order its weights expect (``rgb`` or ``bgr``)."""
    payload = read_backbone_file(path, arch)
    check_fits(payload, path)
    model = build_from_payload(payload, path)
    model.load_state_dict(payload["state_dict"])
    model.eval()
    model.input_channels = payload.get("input_channels", RGB)
    return model, payload["backbone"], dict(payload["options"])


def load_init(model: nn.Module, name: str, path: str | os.PathLike, arch: str | None = None) -> list[str]:
    """Start ``model`` (of registry ``name``) from the backbone in ``path`` (``run.init_from``; ``arch``:
    ``run.init_arch``, for a bare state dict): the architecture must be the same and every stored tensor must fit;
    parameters the file lacks (FaceT's prompts after MAE) keep their fresh values and are returned. Weights for BGR
    images start the (RGB) run with their first layer's input channels reversed, which is exact."""
    where = f"run.init_from: {path}"
    payload = read_backbone_file(path, arch)
    if payload["backbone"] != name:
        raise FacetoolError(f"{where} holds a {payload['backbone']!r} backbone, this run trains {name!r}")
    state, own = payload["state_dict"], model.state_dict()
    missing, unexpected, wrong = state_mismatch(own, state)
    if unexpected or wrong:
        k = (unexpected or wrong)[0]
        what = "unexpected tensor" if unexpected else f"shape {tuple(state[k].shape)} vs {tuple(own[k].shape)} for"
        raise FacetoolError(f"{where} does not fit {name} with these options: {what} {k}")
    model.load_state_dict(to_rgb(state, model, payload.get("input_channels", RGB), where), strict=False)
    return missing


__all__ = [
    "FORMAT",
    "VERSION",
    "backbone_payload",
    "bare_payload",
    "build_from_payload",
    "check_fits",
    "is_backbone_payload",
    "load_backbone",
    "load_init",
    "read_backbone_file",
    "save_backbone",
    "save_payload",
    "state_mismatch",
    "state_payload",
]

"""Backbone checkpoints: the architecture's name and options travel with the weights, so a file rebuilds itself."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .registry import create_backbone

FORMAT = "facetool-backbone"
VERSION = 1


def save_backbone(path: str | os.PathLike, model: nn.Module, name: str, options: dict[str, Any]) -> None:
    """Write ``model``'s weights with its registry ``name`` and ``options``; atomic (temp file, then rename)."""
    path = Path(path)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    payload = {"format": FORMAT, "version": VERSION, "backbone": name, "options": dict(options), "state_dict": state}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_backbone(path: str | os.PathLike) -> tuple[nn.Module, str, dict[str, Any]]:
    """Rebuild the backbone saved at ``path``; returns (model in eval mode, name, options).

    Raises ValueError with a one-line message naming the file when it is not a backbone checkpoint or when its
    weights do not fit the named architecture.
    """
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise
    except Exception as err:  # the unpickler fails in many ways on foreign bytes
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{path}: not a facetool backbone checkpoint ({reason})") from None
    return backbone_from_payload(payload, path)


def is_backbone_payload(obj: object) -> bool:
    """Whether ``obj`` (something ``torch.load`` returned) is what :func:`save_backbone` writes."""
    return isinstance(obj, dict) and obj.get("format") == FORMAT


def backbone_from_payload(payload: object, path: str | os.PathLike) -> tuple[nn.Module, str, dict[str, Any]]:
    """Rebuild a backbone from an already loaded checkpoint ``payload``; errors as :func:`load_backbone`'s, naming
    ``path``. For callers that load a file holding more than the backbone (a training checkpoint)."""
    if not is_backbone_payload(payload):
        raise ValueError(f"{path}: not a facetool backbone checkpoint (no format {FORMAT!r})")
    if payload.get("version") != VERSION:
        raise ValueError(f"{path}: unsupported backbone checkpoint version {payload.get('version')!r}")
    name, options, state = payload.get("backbone"), payload.get("options"), payload.get("state_dict")
    if not isinstance(name, str) or not isinstance(options, dict) or not isinstance(state, dict):
        raise ValueError(f"{path}: backbone checkpoint lacks a name, options or state_dict")
    try:
        model = create_backbone(name, **options)
    except (ValueError, TypeError) as err:
        raise ValueError(f"{path}: cannot build backbone {name!r}: {err}") from None
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        parts = [
            f"{label} {len(keys)} (e.g. {keys[0]})"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
            if keys
        ]
        raise ValueError(f"{path}: state dict does not fit backbone {name!r}: {'; '.join(parts)}")
    model.load_state_dict(state)
    model.eval()
    return model, name, options

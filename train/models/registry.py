"""Backbone registry: names map to constructors, so configs and checkpoints name an architecture, not code."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

_BACKBONES: dict[str, Callable[..., nn.Module]] = {}

F = TypeVar("F", bound=Callable[..., nn.Module])


def register_backbone(name: str) -> Callable[[F], F]:
    """Decorator that registers a backbone constructor under ``name`` (each name once)."""

    def decorator(fn: F) -> F:
        if name in _BACKBONES:
            raise ValueError(f"backbone {name!r} is already registered")
        _BACKBONES[name] = fn
        return fn

    return decorator


def list_backbones() -> list[str]:
    """Names of all registered backbones, sorted."""
    return sorted(_BACKBONES)


def create_backbone(name: str, **options: Any) -> nn.Module:
    """Build the backbone ``name``: a module mapping (N,3,112,112) images in [-1,1] to (N,512) embeddings."""
    try:
        fn = _BACKBONES[name]
    except KeyError:
        raise ValueError(f"unknown backbone {name!r}; known: {', '.join(list_backbones())}") from None
    return fn(**options)

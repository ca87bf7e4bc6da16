"""Backbone registry: names map to constructors, so configs and checkpoints name an architecture, not code."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

from facetool.pipeline.errors import FacetoolError

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
    """Build the backbone ``name``: a module mapping (N,3,112,112) images in [-1,1] to (N,512) embeddings. An
    unknown name, an option it does not take or a value it refuses is a one-line :class:`FacetoolError`."""
    if name not in _BACKBONES:
        raise FacetoolError(f"unknown backbone {name!r}; known: {', '.join(list_backbones())}")
    fn = _BACKBONES[name]
    params = inspect.signature(fn).parameters.values()
    takes = [p.name for p in params if p.kind is not p.VAR_KEYWORD]
    unknown = sorted(set(options) - set(takes))
    if unknown and not any(p.kind is p.VAR_KEYWORD for p in params):
        raise FacetoolError(f"option not taken by {name}: {', '.join(unknown)}; it takes {', '.join(takes)}")
    try:
        return fn(**options)
    except (TypeError, ValueError, RuntimeError, OverflowError) as err:  # width = "big", -3 or 2**70
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise FacetoolError(f"backbone {name!r}: {reason}") from None

"""Backbones by name: ``create_backbone("ir100")`` maps (N,3,112,112) images in [-1,1] to (N,512) embeddings."""

from . import facet, iresnet, irse, mobilefacenet, tiny  # noqa: F401  (importing registers the backbones)
from .checkpoint import load_backbone, save_backbone
from .registry import create_backbone, list_backbones, register_backbone

__all__ = ["create_backbone", "list_backbones", "load_backbone", "register_backbone", "save_backbone"]

"""Training data loaders over facetool shards (docs/FORMAT.md): NVIDIA DALI on a GPU or the CPU, and a portable
webdataset + torch DataLoader fallback with the same options, augmentations and epoch rules.

    from facetool.train.data import LoaderConfig, create_loader
    loader = create_loader("shards/", LoaderConfig(batch_size=256, masked_prob=0.3), rank, world_size)
    for epoch in range(epochs):
        for images, labels, masked in loader:   # one epoch
            ...
"""

from __future__ import annotations

import os

import torch

from facetool.pipeline.errors import FacetoolError
from facetool.train.data.batch import Batch
from facetool.train.data.config import LoaderConfig
from facetool.train.data.dali import DaliLoader, build_pipeline, dali_available
from facetool.train.data.epochs import batches_per_epoch
from facetool.train.data.fallback import WdsLoader
from facetool.train.data.shardset import MASK_REUSE_LIMIT, MaskReuseWarning, ShardSet, open_shards

BACKENDS = ("auto", "dali", "wds")
DEVICES = ("auto", "cpu", "gpu")


def create_loader(
    shards: ShardSet | str | os.PathLike,
    config: LoaderConfig,
    rank: int = 0,
    world_size: int = 1,
    device: str = "auto",
    backend: str = "auto",
    device_id: int | None = None,
) -> DaliLoader | WdsLoader:
    """A loader for this rank. ``device`` "auto" is the GPU when torch sees one (``device_id``: the local rank's
    GPU, default ``rank % device_count``), else the CPU; ``backend`` "auto" is DALI where it imports, else the
    webdataset fallback. The shards are checked and ``masked_prob`` validated before anything starts."""
    if backend not in BACKENDS:
        raise FacetoolError(f"loader backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if device not in DEVICES:
        raise FacetoolError(f"loader device must be one of {', '.join(DEVICES)}, got {device!r}")
    if not isinstance(shards, ShardSet):
        shards = open_shards(shards)
    if device == "auto":
        device = "gpu" if torch.cuda.is_available() else "cpu"
    if device == "gpu":
        if not torch.cuda.is_available():
            raise FacetoolError("loader device 'gpu' requested but torch sees no CUDA device")
        if device_id is None:
            device_id = rank % torch.cuda.device_count()
    if backend == "auto":
        backend = "dali" if dali_available() else "wds"
    if backend == "dali":
        if not dali_available():
            raise FacetoolError("loader backend 'dali' requested but nvidia.dali is not installed")
        return DaliLoader(shards, config, rank, world_size, device=device, device_id=device_id)
    target = torch.device("cuda", device_id) if device == "gpu" else torch.device("cpu")
    return WdsLoader(shards, config, rank, world_size, device=target)


__all__ = [
    "Batch",
    "DaliLoader",
    "LoaderConfig",
    "MASK_REUSE_LIMIT",
    "MaskReuseWarning",
    "ShardSet",
    "WdsLoader",
    "batches_per_epoch",
    "build_pipeline",
    "create_loader",
    "dali_available",
    "open_shards",
]

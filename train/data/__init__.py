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
from collections.abc import Callable

import torch

from facetool.pipeline.errors import FacetoolError
from facetool.train.data.batch import Batch, move_batch
from facetool.train.data.config import LoaderConfig
from facetool.train.data.dali import DALI_INSTALL, DaliLoader, build_pipeline, dali_available, require_dali
from facetool.train.data.epochs import batches_per_epoch
from facetool.train.data.fallback import WdsLoader
from facetool.train.data.shardset import MASK_REUSE_LIMIT, MaskReuseWarning, ShardSet, open_shards
from facetool.train.devices import local_gpu

BACKENDS = ("auto", "dali", "wds")
DEVICES = ("auto", "cpu", "gpu")
#: What ``backend="auto"`` says (through ``notify``) when it falls back for want of DALI
FALLBACK_NOTE = f"NVIDIA DALI is not installed: the portable webdataset loader (wds) reads the shards ({DALI_INSTALL})"


def create_loader(
    shards: ShardSet | str | os.PathLike,
    config: LoaderConfig,
    rank: int = 0,
    world_size: int = 1,
    device: str = "auto",
    backend: str = "auto",
    device_id: int | None = None,
    notify: Callable[[str], None] | None = None,
) -> DaliLoader | WdsLoader:
    """A loader for this rank. ``device`` "auto" is the GPU when torch sees one (``device_id``: default the local
    rank's, ``LOCAL_RANK``), else the CPU; ``backend`` "auto" is DALI where it imports, else the webdataset
    fallback, which ``notify(message)`` is told. The shards are checked and ``masked_prob`` validated before
    anything starts; ``backend="dali"`` without DALI is a one-line error saying how to install it."""
    if backend not in BACKENDS:
        raise FacetoolError(f"loader backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if device not in DEVICES:
        raise FacetoolError(f"loader device must be one of {', '.join(DEVICES)}, got {device!r}")
    if backend == "dali":
        require_dali("loader backend 'dali'")
    if not isinstance(shards, ShardSet):
        shards = open_shards(shards)
    if device == "auto":
        device = "gpu" if torch.cuda.is_available() else "cpu"
    if device == "gpu":
        if not torch.cuda.is_available():
            raise FacetoolError("loader device 'gpu' requested but torch sees no CUDA device")
        device_id = local_gpu(device_id)
    if backend == "auto":
        backend = "dali" if dali_available() else "wds"
        if backend == "wds" and notify is not None:
            notify(FALLBACK_NOTE)
    if backend == "dali":
        return DaliLoader(shards, config, rank, world_size, device=device, device_id=device_id)
    target = torch.device("cuda", device_id) if device == "gpu" else torch.device("cpu")
    return WdsLoader(shards, config, rank, world_size, device=target)


__all__ = [
    "BACKENDS",
    "DALI_INSTALL",
    "DEVICES",
    "FALLBACK_NOTE",
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
    "move_batch",
    "open_shards",
    "require_dali",
]

"""Which GPU a process uses: its local rank's (torchrun's ``LOCAL_RANK``), never its global rank, which on the
second machine of a run is past the GPUs it has. Every local rank needs a GPU of its own."""

from __future__ import annotations

import os

import torch

from facetool.pipeline.errors import FacetoolError


def local_rank() -> int:
    """This process's rank on its machine as torchrun set it (0 when it did not launch us)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def local_gpu(device_id: int | None = None) -> int:
    """The CUDA device index of this process: ``device_id`` when given, else ``LOCAL_RANK``. More local ranks
    (``LOCAL_WORLD_SIZE``) than GPUs, or an index past them, is a one-line error, not a GPU shared by accident."""
    count = torch.cuda.device_count()
    if device_id is not None:
        if not 0 <= device_id < count:
            raise FacetoolError(f"GPU {device_id} requested, but torch sees {count} GPU(s) here")
        return device_id
    rank, ranks = local_rank(), int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if max(rank + 1, ranks) > count:
        raise FacetoolError(
            f"local rank {rank} of {max(rank + 1, ranks)} on this machine, but torch sees {count} GPU(s): each "
            f"local rank needs its own GPU (start at most {count} process(es) per machine, torchrun --nproc-per-node)"
        )
    return rank

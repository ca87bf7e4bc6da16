"""Where a training process runs: one process, or one rank of many under torchrun (gloo on CPUs, NCCL on GPUs)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from facetool.pipeline.errors import FacetoolError
from facetool.train.devices import local_gpu, local_rank
from facetool.train.engine.config import Config


@dataclass
class Context:
    """Where this process runs: rank, world size, local rank, device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        """Whether this is rank 0 (the one that writes the run's shared files and logs)."""
        return self.rank == 0

    def barrier(self) -> None:
        """Wait for every rank (a no-op in one process)."""
        if self.world_size > 1:
            dist.barrier()


def launched_rank() -> int:
    """This process's rank as torchrun set it (0 when it did not launch us)."""
    return int(os.environ.get("RANK", "0"))


def setup_distributed(cfg: Config) -> Context:
    """Join torchrun's process group when it launched us (WORLD_SIZE > 1), pick the device and the threads."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = launched_rank()
    want = cfg["run"]["device"]
    if want == "cuda" and not torch.cuda.is_available():
        raise FacetoolError(f"{cfg.source}: run.device = 'cuda' but torch sees no GPU")
    use_cuda = want == "cuda" or (want == "auto" and torch.cuda.is_available())
    device = torch.device("cpu")
    if use_cuda:
        try:
            device = torch.device("cuda", local_gpu())  # the local rank's GPU; more ranks than GPUs: an error
        except FacetoolError as err:
            raise FacetoolError(f"{cfg.source}: run.device = {want!r}: {err}") from None
        torch.cuda.set_device(device)
    threads = cfg["run"]["threads"]
    if not threads and not use_cuda:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        threads = max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    if threads:
        torch.set_num_threads(threads)
    if world_size > 1 and not dist.is_initialized():
        backend = cfg["run"]["dist_backend"]
        if backend == "auto":
            backend = "nccl" if use_cuda else "gloo"
        dist.init_process_group(backend=backend, device_id=device if backend == "nccl" else None)
    return Context(rank=rank, world_size=world_size, local_rank=local_rank(), device=device)

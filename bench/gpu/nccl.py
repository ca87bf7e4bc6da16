"""The NCCL part: a process group of one rank comes up on the GPU, an all-reduce runs, and Partial FC runs one step
through its collectives (the embeddings' all-gather and reduce-scatter, the sharded cross-entropy's all-reduces).

With one rank a head skips its collectives, so the step is run twice: by a head as it is, and by its copy whose
class shard is marked distributed (:class:`CollectiveShard`), which sends everything through the process group.
Both must give the same loss and embedding gradient.
"""

from __future__ import annotations

import copy
import dataclasses
import socket
import time
from collections.abc import Iterator
from typing import Any

from facetool.bench.gpu.plan import Job, Part, Setting, Sizes, attempt, synchronize
from facetool.pipeline.errors import FacetoolError

HEAD = "arcface"
SAMPLE_RATE = 0.5  # the class sampler runs too


def collective_shard(shard):
    """A copy of a head's class ``shard`` that calls the collectives even when it is the only rank."""
    from facetool.train.heads import Shard

    @dataclasses.dataclass(frozen=True)
    class CollectiveShard(Shard):
        @property
        def distributed(self) -> bool:
            return True

    return CollectiveShard(**dataclasses.asdict(shard))


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _head_pass(head, embeddings, labels) -> tuple[float, Any]:
    e = embeddings.clone().requires_grad_()
    loss = head(e, labels)
    loss.backward()
    synchronize(e.device)
    return float(loss.detach()), e.grad


def collective_step(backend: str, device: str, classes: int, width: int, batch: int) -> dict[str, Any]:
    """Bring up a one-rank ``backend`` group on ``device`` and compare a head step through it with the local one."""
    import torch
    import torch.distributed as dist

    from facetool.train.heads import create_head

    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", dev.index if dev.index is not None else torch.cuda.current_device())
        torch.cuda.set_device(dev)  # NCCL binds the group to one device
    t0 = time.perf_counter()
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1,
                            device_id=dev if backend == "nccl" else None)  # fmt: skip
    try:
        probe = torch.ones(4, device=dev)
        dist.all_reduce(probe)
        synchronize(dev)
        t1 = time.perf_counter()
        local = create_head(HEAD, width, classes, partial_fc=True, sample_rate=SAMPLE_RATE).to(dev)
        through = copy.deepcopy(local)
        through.shard = collective_shard(local.shard)
        gen = torch.Generator(dev).manual_seed(0)
        embeddings = torch.randn(batch, width, device=dev, generator=gen)
        labels = torch.randint(classes, (batch,), device=dev, generator=gen)
        loss_local, grad_local = _head_pass(local, embeddings, labels)
        t2 = time.perf_counter()
        loss, grad = _head_pass(through, embeddings, labels)
        t3 = time.perf_counter()
    finally:
        dist.destroy_process_group()
    if not bool(probe.eq(1).all()):
        raise FacetoolError(f"a one-rank {backend} all-reduce changed its input: {probe.tolist()}")
    if not (abs(loss - loss_local) <= 1e-5 * abs(loss_local) + 1e-6 and torch.allclose(grad, grad_local, 1e-4, 1e-7)):
        raise FacetoolError(f"the {backend} path's step differs from the local one (loss {loss} vs {loss_local})")
    return {
        "backend": backend, "device": device, "init_seconds": t1 - t0, "step_seconds": t3 - t2,
        "classes": classes, "batch_size": batch, "sample_rate": SAMPLE_RATE, "loss": loss, "matches_one_process": True,
        "nccl_version": _nccl_version() if backend == "nccl" else None,
    }  # fmt: skip


def _nccl_version() -> str:
    import torch

    version = torch.cuda.nccl.version()
    return ".".join(map(str, version)) if isinstance(version, tuple) else str(version)


def nccl_runs(sizes: Sizes, device: str) -> Iterator[dict[str, Any]]:
    yield attempt("one-rank step", collective_step, "nccl", device, sizes.nccl_classes, 512, sizes.pfc_batch)


def _plan(setting: Setting, results: dict[str, Any]) -> list[Job]:
    return [Job("group", nccl_runs, (setting.sizes, setting.device), runs=("one-rank step",))]


PART = Part(
    name="nccl",
    what="a one-rank NCCL process group and a Partial FC step through its collectives",
    share=0.04,
    plan=_plan,
    needs_cuda=True,
)

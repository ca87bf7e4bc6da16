"""Keeping the DDP replicas in lockstep: every decision taken from gradients is the same number on every rank.

DDP all-reduces the backbone's gradients, so they are equal on every rank; the Partial FC head holds a different
class shard on each rank, and so do its gradients. Anything computed from them must be all-reduced before it acts
on the backbone, or the replicas drift apart silently: the gradient clipping factor (:func:`clip_gradients`) and
fp16's overflow check (:func:`grad_scaler`). :func:`check_replicas` verifies the outcome on demand
(``run.check_sync_every``).
"""

from __future__ import annotations

import hashlib

import torch
import torch.distributed as dist
from torch import nn

from facetool.pipeline.errors import FacetoolError

CLIP_SCOPES = ("backbone", "all")  # what optim.clip_grad's norm covers


def clip_gradients(
    params: list[nn.Parameter], sharded: list[nn.Parameter], max_norm: float, scope: str, world_size: int
) -> torch.Tensor:
    """Scale the gradients of ``params`` (every trained parameter) so that their norm is at most ``max_norm``;
    returns the norm. ``sharded`` are those that differ from rank to rank (the head's class shard).

    ``scope = "backbone"`` clips the replicated parameters alone (the backbone, or the whole MAE model), as both
    upstreams do: arcface_torch clips ``backbone.parameters()`` at 5 (deepinsight/insightface
    recognition/arcface_torch/train_v2.py @ 7fadd420c2 L188-196) and FaceT clips its DDP backbone
    (zyainfal/Joint-Holistic-and-Masked-Face-Recognition code/trainer.py @ 3126602be5 L413-421). ``"all"`` adds
    the head: the backbone's norm (the same on every rank after DDP's all-reduce, so counted once) and the squared
    norms of every rank's shard, summed over the ranks. Either way the factor is one number on every rank.
    """
    own = {id(p) for p in sharded}
    replicated = [p for p in params if id(p) not in own]
    if scope == "backbone":
        return torch.nn.utils.clip_grad_norm_(replicated, max_norm)
    if world_size == 1 or not sharded:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    backbone = torch.nn.utils.get_total_norm([p.grad for p in replicated if p.grad is not None])
    shard = [p.grad for p in params if id(p) in own and p.grad is not None]
    squared = torch.nn.utils.get_total_norm(shard).square() if shard else torch.zeros((), device=backbone.device)
    dist.all_reduce(squared)
    total = (backbone.square() + squared.to(backbone.device)).sqrt()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total


def grad_scaler(device_type: str, enabled: bool, world_size: int) -> torch.amp.GradScaler:
    """fp16's loss scaler. On several ranks one whose overflow check is all-reduced (torch's
    ``ShardedGradScaler``): an inf in one rank's head shard skips the step, and lowers the scale, on every rank."""
    if enabled and world_size > 1:
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        return ShardedGradScaler(device_type, enabled=True)
    return torch.amp.GradScaler(device_type, enabled=enabled)


def checksum(module: nn.Module) -> int:
    """A 64-bit digest of the bytes of ``module``'s parameters (with their names). Buffers are left out: DDP
    broadcasts rank 0's (BatchNorm's running statistics) at each forward, so between steps the others' may differ
    by design."""
    digest = hashlib.blake2b(digest_size=8)
    for name, value in module.named_parameters():
        digest.update(name.encode())
        digest.update(value.detach().reshape(-1).contiguous().view(torch.uint8).cpu().numpy().tobytes())
    return int.from_bytes(digest.digest(), "little", signed=True)


def check_replicas(module: nn.Module, step: int, world_size: int, device: torch.device) -> None:
    """Every rank must hold bitwise the same ``module`` (the replicated backbone); a one-line error naming the
    step and the ranks that differ from rank 0 otherwise, raised on every rank."""
    if world_size == 1:
        return
    mine = torch.tensor([checksum(module)], dtype=torch.int64, device=device)
    gathered = [torch.zeros_like(mine) for _ in range(world_size)]
    dist.all_gather(gathered, mine)
    values = [int(v) for v in gathered]
    differ = [rank for rank, value in enumerate(values) if value != values[0]]
    if differ:
        raise FacetoolError(
            f"step {step}: the ranks hold different backbones (run.check_sync_every): rank(s) "
            f"{', '.join(map(str, differ))} differ from rank 0; the replicas are out of sync"
        )

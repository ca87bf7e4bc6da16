"""Model-parallel pieces of Partial FC: class sharding, an autograd-aware all-gather and a sharded cross-entropy.

Everything here works on one rank too (``world_size == 1``): the collectives are skipped, so the same code runs
sharded over ``torch.distributed`` or whole in one process.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from facetool.pipeline.errors import FacetoolError


@dataclass(frozen=True)
class Shard:
    """The contiguous class range ``[start, start + size)`` that ``rank`` of ``world_size`` holds.

    With ``C = q * W + rem``, ranks ``0 .. rem-1`` hold ``q + 1`` classes and the others ``q``.
    """

    rank: int
    world_size: int
    start: int
    size: int

    @property
    def distributed(self) -> bool:
        """Whether collectives are needed (more than one rank)."""
        return self.world_size > 1


def class_shard(num_classes: int, rank: int, world_size: int) -> Shard:
    """Split ``num_classes`` into ``world_size`` contiguous ranges; the first ``C % world_size`` get one more."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of {world_size}")
    if num_classes < world_size:
        raise FacetoolError(f"{num_classes} classes cannot be sharded over {world_size} ranks (need >= 1 per rank)")
    base, rem = divmod(num_classes, world_size)
    size = base + (1 if rank < rem else 0)
    start = rank * base + min(rank, rem)
    return Shard(rank=rank, world_size=world_size, start=start, size=size)


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, ``(0, 1)`` when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _AllGather(torch.autograd.Function):
    """Concatenate every rank's rows; backward sums the gradient over ranks and returns this rank's rows."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        world_size = dist.get_world_size()
        ctx.rank, ctx.rows = dist.get_rank(), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(world_size)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        grad = grad.contiguous()
        if dist.get_backend() == dist.Backend.NCCL:
            out = torch.empty((ctx.rows, *grad.shape[1:]), dtype=grad.dtype, device=grad.device)
            dist.reduce_scatter_tensor(out, grad)
            return out
        dist.all_reduce(grad)  # gloo has no reduce-scatter: reduce all, keep this rank's rows
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows].clone()


def all_gather_rows(x: Tensor, shard: Shard) -> Tensor:
    """Gather equal-sized row blocks of all ranks in rank order; gradients flow back to each rank's own rows.

    The gradient a rank receives for its rows is the sum of what every rank's part of the loss sends them, i.e.
    exactly d(global loss)/d(local rows). Every rank must pass the same number of rows.
    """
    if not shard.distributed:
        return x
    if x.requires_grad:
        return _AllGather.apply(x)
    parts = [torch.empty_like(x) for _ in range(shard.world_size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def all_reduce(x: Tensor, shard: Shard, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> Tensor:
    """In-place all-reduce of a tensor that needs no gradient; a no-op on one rank."""
    if shard.distributed:
        dist.all_reduce(x, op=op)
    return x


class _ShardedCrossEntropy(torch.autograd.Function):
    """Mean softmax cross-entropy over rows whose logits are split by columns across ranks."""

    @staticmethod
    def forward(ctx, logits: Tensor, target: Tensor, shard: Shard) -> Tensor:  # type: ignore[override]
        ctx.dtype = logits.dtype
        logits = logits.float()
        rows = logits.shape[0]
        owned = target >= 0
        if logits.shape[1] > 0:
            row_max = logits.max(dim=1).values
        else:
            row_max = torch.full((rows,), float("-inf"), dtype=logits.dtype, device=logits.device)
        all_reduce(row_max, shard, dist.ReduceOp.MAX)
        exp = torch.exp(logits - row_max[:, None])
        sum_exp = exp.sum(dim=1)
        all_reduce(sum_exp, shard)
        picked = torch.zeros(rows, dtype=logits.dtype, device=logits.device)
        if owned.any():
            picked[owned] = logits[owned, target[owned]] - row_max[owned]
        all_reduce(picked, shard)  # each row's target lives on exactly one rank
        loss = (torch.log(sum_exp) - picked).mean()
        ctx.save_for_backward(exp.div_(sum_exp[:, None]), target)
        return loss

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        prob, target = ctx.saved_tensors
        owned = target >= 0
        grad_logits = prob.clone()
        rows = torch.nonzero(owned).squeeze(1)
        grad_logits[rows, target[rows]] -= 1.0
        grad_logits.mul_(grad / prob.shape[0])
        return grad_logits.to(ctx.dtype), None, None


def sharded_cross_entropy(logits: Tensor, target: Tensor, shard: Shard) -> Tensor:
    """Cross-entropy averaged over all rows, where this rank holds some columns of every row.

    ``target`` is the local column of each row's class, or -1 where another rank holds it. The max and the sum of
    exponentials are all-reduced and the target logit comes from its owner, so the value (the same on every rank)
    and the gradient equal those of one process holding all columns. No logits are communicated.
    """
    return _ShardedCrossEntropy.apply(logits, target, shard)

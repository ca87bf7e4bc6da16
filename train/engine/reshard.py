"""Resuming a checkpoint written by N ranks on M ranks: the Partial FC class shards are cut again.

Rank r of W holds the contiguous class range :func:`~facetool.train.heads.distributed.class_shard` gives it. A
tensor of the head's state (parameter or buffer) is *per class* when its first dimension is the local class count
on every rank that wrote the checkpoint; so is every tensor of the optimiser's state of a per-class head parameter
(SGD's momentum, AdamW's ``exp_avg`` and ``exp_avg_sq``) with that first dimension. :func:`recut_states` joins
each such tensor's rows in rank order and hands new rank r the rows of its new range: every class row, and its
optimiser state, is carried over bit for bit. Everything else is the same on every rank (backbone, optimiser state
of the replicated parameters, AdamW's ``step``, scaler, history) and is taken from rank 0; torch's, numpy's and
Python's RNG states from the old rank of the same number (rank 0's for a new rank). The class sampler's generator
is per rank and has no counterpart in another layout: it is dropped, so each new rank seeds it again from the
head's seed and its rank, as a fresh run does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from facetool.train.heads.distributed import class_shard

HEAD_PREFIX = "head."  # the optimiser group name of a head parameter (``parameter_groups``)


def per_class_keys(heads: list[dict[str, Any]], num_classes: int) -> list[str]:
    """The keys of a head state whose tensor's first dimension is the local class count on every rank (``heads``
    in rank order)."""
    world = len(heads)
    sizes = [class_shard(num_classes, r, world).size for r in range(world)]
    keys = [k for k, v in heads[0].items() if torch.is_tensor(v) and v.dim() >= 1]
    fits = [
        [torch.is_tensor(h.get(k)) and h[k].shape[:1] == (n,) for h, n in zip(heads, sizes, strict=True)] for k in keys
    ]
    return [k for k, fit in zip(keys, fits, strict=True) if all(fit)]


def recut_rows(parts: list[Tensor], num_classes: int, rank: int, world_size: int) -> Tensor:
    """The rows of new rank ``rank`` of ``world_size``, from the per-class tensors of the old ranks in order."""
    new = class_shard(num_classes, rank, world_size)
    pieces, start = [], 0
    for part in parts:
        lo, hi = max(new.start, start), min(new.start + new.size, start + part.shape[0])
        if lo < hi:
            pieces.append(part[lo - start : hi - start])
        start += part.shape[0]
    if start != num_classes:
        raise ValueError(f"the ranks hold {start} class rows, the head has {num_classes} classes")
    return torch.cat(pieces).clone()


def head_parameter_ids(optimizer_state: dict[str, Any]) -> dict[str, int]:
    """Head parameter name (without ``head.``) -> its index in an optimiser state dict, from the groups' names."""
    out = {}
    for group in optimizer_state["param_groups"]:
        for name, index in zip(group.get("names", ()), group["params"], strict=True):
            if name.startswith(HEAD_PREFIX):
                out[name[len(HEAD_PREFIX) :]] = index
    return out


def recut_head(
    heads: list[dict[str, Any]], optims: list[dict[str, Any]], num_classes: int, rank: int, world_size: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    """New rank ``rank``'s head state and optimiser state from the old ranks' (in rank order): per-class tensors
    re-cut (:func:`recut_rows`), the rest from rank 0, the class sampler dropped (it is seeded again)."""
    keys = per_class_keys(heads, num_classes)
    head = {k: v for k, v in heads[0].items() if k not in keys}
    head.update({k: recut_rows([h[k] for h in heads], num_classes, rank, world_size) for k in keys})
    head["_extra_state"] = {}
    optim = {"param_groups": optims[0]["param_groups"], "state": dict(optims[0]["state"])}
    sizes = {r: class_shard(num_classes, r, len(heads)).size for r in range(len(heads))}
    for name, index in head_parameter_ids(optims[0]).items():
        if name not in keys or index not in optim["state"]:
            continue
        entry = dict(optim["state"][index])
        for field in entry:
            parts = [o["state"][index][field] for o in optims]
            if all(torch.is_tensor(p) and p.dim() >= 1 and p.shape[0] == sizes[r] for r, p in enumerate(parts)):
                entry[field] = recut_rows(parts, num_classes, rank, world_size)
        optim["state"][index] = entry
    return head, optim


def recut_states(
    load: Callable[[int], dict[str, Any]], old_world: int, num_classes: int | None, rank: int, world_size: int
) -> dict[str, Any]:
    """The training state new rank ``rank`` of ``world_size`` would have written, from a checkpoint of
    ``old_world`` ranks (``load(r)`` reads old rank r's state). ``num_classes`` is None for a run without a head
    (MAE pre-training: every rank holds the same state). States that do not fit raise KeyError, TypeError or
    ValueError."""
    states = [load(r) for r in range(old_world)]
    base = states[0]
    rng = states[rank]["rng"] if rank < old_world else base["rng"]
    state = {**base, "rank": rank, "rng": rng}  # world_size: still the writers' (the loader state is theirs)
    if rank == 0:
        state.pop("backbone_state", None)
    else:
        state.pop("backbone", None)
        state["backbone_state"] = base["backbone"]["state_dict"]
    if num_classes is not None:
        heads, optims = [s["head"] for s in states], [s["optimizer"] for s in states]
        state["head"], state["optimizer"] = recut_head(heads, optims, num_classes, rank, world_size)
    return state


def describe_ranks(count: int) -> str:
    """``1 rank``, ``2 ranks``."""
    return f"{count} rank" + ("" if count == 1 else "s")

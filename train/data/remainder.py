"""The rest of an interrupted epoch, for a loader of another layout (number of ranks, or of workers per rank).

The webdataset loader's epoch is a pure function of (seed, epoch, ranks, workers): the samples in the tar order of
the epoch, cut into contiguous parts per rank and slices per worker, each slice shuffled in a buffer, batched, and
the workers' batches taken in turn. So which samples the first ``b`` batches of every rank held can be computed
again from the sample ids alone, without reading a tar (:func:`consumed_mask`). A resumed run on another layout
reads the epoch's other samples, in the same order minus the consumed ones, cut over its own ranks and workers:
no sample of the epoch is seen twice, none is left out (except what ``last_batch = "drop"`` drops).

A *cut* is where an epoch's stream stopped: ``{"world_size", "workers", "batch", "before"}`` (``before``: the cut
of the stream this one continued, or None for a whole epoch); the checkpoint stores it as the loader state. The
DALI loader's own reader shuffles in C++, in an order no formula here gives; its cuts say ``"reader": "dali"``, and
which samples they had handed out is found by replaying that reader (a ``replay`` function, from
:mod:`facetool.train.data.dali.replay`). The rest of an epoch is read by either loader as a stream of this module's
kind with one worker per rank.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch

from facetool.pipeline.errors import FacetoolError
from facetool.train.data.config import LoaderConfig
from facetool.train.data.epochs import batches_per_epoch, derive_seed, tar_order


def epoch_ids(counts: list[int], seed: int, epoch: int) -> np.ndarray:
    """The ids of all samples (their rank in manifest order) in the order an epoch reads them."""
    offsets = np.concatenate([[0], np.cumsum(counts)])
    order = tar_order(len(counts), seed, epoch)
    return np.concatenate([np.arange(offsets[s], offsets[s + 1], dtype=np.int64) for s in order])


def slice_ids(ids: np.ndarray, rank: int, world_size: int, worker: int, workers: int) -> np.ndarray:
    """A worker's slice of a rank's contiguous part of ``ids`` (the loaders' cut)."""
    n = len(ids)
    part_lo, part_hi = rank * n // world_size, (rank + 1) * n // world_size
    size = part_hi - part_lo
    return ids[part_lo + worker * size // workers : part_lo + (worker + 1) * size // workers]


def runs_of(ids: np.ndarray, counts: list[int]) -> list[tuple[int, int, int]]:
    """``ids`` as (shard, first sample in the shard, count) runs of consecutive samples, in order."""
    offsets = np.concatenate([[0], np.cumsum(counts)])
    runs: list[tuple[int, int, int]] = []
    for i in ids.tolist():
        shard = int(np.searchsorted(offsets, i, side="right")) - 1
        first = i - int(offsets[shard])
        if runs and runs[-1][0] == shard and runs[-1][1] + runs[-1][2] == first:
            runs[-1] = (shard, runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((shard, first, 1))
    return runs


def shuffle_seed(seed: int, epoch: int, rank: int, worker: int) -> int:
    """The seed of a worker's shuffle buffer in an epoch."""
    return derive_seed(seed, 3, epoch, rank, worker)


def interleave(streams: list[Iterator[Any]]) -> Iterator[Any]:
    """The items of ``streams`` in turn, skipping those that ended: the order in which torch's DataLoader hands
    out its workers' items."""
    live = list(streams)
    while live:
        for stream in list(live):
            try:
                yield next(stream)
            except StopIteration:
                live.remove(stream)


def assemble(items: Iterable[tuple[torch.Tensor, ...]], total: int, batch_size: int, partial: bool):
    """A rank's ``total`` batches from its workers' items (full batches and one remainder each): full batches as
    they come, remainders merged into full ones, then (under ``partial``) what is left, and None (an empty batch)
    until every rank has yielded the same number."""
    done, rest = 0, []
    for item in items if total else ():
        if len(item[0]) == batch_size:
            yield item
            done += 1
        else:
            rest.append(item)
            if sum(len(r[0]) for r in rest) >= batch_size:
                merged = [torch.cat(t) for t in zip(*rest, strict=True)]
                yield tuple(t[:batch_size] for t in merged)
                done += 1
                rest = [tuple(t[batch_size:] for t in merged)]
        if done == total:
            return
    if done < total and partial:
        yield tuple(torch.cat(t) for t in zip(*rest, strict=True)) if rest else None
        done += 1
        for _ in range(total - done):  # this rank's part is a sample shorter than the largest: same batch count
            yield None


#: ``replay(epoch, cut)``: which samples (a bool per id) a reader cut (``"reader"`` set) had handed out
Replay = Callable[[int, dict[str, Any]], np.ndarray]


def remaining_ids(
    counts: list[int], cfg: LoaderConfig, epoch: int, before: dict[str, Any] | None, replay: Replay | None = None
) -> np.ndarray:
    """The ids an epoch reads after the cut ``before`` (all of them when None), in the epoch's order."""
    ids = epoch_ids(counts, cfg.seed, epoch)
    return ids if before is None else ids[~consumed_mask(counts, cfg, epoch, before, replay)[ids]]


def consumed_mask(
    counts: list[int], cfg: LoaderConfig, epoch: int, cut: dict[str, Any], replay: Replay | None = None
) -> np.ndarray:
    """Which samples (a bool per id) an epoch's streams up to ``cut`` had handed out."""
    if cut.get("reader") is not None:
        if replay is None:
            raise FacetoolError(f"a cut of the {cut['reader']} reader needs that reader to be replayed")
        return replay(epoch, cut)
    ids = epoch_ids(counts, cfg.seed, epoch)
    if cut["before"] is None:
        mask = np.zeros(sum(counts), dtype=bool)
    else:
        mask = consumed_mask(counts, cfg, epoch, cut["before"], replay)
        ids = ids[~mask[ids]]
    world, workers, _ = check_cut(cut, len(ids), cfg)
    workers, B = max(1, workers), cfg.batch_size
    total = batches_per_epoch(len(ids), world, B, cfg.last_batch)
    for rank in range(world):
        streams = [iter(worker_chunks(ids, cfg, epoch, rank, world, worker, workers)) for worker in range(workers)]
        batches = assemble(interleave(streams), total, B, cfg.last_batch == "partial")
        for batch in itertools.islice(batches, int(cut["batch"])):
            if batch is not None:
                mask[batch[0].numpy()] = True
    return mask


def check_cut(cut: dict[str, Any], samples: int, cfg: LoaderConfig) -> tuple[int, int, int]:
    """(ranks, workers, batches) of a cut of a stream over ``samples``, checked to fit it (a damaged checkpoint's
    counts must not start a billion streams): a ValueError saying what does not."""
    world, workers, batch = int(cut["world_size"]), int(cut["workers"]), int(cut["batch"])
    total = batches_per_epoch(samples, world, cfg.batch_size, cfg.last_batch) if 1 <= world <= samples else -1
    if not (0 <= workers <= samples and 0 <= batch <= total):
        raise ValueError(f"a loader position of {batch} batches on {world} ranks x {workers} workers does not fit "
                         f"the {samples} samples left of the epoch in batches of {cfg.batch_size}")  # fmt: skip
    return world, workers, batch


def worker_chunks(
    ids: np.ndarray, cfg: LoaderConfig, epoch: int, rank: int, world_size: int, worker: int, workers: int
) -> list[tuple[torch.Tensor]]:
    """The ids of the items a worker yields (its slice through its shuffle buffer, in batches), as the worker does
    with the samples themselves."""
    import webdataset as wds

    buf = max(1, cfg.shuffle_buffer // workers)
    shuffle = wds.filters.shuffle(buf, initial=buf, seed=shuffle_seed(cfg.seed, epoch, rank, worker))
    order = list(shuffle(iter(slice_ids(ids, rank, world_size, worker, workers).tolist())))
    return [(chunk,) for chunk in torch.tensor(order, dtype=torch.int64).split(cfg.batch_size)] if order else []


STREAM_KEYS = ("world_size", "workers", "batch", "before", "reader")


def normalise_cut(cut: Any) -> Any:
    """A checkpoint's loader state in the form above: the DALI loader's state from before it kept cuts
    (``{"backend": "DaliLoader", "epoch", "batch", "world_size"}``) is a cut of DALI's reader; others as they are."""
    if isinstance(cut, dict) and cut.get("backend") == "DaliLoader":
        return {"backend": "dali", "epoch": cut["epoch"], "world_size": cut["world_size"], "workers": 0,
                "reader": "dali", "batch": cut["batch"], "before": None}  # fmt: skip
    return cut


def resume_plan(
    cut: dict[str, Any], layout: dict[str, Any], counts: list[int], cfg: LoaderConfig, replay: Replay | None = None
) -> tuple[int, int, dict[str, Any] | None, np.ndarray | None]:
    """Where a loader whose stream has ``layout`` (``world_size``, ``workers``, ``reader``) goes on from a
    checkpoint's ``cut``: (epoch, batches of it to skip, the cut its stream continues (None: the whole epoch), the
    ids left to read (None: all)). A cut of the same layout goes on where it stood; another's leaves the epoch's
    samples it had not yet handed out."""
    epoch, batch = int(cut["epoch"]), int(cut["batch"])
    stream = {k: cut.get(k) for k in STREAM_KEYS}
    same = all(stream[k] == v for k, v in layout.items())
    before = cut["before"] if same or batch == 0 else stream
    ids = None if before is None else remaining_ids(counts, cfg, epoch, before, replay)
    if same:  # (another layout's cut was checked while its samples were found)
        check_cut(cut, sum(counts) if ids is None else len(ids), cfg)
    return epoch, batch if same else 0, before, ids

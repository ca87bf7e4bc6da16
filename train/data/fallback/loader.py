"""The fallback's DataLoader: each worker streams its slice of the epoch and builds batches into the shared
:class:`~.pool.SlotPool`; the main process merges the workers' remainders, so that every rank yields the DALI
loader's batch count."""

from __future__ import annotations

import gc
import itertools
import multiprocessing as mp
import os
import re
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from facetool.pipeline.errors import FacetoolError
from facetool.pipeline.processes import worker_init
from facetool.train.data.batch import Batch, empty_batch
from facetool.train.data.config import LoaderConfig
from facetool.train.data.epochs import batches_per_epoch, derive_seed
from facetool.train.data.fallback.batches import fill_batch
from facetool.train.data.fallback.pool import Slot, SlotPool
from facetool.train.data.fallback.reader import epoch_segments, read_samples
from facetool.train.data.remainder import assemble, resume_plan, runs_of, shuffle_seed, slice_ids
from facetool.train.data.shardset import ShardSet, warn_mask_reuse

PREFETCH = 2  # batches each worker builds ahead
SLOTS = PREFETCH + 2  # pool slots per worker: those ahead, the batch in use and the one before it
_WORKER_DIED = re.compile(r"DataLoader worker \(pid")  # torch's words for a worker that crashed or was killed


class SampleStream(IterableDataset):
    """Yields, per worker, its batches of ``batch_size`` and one final remainder: each a :class:`Slot` of ``pool``
    or, when all of the worker's slots are in use, an (images, labels, masked) tuple of tensors."""

    def __init__(
        self,
        shards: ShardSet,
        config: LoaderConfig,
        rank: int,
        world_size: int,
        pick: float,
        epoch,
        pool: SlotPool,
    ) -> None:
        self.tars = [str(s.tar) for s in shards.shards]
        self.indexes = [str(s.index) for s in shards.shards]
        self.counts = [s.samples for s in shards.shards]
        self.classes = shards.classes
        self.config, self.rank, self.world_size, self.pick = config, rank, world_size, pick
        self.epoch = epoch  # a shared mp.Value: persistent workers read the main process's epoch from it
        self.pool = pool
        self.remainder: tuple[int, np.ndarray, dict] | None = None  # a resumed epoch: (epoch, ids left, cut)

    def __iter__(self) -> Iterator[Slot | tuple[torch.Tensor, torch.Tensor, torch.Tensor] | str]:
        try:
            yield from self._batches()
        except FacetoolError as err:
            if get_worker_info() is None:
                raise
            yield str(err)  # from a DataLoader worker: the message alone, raised again by the loader (one line)

    def _batches(self) -> Iterator[Slot | tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        cfg, epoch, pass_ = self.config, int(self.epoch.value), self.pool.current_pass()
        if self.remainder is not None and self.remainder[0] == epoch:
            runs = runs_of(slice_ids(self.remainder[1], self.rank, self.world_size, worker, workers), self.counts)
        else:
            runs = epoch_segments(self.counts, cfg.seed, epoch, self.rank, self.world_size, worker, workers)
        samples = itertools.chain.from_iterable(self._read(s, first, count) for s, first, count in runs)
        bufsize = max(1, cfg.shuffle_buffer // workers)
        import webdataset as wds

        seed = shuffle_seed(cfg.seed, epoch, self.rank, worker)
        samples = wds.filters.shuffle(bufsize, initial=bufsize, seed=seed)(samples)
        rng = np.random.default_rng(derive_seed(cfg.seed, 4, epoch, self.rank, worker))
        B, S = cfg.batch_size, cfg.image_size
        scratch = torch.empty((B, S, S, 3), dtype=torch.uint8)  # decoded pixels, reused batch after batch
        while True:
            chunk = list(itertools.islice(samples, B))
            if not chunk:
                return
            yield self._build(chunk, worker, pass_, rng, scratch)
            if len(chunk) < B:
                return

    def _build(self, chunk: list[dict], worker: int, pass_: int, rng: np.random.Generator, scratch: torch.Tensor):
        """One batch, in a free slot of this worker's (or in fresh memory when none is free)."""
        n, pool = len(chunk), self.pool
        index = pool.claim(worker, pass_)
        if index is None:
            out = (np.empty((n, *pool.image_shape), pool.dtype), np.empty(n, np.int64), np.empty(n, bool))
        else:
            out = pool.arrays(index, n)
        try:
            fill_batch(chunk, self.config, self.pick, rng, self.classes, out, scratch)
        except BaseException:
            if index is not None:
                pool.release(index)
            raise
        return Slot(index, n) if index is not None else tuple(torch.from_numpy(a) for a in out)

    def _read(self, shard: int, first: int, count: int) -> Iterator[dict]:
        return read_samples(self.tars[shard], self.indexes[shard], first, count)


class WdsLoader:
    """Iterate epochs of :class:`Batch` from the webdataset fallback; ``for batch in loader`` is one epoch.

    ``workers`` DataLoader processes (``config.workers``, 0: this rank's share of the cores) persist across epochs;
    ``workers=0`` reads in the calling process. Batches are built in ``pool`` (:class:`SlotPool`), memory shared
    with the workers. Tensors end on ``device``: on a GPU, a batch from the pool is copied before its slot can be
    reused (pageable memory: the copy completes before it returns); one built outside it is pinned and copied
    without blocking.
    """

    def __init__(
        self,
        shards: ShardSet,
        config: LoaderConfig,
        rank: int = 0,
        world_size: int = 1,
        device: str | torch.device = "cpu",
        workers: int | None = None,
        start_method: str | None = None,
    ) -> None:
        if not (0 <= rank < world_size):
            raise FacetoolError(f"rank {rank} outside world size {world_size}")
        if world_size > shards.samples:
            raise FacetoolError(f"{shards.root}: {shards.samples} samples cannot be split over {world_size} ranks")
        pick = shards.mask_pick_probability(config.masked_prob)  # an error before any worker starts
        warn_mask_reuse(shards, config.masked_prob, rank)
        self.shards, self.config, self.rank, self.world_size = shards, config, rank, world_size
        self.device = torch.device(device)
        if workers is None:
            workers = config.workers or config.cpu_share()
        ctx = mp.get_context(start_method) if workers > 0 else mp.get_context()
        self._epoch = ctx.Value("q", 0, lock=False)
        S, dtype = config.image_size, np.float16 if config.dtype == "float16" else np.float32
        self.pool = SlotPool(workers, SLOTS, config.batch_size, (3, S, S), dtype, ctx if workers > 0 else None)
        self.dataset = SampleStream(shards, config, rank, world_size, pick, self._epoch, self.pool)
        self._workers, self._ctx = workers, ctx
        self.workers = workers
        self._loader = self._data_loader()
        self.epoch = 0
        self._started = False

    def _data_loader(self) -> DataLoader:
        workers = self._workers
        return DataLoader(
            self.dataset,
            batch_size=None,
            num_workers=workers,
            persistent_workers=workers > 0,
            prefetch_factor=PREFETCH if workers > 0 else None,
            multiprocessing_context=self._ctx if workers > 0 else None,
            worker_init_fn=worker_init(os.getpid()) if workers > 0 else None,  # workers end with this process
            pin_memory=self.device.type == "cuda",
        )

    def __len__(self) -> int:
        """Batches per epoch on this rank (the same on every rank)."""
        return batches_per_epoch(self.shards.samples, self.world_size, self.config.batch_size, self.config.last_batch)

    def __iter__(self) -> Iterator[Batch]:
        if self._loader.num_workers and not self._started:
            # Collect garbage before the workers fork: an unreachable DALI pipeline (say, from a DALI loader used
            # earlier in this process) collected inside a forked child waits forever on threads that do not exist
            # there. Persistent workers fork once, at the first epoch.
            gc.collect()
            self._started = True
        self._epoch.value = self.epoch
        self.pool.begin_pass()
        total, partial = self.batches(self.epoch), self.config.last_batch == "partial"
        for batch in assemble(self._items() if total else iter(()), total, self.config.batch_size, partial):
            yield empty_batch(self.config, self.device) if batch is None else self._to_device(*batch)
        self.epoch += 1

    def batches(self, epoch: int) -> int:
        """Batches of ``epoch`` on this rank: ``len(self)``, or fewer for the rest of a resumed epoch."""
        remainder = self.dataset.remainder
        samples = len(remainder[1]) if remainder is not None and remainder[0] == epoch else self.shards.samples
        return batches_per_epoch(samples, self.world_size, self.config.batch_size, self.config.last_batch)

    def cut(self, epoch: int, batch: int) -> dict:
        """Where this rank's stream stands after ``batch`` batches of ``epoch`` (the checkpoint's loader state)."""
        remainder = self.dataset.remainder
        before = remainder[2] if remainder is not None and remainder[0] == epoch else None
        return {"backend": "wds", "epoch": epoch, "world_size": self.world_size, "workers": self.workers,
                "batch": batch, "before": before}  # fmt: skip

    def resume_epoch(self, cut: dict) -> tuple[int, int]:
        """Continue from a checkpoint's loader state ``cut``: (its epoch, the batches of it to skip). Written by
        this layout (ranks and workers), the stream goes on where it stood; by another (or by the DALI loader,
        whose reader is replayed to learn what it had read), this epoch reads only the samples not yet handed out.
        Called before the first epoch is read (workers persist)."""
        from facetool.train.data.dali.replay import replay_for

        layout = {"world_size": self.world_size, "workers": self.workers, "reader": None}
        counts = [s.samples for s in self.shards.shards]
        epoch, skip, before, ids = resume_plan(cut, layout, counts, self.config, replay_for(self.shards, self.config))
        if before is not None:
            self.dataset.remainder = (epoch, ids, before)
        return epoch, skip

    def _items(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """The DataLoader's batches as tensors; a worker's error, or a worker that died, as one line."""
        batches = iter(self._loader)
        self.pool.reclaim()  # the workers have left the previous pass: its batches never handed out are gone
        while True:
            died = None
            try:
                item = next(batches)
            except StopIteration:
                return
            except RuntimeError as err:
                if not _WORKER_DIED.match(str(err)):
                    raise
                died = str(err).strip().splitlines()[0]
            if died is not None or isinstance(item, str):  # a worker died, or sent its error's message
                # Shut the workers down now, not when the garbage collector meets the iterator: collected with an
                # exception's traceback, its queues may be finalised first, and each worker then waits out its
                # status-check interval before it is terminated. Raised here, not in the handler, so no traceback
                # keeps the old workers alive.
                getattr(batches, "_shutdown_workers", lambda: None)()
                del batches
                self._loader, self._started = self._data_loader(), False
                if died is not None:
                    raise FacetoolError(f"{self.shards.root}: a loader worker ended unexpectedly ({died})")
                raise FacetoolError(item)
            yield self.pool.take(item) if isinstance(item, Slot) else item

    def _to_device(self, images: torch.Tensor, labels: torch.Tensor, masked: torch.Tensor) -> Batch:
        nb = self.device.type == "cuda"
        return Batch(
            images.to(self.device, non_blocking=nb),
            labels.to(self.device, non_blocking=nb),
            masked.to(self.device, non_blocking=nb),
        )

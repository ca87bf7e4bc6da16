"""The DALI loader: an epoch's pipeline per epoch, batches handed over as torch tensors, failures named by sample,
and the rest of an epoch interrupted on another layout read through :class:`~.source.RemainderSource`."""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch

from facetool.pipeline.errors import FacetoolError
from facetool.train.data.batch import Batch, empty_batch
from facetool.train.data.config import LoaderConfig
from facetool.train.data.dali.pipeline import (
    READER_NAME,
    build_pipeline,
    error_line,
    find_bad_sample,
    require_dali,
)
from facetool.train.data.dali.replay import replay_for
from facetool.train.data.dali.source import RemainderSource
from facetool.train.data.epochs import batches_per_epoch
from facetool.train.data.remainder import resume_plan
from facetool.train.data.shardset import ShardSet, warn_mask_reuse

T = TypeVar("T")


class DaliLoader:
    """Iterate epochs of :class:`Batch` from the DALI pipeline; ``for batch in loader`` is one epoch, the one
    ``loader.epoch`` names (set it to start anywhere: a resumed run sets it to its checkpoint's epoch).

    Tensors are on the training device (``cuda:device_id`` for the GPU pipeline, else the CPU). The images of a
    batch stay valid after the next one is drawn (DALI hands each batch over as its own torch tensor). The first
    epoch's pipeline is built at construction, so configuration errors surface there.
    """

    def __init__(
        self,
        shards: ShardSet,
        config: LoaderConfig,
        rank: int = 0,
        world_size: int = 1,
        device: str = "cpu",
        device_id: int | None = None,
    ) -> None:
        require_dali("the DALI loader")
        self.shards, self.config, self.rank, self.world_size = shards, config, rank, world_size
        self._device_kind, self._device_id = device, device_id
        self.device = torch.device("cuda", device_id or 0) if device == "gpu" else torch.device("cpu")
        self._with_masks = config.masked_prob > 0
        self.epoch = 0
        warn_mask_reuse(shards, config.masked_prob, rank)
        self._ready: tuple[int, object] | None = None  # (epoch, iterator not yet drawn from)
        self._remainder: tuple[int, RemainderSource, dict] | None = None  # a resumed epoch: (epoch, source, cut)
        self._guarded(0, 0, lambda: self._prepare(0))

    def _source(self, epoch: int) -> RemainderSource | None:
        """The external source of ``epoch`` when it is the rest of an interrupted one, else None (the reader)."""
        return self._remainder[1] if self._remainder is not None and self._remainder[0] == epoch else None

    def _prepare(self, epoch: int):
        """The iterator over ``epoch``'s pipeline, built now unless an unused one for that epoch is ready."""
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        if self._ready is not None and self._ready[0] == epoch:
            return self._ready[1]
        self._ready = None  # the previous pipeline goes before the next is built (threads, buffers)
        source = self._source(epoch)
        pipe = build_pipeline(
            self.shards, self.config, self.rank, self.world_size, self._device_kind, self._device_id, epoch=epoch,
            source=source,
        )  # fmt: skip
        pipe.build()
        policy = LastBatchPolicy.PARTIAL if self.config.last_batch == "partial" else LastBatchPolicy.DROP
        names = ["images", "labels", "masked"] if self._with_masks else ["images", "labels"]
        if source is None:
            iterator = DALIGenericIterator([pipe], names, reader_name=READER_NAME, last_batch_policy=policy)
        else:  # the source's batches, of the sizes it gives, until it ends
            iterator = DALIGenericIterator([pipe], names, last_batch_policy=LastBatchPolicy.PARTIAL)
        self._ready = (epoch, iterator)
        return iterator

    def __len__(self) -> int:
        """Batches per epoch on this rank (the same on every rank)."""
        return batches_per_epoch(self.shards.samples, self.world_size, self.config.batch_size, self.config.last_batch)

    def batches(self, epoch: int) -> int:
        """Batches of ``epoch`` on this rank: ``len(self)``, or fewer for the rest of a resumed epoch."""
        source = self._source(epoch)
        return len(self) if source is None else source.total

    def cut(self, epoch: int, batch: int) -> dict[str, Any]:
        """Where this rank's stream stands after ``batch`` batches of ``epoch`` (the checkpoint's loader state):
        in DALI's reader, or in the rest of an epoch read as the fallback reads it with one worker."""
        if self._source(epoch) is None:
            return {"backend": "dali", "epoch": epoch, "world_size": self.world_size, "workers": 0, "reader": "dali",
                    "batch": batch, "before": None}  # fmt: skip
        return {"backend": "dali", "epoch": epoch, "world_size": self.world_size, "workers": 1, "batch": batch,
                "before": self._remainder[2]}  # fmt: skip

    def resume_epoch(self, cut: dict[str, Any]) -> tuple[int, int]:
        """Continue from a checkpoint's loader state ``cut``: (its epoch, the batches of it to skip). Written by
        this layout, the stream goes on where it stood; by another (ranks, or the fallback's workers), this epoch
        reads only the samples not yet handed out. Called before the first epoch is read."""
        inside = cut.get("before") is not None  # the cut fell in the rest of an epoch, not in DALI's reader
        layout = {"world_size": self.world_size, "workers": 1 if inside else 0, "reader": None if inside else "dali"}
        counts = [s.samples for s in self.shards.shards]
        epoch, skip, before, ids = resume_plan(cut, layout, counts, self.config, replay_for(self.shards, self.config))
        if before is not None:
            source = RemainderSource(self.shards, self.config, epoch, ids, self.rank, self.world_size)
            self._remainder, self._ready = (epoch, source, before), None
        return epoch, skip

    def __iter__(self) -> Iterator[Batch]:
        epoch = self.epoch
        iterator = self._guarded(epoch, 0, lambda: self._prepare(epoch))
        self._ready = None  # drawn from now: a later epoch, or this one again, gets a fresh pipeline
        for batch in itertools.count():
            out = self._guarded(epoch, batch, functools.partial(next, iterator, None))
            if out is None:
                break
            data = out[0]
            labels = data["labels"].view(-1).long()
            if bool(((labels < 0) | (labels >= self.shards.classes)).any()):  # one sync; the step syncs anyway
                raise self._culprit(epoch, batch, None)
            if self._with_masks:
                masked = data["masked"].view(-1).bool()
            else:
                masked = torch.zeros(labels.shape, dtype=torch.bool, device=labels.device)
            yield Batch(data["images"], labels, masked)
        del iterator
        source = self._source(epoch)
        for _ in range(len(source.sizes), source.total) if source is not None else ():
            yield empty_batch(self.config, self.device)  # this rank's part of the rest ran out before the others'
        self.epoch += 1

    def _guarded(self, epoch: int, batch: int, step: Callable[[], T]) -> T:
        """Run ``step`` (building, or drawing from, the pipeline); a DALI failure (a RuntimeError carrying a page
        of pipeline traceback) becomes one line naming the sample at fault."""
        try:
            return step()
        except RuntimeError as err:
            raise self._culprit(epoch, batch, err) from None

    def _culprit(self, epoch: int, batch: int, err: RuntimeError | None) -> FacetoolError:
        """The error for a failure at ``batch`` of ``epoch``: the bad sample, found by re-reading the batches the
        failure can belong to (the pipeline runs ahead by its prefetch depths) on the CPU."""
        ahead = 1 if err is None else self.config.prefetch + self.config.reader_prefetch + 2
        source = self._source(epoch)
        if source is None:
            found = find_bad_sample(self.shards, self.config, self.rank, self.world_size, epoch, batch, ahead)
        else:
            found = source.find_bad_sample(batch, ahead)
        if found is not None:
            return found
        what = f"a label outside [0, {self.shards.classes})" if err is None else error_line(err)
        return FacetoolError(
            f"{self.shards.root}: the DALI pipeline failed in epoch {epoch}, batch {batch} ({what}), and no sample "
            "of that batch fails when read again on the CPU"
        )

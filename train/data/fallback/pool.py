"""Batch buffers that the fallback's workers fill and the training loop reads: shared memory, reused.

A worker builds a batch in place in one of its slots (no copy into fresh shared memory, no fresh pages to fault
in per batch) and hands over the slot's number. The tensors handed out view the slot; the slot is free again once
every one of them (and every view of them) is gone. A worker finding none of its slots free builds its batch in
fresh memory instead, so a consumer may keep batches as long as it likes.

A slot's state is FREE, HELD (handed out) or the pass (>= 1, one per epoch started) in which a worker took it.
Batches a worker built in a pass that was abandoned are dropped unseen by the DataLoader; their slots are
reclaimed when the next pass begins (every worker has then left the old pass).
"""

from __future__ import annotations

import math
import weakref
from typing import NamedTuple

import numpy as np
import torch

FREE, HELD = 0, -1


class Slot(NamedTuple):
    """A batch built in slot ``index`` of the pool: its first ``size`` rows."""

    index: int
    size: int


def _free(state: np.ndarray, index: int) -> None:
    state[index] = FREE


class SlotPool:
    """``slots`` batch buffers per worker ((batch, *image_shape) images of ``dtype``, labels, masked flags) in
    memory shared with the workers (``ctx``: their multiprocessing context; None: in this process only)."""

    def __init__(self, workers: int, slots: int, batch: int, image_shape: tuple[int, ...], dtype, ctx=None) -> None:
        self.workers, self.slots, self.batch = max(1, workers), slots, batch
        self.image_shape, self.dtype = tuple(image_shape), np.dtype(dtype)
        count = self.workers * slots
        sizes = (count * batch * math.prod(image_shape) * self.dtype.itemsize, count * batch * 8, count * batch,
                 (count + 1) * 8)  # fmt: skip
        self._buffers = tuple(ctx.RawArray("b", n) if ctx is not None else bytearray(n) for n in sizes)
        self._views()

    def _views(self) -> None:
        images, labels, masked, state = self._buffers
        count = self.workers * self.slots
        self.images = np.frombuffer(images, dtype=self.dtype).reshape(count, self.batch, *self.image_shape)
        self.labels = np.frombuffer(labels, dtype=np.int64).reshape(count, self.batch)
        self.masked = np.frombuffer(masked, dtype=bool).reshape(count, self.batch)
        self.state = np.frombuffer(state, dtype=np.int64)  # one per slot, then the current pass

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("images", "labels", "masked", "state")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._views()

    # ---- in the main process
    def begin_pass(self) -> None:
        """A new pass (epoch) begins: batches taken from now on carry its number."""
        self.state[-1] += 1

    def reclaim(self) -> None:
        """Free the slots of batches built in earlier passes and never handed out (call once the workers have
        left those passes)."""
        slots = self.state[:-1]
        slots[(slots > 0) & (slots < self.state[-1])] = FREE

    def take(self, slot: Slot) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The tensors of a batch a worker built in ``slot``; the images view the slot until they are gone."""
        self.state[slot.index] = HELD
        images = self.images[slot.index, : slot.size]  # a view of its own: its end frees the slot
        weakref.finalize(images, _free, self.state, slot.index)
        labels = self.labels[slot.index, : slot.size].copy()
        masked = self.masked[slot.index, : slot.size].copy()
        return torch.from_numpy(images), torch.from_numpy(labels), torch.from_numpy(masked)

    # ---- in a worker
    def current_pass(self) -> int:
        return int(self.state[-1])

    def claim(self, worker: int, pass_: int) -> int | None:
        """One of ``worker``'s free slots, now taken in ``pass_``; None when all of them are in use."""
        first = worker * self.slots
        free = np.flatnonzero(self.state[first : first + self.slots] == FREE)
        if not len(free):
            return None
        index = first + int(free[0])
        self.state[index] = pass_
        return index

    def release(self, index: int) -> None:
        """Give back a slot whose batch was not handed over (an error while building it)."""
        self.state[index] = FREE

    def arrays(self, index: int, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The first ``size`` rows of a slot's images, labels and masked flags, to build a batch in."""
        return self.images[index, :size], self.labels[index, :size], self.masked[index, :size]

"""Which epoch, and which batch of it, each optimiser step trains on.

A run starts at epoch 0, step 0, and every epoch has the loader's ``len`` batches. A run resumed on another layout
(number of ranks) first finishes the interrupted epoch with the samples left of it, in fewer batches than a whole
epoch; the clock then starts at that epoch and step with that length, and whole epochs follow.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class EpochClock:
    """Epoch ``epoch`` began at step ``start`` and has ``length`` batches (None: a whole epoch); every epoch after
    it has ``steps_per_epoch``."""

    steps_per_epoch: int
    epoch: int = 0
    start: int = 0
    length: int | None = None

    def at(self, step: int) -> tuple[int, int]:
        """(epoch, batch in that epoch) of ``step``."""
        first = self.steps_per_epoch if self.length is None else self.length
        if step < self.start + first:
            return self.epoch, step - self.start
        epoch, batch = divmod(step - self.start - first, self.steps_per_epoch)
        return self.epoch + 1 + epoch, batch

    def total(self, epochs: float) -> int:
        """The steps of a run of ``epochs`` epochs: ``ceil(epochs x steps_per_epoch)`` while the epochs fall on
        multiples of it; after a shortened epoch, its end plus the whole epochs left (a fraction rounds up to a
        step; an end that falls in the shortened epoch finishes it)."""
        spe = self.steps_per_epoch
        if self.start == self.epoch * spe and self.length in (None, spe):
            return max(1, math.ceil(epochs * spe))
        if epochs <= self.epoch:
            return self.start
        end = self.start + (spe if self.length is None else self.length)
        return end + max(0, math.ceil((epochs - self.epoch - 1) * spe))

"""The parts of `facetool bench gpu`, in the order they run, each with its share of the global time budget.

The environment comes first (the rest depends on whether there is a GPU), then the shards the loader, training
and device parts read; compiling comes last, as it is the slowest and the figure the run can best do without.
A new part is a module with a ``PART`` (:class:`~facetool.bench.gpu.plan.Part`) listed here.
"""

from __future__ import annotations

from facetool.bench.gpu import devices, environment, fixture, loader, nccl, partial_fc, training, verification
from facetool.bench.gpu.plan import Part

PARTS: tuple[Part, ...] = (
    environment.PART,
    fixture.PART,
    loader.PART,
    training.PART,
    partial_fc.PART,
    verification.PART,
    nccl.PART,
    devices.PART,
    training.COMPILE_PART,
)


def part_names() -> list[str]:
    """The parts' names, in the order they run."""
    return [p.name for p in PARTS]

"""The pieces `facetool bench gpu` is made of: the sizes of a full and of a smoke run, parts and their jobs, and the
status strings every run, job and part reports.

A *part* (loader, training, ...) holds a share of the global time budget and plans *jobs*; each job runs in a
fresh process and yields *runs*, one dict per figure, each with a ``name`` and a ``status``: ``"ok"``,
``"failed: <one-line reason>"`` or ``"skipped: <reason>"``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from facetool.pipeline import DEFAULT_SAMPLES_PER_SHARD

OK = "ok"
NO_CUDA = "no CUDA"
_REASON_CHARS = 300


@dataclass(frozen=True)
class Sizes:
    """How big each measurement is: the full run on a GPU, or the smoke run's toy sizes on the CPU."""

    faces: int  # distinct drawn faces, reused by the shards' samples under distinct keys and labels
    samples: int  # shard samples
    per_identity: int  # samples per label
    mask_fraction: float  # share of samples with a rendered masked twin
    samples_per_shard: int
    masked_prob: float  # q: share of faces shown masked
    loader_batch: int
    loader_warmup: int
    loader_batches: int
    shuffle_buffer: int | None  # None: the loader's default
    models: tuple[str, ...]  # trained in this order (the last one gets what the others leave of the budget)
    model_weights: tuple[float, ...]  # each model's share of the training part's time
    train_batch: int
    train_warmup: int
    train_steps: int
    flop_batch: int
    pfc_classes: int
    pfc_width: int
    pfc_batch: int
    pfc_rates: tuple[float, ...]
    pfc_warmup: int
    pfc_steps: int
    verification_model: str
    verification_images: int
    nccl_classes: int
    devices_model: str
    devices_batch: int


FULL = Sizes(
    faces=4096, samples=200_000, per_identity=20, mask_fraction=0.2, samples_per_shard=DEFAULT_SAMPLES_PER_SHARD,
    masked_prob=0.1, loader_batch=512, loader_warmup=10, loader_batches=100, shuffle_buffer=None,
    models=("mobilefacenet", "ir50", "facet_base", "ir100"), model_weights=(1.0, 1.5, 2.0, 2.5),
    train_batch=512, train_warmup=5, train_steps=30, flop_batch=2,
    pfc_classes=2_000_000, pfc_width=512, pfc_batch=512, pfc_rates=(0.1, 1.0), pfc_warmup=3, pfc_steps=10,
    verification_model="ir100", verification_images=12_000, nccl_classes=100_000,
    devices_model="mobilefacenet", devices_batch=64,
)  # fmt: skip

SMOKE = Sizes(
    faces=64, samples=1024, per_identity=8, mask_fraction=0.2, samples_per_shard=512,
    masked_prob=0.1, loader_batch=32, loader_warmup=2, loader_batches=8, shuffle_buffer=64,
    models=("tinynet",), model_weights=(1.0,),
    train_batch=8, train_warmup=1, train_steps=2, flop_batch=2,
    pfc_classes=5000, pfc_width=512, pfc_batch=64, pfc_rates=(0.1, 1.0), pfc_warmup=1, pfc_steps=2,
    verification_model="tinynet", verification_images=64, nccl_classes=1000,
    devices_model="tinynet", devices_batch=8,
)  # fmt: skip


@dataclass(frozen=True)
class Setting:
    """What every part's plan sees: the sizes, the device the parts run on, the work folder, the environment."""

    sizes: Sizes
    device: str  # "cuda" or "cpu"
    work: Path
    smoke: bool
    env: dict[str, Any] = field(default_factory=dict)

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"

    @property
    def shards(self) -> Path:
        """The shard folder the fixture part writes and the loader, training and device parts read."""
        return self.work / "shards"

    def no_cuda_reason(self) -> str:
        """Why a CUDA part is skipped: no GPU here, or a smoke run that stays on the CPU."""
        return NO_CUDA + (" (a --smoke run stays on the CPU)" if self.smoke and self.env.get("cuda") else "")

    def with_env(self, env: dict[str, Any]) -> Setting:
        return dataclasses.replace(self, env=env)


@dataclass(frozen=True)
class Job:
    """One fresh process: ``fn(*args)`` yields the runs named ``runs`` (a run it does not reach is reported
    failed with the reason the process stopped)."""

    name: str
    fn: Callable[..., Iterator[dict[str, Any]]]
    args: tuple
    runs: tuple[str, ...]
    weight: float = 1.0  # its share of the part's time, against the part's other jobs
    needs_cuda: bool = False


@dataclass(frozen=True)
class Part:
    """A part of the benchmark: its share of the global budget, its jobs for a setting (and the results of the
    parts before it), and the figures it derives from its runs."""

    name: str
    what: str  # one line for the report
    share: float
    plan: Callable[[Setting, dict[str, Any]], list[Job]]
    needs_cuda: bool = False
    needs_shards: bool = False
    summarize: Callable[[list[dict[str, Any]], dict[str, Any]], dict[str, Any]] | None = None


def one_line(text: object) -> str:
    """The first line of a message, shortened: a status reason stays one line."""
    lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
    first = lines[0] if lines else "no message"
    return first if len(first) <= _REASON_CHARS else first[: _REASON_CHARS - 3] + "..."


def failed(reason: object) -> str:
    return f"failed: {one_line(reason)}"


def skipped(reason: object) -> str:
    return f"skipped: {one_line(reason)}"


def error_reason(err: BaseException) -> str:
    """An exception as a status reason: its type (unless a FacetoolError) and the first line of its message."""
    from facetool.pipeline.errors import FacetoolError

    return one_line(err) if isinstance(err, FacetoolError) else f"{type(err).__name__}: {one_line(err)}"


def attempt(name: str, fn: Callable[..., dict[str, Any]], *args: Any, **kwargs: Any) -> dict[str, Any]:
    """Run one measurement: ``{"name", "status": "ok", **figures}``, or its failure as a status (an exception in
    one measurement, a CUDA out-of-memory error say, does not stop the job's next ones)."""
    try:
        return {"name": name, "status": OK, **fn(*args, **kwargs)}
    except Exception as err:
        return {"name": name, "status": failed(error_reason(err))}


def status_of(runs: list[dict[str, Any]]) -> str:
    """A part's status from its runs: failed when one failed, skipped when all were, else ok."""
    bad = [r for r in runs if r["status"].startswith("failed")]
    if bad:
        first = bad[0]["status"].removeprefix("failed: ")
        return failed(f"{len(bad)} of {len(runs)} runs failed; first, {bad[0]['name']}: {first}")
    if runs and all(r["status"].startswith("skipped") for r in runs):
        return runs[0]["status"]
    return OK if runs else skipped("nothing to run")


def ok_runs(runs: list[dict[str, Any]], **match: Any) -> list[dict[str, Any]]:
    """The runs that succeeded and whose fields equal ``match``."""
    return [r for r in runs if r["status"] == OK and all(r.get(k) == v for k, v in match.items())]


def first_ok(runs: list[dict[str, Any]], **match: Any) -> dict[str, Any]:
    """The first run that succeeded and whose fields equal ``match``, or an empty dict."""
    found = ok_runs(runs, **match)
    return found[0] if found else {}


def synchronize(device: Any) -> None:
    """Wait for the GPU's queued work when ``device`` is a CUDA device (a clock read after it is honest)."""
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None when either is missing."""
    return a / b if a is not None and b else None

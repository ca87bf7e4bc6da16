"""`facetool bench train`: a recipe's training images/s with its data loader, beside the model-only rate (the same
steps on random images already on the device), so that the loader's cost is visible; and the peak memory of each.

Each data source runs in a fresh process (so that neither inherits the other's threads, allocator state or warm
caches), builds the run exactly as `facetool train` does, with no evaluation and no intermediate checkpoint, and
times ``steps`` optimiser steps after ``warmup`` ones (first-step allocations, loader start-up, shuffle-buffer
fill, cuDNN autotuning). On a GPU the clock is read after a device synchronisation.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from facetool.bench.process import cpu_us_per_image, fastest_runs, process_tree_cpu_seconds, run_isolated
from facetool.pipeline.errors import FacetoolError

SOURCES = ("shards", "synthetic")
_LOADER_NAMES = {"DaliLoader": "dali", "WdsLoader": "wds", "SyntheticLoader": "synthetic"}


def loader_name(loader: object) -> str:
    """What a row calls the loader of a run: dali, wds or synthetic."""
    return _LOADER_NAMES.get(type(loader).__name__, type(loader).__name__)


def peak_memory(device) -> tuple[int, str]:
    """(bytes, what): torch's CUDA caching allocator's peak on a GPU (the model, optimiser and batches; DALI's
    own device buffers are not in it), else this process's peak resident set."""
    import torch

    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda_max_allocated"
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return int(rss if sys.platform == "darwin" else rss * 1024), "max_rss"


class _Stop(Exception):
    """Raised from ``on_step`` to end a run once its last clock reading is taken."""


def step_clock(trainer, steps: Iterable[int], stop: bool = False) -> dict[int, tuple[float, float | None]]:
    """Run ``trainer`` and read the clock and the process tree's CPU seconds before the run (key 0) and after each
    optimiser step in ``steps`` (after a device synchronisation on a GPU). With ``stop`` the run ends right after
    the last of them, before that step's logging, checkpoint or evaluation."""
    import torch

    wanted = sorted(set(steps))
    device = trainer.ctx.device
    marks = {0: (time.perf_counter(), process_tree_cpu_seconds())}

    def on_step(step: int) -> None:
        if step in wanted:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            marks[step] = (time.perf_counter(), process_tree_cpu_seconds())
            if stop and step == wanted[-1]:
                raise _Stop

    try:
        trainer.run(on_step=on_step)
    except _Stop:
        pass
    return marks


def bench_overrides(source: str, warmup: int, steps: int) -> list[str]:
    """What the benchmark changes in a recipe: the data source, the length, no evaluation, one final checkpoint."""
    return [f"data.source={source}", f"run.steps={warmup + steps}", "eval.bins=[]", "eval.every=0",
            "run.checkpoint_every=0"]  # fmt: skip


def check_recipe(config: str | os.PathLike, overrides: tuple[str, ...], sources: tuple[str, ...]) -> None:
    """The errors a run would meet (unknown keys, wrong types, missing shards), before any process starts."""
    from facetool.train.engine import load_config

    unknown = set(sources) - set(SOURCES)
    if unknown or not sources:
        raise FacetoolError(f"bench train: data sources must be among {', '.join(SOURCES)}, got {sources}")
    for source in sources:
        cfg = load_config(config, [*overrides, *bench_overrides(source, 1, 1)])
        if source == "shards" and not cfg["data"]["shards"]:
            raise FacetoolError(f"{config}: data.shards is not set; give it with --set data.shards=DIR")


def run_steps(config: str, overrides: tuple[str, ...], source: str, warmup: int, steps: int) -> dict[str, Any]:
    """Build the run of ``config`` (with ``overrides``) on ``source`` and time ``steps`` steps after ``warmup``."""
    import torch

    from facetool.train.engine import load_config
    from facetool.train.engine.trainer import Trainer

    extra = bench_overrides(source, warmup, steps)
    cfg = load_config(config, [*overrides, *extra])
    if source == "synthetic" and cfg["data"]["shards"]:
        from facetool.train.data import open_shards

        try:  # the model-only run gets the classifier the shards would give it
            classes = open_shards(cfg["data"]["shards"], check=False).classes
            cfg = load_config(config, [*overrides, *extra, f"data.synthetic_classes={classes}"])
        except FacetoolError:
            pass  # no readable shards: the configured synthetic_classes stay
    with tempfile.TemporaryDirectory(prefix="facetool-bench-train-") as tmp:
        trainer = Trainer(cfg, Path(tmp))
        device = trainer.ctx.device
        marks = step_clock(trainer, (warmup, warmup + steps))
        (t0, c0), (t1, c1) = marks[warmup], marks[warmup + steps]
        images = steps * trainer.global_batch
        peak, peak_kind = peak_memory(device)
        return {
            "source": source,
            "loader": loader_name(trainer.loader),
            "device": str(device),
            "backbone": trainer.name,
            "task": trainer.task,
            "global_batch": trainer.global_batch,
            "classes": cfg["data"]["synthetic_classes"] if source == "synthetic" else trainer.loader.shards.classes,
            "world_size": trainer.ctx.world_size,
            "threads": torch.get_num_threads(),
            "images": images,
            "seconds": t1 - t0,
            "images_per_s": images / (t1 - t0),
            "cpu_seconds": c1 - c0 if c0 is not None and c1 is not None else None,
            "peak_memory_bytes": peak,
            "peak_memory_kind": peak_kind,
        }


def run_train_benchmark(
    config: str | os.PathLike,
    overrides: tuple[str, ...] = (),
    sources: tuple[str, ...] = SOURCES,
    steps: int = 20,
    warmup: int = 3,
    repeats: int = 1,
    report=None,
) -> dict[str, Any]:
    """Time the recipe on each of ``sources`` (``repeats`` times, interleaved, each in a fresh process); return the
    fastest run of each with all rates, and the loader run's rate as a share of the model-only one."""
    if warmup < 1 or steps < 1:
        raise FacetoolError("bench train: --warmup and --steps must be at least 1")
    config = str(config)
    check_recipe(config, overrides, sources)
    runs: dict[str, list[dict[str, Any]]] = {}
    for _ in range(repeats):
        for source in sources:
            row = run_isolated(f"bench train, {source}", run_steps, config, tuple(overrides), source, warmup, steps)
            row["cpu_us_per_image"] = cpu_us_per_image(row["cpu_seconds"], row["images"])
            runs.setdefault(source, []).append(row)
            if report:
                report(row)
    results = fastest_runs(runs.values())
    rate = {r["source"]: r["images_per_s"] for r in results}
    share = rate["shards"] / rate["synthetic"] if {"shards", "synthetic"} <= set(rate) else None
    return {
        "config": str(Path(config).resolve()),
        "overrides": list(overrides),
        "steps": steps,
        "warmup": warmup,
        "repeats": repeats,
        "results": results,
        "shards_to_model_only": share,
    }

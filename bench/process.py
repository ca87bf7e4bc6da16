"""Process helpers shared by the benchmarks: the cores we may use, CPU time of a process tree, and running a
contender in a fresh process so that none inherits another's threads, allocator state or warm caches."""

from __future__ import annotations

import multiprocessing as mp
import os
import queue as queue_module
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from facetool.pipeline.errors import FacetoolError
from facetool.pipeline.processes import die_with_parent


def cpu_count() -> int:
    """Cores this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def process_tree_cpu_seconds() -> float | None:
    """CPU seconds (user + system) used so far by this process and its live descendants (DataLoader workers,
    pool processes); None where /proc is not available."""
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    total, todo, seen = 0.0, [os.getpid()], set()
    try:
        while todo:
            pid = todo.pop()
            if pid in seen:
                continue
            seen.add(pid)
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
                fields = stat[stat.rindex(")") + 2 :].split()
                total += (int(fields[11]) + int(fields[12])) / tick
                for task in Path(f"/proc/{pid}/task").iterdir():
                    todo += [int(c) for c in (task / "children").read_text().split()]
            except (FileNotFoundError, ProcessLookupError):
                continue  # exited meanwhile
    except OSError:
        return None
    return total


def _child(queue, fn: Callable, args: tuple, parent: int) -> None:
    die_with_parent(parent)
    try:
        queue.put(("ok", fn(*args)))
    except FacetoolError as err:
        queue.put(("error", str(err)))
    except Exception as err:  # reported, with its type, to the parent
        queue.put(("error", f"{type(err).__name__}: {err}"))


def run_isolated(what: str, fn: Callable, *args) -> Any:
    """Run ``fn(*args)`` in a fresh (spawned) process and return its result; an exception there, or the process
    dying without an answer (a crash, the OOM killer), is a :class:`FacetoolError` naming ``what``."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(queue, fn, args, os.getpid()))
    proc.start()
    try:
        while True:
            try:
                status, value = queue.get(timeout=1.0)
                break
            except queue_module.Empty:
                if not proc.is_alive():
                    try:  # it may have answered just before exiting
                        status, value = queue.get(timeout=1.0)
                        break
                    except queue_module.Empty:
                        raise FacetoolError(
                            f"{what}: the benchmark process exited with code {proc.exitcode} without a result"
                        ) from None
    finally:
        proc.join()
    if status != "ok":
        raise FacetoolError(f"{what}: {value}")
    return value


def cpu_us_per_image(cpu_seconds: float | None, images: int) -> float | None:
    """CPU microseconds per image, or None where the CPU time was not measurable."""
    return cpu_seconds / images * 1e6 if cpu_seconds is not None else None


def fastest_runs(groups: Iterable[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per group of repeated runs of one contender, its fastest run (by ``images_per_s``) with every run's rate
    in ``all_images_per_s``."""
    results = []
    for rows in groups:
        best = max(rows, key=lambda r: r["images_per_s"])
        results.append({**best, "all_images_per_s": [r["images_per_s"] for r in rows]})
    return results

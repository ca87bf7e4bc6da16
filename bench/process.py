"""Process helpers shared by the benchmarks: the cores we may use, CPU time of a process tree, and running a
contender in a fresh process so that none inherits another's threads, allocator state or warm caches (for one
result, :func:`run_isolated`; for results as they come, under a time limit, :func:`stream_isolated`)."""

from __future__ import annotations

import multiprocessing as mp
import os
import queue as queue_module
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from facetool.pipeline.errors import FacetoolError
from facetool.pipeline.processes import die_with_parent

_EXIT_GRACE = 60.0  # seconds a child that has answered may take to exit (CUDA, DALI and NCCL teardown)


def cpu_count() -> int:
    """Cores this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def process_tree(pid: int | None = None) -> list[int]:
    """This process (or ``pid``) and its live descendants (DataLoader workers, pool processes), as far as /proc
    tells them (where it cannot, the process alone)."""
    found, todo = [], [os.getpid() if pid is None else pid]
    while todo:
        pid = todo.pop()
        if pid in found:
            continue
        found.append(pid)
        try:
            for task in Path(f"/proc/{pid}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue  # exited meanwhile, or no /proc
    return found


def process_tree_cpu_seconds() -> float | None:
    """CPU seconds (user + system) used so far by this process and its live descendants (DataLoader workers,
    pool processes); 0 where /proc is not available."""
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    total = 0.0
    for pid in process_tree():
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue  # exited meanwhile
        fields = stat[stat.rindex(")") + 2 :].split()
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


class MemorySampler:
    """Peak anonymous memory of this process and its descendants, sampled from /proc on a thread every
    ``interval`` s: each process's largest ``RssAnon`` (which counts pages a forked child still shares with its
    parent) and the largest sum over the tree of ``Pss_Anon`` (shared pages split between their sharers: the
    memory the tree really holds)."""

    def __init__(self, interval: float = 0.01) -> None:
        self.interval, self.rss_anon, self.pss_anon_total = interval, {}, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while True:
            self.sample()
            if self._stop.wait(self.interval):
                return

    def sample(self) -> None:
        """Read every process of the tree once."""
        total = 0
        for pid in process_tree():
            rss, pss = anon_memory(pid)
            self.rss_anon[pid] = max(self.rss_anon.get(pid, 0), rss)
            total += pss
        self.pss_anon_total = max(self.pss_anon_total, total)


def anon_memory(pid: int) -> tuple[int, int]:
    """Bytes of anonymous memory a process holds now: ``RssAnon`` and ``Pss_Anon`` (0 where unknown)."""
    return _kib(f"/proc/{pid}/status", "RssAnon:"), _kib(f"/proc/{pid}/smaps_rollup", "Pss_Anon:")


def _kib(path: str, field: str) -> int:
    """Bytes of a ``FIELD: N kB`` line of a /proc file (0 when the process is gone or the field absent)."""
    try:
        with open(path, "rb") as f:
            for line in f:
                if line.startswith(field.encode()):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class TimeLimitExceeded(FacetoolError):
    """A process started by :func:`stream_isolated` ran past its time limit and was stopped."""


def _child(queue, fn: Callable, args: tuple, parent: int) -> None:
    die_with_parent(parent)
    if hasattr(os, "setpgrp"):
        os.setpgrp()  # its own process group: stopping it stops what it started (compile workers, loader workers)
    try:
        for item in fn(*args):
            queue.put(("item", item))
        queue.put(("done", None))
    except FacetoolError as err:
        queue.put(("error", str(err)))
    except Exception as err:  # reported, with its type, to the parent
        queue.put(("error", f"{type(err).__name__}: {err}"))


def _one(fn: Callable, *args) -> Iterator[Any]:
    """A function's result as a stream of one item."""
    yield fn(*args)


def _next_message(queue, proc, what: str, deadline: float | None, limit: float | None) -> tuple[str, Any]:
    """The child's next (status, value); a FacetoolError when it died without one or the deadline passed."""
    while True:
        wait = 1.0 if deadline is None else min(1.0, deadline - time.monotonic())
        if wait <= 0:
            raise TimeLimitExceeded(f"{what}: stopped at its time limit of {limit:.0f} s")
        try:
            return queue.get(timeout=wait)
        except queue_module.Empty:
            if not proc.is_alive():
                try:  # it may have answered just before exiting
                    return queue.get(timeout=1.0)
                except queue_module.Empty:
                    raise FacetoolError(
                        f"{what}: the benchmark process exited with code {proc.exitcode} without a result"
                    ) from None


def stream_isolated(what: str, fn: Callable[..., Iterable[Any]], *args, timeout: float | None = None) -> Iterator[Any]:
    """Run the generator function ``fn(*args)`` in a fresh (spawned) process and yield each item it yields, as it
    comes. An exception there, or the process dying early (a crash, the OOM killer), is a :class:`FacetoolError`
    naming ``what``; running past ``timeout`` seconds kills it and raises :class:`TimeLimitExceeded`. The items
    received before either stay with the caller."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(queue, fn, args, os.getpid()))
    proc.start()
    deadline = None if timeout is None else time.monotonic() + timeout
    answered = False  # the child sent its last message and is exiting by itself
    try:
        while True:
            status, value = _next_message(queue, proc, what, deadline, timeout)
            if status == "item":
                yield value
                continue
            answered = True
            if status == "done":
                return
            raise FacetoolError(f"{what}: {value}")
    finally:
        if answered:  # within the time limit, if there is one
            left = _EXIT_GRACE if deadline is None else min(_EXIT_GRACE, deadline - time.monotonic())
            proc.join(timeout=max(0.0, left))
        if proc.is_alive():  # past its limit, stuck in its teardown, or the caller stopped reading
            _kill_group(proc)
        proc.join()


def _kill_group(proc) -> None:
    """Kill a child started by :func:`stream_isolated` and the processes it started."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (AttributeError, ProcessLookupError, PermissionError):
        proc.kill()  # no process groups here, or it had not made its own yet


def run_isolated(what: str, fn: Callable, *args) -> Any:
    """Run ``fn(*args)`` in a fresh (spawned) process and return its result; an exception there, or the process
    dying without an answer (a crash, the OOM killer), is a :class:`FacetoolError` naming ``what``."""
    return list(stream_isolated(what, _one, fn, *args))[0]


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

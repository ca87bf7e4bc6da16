"""``facetool convert``: RecordIO -> WebDataset tar shards (format v1), shuffled, indexed, parallel, resumable.

The shards of a conversion are planned up front (``ConvertJob``), so they can be written in any order, by any
number of worker processes, and a re-run after a kill writes exactly the bytes an uninterrupted run would have:
it skips the shards whose tar is under its final name (published last) and writes the others again.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import sys
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from pathlib import Path

from facetool.pipeline.atomic import Progress
from facetool.pipeline.errors import FacetoolError
from facetool.pipeline.lock import LOCK_NAME, folder_lock
from facetool.pipeline.processes import die_with_parent
from facetool.pipeline.recordio import RecordFile
from facetool.pipeline.shards.format import LABEL_MAP, ShardStats, build_manifest, publish, write_manifest
from facetool.pipeline.shards.plan import ConvertJob, ConvertOptions
from facetool.pipeline.shards.sources import locate_source
from facetool.pipeline.shards.state import check_output_dir, claim_plan, clear_state, finished_manifest, load_stats
from facetool.pipeline.shards.write import write_shard

CLAIM_WAIT = 300.0  # seconds a run waits for the folder's lock, which others hold only to claim or to finish


def convert(
    src: str | os.PathLike,
    out: str | os.PathLike,
    options: ConvertOptions = ConvertOptions(),
    progress: Progress | None = None,
) -> dict:
    """Convert an InsightFace RecordIO dataset, an image folder or a list file (``locate_source``) into shards in
    ``out``; returns the manifest it wrote.

    ``progress(done, total)`` is called as records are processed. Re-running after an interruption skips the
    shards already complete and gives the same bytes as an uninterrupted run; anything in ``out`` that another
    plan left there is refused. The output folder is locked while the command writes into it.
    """
    options.validate()
    source = locate_source(src, out, options)
    with source.open(options.on_error) as reader:
        job = ConvertJob.plan(Path(out), source, reader, options)
        manifest = finished_manifest(job)
        if manifest is None:
            check_output_dir(job.out)
            manifest = _convert_locked(job, reader, progress)
        elif progress:  # already complete: nothing to do
            progress(job.perm.size, job.perm.size)
        return manifest


def _convert_locked(job: ConvertJob, reader: RecordFile, progress: Progress | None) -> dict:
    """The conversion proper: under the folder's lock (held briefly: the parts of a cluster conversion share the
    folder) check and claim the plan and take this part's lock; write the missing shards holding only the part's
    lock; then, under the folder's lock again, the manifest."""
    pi, pn = job.options.part
    with contextlib.ExitStack() as part_lock:
        with folder_lock(job.out, "convert", wait=CLAIM_WAIT):
            manifest = finished_manifest(job)  # another run may have finished it meanwhile
            if manifest is not None:
                return manifest
            part_lock.enter_context(folder_lock(job.out, "convert", name=f"{LOCK_NAME}.part-{pi:04d}-of-{pn:04d}"))
            done = claim_plan(job)
        todo = [s for s in job.mine if s not in done]
        total = sum(job.positions(s).size for s in job.mine)
        counted = total - sum(job.positions(s).size for s in todo)
        if progress:
            progress(counted, total)
        if todo:
            _run_shards(job, reader, todo, _Counter(counted, total, progress))
        with folder_lock(job.out, "convert", wait=CLAIM_WAIT):
            manifest = _manifest(job, [done[s] if s in done else load_stats(job, s) for s in job.mine])
            label_map = job.source.label_map()
            if label_map is not None:  # before the manifest, which says the conversion is complete
                publish(job.out / LABEL_MAP, label_map)
            write_manifest(job.manifest_path, manifest)
            clear_state(job)
        return manifest


def _manifest(job: ConvertJob, shards: list[ShardStats]) -> dict:
    manifest = build_manifest(
        source=str(job.source.path.resolve()),
        layout=job.layout,
        records=int(job.perm.size),
        classes=job.num_classes,
        arguments=job.arguments(),
        part=job.options.part,
        total_shards=job.num_shards,
        shards=shards,
        plan=job.plan_id if job.options.part[1] > 1 else None,
        index_skipped=job.index_skipped if job.options.part[0] == 0 else (),
    )
    classes, records = manifest["source"]["classes"], manifest["source"]["records"]
    if classes > records:
        raise FacetoolError(
            f"{job.source.path}: labels reach {classes - 1}, more classes than its {records} image records; give "
            "the dataset a property file with its class count"
        )
    return manifest


class _Counter:
    """Records processed, counted across worker processes in shared memory, reported as ``progress(done, total)``."""

    def __init__(self, done: int, total: int, progress: Progress | None) -> None:
        fork = "fork" in mp.get_all_start_methods() and sys.platform != "darwin"
        self.context = mp.get_context("fork" if fork else "spawn")
        self.value = self.context.Value("q", 0)
        self.done, self.total, self.progress = done, total, progress

    def report(self) -> None:
        if self.progress:
            self.progress(self.done + self.value.value, self.total)

    def tick(self, n: int) -> None:
        """Count ``n`` records (in this process: also report them)."""
        _increment(self.value, n)
        self.report()


def _increment(value, n: int) -> None:
    with value.get_lock():
        value.value += n


def _run_shards(job: ConvertJob, reader: RecordFile, todo: list[int], counter: _Counter) -> None:
    """Write the given shards, in this process or a pool of ``job.options.workers`` processes."""
    workers = max(1, min(job.options.workers, len(todo)))
    if workers == 1:
        for s in todo:
            write_shard(job, s, reader, counter.tick)
        return
    fork = counter.context.get_start_method() == "fork"
    with ProcessPoolExecutor(
        workers,
        mp_context=counter.context,
        initializer=_init_worker,
        initargs=(job, reader if fork else None, counter.value, os.getpid()),
    ) as pool:
        pending = {pool.submit(_write_in_worker, s) for s in todo}
        while pending:
            finished, pending = wait(pending, timeout=0.2, return_when=FIRST_EXCEPTION)
            counter.report()
            for f in finished:
                if f.exception() is not None:
                    for p in pending:
                        p.cancel()
                    raise f.exception()


_WORKER: dict = {}  # a worker process's job, reader and progress counter


def _init_worker(job: ConvertJob, reader: RecordFile | None, value, parent: int) -> None:
    """Process-pool initializer: die with the parent; reuse its mapped reader after fork, or open our own after
    spawn."""
    die_with_parent(parent)
    _WORKER["job"] = job
    if reader is None:
        reader = job.source.open(job.options.on_error)
    _WORKER["reader"] = reader
    _WORKER["tick"] = lambda n: _increment(value, n)


def _write_in_worker(shard: int) -> ShardStats:
    return write_shard(_WORKER["job"], shard, _WORKER["reader"], _WORKER["tick"])

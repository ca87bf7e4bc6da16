"""``facetool convert``: RecordIO -> WebDataset tar shards (format v1), shuffled, indexed, parallel, resumable.

The shards of a conversion are planned up front (``ConvertJob``), so they can be written in any order, by any
number of worker processes, and a re-run after a kill writes exactly the bytes an uninterrupted run would have:
it skips the shards whose tar is under its final name (published last) and writes the others again.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from pathlib import Path

from facetool.pipeline.atomic import Progress
from facetool.pipeline.recordio import RecordFile
from facetool.pipeline.shards.format import ShardStats, build_manifest, write_manifest
from facetool.pipeline.shards.plan import (
    ConvertJob,
    ConvertOptions,
    Source,
    check_output_dir,
    claim_plan,
    clear_state,
    finished_manifest,
    load_stats,
)
from facetool.pipeline.shards.write import write_shard


def convert(
    src: str | os.PathLike,
    out: str | os.PathLike,
    options: ConvertOptions = ConvertOptions(),
    progress: Progress | None = None,
) -> dict:
    """Convert an InsightFace RecordIO dataset into shards in ``out``; returns the manifest it wrote.

    ``progress(done, total)`` is called as records are processed. Re-running after an interruption skips the
    shards already complete and gives the same bytes as an uninterrupted run.
    """
    options.validate()
    source = Source.locate(src, options.use_index)
    with RecordFile(source.rec, source.idx) as reader:
        job = ConvertJob.plan(Path(out), source, reader, options)
        manifest = finished_manifest(job)
        if manifest is not None:  # already complete: nothing to do
            if progress:
                progress(job.perm.size, job.perm.size)
            return manifest
        check_output_dir(job.out)
        claim_plan(job)
        todo = [s for s in job.mine if not job.is_written(s)]
        total = sum(job.positions(s).size for s in job.mine)
        done = total - sum(job.positions(s).size for s in todo)
        if progress:
            progress(done, total)
        if todo:
            _run_shards(job, reader, todo, _Counter(done, total, progress))
        manifest = _manifest(job, [load_stats(job, s) for s in job.mine])
        write_manifest(job.manifest_path, manifest)
        clear_state(job)
        return manifest


def _manifest(job: ConvertJob, shards: list[ShardStats]) -> dict:
    return build_manifest(
        source=str(job.source.rec.resolve()),
        layout=job.layout,
        records=int(job.perm.size),
        classes=job.num_classes,
        arguments=job.options.output_arguments(),
        part=job.options.part,
        total_shards=job.num_shards,
        shards=shards,
    )


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
        initargs=(job, reader if fork else None, counter.value),
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


def _init_worker(job: ConvertJob, reader: RecordFile | None, value) -> None:
    """Process-pool initializer: reuse the parent's mapped reader after fork, or open our own after spawn."""
    _WORKER["job"] = job
    _WORKER["reader"] = reader if reader is not None else RecordFile(job.source.rec, job.source.idx)
    _WORKER["tick"] = lambda n: _increment(value, n)


def _write_in_worker(shard: int) -> ShardStats:
    return write_shard(_WORKER["job"], shard, _WORKER["reader"], _WORKER["tick"])

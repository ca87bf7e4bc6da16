"""`facetool bench convert`: convert throughput against a plain copy of the same bytes, measured in one run."""

from __future__ import annotations

import os
import resource
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from facetool.pipeline import DEFAULT_SAMPLES_PER_SHARD
from facetool.pipeline.atomic import atomic_path
from facetool.pipeline.shards import ConvertOptions, Source, convert


def _drop_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _copy(src: Path, dst: Path) -> None:
    """The baseline: the kernel's own copy (``sendfile``), published as convert publishes a shard (fsync, rename)."""
    with atomic_path(dst, tmp=dst.with_name(dst.name + ".tmp")) as tmp:
        shutil.copyfile(src, tmp)


def _settle() -> None:
    """Let the disk finish what the previous step left (write-back, discards of deleted files) before the next
    timed step, so that neither contender pays for the other."""
    if hasattr(os, "sync"):
        os.sync()


def _timed_copy(src: Path, target: Path) -> float:
    """Seconds of one copy, made after an untimed one whose memory it then reuses (the copy's best case)."""
    _copy(src, target)
    target.unlink()
    _settle()
    t0 = time.perf_counter()
    _copy(src, target)
    seconds = time.perf_counter() - t0
    target.unlink()
    _settle()
    return seconds


def _timed_convert(source: Source, out: Path, options: ConvertOptions) -> tuple[float, dict]:
    """Seconds of one full convert into ``out`` (removed afterwards), and its manifest."""
    t0 = time.perf_counter()
    manifest = convert(source.rec.parent, out, options)
    seconds = time.perf_counter() - t0
    _drop_tree(out)
    _settle()
    return seconds, manifest


def run_convert_benchmark(
    src: str | os.PathLike,
    workers: int = 2,
    samples_per_shard: int = DEFAULT_SAMPLES_PER_SHARD,
    tmp_dir: str | os.PathLike | None = None,
    repeats: int = 3,
) -> dict:
    """Time a plain copy of ``train.rec`` and a full convert into the same folder, each ``repeats`` times.

    Both read a warm page cache and both publish what they write (fsync, rename); the fastest run of each is
    reported, and the ratio of the medians beside it. The copy is the I/O floor of the job (read every byte, write
    every byte); the ratio says how close convert's parsing, tar framing, hashing and indexing come to it. Each
    timed copy follows an untimed one: its page cache then lands in memory just freed, which is the copy's best
    case (on virtual machines that hand idle memory back to the host, first touching memory can cost more than the
    copy itself), while convert streams its shards out through a small window of the page cache and never needs
    that much.
    """
    source = Source.locate(src)
    base = Path(tmp_dir) if tmp_dir is not None else source.rec.parent
    work = Path(tempfile.mkdtemp(prefix=".facetool-bench-", dir=base))
    try:
        with open(source.rec, "rb") as f:  # warm the page cache so neither contender pays the first read
            while f.read(1 << 24):
                pass
        rec_bytes = source.rec.stat().st_size
        copy_times, convert_times = [], []
        options = ConvertOptions(samples_per_shard=samples_per_shard, workers=workers)
        for r in range(repeats):
            copy_times.append(_timed_copy(source.rec, work / f"copy-{r}.rec"))
            seconds, manifest = _timed_convert(source, work / f"shards-{r}", options)
            convert_times.append(seconds)
            out_bytes = sum(s["bytes"] for s in manifest["shards"])
    finally:
        _drop_tree(work)
    records = manifest["samples"] + manifest["skipped"]
    seconds, copy_seconds = min(convert_times), min(copy_times)
    return {
        "records": records,
        "seconds": seconds,
        "records_per_s": records / seconds,
        "mb_per_s": out_bytes / seconds / 1e6,
        "copy_seconds": copy_seconds,
        "copy_records_per_s": records / copy_seconds,
        "copy_mb_per_s": rec_bytes / copy_seconds / 1e6,
        "ratio_to_copy": copy_seconds / seconds,
        "median_ratio_to_copy": statistics.median(copy_times) / statistics.median(convert_times),
        "workers": workers,
        "samples_per_shard": samples_per_shard,
        "repeats": repeats,
        "all_seconds": convert_times,
        "all_copy_seconds": copy_times,
        "source_bytes": rec_bytes,
        "shard_bytes": out_bytes,
    }


def _cpu_seconds() -> float:
    """User and system CPU seconds of this process and of its children that have been waited for."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def run_convert_memory(
    src: str | os.PathLike,
    workers: int = 2,
    samples_per_shard: int = DEFAULT_SAMPLES_PER_SHARD,
    tmp_dir: str | os.PathLike | None = None,
) -> dict:
    """One full convert of ``src`` (into a temporary folder, removed afterwards): its time and records/s, and the
    peak anonymous memory of the converting process and of each worker, sampled from /proc as it runs."""
    from facetool.bench.process import MemorySampler, anon_memory

    source = Source.locate(src)
    base = Path(tmp_dir) if tmp_dir is not None else source.rec.parent
    work = Path(tempfile.mkdtemp(prefix=".facetool-bench-", dir=base))
    options = ConvertOptions(samples_per_shard=samples_per_shard, workers=workers)
    before, cpu = anon_memory(os.getpid())[0], _cpu_seconds()
    try:
        with MemorySampler() as memory:
            seconds, manifest = _timed_convert(source, work / "shards", options)
        cpu = _cpu_seconds() - cpu  # the pool's workers have been waited for: their time is counted
    finally:
        _drop_tree(work)
    records = manifest["samples"] + manifest["skipped"]
    parent = memory.rss_anon.pop(os.getpid(), 0)
    return {
        "records": records,
        "seconds": seconds,
        "records_per_s": records / seconds,
        "cpu_seconds": cpu,
        "records_per_cpu_s": records / cpu,
        "workers": workers,
        "samples_per_shard": samples_per_shard,
        "parent_rss_anon_before": before,
        "parent_rss_anon": parent,
        "worker_rss_anon": sorted(memory.rss_anon.values(), reverse=True)[:workers],
        "tree_pss_anon": memory.pss_anon_total,
        "tree_pss_anon_per_record": memory.pss_anon_total / records,
    }

"""`facetool bench masks`: masked faces per second per core, end to end, against decode+encode alone."""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from facetool.pipeline.masks import KINDS, decode_image, encode_like, mask_jpeg
from facetool.pipeline.masks.preview import sample_faces
from facetool.pipeline.masks.sprites import VARIANTS, get_sprite


def _timed(fn: Callable[[], None]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of ``fn()``."""
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w0, time.process_time() - c0


def run_masks_benchmark(
    count: int = 4096, src: str | os.PathLike | None = None, distinct: int = 512, repeats: int = 3, seed: int = 0
) -> dict:
    """Time, in one process, ``count`` masked twins made end to end (JPEG decode, render, JPEG encode like the
    source) and, in the same run, the same decode and encode without the render: the floor any JPEG-to-JPEG step
    pays. Faces are ``distinct`` encoded faces (synthetic, or evenly spaced records of ``src``) cycled to ``count``,
    each with its own key. Each contender runs ``repeats`` times, alternating; the fastest run is reported (least
    wall time for images/s, least CPU time for images/s per core).

    The sprite bank is built before timing (a one-off cost per process, reported as ``setup_seconds``). Per core =
    images over this process's CPU time, so a BLAS thread pool could not inflate it.
    """
    faces = sample_faces(src, min(distinct, count), seed)
    jobs = [faces[i % len(faces)] for i in range(count)]
    t0 = time.perf_counter()
    height, width, _ = decode_image(faces[0])[0].shape
    for kind in KINDS:
        for v in range(VARIANTS):
            get_sprite(height, width, kind, v)
    setup = time.perf_counter() - t0

    def masked() -> None:
        for key, data in enumerate(jobs):
            mask_jpeg(data, seed, key)

    def copy() -> None:
        for data in jobs:
            arr, im = decode_image(data)
            encode_like(arr, im)

    runs, base_runs = [], []
    for _ in range(repeats):
        runs.append(_timed(masked))
        base_runs.append(_timed(copy))
    wall, cpu = min(w for w, _ in runs), min(c for _, c in runs)
    base_wall, base_cpu = min(w for w, _ in base_runs), min(c for _, c in base_runs)
    return {
        "images": count,
        "cores": round(cpu / wall, 2),  # the share of a core the process got: under 1 on a busy machine
        "images_per_s": count / wall,
        "images_per_s_per_core": count / cpu,
        "seconds": wall,
        "cpu_seconds": cpu,
        "decode_encode_images_per_s": count / base_wall,
        "decode_encode_images_per_s_per_core": count / base_cpu,
        "render_share": 1.0 - base_cpu / cpu,
        "setup_seconds": setup,
        "distinct_faces": len(faces),
        "source": str(src) if src is not None else "synthetic",
        "repeats": repeats,
        "all_seconds": [w for w, _ in runs],
        "all_cpu_seconds": [c for _, c in runs],
        "all_decode_encode_seconds": [w for w, _ in base_runs],
        "all_decode_encode_cpu_seconds": [c for _, c in base_runs],
    }

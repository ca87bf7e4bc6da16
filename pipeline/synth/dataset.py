"""Writing the synthetic dataset: training images as an InsightFace layout-A RecordIO set, a held-out verification
set ``synth.bin`` and ``synth_meta.json``, the drawing spread over worker processes.

Verification set (``synth.bin``): made of held-out identities ``C .. C+E-1`` (``E = max(50, pairs // 10)``, never
among the ``C`` training identities); pair ``p`` uses image indices ``2p`` and ``2p+1`` of its identities; the
same/different flags are a seeded permutation of ``pairs // 2`` positives and the rest negatives.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path

import numpy as np

from facetool.pipeline.atomic import Progress, write_json_atomic
from facetool.pipeline.errors import FacetoolError
from facetool.pipeline.processes import worker_init
from facetool.pipeline.recordio import write_layout_a
from facetool.pipeline.synth.faces import render_jpeg
from facetool.pipeline.synth.identity import SIZE, TEMPLATE, FaceIdentity, image_rng, make_identity
from facetool.pipeline.verification_bin import write_bin

_TAG_PAIRS = 3  # the pairs' stream, apart from the identities' (1) and images' (2)
_CHUNK = 512  # images a worker draws per task


def _render_many(seed: int, jobs: list[tuple[int, int]]) -> list[bytes]:
    cache: dict[int, FaceIdentity] = {}
    out = []
    for i, k in jobs:
        if i not in cache:
            cache[i] = make_identity(seed, i)
        out.append(render_jpeg(cache[i], image_rng(seed, i, k)))
    return out


def _ordered_map(fn: Callable, args: list, workers: int) -> Iterator:
    """``map(fn, args)`` in order, on a process pool when ``workers > 1``, with a bounded number in flight."""
    if workers <= 1:
        for a in args:
            yield fn(*a)
        return
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=worker_init(os.getpid())) as pool:
        pending: deque[Future] = deque()
        it = iter(args)
        for a in it:
            pending.append(pool.submit(fn, *a))
            if len(pending) >= 4 * workers:
                break
        while pending:
            yield pending.popleft().result()
            for a in it:
                pending.append(pool.submit(fn, *a))
                break


def plan_pairs(seed: int, first: int, count: int, pairs: int) -> tuple[list[tuple[int, int]], np.ndarray]:
    """Identities of each verification pair among ``first .. first+count-1`` and the issame flags."""
    rng = np.random.default_rng([seed, _TAG_PAIRS])
    issame = rng.permutation(np.arange(pairs) < pairs // 2)
    who = []
    for same in issame:
        a = int(rng.integers(count))
        b = a if same else (a + 1 + int(rng.integers(count - 1))) % count
        who.append((first + a, first + b))
    return who, issame


def write_synth(
    out: str | Path,
    identities: int = 200,
    images_per_identity: int = 40,
    pairs: int = 1000,
    seed: int = 0,
    workers: int = 1,
    progress: Progress | None = None,
) -> dict:
    """Write the synthetic dataset to ``out``: train.rec/.idx/property (layout A), synth.bin, synth_meta.json.

    Returns a summary: records (training images), identities, pairs, seconds, images_per_s (every image
    rendered, training and verification, over the wall time of the whole call). ``progress(done, total)`` counts
    drawn images."""
    if identities < 1 or images_per_identity < 1 or pairs < 2 or workers < 1:
        raise FacetoolError(
            f"synth: identities and images per identity must be >= 1, pairs >= 2 and workers >= 1 (got "
            f"{identities}, {images_per_identity}, {pairs}, {workers})"
        )
    out = Path(out)
    per_id, held = images_per_identity, max(50, pairs // 10)
    who, issame = plan_pairs(seed, identities, held, pairs)
    per_chunk = max(1, _CHUNK // per_id)  # whole identities per training task
    train = [
        (seed, [(i, k) for i in range(i0, min(identities, i0 + per_chunk)) for k in range(per_id)])
        for i0 in range(0, identities, per_chunk)
    ]
    pair_jobs = [(i, 2 * p + j) for p, ids in enumerate(who) for j, i in enumerate(ids)]
    pair_tasks = [(seed, pair_jobs[s : s + _CHUNK]) for s in range(0, len(pair_jobs), _CHUNK)]
    total, done = identities * per_id + len(pair_jobs), 0
    t0 = time.perf_counter()
    results = _ordered_map(_render_many, train + pair_tasks, workers)

    def counted(tasks: list) -> Iterator[list[bytes]]:
        nonlocal done
        for _ in tasks:
            got = next(results)
            yield got
            done += len(got)
            if progress is not None:
                progress(done, total)

    by_identity = (got[s : s + per_id] for got in counted(train) for s in range(0, len(got), per_id))
    records, _ = write_layout_a(out, by_identity, (SIZE, SIZE))
    write_bin(out / "synth.bin", [img for got in counted(pair_tasks) for img in got], issame)
    seconds = time.perf_counter() - t0
    write_json_atomic(out / "synth_meta.json", _meta(identities, per_id, pairs, seed, issame, held))
    return {
        "records": records,
        "identities": identities,
        "pairs": pairs,
        "seconds": round(seconds, 3),
        "images_per_s": round(total / seconds, 1) if seconds > 0 else None,
    }


def _meta(identities: int, per_id: int, pairs: int, seed: int, issame: np.ndarray, held: int) -> dict:
    """What ``synth_meta.json`` records: the arguments, the layout and the held-out rule."""
    return {
        "format": "insightface-layout-A",
        "arguments": {"identities": identities, "images_per_identity": per_id, "pairs": pairs, "seed": seed},
        "records": identities * per_id,
        "identities": identities,
        "image_size": [SIZE, SIZE],
        "template": TEMPLATE.tolist(),
        "pairs": pairs,
        "positive_pairs": int(issame.sum()),
        "heldout_rule": "identities C .. C+E-1 with E = max(50, pairs // 10); pair p uses images 2p, 2p+1",
        "heldout_identities": list(range(identities, identities + held)),
    }

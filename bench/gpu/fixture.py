"""The shards the loader, training and device parts read, made on the spot and fast.

Drawing a synthetic face costs ~2 ms and rendering its mask ~5 ms, so 200,000 of each would take minutes even on
16 cores. Instead a few thousand distinct faces are drawn (and their masked twins rendered), and every sample of
the shards is one of them under its own key and label: decoding costs the same, and the loader cannot tell. The
shards are the format `facetool convert` writes (tar, DALI index, manifest; twins chosen per key by the mask
fraction), written through :class:`~facetool.pipeline.shards.ShardWriter`, one process per shard.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

from facetool.bench.gpu.plan import Job, Part, Setting, Sizes
from facetool.bench.process import cpu_count
from facetool.pipeline.atomic import atomic_path
from facetool.pipeline.shards import LABEL_EXT, MASK_EXT, ShardStats, ShardWriter, shard_name
from facetool.pipeline.shards.format import JPEG_EXT, MANIFEST, build_manifest, publish, write_manifest

IMAGES_PER_IDENTITY = 8  # drawn faces per synthetic identity
SEED = 0
# below these a process of its own costs more than it saves (starting it takes about a second)
_FACES_PER_WORKER = 256
_SAMPLES_PER_WORKER = 20_000


def shard_classes(sizes: Sizes) -> int:
    """The labels of the shards: sample j has label ``j // per_identity``."""
    return (sizes.samples - 1) // sizes.per_identity + 1


def draw_faces(first: int, count: int, seed: int = SEED) -> list[tuple[bytes, bytes]]:
    """Faces ``first .. first+count-1`` (identity ``i // 8``, image ``i % 8``) and their masked twins, as JPEGs."""
    from facetool.pipeline.masks import mask_jpeg
    from facetool.pipeline.synth import image_rng, make_identity, render_jpeg

    out, identities = [], {}
    for i in range(first, first + count):
        who = i // IMAGES_PER_IDENTITY
        if who not in identities:
            identities[who] = make_identity(seed, who)
        face = render_jpeg(identities[who], image_rng(seed, who, i % IMAGES_PER_IDENTITY))
        out.append((face, mask_jpeg(face, seed, i)))
    return out


def write_shard_file(
    out: Path, index: int, first: int, count: int, faces: list[tuple[bytes, bytes]], sizes: Sizes
) -> ShardStats:
    """Shard ``index``: samples ``first .. first+count-1``, sample j showing face ``j % len(faces)`` with label
    ``j // per_identity``, and its masked twin when the mask fraction picks key j."""
    from facetool.pipeline.masks import select_masked

    keys = np.arange(first, first + count, dtype=np.int64)
    masked = select_masked(keys, sizes.mask_fraction, SEED)
    name = shard_name(index)
    with atomic_path(out / f"{name}.tar") as tmp:
        writer = ShardWriter(tmp)
        try:
            for j, twin in zip(keys.tolist(), masked.tolist(), strict=True):
                face, mask = faces[j % len(faces)]
                members = [(JPEG_EXT, face), (LABEL_EXT, struct.pack("<i", j // sizes.per_identity))]
                writer.add_sample(f"{j:09d}", [*members, (MASK_EXT, mask)] if twin else members)
            size, digest = writer.finish()
        except BaseException:
            writer.abort()
            raise
    publish(out / f"{name}.idx", writer.index_bytes())
    max_label = (first + count - 1) // sizes.per_identity
    return ShardStats(f"{name}.tar", f"{name}.idx", count, int(masked.sum()), size, digest, max_label)


def _parallel(fn, tasks: list[tuple], workers: int) -> list:
    """``[fn(*t) for t in tasks]``, on ``workers`` spawned processes when more than one."""
    if workers <= 1:
        return [fn(*t) for t in tasks]
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        return list(pool.map(fn, *zip(*tasks, strict=True)))


def make_shards(out: Path, sizes: Sizes, workers: int | None = None) -> dict[str, Any]:
    """Write the shards into ``out`` (drawing, masking and writing timed apart); returns their figures."""
    out.mkdir(parents=True, exist_ok=True)
    workers = workers or cpu_count()
    t0 = time.perf_counter()
    drawers = min(workers, -(-sizes.faces // _FACES_PER_WORKER))
    step = -(-sizes.faces // drawers)
    chunks = _parallel(draw_faces, [(s, min(step, sizes.faces - s)) for s in range(0, sizes.faces, step)], drawers)
    faces = [f for chunk in chunks for f in chunk]
    t1 = time.perf_counter()
    starts = range(0, sizes.samples, sizes.samples_per_shard)
    tasks = [(out, i, s, min(sizes.samples_per_shard, sizes.samples - s), faces, sizes) for i, s in enumerate(starts)]
    writers = min(workers, len(tasks), -(-sizes.samples // _SAMPLES_PER_WORKER))
    stats = _parallel(write_shard_file, tasks, writers)
    classes = shard_classes(sizes)
    arguments = {"mask_fraction": sizes.mask_fraction, "seed": SEED, "faces": sizes.faces}
    manifest = build_manifest(source="facetool bench gpu (synthetic faces)", layout="synthetic", records=sizes.samples,
                              classes=classes, arguments=arguments, part=(0, 1), total_shards=len(stats),
                              shards=stats)  # fmt: skip
    write_manifest(out / MANIFEST, manifest)
    t2 = time.perf_counter()
    return {
        "samples": sizes.samples,
        "classes": classes,
        "distinct_faces": sizes.faces,
        "masked": manifest["masked"],
        "shards": len(stats),
        "bytes": sum(s.bytes for s in stats),
        "draw_processes": drawers,
        "write_processes": writers,
        "draw_seconds": t1 - t0,  # faces and their masked twins
        "write_seconds": t2 - t1,
        "seconds": t2 - t0,
        "samples_per_s": sizes.samples / (t2 - t0),
    }


def fixture_runs(out: str, sizes: Sizes) -> Iterator[dict[str, Any]]:
    """The fixture part's one run (its failure is the job's: the parts that read the shards are then skipped)."""
    yield {"name": "shards", "status": "ok", **make_shards(Path(out), sizes)}


def _plan(setting: Setting, results: dict[str, Any]) -> list[Job]:
    return [Job("shards", fixture_runs, (str(setting.shards), setting.sizes), runs=("shards",))]


PART = Part(
    name="fixture",
    what="shards of synthetic faces for the loader, training and device parts (generation timed)",
    share=0.06,
    plan=_plan,
)

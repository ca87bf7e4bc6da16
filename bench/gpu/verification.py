"""The verification part: `bench verification`'s embedding rate on the device (decode, normalise, each image with
its flip, metrics), beside the same backbone's forward passes alone on batches already on the device.

The set is made of faces from the fixture's shards, paired in order (LFW's size on a GPU); only the time matters,
the model is untrained.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import numpy as np

from facetool.bench.gpu.plan import Job, Part, Setting, Sizes, attempt, ok_runs, ratio, synchronize

RUNS = ("embedding", "forward only")


def pair_set(jpegs: list[bytes], source: str):
    """A verification set of the faces, pair k = images (2k, 2k+1), every other pair "same"."""
    from facetool.bench.verification import PairSet

    n = len(jpegs) - len(jpegs) % 2
    issame = np.arange(n // 2) % 2 == 0
    return PairSet(name="shard faces", source=source, images=jpegs[:n], pairs=np.arange(n).reshape(-1, 2),
                   issame=issame, masked=np.zeros(n, dtype=bool))  # fmt: skip


def embedding_figures(model, jpegs: list[bytes], source: str, device: str) -> dict[str, Any]:
    """What `bench verification` reports for the set: images (each with its flip) per second of embedding."""
    from facetool.bench.verification import default_batch_size, embed_set, evaluate_set

    batch = default_batch_size(device)
    embed_set(model, pair_set(jpegs[: 2 * batch], source), None, device)  # warm-up: first allocations, cuDNN
    faces = pair_set(jpegs, source)
    metrics = evaluate_set(model, faces, None, device)
    seconds = metrics.extra["embed_seconds"]
    return {
        "device": device, "images": len(faces.images), "batch_size": batch,
        "embed_seconds": seconds, "images_per_s": len(faces.images) / seconds,
        "metric_seconds": metrics.extra["metric_seconds"],
    }  # fmt: skip


def forward_figures(model, images: int, device: str) -> dict[str, Any]:
    """The same forwards (batch of images plus their flips, float32, inference mode) on random device tensors."""
    import torch

    from facetool.bench.verification import default_batch_size

    batch = default_batch_size(device)
    x = torch.rand(2 * batch, 3, 112, 112, device=device) * 2 - 1
    rounds = max(1, images // batch)
    with torch.inference_mode():
        model(x)
        synchronize(device)
        t0 = time.perf_counter()
        for _ in range(rounds):
            model(x)
        synchronize(device)
        seconds = time.perf_counter() - t0
    return {"device": device, "images": rounds * batch, "seconds": seconds, "images_per_s": rounds * batch / seconds}


def verification_runs(shards: str, sizes: Sizes, device: str) -> Iterator[dict[str, Any]]:
    import torch

    from facetool.bench.loader import read_jpegs
    from facetool.train.models import create_backbone

    torch.manual_seed(0)
    model = create_backbone(sizes.verification_model).eval().to(device)
    jpegs = read_jpegs(shards, sizes.verification_images)
    name = {"model": sizes.verification_model}
    yield {**attempt("embedding", embedding_figures, model, jpegs, shards, device), **name}
    yield {**attempt("forward only", forward_figures, model, len(jpegs), device), **name}


def _plan(setting: Setting, results: dict[str, Any]) -> list[Job]:
    return [Job("embed", verification_runs, (str(setting.shards), setting.sizes, setting.device), runs=RUNS)]


def summarize(runs: list[dict[str, Any]], results: dict[str, Any]) -> dict[str, Any]:
    rate = {r["name"]: r["images_per_s"] for r in ok_runs(runs)}
    return {"embedding_to_forward_only": ratio(rate.get("embedding"), rate.get("forward only"))}


PART = Part(
    name="verification",
    what="bench verification images/s (each with its flip) beside forward passes alone",
    share=0.06,
    plan=_plan,
    needs_shards=True,
    summarize=summarize,
)

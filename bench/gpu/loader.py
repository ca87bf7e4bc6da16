"""The loader part: the DALI loader's images/s at 112x112 with and without masks, on the GPU (``mixed``: nvJPEG and
the hardware decoder) and on the CPU, each beside the same pipeline cut after its decoder (reader and decoder
only: the decode-only limit on those shards), all over the same shards. One process per device."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from facetool.bench.gpu.plan import Job, Part, Setting, Sizes, attempt, first_ok, ratio
from facetool.bench.process import cpu_us_per_image

RUNS = ("decode-only", "loader", "loader, masks")


def _measure(shards: str, device: str, sizes: Sizes, decode_only: bool, masked_prob: float) -> dict[str, Any]:
    from facetool.bench.loader import run_dali

    m = run_dali(shards, device, sizes.loader_batch, None, sizes.loader_warmup, sizes.loader_batches, decode_only,
                 masked_prob=masked_prob, shuffle_buffer=sizes.shuffle_buffer)  # fmt: skip
    return {
        "device": device,
        "masked_prob": masked_prob,
        "batch_size": sizes.loader_batch,
        "images": m["images"],
        "seconds": m["seconds"],
        "images_per_s": m["images"] / m["seconds"],
        "cpu_us_per_image": cpu_us_per_image(m["cpu_seconds"], m["images"]),
        "dali_threads": m["threads"],
    }


def loader_runs(shards: str, device: str, sizes: Sizes) -> Iterator[dict[str, Any]]:
    """Decode-only, the loader, and the loader with masks (q), on ``device`` ("gpu" or "cpu")."""
    from facetool.train.data import dali_available

    if not dali_available():
        for name in RUNS:
            yield {"name": name, "device": device, "status": "skipped: NVIDIA DALI is not installed"}
        return
    for name, decode_only, q in zip(RUNS, (True, False, False), (0.0, 0.0, sizes.masked_prob), strict=True):
        yield attempt(name, _measure, shards, device, sizes, decode_only, q)


def _plan(setting: Setting, results: dict[str, Any]) -> list[Job]:
    args = (str(setting.shards),)
    return [
        Job("gpu", loader_runs, (*args, "gpu", setting.sizes), runs=RUNS, needs_cuda=True),
        Job("cpu", loader_runs, (*args, "cpu", setting.sizes), runs=RUNS),
    ]


def _rate(runs: list[dict[str, Any]], job: str, name: str) -> float | None:
    return first_ok(runs, job=job, name=name).get("images_per_s")


def summarize(runs: list[dict[str, Any]], results: dict[str, Any]) -> dict[str, Any]:
    """Each loader against its decode-only limit, the GPU against the CPU, and what masks cost."""
    out: dict[str, Any] = {}
    for job in ("gpu", "cpu"):
        for name in RUNS[1:]:
            key = f"{job} {name}".replace(", ", " ").replace(" ", "_")
            out[f"{key}_to_decode_only"] = ratio(_rate(runs, job, name), _rate(runs, job, "decode-only"))
        out[f"{job}_masks_to_no_masks"] = ratio(_rate(runs, job, "loader, masks"), _rate(runs, job, "loader"))
    for name in RUNS:
        key = name.replace(", ", "_").replace("-", "_")
        out[f"gpu_to_cpu_{key}"] = ratio(_rate(runs, "gpu", name), _rate(runs, "cpu", name))
    return out


PART = Part(
    name="loader",
    what="DALI loader images/s (mixed and CPU, with masks and without) beside decode-only",
    share=0.12,
    plan=_plan,
    needs_shards=True,
    summarize=summarize,
)

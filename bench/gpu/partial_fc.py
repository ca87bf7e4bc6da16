"""The Partial FC part: peak memory and step time of the margin head over two million classes of 512-d embeddings
on one device, sampling r = 0.1 of the classes per step and all of them (r = 1.0), each beside the other and
beside the size of the class weight itself.

A step is what the engine does for the head: the loss under bf16 autocast on float32 embeddings, backward, and an
SGD step (momentum, weight decay) over the whole class weight.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator
from typing import Any

from facetool.bench.gpu.plan import Job, Part, Setting, Sizes, attempt, ok_runs, ratio, synchronize

HEAD = "arcface"


def head_step_figures(classes: int, width: int, batch: int, rate: float, warmup: int, steps: int, device: str):
    """Median step time and peak memory of the head at sample rate ``rate`` (a fresh head and optimiser)."""
    import torch

    from facetool.bench.train import peak_memory
    from facetool.train.heads import create_head

    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
    with dev:  # the class weight is drawn where it lives: 4 GB drawn on a CPU would take longer than the steps
        head = create_head(HEAD, width, classes, partial_fc=True, sample_rate=rate)
    opt = torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    gen = torch.Generator(dev).manual_seed(0)
    embeddings = torch.randn(batch, width, device=dev, generator=gen).requires_grad_()
    labels = torch.randint(classes, (batch,), device=dev, generator=gen)
    times = []
    try:
        for _ in range(warmup + steps):
            synchronize(dev)
            t0 = time.perf_counter()
            with torch.autocast(dev.type, dtype=torch.bfloat16):
                loss = head(embeddings, labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            synchronize(dev)
            times.append(time.perf_counter() - t0)
        used = head.last_index.numel() if head.last_index is not None else classes
        peak, kind = peak_memory(dev)
    finally:
        del head, opt
    return {
        "device": device, "head": HEAD, "classes": classes, "width": width, "batch_size": batch,
        "sample_rate": rate, "classes_per_step": int(used), "steps": steps,
        "step_ms": statistics.median(times[warmup:]) * 1e3,
        "peak_memory_bytes": peak, "peak_memory_kind": kind,
        "class_weight_bytes": classes * width * 4,
    }  # fmt: skip


def run_name(rate: float) -> str:
    return f"r={rate:g}"


def partial_fc_runs(sizes: Sizes, device: str) -> Iterator[dict[str, Any]]:
    """One run per sample rate, the smaller first (a CUDA out-of-memory error at r = 1.0 loses nothing else)."""
    for rate in sorted(sizes.pfc_rates):
        yield attempt(run_name(rate), head_step_figures, sizes.pfc_classes, sizes.pfc_width, sizes.pfc_batch, rate,
                      sizes.pfc_warmup, sizes.pfc_steps, device)  # fmt: skip


def _plan(setting: Setting, results: dict[str, Any]) -> list[Job]:
    runs = tuple(run_name(r) for r in sorted(setting.sizes.pfc_rates))
    return [Job("head", partial_fc_runs, (setting.sizes, setting.device), runs=runs)]


def summarize(runs: list[dict[str, Any]], results: dict[str, Any]) -> dict[str, Any]:
    """Sampling's savings: step time and peak memory at the smallest rate against the exact softmax (r = 1)."""
    rows = sorted(ok_runs(runs), key=lambda r: r["sample_rate"])
    if len(rows) < 2:
        return {}
    low, full = rows[0], rows[-1]
    return {
        "step_time_ratio": ratio(low["step_ms"], full["step_ms"]),
        "peak_memory_ratio": ratio(low["peak_memory_bytes"], full["peak_memory_bytes"]),
        "compared": [run_name(low["sample_rate"]), run_name(full["sample_rate"])],
    }


PART = Part(
    name="partial_fc",
    what="Partial FC over 2M classes x 512: step time and peak memory at r = 0.1 and 1.0",
    share=0.06,
    plan=_plan,
    summarize=summarize,
)

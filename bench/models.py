"""Backbone figures: parameters, multiply-adds of one 112x112 forward, and CPU forward throughput."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from facetool.train.models import create_backbone, list_backbones


def count_parameters(model: nn.Module) -> int:
    """All parameters, frozen ones included (as the papers and arcface_torch count them)."""
    return sum(p.numel() for p in model.parameters())


@contextlib.contextmanager
def unfused_attention(model: nn.Module) -> Iterator[None]:
    """timm's fused attention switched off inside the block: torch's FLOP counter does not see inside the fused
    CPU kernel, and the unfused path does the same matmuls."""
    fused = [m for m in model.modules() if getattr(m, "fused_attn", False)]
    for m in fused:
        m.fused_attn = False
    try:
        yield
    finally:
        for m in fused:
            m.fused_attn = True


def count_macs(model: nn.Module, masked: bool = False) -> int:
    """Multiply-adds of one forward of one 112x112 image: torch's FLOP count (matmuls, convs, attention) / 2.

    Element-wise work (norms, activations, softmax) is not counted, as in arcface_torch's GFLOPs (which are MACs).
    timm's fused attention is switched off while counting (:func:`unfused_attention`).
    """
    model.eval()
    counter = FlopCounterMode(display=False)
    with unfused_attention(model), torch.no_grad(), counter:
        model(torch.zeros(1, 3, 112, 112), torch.tensor([masked]))
    return counter.get_total_flops() // 2


def forward_throughput(model: nn.Module, batch_size: int = 8, iters: int = 5, warmup: int = 1) -> float:
    """Images/s of eval-mode forward passes on the CPU after ``warmup`` untimed batches (median batch time)."""
    model.eval()
    images = torch.rand(batch_size, 3, 112, 112) * 2 - 1
    masked = torch.zeros(batch_size, dtype=torch.bool)
    times = []
    with torch.inference_mode():
        for i in range(warmup + iters):
            start = time.perf_counter()
            model(images, masked)
            if i >= warmup:
                times.append(time.perf_counter() - start)
    times.sort()
    return batch_size / times[len(times) // 2]


def bench_models(
    names: Iterable[str] | None = None,
    batch_size: int = 8,
    iters: int = 5,
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Figures for each backbone (default: every registered one) with its default options; one JSON object."""
    results = []
    for name in names or list_backbones():
        torch.manual_seed(0)
        model = create_backbone(name)
        row = {
            "backbone": name,
            "params": count_parameters(model),
            "gmacs": count_macs(model) / 1e9,
            "images_per_s": forward_throughput(model, batch_size, iters),
        }
        results.append(row)
        if progress:
            progress(row)
        del model
    return {
        "batch_size": batch_size,
        "iters": iters,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__.split("+")[0],
        "device": "cpu",
        "results": results,
    }

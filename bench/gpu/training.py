"""The training parts: images/s of each backbone in bf16, fed by the DALI loader and by synthetic batches already
on the device (the model-only rate: the difference is the loader's cost), NCHW and channels-last, then (a part of
its own, last, as compiling is slow) under ``torch.compile``; each with model FLOPs utilisation.

Every run is the engine's own loop (:class:`~facetool.train.engine.Trainer`, timed by
:func:`facetool.bench.train.step_clock`), on a head over the shards' classes, stopped right after its last timed
step (no checkpoint is written). FLOPs are measured, not quoted: torch's FLOP counter over one forward and backward
of the backbone (convolutions, matmuls, attention; the head's few are left out), per image; MFU is the achieved
rate over the device's peak dense bf16 rate.
"""

from __future__ import annotations

import gc
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from facetool.bench.gpu.environment import mfu_note
from facetool.bench.gpu.fixture import shard_classes
from facetool.bench.gpu.plan import Job, Part, Setting, Sizes, attempt, first_ok, ok_runs, ratio, skipped

LAYOUTS = ("nchw", "channels_last")
RUNS = ("flops", "model only, nchw", "model only, channels_last", "with loader")
LR = 0.01  # small: the figures do not depend on it, and a diverging loss would stop no run (stop_on_nonfinite off)


def train_config(
    sizes: Sizes, model: str, device: str, source: str, shards: str, *, batch: int | None = None,
    loader_device: str = "auto", steps: int | None = None, backend: str = "dali",
):  # fmt: skip
    """The engine's config of a benchmark run: ``model`` in bf16 on ``device``, fed from ``source`` (the
    ``backend`` loader, DALI by default, on ``loader_device`` over ``shards``, or synthetic batches), ``steps`` long
    (default: the timed steps and their warm-up, plus one: the run is stopped after the last timed step)."""
    from facetool.train.engine.config import Config, defaults, merge, validate

    data: dict[str, Any] = {"source": source, "batch_size": batch or sizes.train_batch,
                            "synthetic_classes": shard_classes(sizes)}  # fmt: skip
    if source == "shards":
        data.update(shards=shards, backend=backend, loader_device=loader_device, masked_prob=sizes.masked_prob)
    if sizes.shuffle_buffer is not None:
        data["shuffle_buffer"] = sizes.shuffle_buffer
    steps = steps or sizes.train_warmup + sizes.train_steps + 1
    tables = {
        "run": {"device": device, "amp": "bf16", "steps": steps, "log_every": steps, "stop_on_nonfinite": False},
        "data": data,
        "model": {"name": model},
        "optim": {"name": "sgd", "lr": LR},
        "eval": {"bins": [], "every": 0},
    }
    cfg = Config(defaults())
    cfg.source = "bench gpu"
    merge(cfg, tables, cfg.source)
    validate(cfg)
    return cfg


def prepare(trainer, layout: str, compiled: bool) -> None:
    """Channels-last weights and inputs, and ``torch.compile``, applied to a built trainer's forward model."""
    import torch
    from torch import nn

    class ChannelsLast(nn.Module):
        def __init__(self, model: nn.Module) -> None:
            super().__init__()
            self.model = model

        def forward(self, images, *rest):
            return self.model(images.contiguous(memory_format=torch.channels_last), *rest)

    if layout == "channels_last":
        trainer.backbone.to(memory_format=torch.channels_last)  # in place: the optimiser keeps its parameters
        trainer.model = ChannelsLast(trainer.model)
    if compiled:
        trainer.model = torch.compile(trainer.model)


def train_flops_per_image(model: str, device: str, batch: int) -> int:
    """FLOPs of one bf16 training forward and backward of ``model``, per image, counted by torch."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from facetool.bench.models import unfused_attention
    from facetool.train.models import create_backbone

    dev = torch.device(device)
    torch.manual_seed(0)
    net = create_backbone(model).to(dev).train()
    images = torch.rand(batch, 3, 112, 112, device=dev) * 2 - 1
    masked = torch.zeros(batch, dtype=torch.bool, device=dev)
    counter = FlopCounterMode(display=False)
    with unfused_attention(net), counter:
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            out = net(images, masked) if getattr(net, "uses_masked", False) else net(images)
        out.float().sum().backward()
    return counter.get_total_flops() // batch


def _release() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def time_training(
    model: str, source: str, layout: str, compiled: bool, shards: str, sizes: Sizes, device: str,
    flops: int | None, peak_tflops: float | None,
) -> dict[str, Any]:  # fmt: skip
    """Images/s of ``train_steps`` engine steps after ``train_warmup``, with peak memory and MFU."""
    import torch

    from facetool.bench.process import cpu_us_per_image
    from facetool.bench.train import loader_name, peak_memory, step_clock
    from facetool.train.engine import Trainer

    warmup, steps = sizes.train_warmup, sizes.train_steps
    cfg = train_config(sizes, model, device, source, shards)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory(prefix="facetool-bench-gpu-") as tmp:
        trainer = Trainer(cfg, Path(tmp))
        try:
            prepare(trainer, layout, compiled)
            marks = step_clock(trainer, (1, warmup, warmup + steps), stop=True)
            peak, peak_kind = peak_memory(trainer.ctx.device)
            loader, batch = loader_name(trainer.loader), trainer.global_batch
        finally:
            del trainer
            _release()
    (t0, _), (t1, _), (ta, ca), (tb, cb) = marks[0], marks[1], marks[warmup], marks[warmup + steps]
    rate = steps * batch / (tb - ta)
    achieved = flops * rate / 1e12 if flops else None
    return {
        "model": model, "source": source, "loader": loader, "layout": layout, "compiled": compiled,
        "amp": "bf16", "device": device, "batch_size": batch, "steps": steps, "images_per_s": rate,
        "step_ms": (tb - ta) / steps * 1e3,
        "first_step_seconds": t1 - t0,  # loader start-up, first allocations and, compiled, the compilation
        "cpu_us_per_image": cpu_us_per_image(cb - ca if ca is not None and cb is not None else None, steps * batch),
        "peak_memory_bytes": peak, "peak_memory_kind": peak_kind,
        "train_flops_per_image": flops, "achieved_tflops": achieved,
        "mfu": achieved / peak_tflops if achieved is not None and peak_tflops else None,
    }  # fmt: skip


def training_runs(model: str, shards: str, sizes: Sizes, device: str, peak: float | None) -> Iterator[dict]:
    """FLOPs, the model-only rate in each layout, then the rate with the DALI loader in the faster layout."""
    from facetool.train.data import dali_available

    counted = attempt("flops", lambda: {"train_flops_per_image": train_flops_per_image(model, device,
                                                                                       sizes.flop_batch)})  # fmt: skip
    _release()
    yield {**counted, "model": model}
    flops = counted.get("train_flops_per_image")
    rates = {}
    for layout in LAYOUTS:
        row = attempt(f"model only, {layout}", time_training, model, "synthetic", layout, False, shards, sizes,
                      device, flops, peak)  # fmt: skip
        rates[layout] = row.get("images_per_s", 0.0)
        yield {**row, "model": model}
    best = max(LAYOUTS, key=lambda k: rates[k])
    if not dali_available():
        yield {"name": "with loader", "model": model, "status": skipped("NVIDIA DALI is not installed")}
        return
    yield {**attempt("with loader", time_training, model, "shards", best, False, shards, sizes, device, flops, peak),
           "model": model}  # fmt: skip


def compile_runs(model: str, layout: str, flops: int | None, sizes: Sizes, device: str, peak: float | None):
    """The model-only rate under ``torch.compile`` (its first step holds the compilation)."""
    yield {**attempt("compiled", time_training, model, "synthetic", layout, True, "", sizes, device, flops, peak),
           "model": model}  # fmt: skip


def _training_plan(setting: Setting, results: dict[str, Any]) -> list[Job]:
    sizes, peak = setting.sizes, setting.env.get("peak_bf16_tflops") if setting.cuda else None
    return [
        Job(m, training_runs, (m, str(setting.shards), sizes, setting.device, peak), runs=RUNS, weight=w)
        for m, w in zip(sizes.models, sizes.model_weights, strict=True)
    ]


def _compile_plan(setting: Setting, results: dict[str, Any]) -> list[Job]:
    sizes, peak = setting.sizes, setting.env.get("peak_bf16_tflops")
    models = results.get("training", {}).get("summary", {}).get("models", {})
    jobs = []
    for m, w in zip(sizes.models, sizes.model_weights, strict=True):
        eager = models.get(m, {})
        args = (m, eager.get("best_layout") or "nchw", eager.get("train_flops_per_image"), sizes, setting.device, peak)
        jobs.append(Job(m, compile_runs, args, runs=("compiled",), weight=w, needs_cuda=True))
    return jobs


def summarize_training(runs: list[dict[str, Any]], results: dict[str, Any]) -> dict[str, Any]:
    """Per model: the faster layout and its model-only rate, the rate with the loader and its share, MFU."""
    models = {}
    for m in dict.fromkeys(r.get("model") for r in runs if r.get("model")):
        by = {layout: first_ok(runs, model=m, name=f"model only, {layout}") for layout in LAYOUTS}
        best = max(LAYOUTS, key=lambda k: by[k].get("images_per_s", 0.0))
        fed = first_ok(runs, model=m, name="with loader")
        rate = by[best].get("images_per_s")
        models[m] = {
            "train_flops_per_image": first_ok(runs, model=m, name="flops").get("train_flops_per_image"),
            "best_layout": best if rate else None,
            "model_only_images_per_s": rate,
            "channels_last_speedup": ratio(by["channels_last"].get("images_per_s"), by["nchw"].get("images_per_s")),
            "with_loader_images_per_s": fed.get("images_per_s"),
            "with_loader_to_model_only": ratio(fed.get("images_per_s"), rate),
            "mfu_model_only": by[best].get("mfu"),
            "mfu_with_loader": fed.get("mfu"),
        }
    return {"models": models, "mfu_note": mfu_note(results)}


def summarize_compile(runs: list[dict[str, Any]], results: dict[str, Any]) -> dict[str, Any]:
    """Per model: the compiled rate against the eager one of the training part, and whether compiling helps."""
    eager = results.get("training", {}).get("summary", {}).get("models", {})
    models = {}
    for row in ok_runs(runs):
        speedup = ratio(row["images_per_s"], eager.get(row["model"], {}).get("model_only_images_per_s"))
        models[row["model"]] = {
            "compiled_images_per_s": row["images_per_s"],
            "speedup_over_eager": speedup,
            "helps": speedup is not None and speedup > 1.02,  # beyond run-to-run noise
            "first_step_seconds": row["first_step_seconds"],
            "mfu": row["mfu"],
        }
    return {"models": models}


PART = Part(
    name="training",
    what="bf16 training images/s, model only (NCHW, channels-last) and with the DALI loader, and MFU",
    share=0.25,
    plan=_training_plan,
    summarize=summarize_training,
)

COMPILE_PART = Part(
    name="compile",
    what="torch.compile: the model-only rate compiled, against eager",
    share=0.25,
    plan=_compile_plan,
    needs_cuda=True,
    summarize=summarize_compile,
)

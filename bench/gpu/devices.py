"""The device part: pass/fail checks of how the CUDA paths handle devices, each a run of its own.

- batches reach the model on its device when the loader delivers elsewhere (DALI on the CPU for a GPU run, and
  DALI on the GPU for a CPU run; the portable loader's batches where DALI is not installed), or the combination
  is refused with a clear error;
- the in-training evaluation runs on the model's own device and leaves the live backbone there;
- ONNX export of a model on the GPU works and leaves the model there;
- the DALI loader's GPU follows LOCAL_RANK, not the global rank, and more local ranks than GPUs is a clear error
  (the portable loader's where DALI is not installed: the choice is the same for both).
A check that fails is a failed run with its reason; the next checks still run.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from facetool.bench.gpu.plan import Job, Part, Setting, Sizes, attempt, error_reason
from facetool.pipeline.errors import FacetoolError

TRAINING_RUNS = ("batches: cpu loader, cuda run", "batches: gpu loader, cpu run", "evaluation: cpu run",
                 "evaluation: cuda run")  # fmt: skip
RANK_RUNS = ("onnx export from the gpu", "loader device from LOCAL_RANK", "more local ranks than gpus")


@contextlib.contextmanager
def environment(**values: str | None) -> Iterator[None]:
    """Set (a string) or remove (None) environment variables inside the block, then restore them."""
    saved = {k: os.environ.get(k) for k in values}
    try:
        for key, value in values.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _devices(tensors) -> set[str]:
    return {str(t.device) for t in tensors}


def batches_check(
    shards: str, sizes: Sizes, run_device: str, loader_device: str, backend: str = "dali"
) -> dict[str, Any]:
    """Two steps of a run on ``run_device`` fed by the ``backend`` loader on ``loader_device``: the images reach
    the backbone and the labels the head on the model's device; a clear refusal passes too."""
    from facetool.bench.gpu.training import train_config
    from facetool.train.engine import Trainer

    cfg = train_config(sizes, sizes.devices_model, run_device, "shards", shards, batch=sizes.devices_batch,
                       loader_device=loader_device, steps=2, backend=backend)  # fmt: skip
    seen: dict[str, set[str]] = {"images": set(), "labels": set()}
    with tempfile.TemporaryDirectory(prefix="facetool-bench-gpu-") as tmp:
        try:
            trainer = Trainer(cfg, Path(tmp))
            model_device = str(next(trainer.backbone.parameters()).device)
            trainer.backbone.register_forward_pre_hook(lambda m, args: seen["images"].update(_devices(args[:1])))
            trainer.head.register_forward_pre_hook(lambda m, args: seen["labels"].update(_devices(args[1:2])))
            trainer.run()
        except FacetoolError as err:
            return {"outcome": "refused", "message": error_reason(err)}
    wrong = {k: sorted(v - {model_device}) for k, v in seen.items() if v - {model_device}}
    if wrong:
        raise FacetoolError(f"the model is on {model_device} but its batches came on {wrong}")
    return {"outcome": "moved", "model_device": model_device, "batch_devices": sorted(seen["images"]),
            "backend": backend}  # fmt: skip


def evaluation_check(shards: str, sizes: Sizes, run_device: str) -> dict[str, Any]:
    """A one-step run on ``run_device`` evaluated at its end as `facetool train` does it: the evaluation must run
    on the backbone's device and leave the backbone there."""
    from facetool.bench.gpu.training import train_config
    from facetool.bench.gpu.verification import pair_set
    from facetool.bench.loader import read_jpegs
    from facetool.bench.verification import evaluate_model
    from facetool.train.engine import Trainer

    faces = pair_set(read_jpegs(shards, 4 * sizes.devices_batch), shards)
    ran_on: set[str] = set()

    def evaluate(backbone):
        handle = backbone.register_forward_pre_hook(lambda m, args: ran_on.update(_devices(args[:1])))
        try:
            return evaluate_model(backbone, [faces], batch_size=sizes.devices_batch)
        finally:
            handle.remove()

    cfg = train_config(sizes, sizes.devices_model, run_device, "synthetic", shards, batch=sizes.devices_batch, steps=1)
    with tempfile.TemporaryDirectory(prefix="facetool-bench-gpu-") as tmp:
        trainer = Trainer(cfg, Path(tmp), evaluate=evaluate)
        model_device = str(next(trainer.backbone.parameters()).device)
        trainer.run()
        after = _devices(trainer.backbone.parameters())
    if after != {model_device}:
        raise FacetoolError(f"the evaluation moved the live backbone from {model_device} to {sorted(after)}")
    if ran_on != {model_device}:
        raise FacetoolError(f"the evaluation ran on {sorted(ran_on)}; the backbone lives on {model_device}")
    return {"model_device": model_device, "evaluated_on": sorted(ran_on)}


def onnx_check(sizes: Sizes, work: str, device: str) -> dict[str, Any]:
    """Export a backbone that lives on ``device`` to ONNX: the file must check, the model stay on its device, and
    onnxruntime (where installed) reproduce its embeddings."""
    import onnx
    import torch

    from facetool.train.models import create_backbone
    from facetool.train.models.export import export_onnx

    torch.manual_seed(0)
    model = create_backbone(sizes.devices_model).to(device).eval()
    path = Path(work) / f"devices-{os.getpid()}.onnx"
    inputs = export_onnx(model, path)
    onnx.checker.check_model(str(path))
    if _devices(model.parameters()) != {str(torch.device(device, 0) if device == "cuda" else device)}:
        raise FacetoolError(f"the export moved the model off {device}: {sorted(_devices(model.parameters()))}")
    out: dict[str, Any] = {"inputs": inputs, "onnx_bytes": path.stat().st_size}
    try:
        import onnxruntime
    except ImportError:
        return {**out, "onnxruntime": "not installed: the graph was checked, not run"}
    x = torch.rand(2, 3, 112, 112) * 2 - 1
    with torch.no_grad():
        expected = model(x.to(device)).float().cpu()
    got = torch.from_numpy(onnxruntime.InferenceSession(str(path)).run(None, {"images": x.numpy()})[0])
    cosine = float(torch.nn.functional.cosine_similarity(got, expected).min())
    if cosine < 0.999:
        raise FacetoolError(f"onnxruntime's embeddings differ from the model's (cosine similarity {cosine:.4f})")
    return {**out, "min_cosine_to_torch": cosine}


def local_rank_check(shards: str, sizes: Sizes, backend: str = "dali") -> dict[str, Any]:
    """Global rank N+1 of N+2 with LOCAL_RANK 0 (N GPUs): the ``backend`` loader must deliver on GPU 0."""
    import torch

    from facetool.train.data import LoaderConfig, create_loader

    count = torch.cuda.device_count()
    rank, world = count + 1, count + 2
    config = LoaderConfig(batch_size=sizes.devices_batch, shuffle_buffer=sizes.shuffle_buffer or 16384)
    with environment(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK="0", LOCAL_WORLD_SIZE="1"):
        loader = create_loader(shards, config, rank, world, device="gpu", backend=backend)
        got = str(loader.device)
        del loader
    if got != "cuda:0":
        raise FacetoolError(f"rank {rank} with LOCAL_RANK 0 gets its batches on {got}, not cuda:0")
    # telling: with one GPU every rank maps to GPU 0, right or wrong
    return {"gpus": count, "rank": rank, "backend": backend, "loader_device": got, "telling": count > 1}


def too_many_ranks_check(shards: str, sizes: Sizes, backend: str = "dali") -> dict[str, Any]:
    """LOCAL_RANK N with N GPUs: the ``backend`` loader and the engine's set-up must both refuse it with a clear
    error (before any process group is joined)."""
    import torch

    from facetool.bench.gpu.training import train_config
    from facetool.train.data import LoaderConfig, create_loader
    from facetool.train.engine.context import setup_distributed

    count = torch.cuda.device_count()
    env = {"RANK": str(count), "WORLD_SIZE": str(count + 1), "LOCAL_RANK": str(count),
           "LOCAL_WORLD_SIZE": str(count + 1), "MASTER_ADDR": None, "MASTER_PORT": None}  # fmt: skip
    config = LoaderConfig(batch_size=sizes.devices_batch, shuffle_buffer=sizes.shuffle_buffer or 16384)
    cfg = train_config(sizes, sizes.devices_model, "cuda", "shards", shards, batch=sizes.devices_batch,
                       backend=backend)  # fmt: skip
    attempts = {
        "loader": lambda: create_loader(shards, config, count, count + 1, device="gpu", backend=backend),
        "engine": lambda: setup_distributed(cfg),
    }
    said: dict[str, str] = {}
    with environment(**env):
        for where, call in attempts.items():
            try:
                call()
                said[where] = "accepted"
            except FacetoolError as err:
                said[where] = f"refused: {error_reason(err)}"
            except Exception as err:
                said[where] = f"no clear error: {error_reason(err)}"
    unclear = {k: v for k, v in said.items() if not v.startswith("refused")}
    if unclear:
        shown = "; ".join(f"{where} {what}" for where, what in unclear.items())
        raise FacetoolError(f"local rank {count} with {count} GPU(s): {shown}")
    return {"gpus": count, "errors": said}


def loader_backend() -> str:
    """The loader the checks feed from: DALI, or the portable one where DALI is not installed."""
    from facetool.train.data import dali_available

    return "dali" if dali_available() else "wds"


def training_checks(shards: str, sizes: Sizes) -> Iterator[dict[str, Any]]:
    backend = loader_backend()
    for name, run_device, loader_device in zip(TRAINING_RUNS[:2], ("cuda", "cpu"), ("cpu", "gpu"), strict=True):
        yield attempt(name, batches_check, shards, sizes, run_device, loader_device, backend)
    for name, run_device in zip(TRAINING_RUNS[2:], ("cpu", "cuda"), strict=True):
        yield attempt(name, evaluation_check, shards, sizes, run_device)


def rank_checks(shards: str, sizes: Sizes, work: str) -> Iterator[dict[str, Any]]:
    yield attempt(RANK_RUNS[0], onnx_check, sizes, work, "cuda")
    for name, check in zip(RANK_RUNS[1:], (local_rank_check, too_many_ranks_check), strict=True):
        yield attempt(name, check, shards, sizes, loader_backend())


def _plan(setting: Setting, results: dict[str, Any]) -> list[Job]:
    shards, sizes = str(setting.shards), setting.sizes
    return [
        Job("training", training_checks, (shards, sizes), runs=TRAINING_RUNS, weight=2.0),
        Job("export and ranks", rank_checks, (shards, sizes, str(setting.work)), runs=RANK_RUNS),
    ]


PART = Part(
    name="devices",
    what="device handling: batches, evaluation, ONNX export and LOCAL_RANK on the GPU (pass/fail)",
    share=0.12,
    plan=_plan,
    needs_cuda=True,
    needs_shards=True,
)

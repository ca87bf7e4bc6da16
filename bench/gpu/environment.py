"""What the run measured on: the GPU, its driver, CUDA, torch and DALI versions, and the device's peak dense bf16
rate for model FLOPs utilisation (MFU)."""

from __future__ import annotations

import os
import platform
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from facetool.bench.gpu.plan import Job, Part, Setting
from facetool.bench.process import cpu_count

#: Peak dense bf16 tensor TFLOPS (no sparsity) by a piece of the name torch gives the device; the first match
#: wins, so the more specific names come first. From NVIDIA's data sheets (SXM parts unless named).
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("GH200", 989.0),
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # H100 SXM ("NVIDIA H100 80GB HBM3")
    ("H800", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
    ("A10", 125.0),
)


def peak_bf16_tflops(device_name: str | None) -> float | None:
    """The device's peak dense bf16 TFLOPS from :data:`PEAK_BF16_TFLOPS`, or None for a device not in it."""
    if not device_name:
        return None
    for piece, tflops in PEAK_BF16_TFLOPS:
        if piece.lower() in device_name.lower():
            return tflops
    return None


def driver_version() -> str | None:
    """The NVIDIA driver's version, from nvidia-smi or /proc; None when neither tells."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20, check=True,
        ).stdout  # fmt: skip
        if out.strip():
            return out.strip().splitlines()[0].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:  # "NVRM version: NVIDIA UNIX x86_64 Kernel Module  570.86.15  ..."
        words = Path("/proc/driver/nvidia/version").read_text().split()
        return next(w for w in words if w[:1].isdigit() and "." in w)
    except (OSError, StopIteration):
        return None


def dali_version() -> str | None:
    try:
        import nvidia.dali
    except ImportError:
        return None
    return str(nvidia.dali.__version__)


def probe() -> Iterator[dict[str, Any]]:
    """One run: the versions, the cores and memory, and the GPU (name, count, memory, compute capability, peak)."""
    import torch

    pages = os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 0
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.cuda.is_available(),
        "cuda_runtime": torch.version.cuda,
        "dali": dali_version(),
        "cpu_cores": cpu_count(),
        "memory_bytes": pages * os.sysconf("SC_PAGE_SIZE") if pages else None,
        "gpu": None,
        "gpus": 0,
    }
    if info["cuda"]:
        props = torch.cuda.get_device_properties(0)
        info.update(
            gpu=props.name,
            gpus=torch.cuda.device_count(),
            gpu_memory_bytes=int(props.total_memory),
            capability=f"{props.major}.{props.minor}",
            cudnn=torch.backends.cudnn.version(),
            driver=driver_version(),
        )
    info["peak_bf16_tflops"] = peak_bf16_tflops(info["gpu"])
    yield {"name": "environment", "status": "ok", **info}


def environment_of(results: dict[str, Any]) -> dict[str, Any]:
    """The environment run among the results of the parts so far (empty when the probe failed)."""
    runs = results.get("environment", {}).get("runs", [])
    return runs[0] if runs and runs[0].get("status") == "ok" else {}


def mfu_note(results: dict[str, Any]) -> str | None:
    """Why MFU figures are missing, or None when they are there."""
    env = environment_of(results)
    if env.get("peak_bf16_tflops"):
        return None
    if not env.get("gpu"):
        return "MFU omitted: no GPU (no peak rate to compare with)"
    return f"MFU omitted: no peak bf16 rate known for {env['gpu']} (add it to PEAK_BF16_TFLOPS)"


def _plan(setting: Setting, results: dict[str, Any]) -> list[Job]:
    return [Job("probe", probe, (), runs=("environment",))]


PART = Part(
    name="environment",
    what="GPU, driver, CUDA, torch and DALI versions",
    share=0.04,
    plan=_plan,
)

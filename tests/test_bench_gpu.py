"""facetool bench gpu: the smoke run on the CPU (structure, skipped CUDA parts, positive figures), the budgeted
runner (a failing, dying or overrunning job is reported and the next one runs), and the checks' plumbing on the
CPU (the NCCL part's collective path through gloo, the device checks, the ONNX check)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from facetool.bench.gpu import SMOKE, Job, Part, Setting, part_names
from facetool.bench.gpu.environment import peak_bf16_tflops
from facetool.bench.gpu.plan import one_line, status_of
from facetool.bench.gpu.run import run_part
from tests.helpers import error_line, run_cli

CUDA_PARTS = ("nccl", "devices", "compile")
PART_KEYS = {"what", "status", "seconds", "budget_seconds", "runs", "summary"}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[dict, str]:
    """One `facetool bench gpu --smoke --json F` run: its JSON report and its output."""
    out = tmp_path_factory.mktemp("bench_gpu") / "report.json"
    proc = run_cli("bench", "gpu", "--smoke", "--json", str(out), env={"CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stderr
    return json.loads(out.read_text()), proc.stdout


def _runs(report: dict, part: str, **match) -> list[dict]:
    return [r for r in report["parts"][part]["runs"] if all(r.get(k) == v for k, v in match.items())]


def test_smoke_report_structure(smoke):
    report, output = smoke
    assert report["smoke"] is True and report["command"] == "facetool bench gpu --smoke"
    assert {"minutes", "started", "sizes", "environment", "parts", "seconds", "counts"} <= set(report)
    assert list(report["parts"]) == part_names()
    env = report["environment"]
    assert env["torch"] and env["cuda"] is False and env["gpu"] is None and env["cpu_cores"] >= 1
    assert "dali" in env and "cuda_runtime" in env and "peak_bf16_tflops" in env
    for name, part in report["parts"].items():
        assert set(part) == PART_KEYS, name
        assert part["status"] == "ok" or part["status"].startswith(("failed: ", "skipped: ")), name
        assert "\n" not in part["status"] and part["seconds"] >= 0 and part["budget_seconds"] > 0
        for run in part["runs"]:
            assert {"job", "name", "status"} <= set(run) and "\n" not in run["status"]
    assert sum(report["counts"].values()) == len(part_names()) and report["counts"]["failed"] == 0
    assert "parts ok, 0 failed, 3 skipped" in output and "training: ok" in output


def test_smoke_skips_what_needs_cuda(smoke):
    report, _ = smoke
    for name in CUDA_PARTS:
        assert report["parts"][name]["status"].startswith("skipped: no CUDA"), name
    gpu_loader = _runs(report, "loader", job="gpu")
    assert [r["name"] for r in gpu_loader] == ["decode-only", "loader", "loader, masks"]
    assert all(r["status"].startswith("skipped: no CUDA") for r in gpu_loader)


def test_smoke_cpu_parts_measure(smoke):
    report, _ = smoke
    for name in ("environment", "fixture", "training", "partial_fc", "verification", "loader"):
        assert report["parts"][name]["status"] == "ok", name
    shards = _runs(report, "fixture")[0]
    assert shards["samples"] == SMOKE.samples and shards["samples_per_s"] > 0 and shards["seconds"] > 0
    assert 0 < shards["masked"] < SMOKE.samples and shards["draw_seconds"] > 0 and shards["write_seconds"] > 0
    from facetool.train.data import dali_available

    if dali_available():
        cpu = _runs(report, "loader", job="cpu")
        assert [r["status"] for r in cpu] == ["ok"] * 3 and all(r["images_per_s"] > 0 for r in cpu)
        assert report["parts"]["loader"]["summary"]["cpu_loader_to_decode_only"] > 0
    (flops,) = _runs(report, "training", name="flops")
    assert flops["train_flops_per_image"] > 0
    for name in ("model only, nchw", "model only, channels_last", "with loader"):
        (run,) = _runs(report, "training", name=name)
        assert run["status"] == "ok" and run["images_per_s"] > 0 and run["peak_memory_bytes"] > 0, name
        assert run["mfu"] is None  # no peak rate on a CPU
    models = report["parts"]["training"]["summary"]["models"]
    assert set(models) == set(SMOKE.models) and report["parts"]["training"]["summary"]["mfu_note"]
    pfc = {r["sample_rate"]: r for r in _runs(report, "partial_fc", status="ok")}
    assert set(pfc) == set(SMOKE.pfc_rates) and all(
        r["step_ms"] > 0 and r["peak_memory_bytes"] > 0 for r in pfc.values()
    )
    assert pfc[0.1]["classes_per_step"] < pfc[1.0]["classes_per_step"] == SMOKE.pfc_classes
    for run in _runs(report, "verification"):
        assert run["status"] == "ok" and run["images_per_s"] > 0


def test_full_run_without_cuda_is_one_line_error():
    line = error_line("bench", "gpu", env={"CUDA_VISIBLE_DEVICES": ""})
    assert "no CUDA device" in line and "--smoke" in line


# the runner: jobs that fail, die or run past their limit ------------------------------------------------------
def _two_then_fail():
    yield {"name": "a", "status": "ok", "images_per_s": 1.0}
    raise RuntimeError("broken\nsecond line")


def _dies():
    yield {"name": "a", "status": "ok"}
    time.sleep(0.5)  # the queue's feeder thread sends "a" first
    os._exit(3)


def _sleeps():
    yield {"name": "a", "status": "ok"}
    time.sleep(600)


def _fine():
    yield {"name": "a", "status": "ok"}


def _part(*jobs: Job) -> Part:
    return Part(name="probe", what="test", share=0.5, plan=lambda setting, results: list(jobs))


def _setting(tmp_path: Path, device: str = "cpu") -> Setting:
    return Setting(sizes=SMOKE, device=device, work=tmp_path, smoke=True)


def test_runner_reports_failing_and_dying_jobs_and_goes_on(tmp_path):
    part = _part(
        Job("fails", _two_then_fail, (), runs=("a", "b")),
        Job("dies", _dies, (), runs=("a", "b")),
        Job("gpu", _fine, (), runs=("a",), needs_cuda=True),
        Job("fine", _fine, (), runs=("a",)),
    )
    lines: list[str] = []
    result = run_part(part, _setting(tmp_path), {}, time.monotonic() + 120, lines.append)
    status = {(r["job"], r["name"]): r["status"] for r in result["runs"]}
    assert status[("fails", "a")] == "ok" and status[("fails", "b")] == "failed: RuntimeError: broken"
    assert status[("dies", "a")] == "ok" and "exited with code 3" in status[("dies", "b")]
    assert status[("gpu", "a")] == "skipped: no CUDA" and status[("fine", "a")] == "ok"
    assert result["status"].startswith("failed: 2 of 6 runs failed; first, b: RuntimeError: broken")
    assert any("probe: failed" in line for line in lines)


def test_runner_stops_a_job_at_its_limit(tmp_path):
    part = _part(Job("slow", _sleeps, (), runs=("a", "b")), Job("next", _fine, (), runs=("a",)))
    result = run_part(part, _setting(tmp_path), {}, time.monotonic() + 20, lambda _line: None)
    status = {(r["job"], r["name"]): r["status"] for r in result["runs"]}
    assert status[("slow", "a")] == "ok" and status[("slow", "b")].startswith("failed: stopped at the job's time limit")
    assert status[("next", "a")] == "ok"


def test_runner_skips_cuda_parts_and_parts_without_shards(tmp_path):
    cuda = Part(name="c", what="", share=0.1, plan=lambda s, r: [], needs_cuda=True)
    shards = Part(name="s", what="", share=0.1, plan=lambda s, r: [], needs_shards=True)
    setting = _setting(tmp_path)
    assert run_part(cuda, setting, {}, time.monotonic() + 10, print)["status"] == "skipped: no CUDA"
    results = {"fixture": {"status": "failed: disk full"}}
    assert run_part(shards, setting, results, time.monotonic() + 10, print)["status"].startswith("skipped: no shards")


@pytest.mark.parametrize(
    ("statuses", "expected"),
    [
        (["ok", "ok"], "ok"),
        (["ok", "skipped: no CUDA"], "ok"),
        (["skipped: no CUDA", "skipped: no CUDA"], "skipped: no CUDA"),
        (["ok", "failed: boom"], "failed: 1 of 2 runs failed; first, r1: boom"),
        ([], "skipped: nothing to run"),
    ],
)
def test_part_status(statuses, expected):
    assert status_of([{"name": f"r{i}", "status": s} for i, s in enumerate(statuses)]) == expected


def test_one_line_reasons():
    assert one_line("CUDA out of memory.\nTried to allocate 4 GiB") == "CUDA out of memory."
    assert len(one_line("x" * 1000)) == 300 and one_line("") == "no message"


@pytest.mark.parametrize(
    ("name", "tflops"),
    [
        ("NVIDIA H200", 989.0),
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA L40S", 362.0),
        ("NVIDIA L4", 121.0),
        ("Tesla V100-SXM2-32GB", None),
        (None, None),
    ],
)
def test_peak_table(name, tflops):
    assert peak_bf16_tflops(name) == tflops


# the checks' code on the CPU ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    from facetool.bench.gpu.fixture import make_shards

    out = tmp_path_factory.mktemp("bench_gpu_shards") / "shards"
    figures = make_shards(out, SMOKE, workers=1)
    assert figures["samples"] == SMOKE.samples
    return str(out)


def test_fixture_shards_are_a_valid_shard_folder(shards):
    from facetool.train.data import open_shards

    opened = open_shards(shards)
    assert opened.samples == SMOKE.samples and opened.classes == SMOKE.samples // SMOKE.per_identity
    assert opened.rendered_fraction >= SMOKE.masked_prob  # the loader's q fits
    assert len(opened.shards) == SMOKE.samples // SMOKE.samples_per_shard


def test_collective_path_through_gloo():
    from facetool.bench.gpu.nccl import collective_step

    out = collective_step("gloo", "cpu", classes=300, width=64, batch=16)
    assert out["matches_one_process"] and out["backend"] == "gloo" and out["step_seconds"] > 0


def test_device_checks_pass_on_the_cpu(shards, tmp_path):
    from facetool.bench.gpu import devices

    backend = devices.loader_backend()  # DALI, or the portable loader where DALI is not installed
    moved = devices.batches_check(shards, SMOKE, "cpu", "cpu", backend)
    assert moved == {"outcome": "moved", "model_device": "cpu", "batch_devices": ["cpu"], "backend": backend}
    assert devices.evaluation_check(shards, SMOKE, "cpu") == {"model_device": "cpu", "evaluated_on": ["cpu"]}
    exported = devices.onnx_check(SMOKE, str(tmp_path), "cpu")
    assert exported["inputs"] == ["images"] and exported.get("min_cosine_to_torch", 1.0) > 0.999

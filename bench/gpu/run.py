"""`facetool bench gpu` as a library call: every part in turn, each job in a fresh process, within a time budget.

Budget: part i may run until ``start + total - (the shares of the parts after it) x total``, so a part can use
what the parts before it left over but never the time reserved for the ones after it; within a part each job gets
its weight's share of what is left. A job past its limit is stopped (its finished runs are kept); a job that
fails or dies (a crash, a CUDA out-of-memory error that kills the process) fails its remaining runs; either way
the next job starts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from facetool.bench.gpu.environment import environment_of
from facetool.bench.gpu.plan import FULL, SMOKE, Job, Part, Setting, failed, skipped, status_of
from facetool.bench.gpu.registry import PARTS
from facetool.bench.gpu.report import counts, describe_run
from facetool.bench.process import TimeLimitExceeded, stream_isolated
from facetool.pipeline.errors import FacetoolError

MIN_JOB_SECONDS = 5.0  # a job given less is skipped: starting a process and importing torch takes about that
DEFAULT_MINUTES = 8.0

Notify = Callable[[str], None]


def run_job(part: Part, job: Job, limit: float, say: Notify) -> list[dict[str, Any]]:
    """The runs of one job, run in a fresh process for at most ``limit`` seconds; runs it did not reach fail with
    the reason it stopped."""
    got: list[dict[str, Any]] = []
    what = f"bench gpu, {part.name}, {job.name}"
    try:
        for run in stream_isolated(what, job.fn, *job.args, timeout=limit):
            got.append({"job": job.name, **run})
            say(describe_run(part.name, got[-1]))
        return got
    except TimeLimitExceeded:
        reason = f"stopped at the job's time limit of {limit:.0f} s"
    except FacetoolError as err:
        reason = str(err).removeprefix(f"{what}: ")  # the run names its part and job
    done = {r["name"] for r in got}
    missing = [n for n in job.runs if n not in done] or [f"{job.name} (end)"]
    for name in missing:
        got.append({"job": job.name, "name": name, "status": failed(reason)})
        say(describe_run(part.name, got[-1]))
    return got


def run_jobs(part: Part, jobs: list[Job], setting: Setting, deadline: float, say: Notify) -> list[dict[str, Any]]:
    """Every job of a part in turn, each limited to its weight's share of the part's time left."""
    runs: list[dict[str, Any]] = []
    for k, job in enumerate(jobs):
        if job.needs_cuda and not setting.cuda:
            runs += [{"job": job.name, "name": n, "status": skipped(setting.no_cuda_reason())} for n in job.runs]
            continue
        weights = sum(j.weight for j in jobs[k:] if setting.cuda or not j.needs_cuda)
        limit = (deadline - time.monotonic()) * job.weight / weights
        if limit < MIN_JOB_SECONDS:
            reason = skipped(f"the part's time budget was spent ({limit:.0f} s left for this job)")
            runs += [{"job": job.name, "name": n, "status": reason} for n in job.runs]
            continue
        runs += run_job(part, job, limit, say)
    return runs


def _skip_reason(part: Part, setting: Setting, results: dict[str, Any]) -> str | None:
    if part.needs_cuda and not setting.cuda:
        return setting.no_cuda_reason()
    if part.needs_shards and results.get("fixture", {}).get("status") != "ok":
        return "no shards: the fixture part did not make them"
    return None


def run_part(part: Part, setting: Setting, results: dict[str, Any], deadline: float, say: Notify) -> dict[str, Any]:
    """One part's result: status, seconds, budget, its runs and the figures derived from them."""
    start = time.monotonic()
    reason = _skip_reason(part, setting, results)
    runs = [] if reason else run_jobs(part, part.plan(setting, results), setting, deadline, say)
    status = skipped(reason) if reason else status_of(runs)
    seconds = time.monotonic() - start
    say(f"{part.name}: {status} ({seconds:.0f} s)")
    return {
        "what": part.what,
        "status": status,
        "seconds": round(seconds, 2),
        "budget_seconds": round(max(0.0, deadline - start), 1),
        "runs": runs,
        "summary": part.summarize(runs, results) if part.summarize and runs else {},
    }


@contextlib.contextmanager
def _work_folder(parent: str | os.PathLike | None) -> Iterator[Path]:
    if parent is not None:
        Path(parent).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="facetool-bench-gpu-", dir=parent) as work:
        yield Path(work)


def _after_environment(report: dict[str, Any], setting: Setting) -> Setting:
    """The setting once the environment is known; a full run where torch sees no GPU is an error (a probe that
    failed says nothing: the run goes on, and the parts tell)."""
    env = environment_of(report["parts"])
    report["environment"] = {k: v for k, v in env.items() if k not in ("name", "status", "job")}
    if env and not setting.smoke and not env.get("cuda"):
        raise FacetoolError("bench gpu: torch sees no CUDA device here; run it on a GPU machine, or with --smoke")
    return dataclasses.replace(setting, env=env, device="cpu" if setting.smoke else "cuda")


def run_gpu_bench(
    smoke: bool = False,
    minutes: float = DEFAULT_MINUTES,
    work_dir: str | os.PathLike | None = None,
    notify: Notify | None = None,
    on_part: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run every part (``smoke``: toy sizes on the CPU, CUDA parts skipped) within ``minutes``; returns the report.
    ``notify`` receives a line per run and per part as they finish, ``on_part`` the report so far after each part
    (to save it: a run cut short keeps what it measured). Shards and files go to a temporary folder (under
    ``work_dir`` when given), removed at the end."""
    if not minutes > 0:
        raise FacetoolError(f"bench gpu: the time budget must be positive, got {minutes} minutes")
    say = notify or (lambda _line: None)
    sizes = SMOKE if smoke else FULL
    budget, t0 = minutes * 60.0, time.monotonic()
    report: dict[str, Any] = {
        "command": "facetool bench gpu" + (" --smoke" if smoke else ""),
        "smoke": smoke,
        "minutes": minutes,
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "sizes": dataclasses.asdict(sizes),
        "environment": {},
        "parts": {},
    }
    with _work_folder(work_dir) as work:
        setting = Setting(sizes=sizes, device="cpu", work=work, smoke=smoke)
        for i, part in enumerate(PARTS):
            deadline = t0 + budget * (1.0 - sum(p.share for p in PARTS[i + 1 :]))
            report["parts"][part.name] = run_part(part, setting, report["parts"], deadline, say)
            if part.name == "environment":
                setting = _after_environment(report, setting)
            report["seconds"] = round(time.monotonic() - t0, 2)
            report["counts"] = counts(report)
            if on_part is not None:
                on_part(report)
    return report

"""The report of `facetool bench gpu` as text: a line per run as it finishes, and the summary at the end (the JSON
holds every figure; these lines show the main ones beside their references)."""

from __future__ import annotations

from typing import Any

OK = "ok"


def size(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def _x(value: float | None) -> str:
    return f"{value:.2f}x" if value is not None else "-"


def _pct(value: float | None) -> str:
    return f"{100 * value:.1f}%" if value is not None else "-"


def _figure(run: dict[str, Any]) -> str:
    """The run's main figure: a rate, a step time with memory, a FLOP count, or what it checked."""
    if "images_per_s" in run:
        extra = f", MFU {_pct(run['mfu'])}" if run.get("mfu") is not None else ""
        return f"{run['images_per_s']:,.0f} images/s{extra}"
    if "step_ms" in run:
        return f"{run['step_ms']:.1f} ms/step, peak {size(run.get('peak_memory_bytes'))}"
    if "train_flops_per_image" in run:
        return f"{run['train_flops_per_image'] / 1e9:.1f} GFLOPs per image (forward + backward)"
    if "samples_per_s" in run:
        return f"{run['samples']:,} samples in {run['seconds']:.1f} s ({run['samples_per_s']:,.0f}/s)"
    if "step_seconds" in run:
        return f"group up in {run['init_seconds']:.2f} s, step {1e3 * run['step_seconds']:.1f} ms, matches one process"
    if "gpu" in run:
        return f"{run.get('gpu') or 'no GPU'}; torch {run.get('torch')}, CUDA {run.get('cuda_runtime')}"
    if "outcome" in run:
        return run["outcome"] + (f": {run['message']}" if run.get("message") else "")
    return "passed"


def describe_run(part: str, run: dict[str, Any]) -> str:
    """One line for a finished run: where, what, and its figure or status."""
    shown = _figure(run) if run["status"] == OK else run["status"]
    where = f"{part} / {run.get('job', '')}"
    return f"  {where:<30}{run['name']:<28}{shown}"


def counts(report: dict[str, Any]) -> dict[str, int]:
    """How many parts are ok, failed and skipped."""
    out = {"ok": 0, "failed": 0, "skipped": 0}
    for part in report["parts"].values():
        out[part["status"].split(":")[0]] += 1
    return out


def _environment_line(env: dict[str, Any]) -> str:
    gpu = f"{env['gpu']} (x{env['gpus']}, driver {env.get('driver')})" if env.get("gpu") else "no GPU"
    return (
        f"{gpu}; torch {env.get('torch')}, CUDA {env.get('cuda_runtime')}, DALI {env.get('dali')}; "
        f"{env.get('cpu_cores')} cores; peak bf16 {env.get('peak_bf16_tflops') or '-'} TFLOPS"
    )


def _loader_lines(summary: dict[str, Any]) -> list[str]:
    lines = []
    for job in ("gpu", "cpu"):
        if summary.get(f"{job}_loader_to_decode_only") is None and summary.get(f"{job}_masks_to_no_masks") is None:
            continue
        lines.append(
            f"  DALI {job}: loader {_x(summary.get(f'{job}_loader_to_decode_only'))} of decode-only, with masks "
            f"{_x(summary.get(f'{job}_loader_masks_to_decode_only'))}; masks cost "
            f"{_x(summary.get(f'{job}_masks_to_no_masks'))}"
        )
    if summary.get("gpu_to_cpu_loader") is not None:
        lines.append(f"  mixed against the CPU: loader {_x(summary['gpu_to_cpu_loader'])}")
    return lines


def _training_lines(summary: dict[str, Any]) -> list[str]:
    lines = []
    for model, m in summary.get("models", {}).items():
        rate = m.get("model_only_images_per_s")
        lines.append(
            f"  {model:<14}model only {rate or 0:,.0f} images/s ({m.get('best_layout') or '-'}, channels-last "
            f"{_x(m.get('channels_last_speedup'))}), with the loader {_x(m.get('with_loader_to_model_only'))} of "
            f"it; MFU {_pct(m.get('mfu_model_only'))}"
        )
    if summary.get("mfu_note"):
        lines.append(f"  {summary['mfu_note']}")
    return lines


def _compile_lines(summary: dict[str, Any]) -> list[str]:
    return [
        f"  {model:<14}compiled {_x(m.get('speedup_over_eager'))} of eager ({'helps' if m['helps'] else 'no help'};"
        f" first step {m['first_step_seconds']:.0f} s)"
        for model, m in summary.get("models", {}).items()
    ]


def summary_lines(report: dict[str, Any]) -> list[str]:
    """The end of the output: the environment, each part's status and main derived figures, the counts."""
    lines = [_environment_line(report.get("environment", {}))]
    detail = {"loader": _loader_lines, "training": _training_lines, "compile": _compile_lines}
    for name, part in report["parts"].items():
        lines.append(f"{name:<14}{part['status']}  ({part['seconds']:.0f} s of {part['budget_seconds']:.0f})")
        if part["status"] == OK and name in detail:
            lines += detail[name](part.get("summary", {}))
    c = counts(report)
    seconds = report.get("seconds", 0)
    lines.append(f"{c['ok']} parts ok, {c['failed']} failed, {c['skipped']} skipped in {seconds:.0f} s")
    return lines

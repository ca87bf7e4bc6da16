"""The printed table and the ROC plot of an :class:`~.run.IJBReport`."""

from __future__ import annotations

import os
from typing import Any

from .metrics import FARS, FPIRS, RANKS


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def _modes(protocol: dict[str, Any]) -> str:
    parts = [
        "image + flip embeddings" if protocol["flip"] else "no flip",
        "image features normalised" if protocol["normalize_images"] else "norms kept",
        "detector-score weighted" if protocol["detector_score"] else "no detector score",
    ]
    if protocol.get("masked"):
        parts.append("every image masked")
    return ", ".join(parts)


def _identification_lines(ident: dict[str, Any]) -> list[str]:
    names = ", ".join(ident["galleries"])
    head = "".join(f"{'rank-' + str(k):>9}" for k in RANKS) + "".join(f"{'TPIR@' + k:>12}" for k in FPIRS)
    row = "".join(f"{_pct(ident[f'rank{k}']):>9}" for k in RANKS)
    row += "".join(f"{_pct(ident['tpir_at_fpir'][k]):>12}" for k in FPIRS)
    lines = [f"1:N identification (%), {ident['probes']:,} probes, galleries {names} (mean):", head, row]
    for name, g in ident["galleries"].items():
        lines.append(
            f"  {name}: {g['templates']:,} templates, {g['mated_probes']:,} mated / {g['non_mated_probes']:,} "
            f"non-mated probes, TPIR " + ", ".join(f"{_pct(v)} @ {k}" for k, v in g["tpir_at_fpir"].items())
        )
    return lines


def format_report(report) -> list[str]:
    """The table: what was evaluated, TAR (%) at each FAR and AUC, 1:N figures, timings, the reference's."""
    lines = [
        f"{report.target}: {report.images:,} images, {report.templates:,} templates, {report.pairs:,} pairs "
        f"({report.genuine:,} genuine)",
        f"protocol: {_modes(report.protocol)}",
        f"{'TAR (%) at FAR':<16}" + "".join(f"{k:>8}" for k in FARS) + f"{'AUC (%)':>10}",
        f"{'':<16}" + "".join(f"{_pct(report.tar_at_far[k]):>8}" for k in FARS) + f"{_pct(report.auc):>10}",
    ]
    if report.identification is not None:
        lines += _identification_lines(report.identification)
    s = report.seconds
    shown = ", ".join(f"{k} {v:.2f}" for k, v in s.items() if k != "metrics")
    lines.append(f"seconds: {shown}; metrics from features {s.get('metrics', 0):.2f} s")
    if report.reference is not None:
        ref = report.reference
        rs = ref["seconds"]
        lines.append(
            f"reference loop (eval_ijbc.py style): {rs['total']:.2f} s (pool {rs['pool']:.2f}, score "
            f"{rs['score']:.2f}, roc {rs['roc']:.2f}); same TAR at every FAR: "
            f"{'yes' if ref['same_tar_at_far'] else 'NO'}; max |score difference| {ref['max_score_difference']:.1e}"
        )
    return lines


def plot_report(report, path: str | os.PathLike) -> None:
    """The ROC (TAR against FAR on a log axis) as a PNG, drawn by the verification benchmark's plotter."""
    from facetool.bench.verification import plot_roc

    name = f"{report.target} ({report.pairs:,} pairs)"
    plot_roc({name: report.roc}, path, title=f"ROC on {report.target}")


__all__ = ["format_report", "plot_report"]

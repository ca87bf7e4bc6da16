"""What a verification run reports: the JSON object, the table, the timing line and the ROC plot (PNG)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from facetool.pipeline.atomic import atomic_path
from facetool.pipeline.errors import FacetoolError

from .metrics import FAR_EXPONENTS, SetMetrics, far_key
from .protocol import INSIGHTFACE, get_protocol


def report_json(results: dict[str, SetMetrics], **meta: Any) -> dict[str, Any]:
    """The ``--json`` object: ``sets`` keyed by name plus whatever describes the run (checkpoint, device...)."""
    return {**meta, "sets": {name: m.to_json() for name, m in results.items()}}


@dataclass
class Report:
    """A verification run: the metrics of each set (in report order), what describes the run (checkpoint,
    backbone, device, timings...), its JSON object and a title for its ROC plot."""

    results: dict[str, SetMetrics]
    meta: dict[str, Any]
    json: dict[str, Any]
    title: str

    @classmethod
    def build(cls, results: dict[str, SetMetrics], meta: dict[str, Any], title: str) -> Report:
        """The report of ``results``, with the run's total embedding and metric seconds added to ``meta``."""
        meta = {
            **meta,
            "embed_seconds": round(embed_seconds(results), 4),
            "metric_seconds": round(metric_seconds(results), 6),
        }
        return cls(results, meta, report_json(results, **meta), title)


def embed_seconds(results: dict[str, SetMetrics]) -> float:
    """Seconds spent embedding all sets (0 for embeddings computed elsewhere)."""
    return sum(m.extra["embed_seconds"] or 0.0 for m in results.values())


def metric_seconds(results: dict[str, SetMetrics]) -> float:
    """Seconds spent computing the metrics of all sets."""
    return sum(m.extra["metric_seconds"] for m in results.values())


def timing_line(report: Report) -> str:
    """``embedding: N images (+ flips) in S s (R images/s); metrics: T s``, or only the metrics' time when the
    embeddings came from elsewhere."""
    metric_s = metric_seconds(report.results)
    if "checkpoint" not in report.meta:
        return f"metrics: {metric_s:.4f} s"
    embed_s = embed_seconds(report.results)
    images = sum(m.extra["images"] for m in report.results.values())
    return (
        f"embedding: {images:,} images (+ flips) in {embed_s:.2f} s ({images / max(embed_s, 1e-9):,.1f} images/s);"
        f" metrics: {metric_s:.4f} s"
    )


def protocol_line(report: Report) -> str:
    """``protocol: NAME (folds, flip, ...)``: which protocol the numbers of ``report`` follow."""
    return get_protocol(report.meta.get("protocol", INSIGHTFACE.name)).describe()


def _pct(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{100 * x:.{digits}f}"


def format_table(results: dict[str, SetMetrics]) -> list[str]:
    """One row per set: accuracy +- std (%), mean threshold, TAR (%) at each FAR, AUC, EER (%); then which FARs
    could not be estimated and why."""
    fars = [far_key(e) for e in FAR_EXPONENTS]
    width = max([4, *(len(n) for n in results)]) + 2
    head = f"{'set':<{width}}{'pairs':>7}{'accuracy %':>17}{'thresh':>8}"
    head += "".join(f"{'TAR@' + f:>11}" for f in fars) + f"{'AUC':>9}{'EER %':>8}"
    lines = [head]
    for name, m in results.items():
        acc = f"{100 * m.accuracy:.2f} +- {100 * m.accuracy_std:.2f}"
        row = f"{name:<{width}}{m.pairs:>7}{acc:>17}{m.threshold:>8.3f}"
        row += "".join(f"{_pct(m.tar_at_far[f]):>11}" for f in fars)
        row += f"{'-' if m.auc is None else f'{m.auc:.4f}':>9}{_pct(m.eer):>8}"
        lines.append(row)
    for name, m in results.items():
        missing = [e for e in FAR_EXPONENTS if m.tar_at_far[far_key(e)] is None]
        if missing:
            need = ", ".join(f"{far_key(e)} needs >= {10**e:,}" for e in missing)
            lines.append(
                f"  {name}: TAR not estimable at FAR {need} impostor pairs ({m.impostor_pairs:,} here)"
                if m.positive_pairs
                else f"  {name}: no genuine pairs, TAR not defined"
            )
    return lines


# ---------------------------------------------------------------------------------------------------------------
# ROC plot

_PALETTE = [
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
]  # fmt: skip
_S = 2  # supersampling: drawn at twice the size, then downsampled
_GREY, _BLACK = (215, 215, 215), (30, 30, 30)


@dataclass
class _Frame:
    """The plot area in pixels (at the supersampled size): log10 FAR from ``lo`` to 0, TAR from ``ymin`` to 1."""

    w: int
    h: int
    left: int
    top: int
    pw: int
    ph: int
    lo: int
    ymin: float

    def x(self, log_far: Any) -> Any:
        return self.left + (log_far - self.lo) / (0 - self.lo) * self.pw

    def y(self, tar: Any) -> Any:
        return self.top + (1 - (tar - self.ymin) / (1 - self.ymin)) * self.ph

    def xy(self, far: np.ndarray, tar: np.ndarray) -> list[tuple[float, float]]:
        return list(zip(self.x(np.log10(far)).tolist(), self.y(tar).tolist(), strict=True))


def _frame(curves: dict[str, SetMetrics]) -> _Frame:
    """Axes down to the smallest FAR the largest set can resolve, and from the lowest TAR at that FAR (rounded down
    to a tenth) up to 1."""
    w, h = 960 * _S, 660 * _S
    left, right, top, bottom = 90 * _S, 30 * _S, 50 * _S, 80 * _S
    most = max(m.impostor_pairs for m in curves.values())
    lo = min(-1, max(-6, -math.ceil(math.log10(most))))  # log10 of the smallest FAR shown
    tars_at_lo = [float(m.tar[np.searchsorted(m.far, 10.0**lo, side="right") - 1]) for m in curves.values()]
    ymin = min(0.9, math.floor(10 * min(tars_at_lo)) / 10)
    return _Frame(w, h, left, top, w - left - right, h - top - bottom, lo, ymin)


def _draw_grid(draw: Any, f: _Frame, small: Any) -> None:
    """Decades and minor ticks along FAR, steps of 0.1 (or finer on a short axis) along TAR, and the box."""
    s, top, ph, left, pw = _S, f.top, f.ph, f.left, f.pw
    for e in range(f.lo, 1):  # decades
        x = f.x(e)
        draw.line([(x, top), (x, top + ph)], fill=_GREY, width=s)
        draw.text((x, top + ph + 8 * s), f"1e{e}" if e else "1", fill=_BLACK, font=small, anchor="mt")
        for k in range(2, 10):
            if e < 0:
                xm = f.x(e + math.log10(k))
                draw.line([(xm, top + ph - 5 * s), (xm, top + ph)], fill=_BLACK, width=s)
    tenths = round(10 * (1 - f.ymin))  # span of the TAR axis in tenths: 1..10
    step = 0.1 if tenths >= 6 else 0.05 if tenths >= 3 else 0.02 if tenths == 2 else 0.01
    steps = round((1 - f.ymin) / step)
    for k in range(steps + 1):
        v = f.ymin + k * step
        y = f.y(v)
        draw.line([(left, y), (left + pw, y)], fill=_GREY, width=s)
        draw.text((left - 8 * s, y), f"{v:.1f}" if step == 0.1 else f"{v:.2f}", fill=_BLACK, font=small, anchor="rm")
    draw.rectangle([left, top, left + pw, top + ph], outline=_BLACK, width=s)


def _draw_curves(draw: Any, f: _Frame, curves: dict[str, SetMetrics], small: Any) -> None:
    """One line per set (its TAR below the smallest FAR shown carried to the left edge), and the legend."""
    s, floor = _S, 10.0**f.lo
    for i, m in enumerate(curves.values()):
        keep = m.far > 0
        far = np.r_[floor, m.far[keep]]
        tar = np.r_[m.tar[np.searchsorted(m.far, floor, side="left") - 1], m.tar[keep]]  # TAR below 10^lo
        sel = far >= floor
        draw.line(f.xy(far[sel], tar[sel]), fill=_PALETTE[i % len(_PALETTE)], width=2 * s, joint="curve")
    # legend, lower right
    right, bottom = f.left + f.pw, f.top + f.ph
    lx, ly = right - 250 * s, bottom - (len(curves) * 22 + 12) * s
    draw.rectangle([lx, ly, right - 10 * s, bottom - 10 * s], fill="white", outline=_GREY, width=s)
    for i, (name, m) in enumerate(curves.items()):
        y = ly + (14 + 22 * i) * s
        draw.line([(lx + 10 * s, y), (lx + 40 * s, y)], fill=_PALETTE[i % len(_PALETTE)], width=3 * s)
        draw.text((lx + 48 * s, y), f"{name}  AUC {m.auc:.4f}", fill=_BLACK, font=small, anchor="lm")


def plot_roc(results: dict[str, SetMetrics], path: str | os.PathLike, title: str = "ROC") -> None:
    """ROC curves of all sets on one axis: TAR against FAR on a log scale (down to the smallest FAR the largest
    set can resolve), drawn with Pillow at 2x and downsampled (anti-aliased); written atomically as PNG."""
    from PIL import Image, ImageDraw, ImageFont

    curves = {n: m for n, m in results.items() if m.auc is not None}
    if not curves:
        raise FacetoolError(f"{path}: no ROC curve to plot: no set has both genuine and impostor pairs")
    s, f = _S, _frame(curves)
    img = Image.new("RGB", (f.w, f.h), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=15 * s)
    small = ImageFont.load_default(size=13 * s)
    _draw_grid(draw, f, small)
    _draw_curves(draw, f, curves, small)
    draw.text((f.left + f.pw / 2, 20 * s), title, fill=_BLACK, font=font, anchor="mm")
    draw.text(
        (f.left + f.pw / 2, f.h - 28 * s), "FAR (false accept rate, log scale)", fill=_BLACK, font=font, anchor="mm"
    )
    label = Image.new("RGB", (300 * s, 24 * s), "white")
    ImageDraw.Draw(label).text((150 * s, 12 * s), "TAR (true accept rate)", fill=_BLACK, font=font, anchor="mm")
    label = label.rotate(90, expand=True)
    img.paste(label, (10 * s, f.top + f.ph // 2 - label.height // 2))
    img = img.resize((f.w // s, f.h // s), Image.LANCZOS)
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")

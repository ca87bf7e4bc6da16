"""``run_ijb``: one IJB-B / IJB-C evaluation, from a model, from features computed elsewhere, or on a synthetic set.

Reads the meta files (:mod:`.meta`), gets one feature row per line of the 5-point file (embedding the aligned
images with :mod:`.features`, or from ``.npy`` files, memory-mapped), pools templates and scores the pairs
(:mod:`.protocol`), and reads the ROC, TAR at FAR, AUC and, when the 1:N files are there, identification
(:mod:`.metrics`). ``reference`` also runs the eval_ijbc.py-style loop (:mod:`.baseline`) on the same features,
for its time and its agreement.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from facetool.bench.verification.embed import load_features
from facetool.pipeline.atomic import Progress, atomic_open
from facetool.pipeline.errors import FacetoolError

from .meta import IMAGE_FOLDER, IJBMeta, TemplateSubjects, read_meta
from .metrics import Roc, identification, roc, tar_at_far
from .protocol import ProtocolOptions, TemplateIndex, pair_scores, pool_templates, rows_of, template_index


@dataclass
class IJBReport:
    """What one evaluation found: counts, TAR at FAR (fractions) and AUC, 1:N figures, the ROC and pair scores."""

    target: str
    images: int
    templates: int
    pairs: int
    genuine: int
    tar_at_far: dict[str, float]
    auc: float
    protocol: dict[str, Any]
    source: dict[str, Any]
    roc: Roc
    scores: np.ndarray
    identification: dict[str, Any] | None = None
    reference: dict[str, Any] | None = None
    seconds: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The ``--json`` object: target, images, templates, pairs, tar_at_far ("1e-6".."1e-1"), auc, protocol,
        then identification (1:N), source, seconds and reference where there are."""
        out: dict[str, Any] = {
            "target": self.target,
            "images": self.images,
            "templates": self.templates,
            "pairs": self.pairs,
            "tar_at_far": self.tar_at_far,
            "auc": self.auc,
            "protocol": self.protocol,
        }
        if self.identification is not None:
            out["identification"] = self.identification
        out["source"] = self.source
        out["seconds"] = {k: round(v, 4) for k, v in self.seconds.items()}
        if self.reference is not None:
            out["reference"] = self.reference
        return out


def open_features(path: str | os.PathLike, rows: int, what: str = "features") -> np.ndarray:
    """A (rows, D) numeric ``.npy`` array, memory-mapped (read-only, no pickles); its shape is checked."""
    arr = load_features(path, mmap=True)
    if arr.ndim != 2 or arr.shape[0] != rows:
        raise FacetoolError(f"{path}: {what} of shape {arr.shape}, expected ({rows}, D): one row per 5-point line")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise FacetoolError(f"{path}: expected a numeric array, got dtype {arr.dtype}")
    return arr


def _template_rows(index: TemplateIndex, listing: TemplateSubjects) -> tuple[np.ndarray, np.ndarray]:
    """(rows of the distinct templates of a 1:N list, sorted by id; the subject of each, from its first row)."""
    ids, first = np.unique(listing.templates, return_index=True)
    known = np.isin(ids, index.ids)
    if not known.all():
        bad = int(first[np.flatnonzero(~known)[0]])
        raise FacetoolError(f"{listing.path}:{listing.lines[bad]}: template {listing.templates[bad]} has no image")
    return rows_of(index.ids, ids), listing.subjects[first]


def identify(meta: IJBMeta, index: TemplateIndex, pooled: np.ndarray) -> dict[str, Any] | None:
    """1:N figures for the galleries and probes of ``meta`` (None without 1:N lists)."""
    if meta.galleries is None or meta.probes is None:
        return None
    probe_rows, probe_subjects = _template_rows(index, meta.probes)
    galleries = {}
    for name, listing in meta.galleries.items():
        rows, subjects = _template_rows(index, listing)
        galleries[name] = (pooled[rows], subjects)
    return identification(pooled[probe_rows], probe_subjects, galleries)


def _embed(meta: IJBMeta, ijb_dir: Path, model_path: Path, options: ProtocolOptions, settings: dict[str, Any],
           progress: Progress | None) -> tuple[np.ndarray, np.ndarray | None, dict[str, Any]]:  # fmt: skip
    """Embed the images of ``meta`` with the backbone in ``model_path``; returns (features, flips, source)."""
    from facetool.bench.verification import default_batch_size, load_model, resolve_device

    from .features import embed_images

    model, name, backbone_options = load_model(model_path, settings["arch"])
    device = resolve_device(settings["device"])
    batch_size = settings["batch_size"] or default_batch_size(device)
    feats, flips = embed_images(
        model, meta.images, ijb_dir / IMAGE_FOLDER, batch_size=batch_size, device=device, flip=options.flip,
        masked=settings["masked"], mask_seed=settings["mask_seed"],
        save_dir=settings["save_features"], progress=progress,
    )  # fmt: skip
    source = {"model": str(model_path), "backbone": name, "options": backbone_options, "device": device,
              "batch_size": batch_size}  # fmt: skip
    return feats, flips, source


def _features(ijb_dir, model, features, flip_features, options, settings, progress):
    """(meta, features, flips, source) from a synthetic set, feature files or a model."""
    if settings["synthetic"] is not None:
        if settings["masked"] or features is not None or model is not None:
            raise FacetoolError("a synthetic set brings its own random features: no MODEL, --features or masking")
        from .synthetic import make_synthetic

        meta, feats, flips = make_synthetic(settings["synthetic"], seed=settings["seed"])
        return meta, feats, flips, {"synthetic": str(settings["synthetic"]), "seed": settings["seed"]}
    if ijb_dir is None:
        raise FacetoolError("no IJB folder given (or --synthetic N)")
    if settings["masked"] and features is not None:
        raise FacetoolError("masking renders new images; --features holds embeddings of the original ones")
    meta = read_meta(ijb_dir, settings["target"])
    rows = len(meta.templates)
    if features is not None:
        feats = open_features(features, rows)
        flips = open_features(flip_features, rows, "flip features") if flip_features is not None else None
        if flips is not None and flips.shape != feats.shape:
            raise FacetoolError(f"{flip_features}: shape {flips.shape} differs from {features} {feats.shape}")
        source = {"features": str(features), "flip_features": None if flip_features is None else str(flip_features)}
        return meta, feats, flips, source
    if model is None:
        raise FacetoolError("give a MODEL to embed with, or --features")
    return (meta, *_embed(meta, Path(ijb_dir), Path(model), options, settings, progress))


def _reference(meta: IJBMeta, feats, flips, options: ProtocolOptions, report: IJBReport) -> dict[str, Any]:
    from .baseline import run_baseline

    base = run_baseline(feats, flips, meta.scores, meta.templates, meta.medias, meta.pair_t1, meta.pair_t2,
                        meta.labels, options)  # fmt: skip
    return {
        "seconds": {k: round(v, 4) for k, v in base["seconds"].items()},
        "tar_at_far": base["tar_at_far"],
        "auc": base["auc"],
        "max_score_difference": float(np.max(np.abs(base["scores"] - report.scores))),
        "same_tar_at_far": base["tar_at_far"] == report.tar_at_far,
    }


def run_ijb(
    ijb_dir: str | os.PathLike | None = None,
    model: str | os.PathLike | None = None,
    *,
    arch: str | None = None,
    target: str = "IJBC",
    features: str | os.PathLike | None = None,
    flip_features: str | os.PathLike | None = None,
    options: ProtocolOptions = ProtocolOptions(),
    masked: bool = False,
    mask_seed: int = 0,
    batch_size: int | None = None,
    device: str | None = None,
    save_features: str | os.PathLike | None = None,
    synthetic: int | str | None = None,
    seed: int = 0,
    reference: bool = False,
    progress: Progress | None = None,
) -> IJBReport:
    """Evaluate on IJB-B / IJB-C (see the module docstring) with the backbone ``model`` (see
    :func:`facetool.bench.verification.load_model`; ``arch`` for a bare state dict, an ``.onnx`` runs in
    onnxruntime): ``masked`` masks every aligned image (``mask_seed``),
    ``save_features`` keeps the embeddings in that folder, ``synthetic`` ("full" or a number of images, ``seed``)
    needs no IJB folder, ``reference`` also runs the baseline loop. ``progress(done, total)``: the embedding."""
    clock = {"start": time.perf_counter()}
    settings = {"target": target, "arch": arch, "masked": masked, "mask_seed": mask_seed, "batch_size": batch_size,
                "device": device, "save_features": save_features, "synthetic": synthetic, "seed": seed}  # fmt: skip
    meta, feats, flips, source = _features(ijb_dir, model, features, flip_features, options, settings, progress)
    if flips is None:
        options = replace(options, flip=False)
    import scipy.sparse  # noqa: F401  (imported before the clock: the timings measure the computation)
    import sklearn.metrics  # noqa: F401

    clock["features"] = time.perf_counter()
    index = template_index(meta.templates, meta.medias, meta.scores, options)
    pooled = pool_templates(feats, flips, index, options)
    if not reference:
        feats = flips = None  # the image features are not needed any more (1.9 GB at IJB-C size)
    clock["pool"] = time.perf_counter()
    scores = pair_scores(pooled, rows_of(index.ids, meta.pair_t1), rows_of(index.ids, meta.pair_t2))
    clock["score"] = time.perf_counter()
    curve = roc(meta.labels, scores)
    clock["roc"] = time.perf_counter()
    ident = identify(meta, index, pooled)
    clock["identification"] = time.perf_counter()
    protocol = {**options.to_json(), "masked": "all" if masked else None}
    report = IJBReport(
        target=meta.target, images=len(meta.templates), templates=len(index.ids), pairs=len(scores),
        genuine=int(meta.labels.sum()), tar_at_far=tar_at_far(curve), auc=curve.auc, protocol=protocol,
        source=source, roc=curve, scores=scores, identification=ident,
    )  # fmt: skip
    steps = list(clock)
    report.seconds = {b: clock[b] - clock[a] for a, b in zip(steps[:-1], steps[1:], strict=True)}
    report.seconds["metrics"] = clock["identification"] - clock["features"]
    if reference:
        report.reference = _reference(meta, feats, flips, options, report)
    return report


def save_scores(path: str | os.PathLike, scores: np.ndarray) -> None:
    """The pair scores (float64, in the order of the pair file) as a ``.npy`` file, written atomically."""
    with atomic_open(path) as f:
        np.save(f, scores)


__all__ = ["IJBReport", "identify", "open_features", "run_ijb", "save_scores"]

"""The baseline the benchmark compares against: IJB 1:1 scoring written the way ``eval_ijbc.py`` writes it.

``recognition/arcface_torch/eval_ijbc.py`` (github.com/deepinsight/insightface @
7fadd420c2351d0ffa8cac403421c1a3ed733365): float32 image features (embedding + flip, optionally normalised, times
the float32 detector score), then a Python loop over the templates that finds each template's images with
``np.where`` over all images and each media's frames the same way, averages multi-frame media, sums the media and
L2-normalises the templates with scikit-learn; pair scores in slices of 100,000 pairs through a template-id lookup
table; ``roc_curve`` / ``auc``, and the nearest-FPR TPR by a ``min`` over (distance, index) tuples of the reversed
ROC. It is here for ``bench ijb --reference`` (time and agreement beside :mod:`.protocol`), not used otherwise.
"""

from __future__ import annotations

import time

import numpy as np

from .metrics import FARS
from .protocol import ProtocolOptions

PAIR_SLICE = 100_000


def baseline_image_features(
    features: np.ndarray, flips: np.ndarray | None, scores: np.ndarray, options: ProtocolOptions
) -> np.ndarray:
    """The per-image features in float32, in the order upstream applies the modes (flip, norm, detector)."""
    feats = np.asarray(features, dtype=np.float32)
    if options.flip and flips is not None:
        feats = feats + np.asarray(flips, dtype=np.float32)
    if options.normalize_images:
        feats = feats / np.sqrt(np.sum(feats**2, -1, keepdims=True))
    if options.detector_score:
        feats = feats * np.asarray(scores, dtype=np.float32)[:, np.newaxis]
    return feats


def baseline_templates(feats: np.ndarray, templates: np.ndarray, medias: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(normalised template features, sorted template ids), one Python iteration per template and media."""
    from sklearn.preprocessing import normalize

    ids = np.unique(templates)
    pooled = np.zeros((len(ids), feats.shape[1]))
    for row, tid in enumerate(ids):
        (members,) = np.where(templates == tid)
        member_feats, member_medias = feats[members], medias[members]
        media_feats = []
        for media, count in zip(*np.unique(member_medias, return_counts=True), strict=True):
            (frames,) = np.where(member_medias == media)
            if count == 1:
                media_feats.append(member_feats[frames])
            else:
                media_feats.append(np.mean(member_feats[frames], axis=0, keepdims=True))
        pooled[row] = np.sum(np.array(media_feats), axis=0)
    return normalize(pooled), ids


def baseline_pair_scores(pooled: np.ndarray, ids: np.ndarray, t1: np.ndarray, t2: np.ndarray) -> np.ndarray:
    """Dot products through an id -> row table, ``PAIR_SLICE`` pairs at a time."""
    lookup = np.zeros((int(ids.max()) + 1, 1), dtype=int)
    for row, tid in enumerate(ids):
        lookup[tid] = row
    scores = np.zeros(len(t1))
    for start in range(0, len(t1), PAIR_SLICE):
        part = slice(start, start + PAIR_SLICE)
        a, b = pooled[lookup[t1[part]]], pooled[lookup[t2[part]]]
        scores[part] = np.sum(a * b, -1).flatten()
    return scores


def baseline_tar_at_far(labels: np.ndarray, scores: np.ndarray) -> tuple[dict[str, float], float]:
    """(TAR at each FAR, AUC) with scikit-learn's ROC and a ``min`` over (|fpr - x|, index) of the reversed ROC."""
    from sklearn.metrics import auc, roc_curve

    fpr, tpr, _ = roc_curve(labels, scores)
    area = float(auc(fpr, tpr))
    fpr, tpr = np.flipud(fpr), np.flipud(tpr)
    out = {}
    for key, x in FARS.items():
        _, nearest = min(zip(abs(fpr - x), range(len(fpr)), strict=True))
        out[key] = float(tpr[nearest])
    return out, area


def run_baseline(
    features: np.ndarray,
    flips: np.ndarray | None,
    scores: np.ndarray,
    templates: np.ndarray,
    medias: np.ndarray,
    t1: np.ndarray,
    t2: np.ndarray,
    labels: np.ndarray,
    options: ProtocolOptions = ProtocolOptions(),
) -> dict:
    """The whole baseline: its pair scores, TAR at FAR, AUC and the seconds of each step."""
    t0 = time.perf_counter()
    feats = baseline_image_features(features, flips, scores, options)
    pooled, ids = baseline_templates(feats, templates, medias)
    del feats
    t1_ = time.perf_counter()
    pair = baseline_pair_scores(pooled, ids, t1, t2)
    t2_ = time.perf_counter()
    tar, area = baseline_tar_at_far(labels, pair)
    t3 = time.perf_counter()
    seconds = {"pool": t1_ - t0, "score": t2_ - t1_, "roc": t3 - t2_, "total": t3 - t0}
    return {"scores": pair, "tar_at_far": tar, "auc": area, "seconds": seconds}


__all__ = [
    "baseline_image_features",
    "baseline_pair_scores",
    "baseline_tar_at_far",
    "baseline_templates",
    "run_baseline",
]

"""Verification metrics of InsightFace's protocol, in numpy alone: k-fold accuracy, ROC, AUC, EER, TAR@FAR.

The distance of a pair is the squared L2 distance of the flip-fused, L2-normalised embeddings. Accuracy: 10
contiguous folds (sklearn's ``KFold(10, shuffle=False)``), the threshold chosen among ``arange(0, 4, 0.01)`` on nine
folds (the first best one), accuracy measured on the tenth; mean and (population) std over the folds. TAR at FAR
1e-1..1e-4 comes from the sorted impostor distances (``None`` where there are too few impostor pairs).

The metrics are vectorised (one histogram of distances against the threshold grid per fold, cumulative sums, an
argmax), so they cost milliseconds for 6,000 pairs; they compute in float64 where InsightFace computes in float32,
which can move a pair lying on a threshold by one rounding step and nothing else.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from facetool.pipeline.errors import FacetoolError

#: InsightFace's threshold grid for the squared L2 distance of unit vectors (which lies in [0, 4]).
THRESHOLDS = np.arange(0, 4, 0.01)
FOLDS = 10
#: FARs at which TAR is reported, as decimal exponents (1e-1 .. 1e-4); integer so that pair counts divide exactly.
FAR_EXPONENTS = (1, 2, 3, 4)


def far_key(exponent: int) -> str:
    """The JSON key of a FAR: ``1e-3`` for exponent 3."""
    return f"1e-{exponent}"


def fold_sizes(n: int, folds: int = FOLDS) -> np.ndarray:
    """Sizes of ``folds`` contiguous folds over ``n`` pairs, as sklearn's ``KFold`` (the first ``n % folds`` get one
    more)."""
    sizes = np.full(folds, n // folds, dtype=np.int64)
    sizes[: n % folds] += 1
    return sizes


def kfold_accuracy(
    dist: np.ndarray, issame: np.ndarray, folds: int = FOLDS, thresholds: np.ndarray = THRESHOLDS
) -> tuple[np.ndarray, np.ndarray]:
    """Per-fold accuracy and chosen threshold of InsightFace's protocol: a pair is "same" when ``dist < t``; for each
    fold, ``t`` is the first grid value that maximises the accuracy on the other folds; the fold's accuracy is then
    measured at that ``t``.

    Vectorised: each distance falls into one cell of the grid (``searchsorted``); a histogram per (fold, class) and
    its cumulative sum give, for every threshold at once, how many pairs lie below it.
    """
    dist = np.asarray(dist, dtype=np.float64)
    issame = np.asarray(issame, dtype=bool)
    n, t = dist.size, thresholds.size
    if n < folds:
        raise FacetoolError(f"{folds}-fold accuracy needs at least {folds} pairs, got {n}")
    sizes = fold_sizes(n, folds)
    fold = np.repeat(np.arange(folds), sizes)
    # dist < thresholds[i]  <=>  i >= cell, with cell = the number of grid values <= dist
    cell = np.searchsorted(thresholds, dist, side="right")
    hist = np.bincount((fold * 2 + issame) * (t + 1) + cell, minlength=folds * 2 * (t + 1)).reshape(folds, 2, t + 1)
    below = np.cumsum(hist, axis=2)[:, :, :t]  # below[f, c, i]: pairs of fold f, class c with dist < thresholds[i]
    impostors = hist[:, 0, :].sum(axis=1, keepdims=True)
    correct = below[:, 1, :] + (impostors - below[:, 0, :])  # genuine accepted + impostors rejected, (folds, t)
    train_correct = correct.sum(axis=0, keepdims=True) - correct
    best = np.argmax(train_correct, axis=1)  # the first maximum, as np.argmax over accuracies
    accuracy = correct[np.arange(folds), best] / sizes
    return accuracy, thresholds[best]


def roc_curve(dist: np.ndarray, issame: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC of "same when dist <= threshold" over every distinct distance: (far, tar, thresholds), starting at
    (0, 0) (threshold -inf) and ending at (1, 1). Equal distances make one point, so ties count half in the AUC."""
    dist = np.asarray(dist, dtype=np.float64)
    issame = np.asarray(issame, dtype=bool)
    order = np.argsort(dist, kind="stable")
    d, y = dist[order], issame[order]
    last = np.r_[np.flatnonzero(np.diff(d)), d.size - 1]  # the last index of each run of equal distances
    tp = np.r_[0, np.cumsum(y)[last]]
    fp = np.r_[0, np.cumsum(~y)[last]]
    positives, negatives = int(y.sum()), int((~y).sum())
    tar = tp / positives if positives else np.full(tp.shape, np.nan)
    far = fp / negatives if negatives else np.full(fp.shape, np.nan)
    return far, tar, np.r_[-np.inf, d[last]]


def roc_auc(far: np.ndarray, tar: np.ndarray) -> float:
    """Area under the ROC curve by the trapezoid rule."""
    return float(np.sum((far[1:] - far[:-1]) * (tar[1:] + tar[:-1])) / 2)


def equal_error_rate(far: np.ndarray, tar: np.ndarray) -> float:
    """The rate at which FAR equals FRR (= 1 - TAR), linearly interpolated on the ROC curve."""
    gap = far - (1 - tar)  # -1 at (0, 0), +1 at (1, 1), non-decreasing
    i = int(np.argmax(gap >= 0))
    if i == 0:
        return float(far[0])
    w = -gap[i - 1] / (gap[i] - gap[i - 1])
    return float(far[i - 1] + w * (far[i] - far[i - 1]))


def tar_at_far(dist: np.ndarray, issame: np.ndarray, exponents: Sequence[int] = FAR_EXPONENTS) -> dict[str, Any]:
    """TAR at FAR = 10^-e: the threshold is the (k+1)-th smallest impostor distance with k = floor(N_impostor * FAR),
    so at most k impostor pairs lie strictly below it; TAR is the share of genuine pairs strictly below. ``None``
    where k < 1 (fewer than 10^e impostor pairs: that FAR cannot be estimated)."""
    dist = np.asarray(dist, dtype=np.float64)
    issame = np.asarray(issame, dtype=bool)
    impostor = np.sort(dist[~issame])
    genuine = np.sort(dist[issame])
    out: dict[str, Any] = {}
    for e in exponents:
        k = impostor.size // 10**e
        if k < 1 or genuine.size == 0:
            out[far_key(e)] = None
        else:
            out[far_key(e)] = float(np.searchsorted(genuine, impostor[k], side="left") / genuine.size)
    return out


def _row_norms(x: np.ndarray) -> np.ndarray:
    """L2 norm of each row, accumulated in float64 without a float64 copy of ``x``."""
    return np.sqrt(np.einsum("ij,ij->i", x, x, dtype=np.float64))


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows divided by their L2 norm, in float64 (zero rows stay zero, as sklearn's ``normalize``)."""
    out = np.array(x, dtype=np.float64)
    norms = _row_norms(out)
    norms[norms == 0] = 1.0
    out /= norms[:, None]
    return out


def fuse_flip(embeddings: np.ndarray, flipped: np.ndarray | None = None) -> np.ndarray:
    """InsightFace's flip fusion: the embedding of each image plus that of its flip, then L2-normalised (float64;
    one array of that size is allocated, which matters for 12,000 x 512 on a machine where fresh memory is slow)."""
    summed = np.array(embeddings, dtype=np.float64)
    if flipped is not None:
        summed += flipped
    norms = _row_norms(summed)
    norms[norms == 0] = 1.0
    summed /= norms[:, None]
    return summed


@dataclass
class SetMetrics:
    """Verification metrics of one set (fractions in [0, 1]); ``far``/``tar`` are the ROC curve for plots."""

    pairs: int
    positive_pairs: int
    accuracy: float
    accuracy_std: float
    threshold: float
    fold_accuracies: list[float]
    fold_thresholds: list[float]
    tar_at_far: dict[str, float | None]
    auc: float | None
    eer: float | None
    far: np.ndarray = field(repr=False)
    tar: np.ndarray = field(repr=False)
    xnorm: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def impostor_pairs(self) -> int:
        return self.pairs - self.positive_pairs

    def to_json(self) -> dict[str, Any]:
        """The report's object for this set: the ``bench verification`` keys plus folds and counts."""
        return {
            "pairs": self.pairs,
            "positive_pairs": self.positive_pairs,
            "accuracy": self.accuracy,
            "accuracy_std": self.accuracy_std,
            "threshold": self.threshold,
            "tar_at_far": dict(self.tar_at_far),
            "auc": self.auc,
            "eer": self.eer,
            "xnorm": self.xnorm,
            "fold_accuracies": list(self.fold_accuracies),
            "fold_thresholds": list(self.fold_thresholds),
            **self.extra,
        }


def pair_metrics(dist: np.ndarray, issame: np.ndarray, folds: int = FOLDS) -> SetMetrics:
    """All metrics of a set from its pair distances (squared L2 of unit embeddings) and same/different flags."""
    dist = np.asarray(dist, dtype=np.float64)
    issame = np.asarray(issame, dtype=bool)
    if dist.shape != issame.shape or dist.ndim != 1:
        raise FacetoolError(f"{dist.size} distances for {issame.size} pairs")
    if not np.all(np.isfinite(dist)):
        raise FacetoolError(f"non-finite embedding distance at pair {int(np.argmin(np.isfinite(dist)))}")
    acc, thr = kfold_accuracy(dist, issame, folds)
    far, tar, _ = roc_curve(dist, issame)
    both = bool(issame.any() and (~issame).any())
    return SetMetrics(
        pairs=int(dist.size),
        positive_pairs=int(issame.sum()),
        accuracy=float(np.mean(acc)),
        accuracy_std=float(np.std(acc)),
        threshold=float(np.mean(thr)),
        fold_accuracies=[float(a) for a in acc],
        fold_thresholds=[float(t) for t in thr],
        tar_at_far=tar_at_far(dist, issame),
        auc=roc_auc(far, tar) if both else None,
        eer=equal_error_rate(far, tar) if both else None,
        far=far,
        tar=tar,
    )


def embedding_metrics(
    embeddings: np.ndarray,
    pairs: np.ndarray,
    issame: np.ndarray,
    flipped: np.ndarray | None = None,
    folds: int = FOLDS,
) -> SetMetrics:
    """Metrics from raw embeddings (and their flips): fuse, normalise, take each pair's squared L2 distance."""
    emb = np.asarray(embeddings)
    if emb.ndim != 2:
        raise FacetoolError(f"embeddings must be a 2-D array (images, dimensions), got shape {emb.shape}")
    norms = [_row_norms(e) for e in (emb, flipped) if e is not None]
    if not all(np.all(np.isfinite(n)) for n in norms):
        raise FacetoolError("embeddings contain NaN or infinite values")
    unit = fuse_flip(emb, flipped)
    diff = unit[pairs[:, 0]]
    diff -= unit[pairs[:, 1]]
    metrics = pair_metrics(np.einsum("ij,ij->i", diff, diff), issame, folds)
    metrics.xnorm = float(np.mean(np.concatenate(norms)))
    return metrics

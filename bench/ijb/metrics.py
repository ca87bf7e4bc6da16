"""IJB metrics: the 1:1 ROC and TAR at FAR as ``eval_ijbc.py`` reads them, and 1:N identification.

1:1 (``recognition/arcface_torch/eval_ijbc.py``, github.com/deepinsight/insightface @
7fadd420c2351d0ffa8cac403421c1a3ed733365): the ROC is scikit-learn's ``roc_curve(labels, scores)`` with its
defaults (so ``drop_intermediate=True`` removes collinear points, which changes which point is nearest below) and
the AUC ``sklearn.metrics.auc``; TAR at FAR x is the TPR of the ROC point whose FPR is nearest to x, taken on the
reversed arrays with ties to the lowest reversed index: at equal FPR the highest TPR, between two FPRs equally far
the larger one. It is a point of the curve, not an interpolation, and its FPR may lie above x.

1:N (``recognition/_evaluation_/ijb/ijb_evals.py``, ``evaluation_1N`` and ``IJB_test.run_model_test_1N``, same
repository and commit): every probe template is searched in each gallery separately (cosine of the normalised
template features). In a gallery, a probe whose subject is enrolled is mated: its rank is the position of the
first gallery template of its subject when the gallery is sorted by score, high first (ties: the later gallery
template ranks first, as ``argsort(...)[::-1]`` of a stable sort); rank-k counts, summed over both galleries, are
divided by the number of probes. A non-mated probe contributes its best score; the threshold at FPIR f is the
``max(int(n * f), 1)``-th highest of these over the n non-mated probes, and TPIR is the share of mated probes whose
mate scores above both the threshold and every non-mate of its gallery; TPIR is the mean over the two galleries.
(InsightFace's older ``ijb_1n.py`` instead searches one gallery made of both; the figures above are the averaged
ones its newer evaluation prints.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

#: The FARs of the 1:1 table, keyed as the report writes them.
FARS = {"1e-6": 1e-6, "1e-5": 1e-5, "1e-4": 1e-4, "1e-3": 1e-3, "1e-2": 1e-2, "1e-1": 1e-1}
#: The FPIRs of the 1:N table.
FPIRS = {"1e-2": 1e-2, "1e-1": 1e-1}
RANKS = (1, 5, 10)
#: Probes scored against a gallery at once.
PROBE_BLOCK = 2048


@dataclass
class Roc:
    """scikit-learn's ROC of the pair scores: ``far`` (FPR) ascending, ``tar`` (TPR), and the AUC; ``impostor_pairs``
    bounds the smallest FAR a plot shows."""

    far: np.ndarray
    tar: np.ndarray
    auc: float
    impostor_pairs: int


def sorted_by_score(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(labels, scores) reordered by ascending score: the impostor and the genuine scores sorted apart (a plain
    sort, faster than the stable argsort of all of them) and merged."""
    genuine = np.sort(scores[labels == 1])
    impostor = scores[labels != 1]
    impostor.sort()
    at = np.searchsorted(impostor, genuine, side="left") + np.arange(len(genuine))
    merged = np.empty(len(scores), dtype=np.float64)
    merged_labels = np.zeros(len(scores), dtype=np.int8)
    is_genuine = np.zeros(len(scores), dtype=bool)
    is_genuine[at] = True
    merged[at] = genuine
    merged[~is_genuine] = impostor
    merged_labels[at] = 1
    return merged_labels, merged


def roc(labels: np.ndarray, scores: np.ndarray) -> Roc:
    """``sklearn.metrics.roc_curve`` with its defaults, and ``sklearn.metrics.auc`` of it.

    The pairs are handed over sorted by score (:func:`sorted_by_score`); the curve does not depend on their order
    (pairs of equal score make one point whatever their order), and scikit-learn's stable sort then finds a single
    run instead of sorting 15 M scores."""
    from sklearn.metrics import auc, roc_curve

    fpr, tpr, _ = roc_curve(*sorted_by_score(np.asarray(labels), np.asarray(scores, dtype=np.float64)))
    return Roc(far=fpr, tar=tpr, auc=float(auc(fpr, tpr)), impostor_pairs=int(np.sum(labels == 0)))


def nearest_tar(far: np.ndarray, tar: np.ndarray, at: float) -> float:
    """The TPR of the ROC point whose FPR is nearest to ``at``, ties as ``eval_ijbc.py`` breaks them (the lowest
    index of the reversed arrays: ``np.argmin`` returns the first minimum)."""
    rev_far, rev_tar = far[::-1], tar[::-1]
    return float(rev_tar[int(np.argmin(np.abs(rev_far - at)))])


def tar_at_far(curve: Roc) -> dict[str, float]:
    """TAR at each FAR of :data:`FARS` (fractions), keyed ``"1e-6"`` ... ``"1e-1"``."""
    return {key: nearest_tar(curve.far, curve.tar, value) for key, value in FARS.items()}


@dataclass
class GalleryResult:
    """Identification against one gallery: rank-k hit counts over its mated probes, and TPIR at each FPIR."""

    templates: int
    mated: int
    non_mated: int
    hits: dict[int, int]
    tpir: dict[str, float | None]

    def to_json(self) -> dict[str, Any]:
        """The gallery's figures (counts, and TPIR fractions)."""
        return {
            "templates": self.templates,
            "mated_probes": self.mated,
            "non_mated_probes": self.non_mated,
            "rank_hits": {str(k): v for k, v in self.hits.items()},
            "tpir_at_fpir": self.tpir,
        }


def _mates(probe_subjects: np.ndarray, gallery_subjects: np.ndarray) -> np.ndarray:
    """The first gallery row of each probe's subject, or -1 when the subject is not enrolled."""
    order = np.argsort(gallery_subjects, kind="stable")
    sorted_subjects = gallery_subjects[order]
    at = np.minimum(np.searchsorted(sorted_subjects, probe_subjects), len(order) - 1)
    return np.where(sorted_subjects[at] == probe_subjects, order[at], -1)


def _probe_block(sim: np.ndarray, mate: np.ndarray, probe_subjects: np.ndarray, gallery_subjects: np.ndarray):
    """For one block of probes: (mate score, best non-mate score, rank of the mate) of the mated ones, and the best
    score of the non-mated ones."""
    mated = mate >= 0
    s, m = sim[mated], mate[mated]
    pos = s[np.arange(len(m)), m]
    cols = np.arange(sim.shape[1])
    above = (s > pos[:, None]).sum(axis=1) + ((s == pos[:, None]) & (cols > m[:, None])).sum(axis=1)
    same = gallery_subjects[None, :] == probe_subjects[mated][:, None]
    best_other = np.where(same, -np.inf, s).max(axis=1, initial=-np.inf)
    return pos, best_other, above + 1, sim[~mated].max(axis=1, initial=-np.inf)


def search_gallery(
    probe_feats: np.ndarray, probe_subjects: np.ndarray, gallery_feats: np.ndarray, gallery_subjects: np.ndarray
) -> GalleryResult:
    """Identification of every probe in one gallery (see the module docstring), in blocks of probes."""
    mate = _mates(probe_subjects, gallery_subjects)
    parts = [
        _probe_block(probe_feats[a : a + PROBE_BLOCK] @ gallery_feats.T, mate[a : a + PROBE_BLOCK],
                     probe_subjects[a : a + PROBE_BLOCK], gallery_subjects)
        for a in range(0, len(probe_feats), PROBE_BLOCK)
    ]  # fmt: skip
    pos, best_other, rank, non_mated = (np.concatenate([p[i] for p in parts]) for i in range(4))
    hits = {k: int(np.sum(rank <= k)) for k in RANKS}
    tpir: dict[str, float | None] = {}
    descending = np.sort(non_mated)[::-1]
    for key, fpir in FPIRS.items():
        if len(descending) == 0 or len(pos) == 0:
            tpir[key] = None
            continue
        threshold = descending[max(int(len(descending) * fpir) - 1, 0)]
        tpir[key] = float(np.sum((pos > best_other) & (pos > threshold)) / len(pos))
    return GalleryResult(len(gallery_feats), len(pos), len(non_mated), hits, tpir)


def identification(
    probe_feats: np.ndarray, probe_subjects: np.ndarray, galleries: dict[str, tuple[np.ndarray, np.ndarray]]
) -> dict[str, Any]:
    """1:N figures over the galleries (name -> (features, subjects)): rank-k as summed hits over all probes, TPIR
    at each FPIR as the mean over the galleries (``None`` where a gallery has no mated or no non-mated probe)."""
    results = {name: search_gallery(probe_feats, probe_subjects, f, s) for name, (f, s) in galleries.items()}
    probes = len(probe_feats)
    out: dict[str, Any] = {f"rank{k}": sum(r.hits[k] for r in results.values()) / probes for k in RANKS}
    tpir: dict[str, float | None] = {}
    for key in FPIRS:
        values = [r.tpir[key] for r in results.values()]
        tpir[key] = None if any(v is None for v in values) else float(np.mean(values))
    out["tpir_at_fpir"] = tpir
    out["probes"] = probes
    out["galleries"] = {name: r.to_json() for name, r in results.items()}
    return out


__all__ = [
    "FARS",
    "FPIRS",
    "RANKS",
    "GalleryResult",
    "Roc",
    "identification",
    "nearest_tar",
    "roc",
    "search_gallery",
    "sorted_by_score",
    "tar_at_far",
]

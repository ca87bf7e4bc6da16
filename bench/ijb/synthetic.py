"""An IJB-C-sized meta set with random features, for timing the metrics without the dataset (``--synthetic``).

The shape follows IJB-C's 1:1 and 1:N protocols: 3,531 subjects, each enrolled by one gallery template (1:N
galleries G1 and G2 split the subjects, 1,772 and 1,759), and 19,593 probe templates of those subjects, 23,124
templates in all, with sparse ids; 469,375 images spread unevenly over the templates, grouped into media of one or
several frames. Pairs are gallery x probe: 19,557 genuine (a probe and its subject's gallery template) and
15,638,932 impostors drawn without repetition from the other gallery x probe cells, 15,658,489 in all, in random
order. Features are a per-subject direction plus noise (so the ROC is not trivial), with varying norms and a flip
twin; detector scores lie in [0.5, 1] with 1 % low ones. ``size`` "full" is IJB-C; an integer is a number of
images, with the other counts scaled (impostors by the size of the grid).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from facetool.pipeline.errors import FacetoolError

from .meta import IJBMeta, TemplateSubjects

FULL = {"images": 469_375, "gallery": (1_772, 1_759), "probes": 19_593, "genuine": 19_557, "impostor": 15_638_932}
_FEATURE_CHUNK = 65536
_NOISE_BANK = 32768


def synthetic_counts(size: int | str) -> dict[str, int]:
    """The counts of a synthetic set: ``"full"`` (IJB-C) or a number of images with everything scaled to it."""
    if size == "full":
        g1, g2 = FULL["gallery"]
        return {"images": FULL["images"], "g1": g1, "g2": g2, "probes": FULL["probes"], "genuine": FULL["genuine"],
                "impostor": FULL["impostor"]}  # fmt: skip
    try:
        images = int(size)
    except ValueError:
        raise FacetoolError(f"--synthetic {size!r}: expected 'full' or a number of images") from None
    f = images / FULL["images"]
    g1, g2 = (max(2, round(g * f)) for g in FULL["gallery"])
    probes = max(4, round(FULL["probes"] * f))
    grid = (g1 + g2 - 1) * probes
    full_grid = (sum(FULL["gallery"]) - 1) * FULL["probes"]
    impostor = max(1, min(grid, round(FULL["impostor"] * grid / full_grid)))
    genuine = max(1, min(probes, round(FULL["genuine"] * f)))
    return {"images": max(images, g1 + g2 + probes), "g1": g1, "g2": g2, "probes": probes, "genuine": genuine,
            "impostor": impostor}  # fmt: skip


def _sample_without_replacement(rng: np.random.Generator, total: int, k: int) -> np.ndarray:
    """``k`` distinct integers of ``range(total)``, sorted, drawn chunk by chunk (memory ~ k, not total)."""
    chunk = 1 << 22
    sizes = np.full(total // chunk, chunk, dtype=np.int64)
    if total % chunk:
        sizes = np.r_[sizes, total % chunk]
    counts = rng.multivariate_hypergeometric(sizes, k) if len(sizes) > 1 else np.array([k])
    starts = np.r_[0, np.cumsum(sizes)[:-1]]
    parts = [
        np.sort(rng.choice(int(s), int(c), replace=False)) + o for s, c, o in zip(sizes, counts, starts, strict=True)
    ]
    return np.concatenate(parts)


def _impostor_pairs(rng: np.random.Generator, probe_subject: np.ndarray, subjects: int, k: int) -> np.ndarray:
    """``k`` distinct (gallery subject, probe) cells with different subjects; probes are sorted by subject."""
    per_subject = np.bincount(probe_subject, minlength=subjects)
    first_probe = np.r_[0, np.cumsum(per_subject)[:-1]]
    available = len(probe_subject) - per_subject  # cells of each gallery row
    row_end = np.cumsum(available)
    flat = _sample_without_replacement(rng, int(row_end[-1]), k)
    row = np.searchsorted(row_end, flat, side="right")
    offset = flat - (row_end[row] - available[row])
    probe = offset + np.where(offset >= first_probe[row], per_subject[row], 0)
    return np.stack([row, probe], axis=1)


def _images_of_templates(rng: np.random.Generator, templates: int, images: int) -> tuple[np.ndarray, np.ndarray]:
    """(template row, media id) of each image: every template gets one image, the rest go by a skewed share; a
    template's images fall into media of one to several frames."""
    share = rng.lognormal(0.0, 1.0, templates)
    counts = 1 + rng.multinomial(images - templates, share / share.sum())
    rows = np.repeat(np.arange(templates), counts)
    media_of_template = np.maximum(1, counts // 4)
    local = (rng.random(images) * np.repeat(media_of_template, counts)).astype(np.int64)
    medias = 1000 + 7 * (np.repeat(np.cumsum(media_of_template) - media_of_template, counts) + local)
    order = rng.permutation(images)
    return rows[order], medias[order]


def _features(rng: np.random.Generator, subject_of_image: np.ndarray, subjects: int, dim: int):
    """Per-subject directions plus noise (float32), and flip twins that differ by a little noise. The noise of an
    image is the sum of two rows of a bank of normal draws (cheaper than fresh draws for 469k x 512 twice)."""
    centres = rng.standard_normal((subjects, dim), dtype=np.float32)
    bank = rng.standard_normal((_NOISE_BANK, dim), dtype=np.float32)
    n = len(subject_of_image)
    feats = np.empty((n, dim), dtype=np.float32)
    flips = np.empty((n, dim), dtype=np.float32)
    for a in range(0, n, _FEATURE_CHUNK):
        b = min(n, a + _FEATURE_CHUNK)
        pick = rng.integers(0, _NOISE_BANK, (3, b - a))
        x = bank[pick[0]] + bank[pick[1]]
        x *= np.float32(4 / np.sqrt(2))
        x += centres[subject_of_image[a:b]]
        x *= rng.uniform(0.5, 1.5, (b - a, 1)).astype(np.float32)
        feats[a:b] = x
        x += np.float32(0.3) * bank[pick[2]]
        flips[a:b] = x
    return feats, flips


def make_synthetic(size: int | str = "full", seed: int = 0, dim: int = 512) -> tuple[IJBMeta, np.ndarray, np.ndarray]:
    """(meta, features, flip features) of a synthetic IJB-C-shaped set (see the module docstring)."""
    c = synthetic_counts(size)
    rng = np.random.default_rng(seed)
    subjects = c["g1"] + c["g2"]
    probe_subject = np.sort(rng.integers(0, subjects, c["probes"]))
    templates = subjects + c["probes"]
    ids = rng.choice(10 * templates, templates, replace=False) + 1  # sparse, unordered template ids
    subject_of_template = np.r_[np.arange(subjects), probe_subject]
    rows, medias = _images_of_templates(rng, templates, c["images"])
    feats, flips = _features(rng, subject_of_template[rows], subjects, dim)
    scores = np.where(rng.random(len(rows)) < 0.01, 0.1, rng.uniform(0.5, 1.0, len(rows)))
    genuine_probes = np.sort(rng.choice(c["probes"], c["genuine"], replace=False))
    gallery_of = ids[:subjects]
    probe_ids = ids[subjects:]
    cells = _impostor_pairs(rng, probe_subject, subjects, c["impostor"])
    t1 = np.r_[gallery_of[probe_subject[genuine_probes]], gallery_of[cells[:, 0]]]
    t2 = np.r_[probe_ids[genuine_probes], probe_ids[cells[:, 1]]]
    labels = np.r_[np.ones(c["genuine"], np.int8), np.zeros(c["impostor"], np.int8)]
    order = rng.permutation(len(labels))
    where = Path("<synthetic>")
    subject_ids = 100 + 3 * np.arange(subjects)

    def listing(rows_: np.ndarray, subj: np.ndarray) -> TemplateSubjects:
        return TemplateSubjects(where, ids[rows_], subject_ids[subj], np.arange(len(rows_)) + 2)

    galleries = {
        "G1": listing(np.arange(c["g1"]), np.arange(c["g1"])),
        "G2": listing(np.arange(c["g1"], subjects), np.arange(c["g1"], subjects)),
    }
    probes = listing(np.arange(subjects, templates), probe_subject)
    meta = IJBMeta(
        target="IJBC", images=None, scores=scores, templates=ids[rows], medias=medias, pair_path=where,
        pair_t1=t1[order], pair_t2=t2[order], labels=labels[order], galleries=galleries, probes=probes,
    )  # fmt: skip
    return meta, feats, flips


__all__ = ["FULL", "make_synthetic", "synthetic_counts"]

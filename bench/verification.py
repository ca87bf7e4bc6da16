"""Face verification with InsightFace's protocol, so the numbers compare with published ones.

Every image and its horizontal flip are embedded, the two embeddings summed and L2-normalised; pair k is images
(2k, 2k+1) of a ``.bin`` set. The distance is the squared L2 distance of the normalised embeddings. Accuracy:
10 contiguous folds (sklearn's ``KFold(10, shuffle=False)``), the threshold chosen among ``arange(0, 4, 0.01)`` on
nine folds (the first best one), accuracy measured on the tenth; reported as mean and (population) std over the
folds, as InsightFace's ``verification.py`` does. Beyond that protocol: TAR at FAR 1e-1..1e-4 from the sorted
impostor distances (``None`` where there are too few impostor pairs), the ROC curve, its area (trapezoid rule) and
the equal error rate.

The metrics are vectorised (one histogram of distances against the threshold grid per fold, cumulative sums, an
argmax), so they cost milliseconds for 6,000 pairs; they compute in float64 where InsightFace computes in float32,
which can move a pair lying on a threshold by one rounding step and nothing else.

Sets are :class:`PairSet`: encoded images, the two image indices of each pair, same/different flags and a
per-image masked flag (FaceT backbones choose their prompt set by it; holistic ``.bin`` sets are all False). A
masked variant of a set is the same pairs with other images and flags, evaluated by the same code.
"""

from __future__ import annotations

import ctypes
import io
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from facetool.pipeline.errors import FacetoolError
from facetool.pipeline.verification_bin import load_bin

#: InsightFace's threshold grid for the squared L2 distance of unit vectors (which lies in [0, 4]).
THRESHOLDS = np.arange(0, 4, 0.01)
FOLDS = 10
#: FARs at which TAR is reported, as decimal exponents (1e-1 .. 1e-4); integer so that pair counts divide exactly.
FAR_EXPONENTS = (1, 2, 3, 4)
IMAGE_SIZE = 112
#: Images per forward pass by default (each with its flip): small on a CPU, where MobileFaceNet's large activation
#: maps outgrow the caches and its throughput falls with bigger batches; large on a GPU.
DEFAULT_BATCH = {"cpu": 16, "cuda": 256}

#: Well-known sets in the order reports list them, with their standard pair counts.
KNOWN_SETS: dict[str, int] = {
    "lfw": 6000,
    "cfp_fp": 7000,
    "cfp_ff": 7000,
    "agedb_30": 6000,
    "calfw": 6000,
    "cplfw": 6000,
    "vgg2_fp": 5000,
}
PAIRS_FILE = "masked_pairs.txt"


def far_key(exponent: int) -> str:
    """The JSON key of a FAR: ``1e-3`` for exponent 3."""
    return f"1e-{exponent}"


# ---------------------------------------------------------------------------------------------------------------
# Metrics


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
        """The report's object for this set (DESIGN.md's ``bench verification`` keys plus folds and counts)."""
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


# ---------------------------------------------------------------------------------------------------------------
# Sets


@dataclass
class PairSet:
    """A verification set: encoded images, pair k = images ``pairs[k]``, ``issame[k]``, and ``masked[i]`` per image.

    ``source`` names where it came from and ``image_names[i]`` (optional) an image, for error messages.
    """

    name: str
    source: str
    images: list[bytes]
    pairs: np.ndarray
    issame: np.ndarray
    masked: np.ndarray
    image_names: list[str] | None = None

    @property
    def num_pairs(self) -> int:
        return int(self.issame.size)

    def describe_image(self, i: int) -> str:
        """``image 17`` or ``image 17 (a/b.jpg)``."""
        return f"image {i}" + (f" ({self.image_names[i]})" if self.image_names else "")


def canonical_set_name(path: str | os.PathLike) -> str:
    """The set's name from a file or folder name: a well-known name in its usual spelling (``AgeDB-30.bin`` ->
    ``agedb_30``, ``cfpfp.bin`` -> ``cfp_fp``), else the name without ``.bin``."""
    stem = Path(path).name
    stem = stem[: -len(".bin")] if stem.lower().endswith(".bin") else stem
    squashed = stem.lower().replace("-", "").replace("_", "").replace(" ", "")
    for known in KNOWN_SETS:
        if squashed == known.replace("_", ""):
            return known
    return stem


def set_order(name: str) -> tuple[int, str]:
    """Sort key: well-known sets first in their usual order, then the others by name."""
    known = list(KNOWN_SETS)
    return (known.index(name), "") if name in known else (len(known), name)


def read_bin_set(path: str | os.PathLike) -> PairSet:
    """A ``.bin`` set through the restricted unpickler: pairs (2k, 2k+1), every image holistic."""
    vs = load_bin(path)
    n = len(vs.images)
    return PairSet(
        name=canonical_set_name(path),
        source=str(path),
        images=vs.images,
        pairs=np.arange(n, dtype=np.int64).reshape(-1, 2),
        issame=vs.issame.astype(bool),
        masked=np.zeros(n, dtype=bool),
    )


def masked_bin_set(
    pair_set: PairSet, mode: str, seed: int = 0, progress: Callable[[int, int], None] | None = None
) -> PairSet:
    """The SMFRD-style masked version of a ``.bin`` set, rendered on the fly: byte for byte the images that
    ``facetool masks bin --mode MODE --seed SEED`` writes, with the masked flag set on the images that got a mask
    (the second of each pair for ``one``, all for ``both``). Named ``<set>_masked_<mode>``."""
    from facetool.pipeline.masks import mask_verification_images, masked_positions

    images = mask_verification_images(pair_set.images, mode, seed, progress=progress)
    masked = pair_set.masked.copy()
    masked[list(masked_positions(len(images), mode))] = True
    return replace(
        pair_set,
        name=f"{pair_set.name}_masked_{mode}",
        source=f"{pair_set.source} (masked: mode {mode}, seed {seed})",
        images=images,
        masked=masked,
    )


def bin_dir_paths(folder: str | os.PathLike) -> list[Path]:
    """Every ``*.bin`` in ``folder`` (not recursive), well-known sets first."""
    folder = Path(folder)
    paths = [p for p in folder.iterdir() if p.suffix.lower() == ".bin" and p.is_file()]
    if not paths:
        raise FacetoolError(f"{folder}: no .bin verification sets in this folder")
    return sorted(paths, key=lambda p: set_order(canonical_set_name(p)))


def _is_holistic_name(relpath: str) -> bool:
    return "unmasked" in relpath.lower()


def read_pairs_dir(path: str | os.PathLike) -> PairSet:
    """A folder of images plus a pairs list (the RMFVD layout): ``DIR/masked_pairs.txt`` (or PATH is the list
    itself), one pair per line, ``path1 path2 label`` with paths relative to the list's folder and label 1 (same)
    or 0. The masked flag of each image: an optional 4th and 5th column ``mask1 mask2`` (1 masked, 0 holistic);
    without them, the RMFVD convention: an image whose path contains ``unmasked`` is holistic, every other image is
    masked. Blank lines and ``#`` comments are skipped; images used by several pairs are embedded once.
    """
    path = Path(path)
    pairs_file = path / PAIRS_FILE if path.is_dir() else path
    root = pairs_file.parent
    if not pairs_file.is_file():
        raise FacetoolError(f"{path}: no pairs list {PAIRS_FILE} (lines: path1 path2 label)")
    try:
        text = pairs_file.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise FacetoolError(f"{pairs_file}: not a UTF-8 text file ({err.reason} at byte {err.start})") from None
    root_resolved = root.resolve()
    index: dict[str, int] = {}
    names: list[str] = []
    flags: list[bool] = []
    pairs: list[tuple[int, int]] = []
    issame: list[bool] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        where = f"{pairs_file} line {lineno}"
        if len(fields) not in (3, 5):
            raise FacetoolError(f"{where}: expected 'path1 path2 label [mask1 mask2]', got {len(fields)} fields")
        if fields[2] not in ("0", "1") or any(f not in ("0", "1") for f in fields[3:]):
            raise FacetoolError(f"{where}: label and mask flags must be 0 or 1")
        ids = []
        for j, rel in enumerate(fields[:2]):
            flag = fields[3 + j] == "1" if len(fields) == 5 else not _is_holistic_name(rel)
            if rel not in index:
                full = (root / rel).resolve()
                if not full.is_relative_to(root_resolved):
                    raise FacetoolError(f"{where}: image {rel!r} lies outside {root}")
                if not full.is_file():
                    raise FacetoolError(f"{where}: image {rel!r} not found in {root}")
                index[rel] = len(names)
                names.append(rel)
                flags.append(flag)
            elif flags[index[rel]] != flag:
                raise FacetoolError(f"{where}: image {rel!r} is marked both masked and holistic")
            ids.append(index[rel])
        pairs.append((ids[0], ids[1]))
        issame.append(fields[2] == "1")
    if not pairs:
        raise FacetoolError(f"{pairs_file}: no pairs")
    images = []
    for rel in names:
        images.append((root / rel).read_bytes())
    return PairSet(
        name=canonical_set_name(root),
        source=str(pairs_file),
        images=images,
        pairs=np.asarray(pairs, dtype=np.int64),
        issame=np.asarray(issame, dtype=bool),
        masked=np.asarray(flags, dtype=bool),
        image_names=names,
    )


def check_unique_names(sets: Sequence[PairSet]) -> None:
    """Two sets under one name would overwrite each other in the report."""
    seen: dict[str, str] = {}
    for s in sets:
        if s.name in seen:
            raise FacetoolError(f"two sets named {s.name!r}: {seen[s.name]} and {s.source}")
        seen[s.name] = s.source


def known_set_warnings(sets: Sequence[PairSet]) -> list[str]:
    """Notes for well-known sets whose pair count differs from the standard one (a truncated or other version)."""
    return [
        f"note: {s.name} has {s.num_pairs} pairs, the standard {s.name} has {KNOWN_SETS[s.name]}"
        for s in sets
        if s.name in KNOWN_SETS and s.num_pairs != KNOWN_SETS[s.name]
    ]


# ---------------------------------------------------------------------------------------------------------------
# Models and embedding


def load_model(path: str | os.PathLike) -> tuple[Any, str, dict[str, Any]]:
    """The backbone in ``path`` (an exported backbone or a training checkpoint), through the one backbone-file
    resolver; returns (model in eval mode, backbone name, options). A bad file is a one-line FacetoolError."""
    from facetool.train.models.checkpoint import load_backbone

    return load_backbone(path)


def retain_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory for reuse rather than hand it back to the kernel at once.

    A CPU forward pass allocates activation buffers of tens of MB and frees them again; by default glibc returns
    such blocks to the kernel (mmap/munmap, heap trimming), so every batch faults them in afresh and the kernel
    zeroes them: measured on a 2-vCPU VM, 95 s of the 170 s it took to embed 12,000 images with MobileFaceNet went
    to the kernel (BENCHMARKS.md). Raising both thresholds to 1 GiB ends that. Process-wide, so the command calls
    it (a short-lived process) and library callers such as a training loop decide for themselves. Returns whether
    it took effect (glibc only; elsewhere nothing changes).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's <malloc.h> parameter numbers
    return bool(mallopt(m_mmap_threshold, 1 << 30)) and bool(mallopt(m_trim_threshold, 1 << 30))


def resolve_device(device: str | None) -> str:
    """``None``/``auto``: CUDA when available, else CPU; an explicit ``cuda`` without a GPU is an error."""
    import torch

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise FacetoolError(f"--device {device}: no CUDA GPU is available to torch here")
    return device


def decode_face(data: bytes, where: str) -> np.ndarray:
    """One encoded image as RGB uint8 (112, 112, 3), resized (bilinear) when another size, as InsightFace does."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            img = img.convert("RGB")
            if img.size != (IMAGE_SIZE, IMAGE_SIZE):
                img = img.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)
            return np.asarray(img, dtype=np.uint8)
    except Exception as err:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError...
        raise FacetoolError(f"{where}: cannot decode the image ({type(err).__name__}: {err})") from None


def _decode_batch(pair_set: PairSet, start: int, stop: int) -> np.ndarray:
    return np.stack(
        [
            decode_face(pair_set.images[i], f"{pair_set.source}: set {pair_set.name!r}, {pair_set.describe_image(i)}")
            for i in range(start, stop)
        ]
    )


def _batches(pair_set: PairSet, batch_size: int) -> Iterator[tuple[int, np.ndarray]]:
    """Decoded batches in order; the next one is decoded on a thread (PIL releases the GIL) while the model runs."""
    n = len(pair_set.images)
    starts = list(range(0, n, batch_size))
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(_decode_batch, pair_set, 0, min(n, batch_size)) if starts else None
        for k, start in enumerate(starts):
            batch = pending.result()
            if k + 1 < len(starts):
                nxt = starts[k + 1]
                pending = pool.submit(_decode_batch, pair_set, nxt, min(n, nxt + batch_size))
            yield start, batch


def default_batch_size(device: str) -> int:
    """Images per forward (plus as many flips) when the user gives none: 16 on a CPU, 256 on a GPU."""
    return DEFAULT_BATCH["cuda" if device.startswith("cuda") else "cpu"]


def embed_set(
    model: Any,
    pair_set: PairSet,
    batch_size: int | None = None,
    device: str | None = None,
    progress: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Raw embeddings of every image of ``pair_set`` and of its horizontal flip, (images, D) float32 each.

    Images are normalised as in training ((x - 127.5) / 127.5, RGB, NCHW); each batch goes through the model
    once with its flips appended. Backbones that take the mask flag (FaceT with prompts) get ``pair_set.masked``.
    ``progress(images_done)`` is called after each batch. The model is put in eval mode. ``batch_size`` None: see
    :func:`default_batch_size`.
    """
    import torch

    device = resolve_device(device)
    batch_size = batch_size or default_batch_size(device)
    model = model.eval().to(device)
    takes_flag = bool(getattr(model, "uses_masked", False))
    n = len(pair_set.images)
    if n == 0:
        raise FacetoolError(f"{pair_set.source}: set {pair_set.name!r} has no images")
    # Results go into arrays allocated once: keeping each batch's small output alive between the large transient
    # buffers of the next forwards fragments the heap (measured: hundreds of MB more per 10,000 images on a CPU).
    out = out_flip = None
    with torch.inference_mode():
        for start, batch in _batches(pair_set, batch_size):
            x = torch.from_numpy(batch).to(device).permute(0, 3, 1, 2).float().contiguous().sub_(127.5).div_(127.5)
            both = torch.cat([x, torch.flip(x, dims=[3])])
            if takes_flag:
                flags = torch.from_numpy(pair_set.masked[start : start + len(batch)]).to(device)
                emb = model(both, torch.cat([flags, flags]))
            else:
                emb = model(both)
            emb = emb.float().cpu().numpy()
            if out is None:
                out = np.empty((n, emb.shape[1]), dtype=np.float32)
                out_flip = np.empty_like(out)
            out[start : start + len(batch)] = emb[: len(batch)]
            out_flip[start : start + len(batch)] = emb[len(batch) :]
            del x, both, emb
            if progress is not None:
                progress(start + len(batch))
    return out, out_flip


def evaluate_set(
    model: Any,
    pair_set: PairSet,
    batch_size: int | None = None,
    device: str | None = None,
    progress: Callable[[int], None] | None = None,
) -> SetMetrics:
    """Embed ``pair_set`` with ``model`` (image + flip) and compute its metrics; timings go into ``extra``."""
    t0 = time.perf_counter()
    emb, flip = embed_set(model, pair_set, batch_size, device, progress)
    t1 = time.perf_counter()
    metrics = embedding_metrics(emb, pair_set.pairs, pair_set.issame, flip)
    t2 = time.perf_counter()
    metrics.extra.update(_set_extra(pair_set, embed_seconds=t1 - t0, metric_seconds=t2 - t1))
    return metrics


def evaluate_features(pair_set: PairSet, features: np.ndarray, flip_features: np.ndarray | None = None) -> SetMetrics:
    """Metrics of embeddings computed elsewhere: row i is image i of the set (and of its flip, when given)."""
    for label, arr in (("features", features), ("flip features", flip_features)):
        if arr is None:
            continue
        if arr.ndim != 2 or arr.shape[0] != len(pair_set.images):
            raise FacetoolError(
                f"{label}: shape {arr.shape}, expected ({len(pair_set.images)}, D): one row per image of "
                f"{pair_set.source} in its order"
            )
        if not np.issubdtype(arr.dtype, np.floating) and not np.issubdtype(arr.dtype, np.integer):
            raise FacetoolError(f"{label}: expected a numeric array, got dtype {arr.dtype}")
    if flip_features is not None and flip_features.shape != features.shape:
        raise FacetoolError(f"flip features: shape {flip_features.shape} differs from features {features.shape}")
    t0 = time.perf_counter()
    metrics = embedding_metrics(features, pair_set.pairs, pair_set.issame, flip_features)
    metrics.extra.update(_set_extra(pair_set, embed_seconds=None, metric_seconds=time.perf_counter() - t0))
    return metrics


def _set_extra(pair_set: PairSet, embed_seconds: float | None, metric_seconds: float) -> dict[str, Any]:
    return {
        "images": len(pair_set.images),
        "masked_images": int(pair_set.masked.sum()),
        "source": pair_set.source,
        "embed_seconds": None if embed_seconds is None else round(embed_seconds, 4),
        "metric_seconds": round(metric_seconds, 6),
    }


def evaluate_model(
    model: Any, sets: Sequence[PairSet], batch_size: int | None = None, device: str | None = None
) -> dict[str, dict[str, Any]]:
    """The report's ``sets`` object for ``model`` on ``sets``; leaves the model's train/eval mode as it found it.

    This is the evaluation the training engine is handed as a callable (e.g. ``functools.partial`` over the sets).
    """
    was_training = bool(getattr(model, "training", False))
    try:
        return {s.name: evaluate_set(model, s, batch_size, device).to_json() for s in sets}
    finally:
        model.train(was_training)


def load_features(path: str | os.PathLike) -> np.ndarray:
    """A ``.npy`` array of embeddings, without pickles (``allow_pickle=False``)."""
    try:
        arr = np.load(path, allow_pickle=False)
    except OSError as err:
        raise FacetoolError(f"{path}: cannot read ({err.strerror or err})") from None
    except ValueError as err:
        raise FacetoolError(f"{path}: not a plain numeric .npy array ({err})") from None
    if not isinstance(arr, np.ndarray):
        raise FacetoolError(f"{path}: expected one array (.npy), got an archive")
    return arr


# ---------------------------------------------------------------------------------------------------------------
# Reports


def report_json(results: dict[str, SetMetrics], **meta: Any) -> dict[str, Any]:
    """The ``--json`` object: ``sets`` keyed by name plus whatever describes the run (checkpoint, device...)."""
    return {**meta, "sets": {name: m.to_json() for name, m in results.items()}}


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


_PALETTE = [
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
]  # fmt: skip


def plot_roc(results: dict[str, SetMetrics], path: str | os.PathLike, title: str = "ROC") -> None:
    """ROC curves of all sets on one axis: TAR against FAR on a log scale (down to the smallest FAR the largest
    set can resolve), drawn with Pillow at 2x and downsampled (anti-aliased); written atomically as PNG."""
    from PIL import Image, ImageDraw, ImageFont

    curves = {n: m for n, m in results.items() if m.auc is not None}
    if not curves:
        raise FacetoolError("--plot: no set has both genuine and impostor pairs, so there is no ROC curve")
    s = 2  # supersampling
    w, h = 960 * s, 660 * s
    left, right, top, bottom = 90 * s, 30 * s, 50 * s, 80 * s
    most = max(m.impostor_pairs for m in curves.values())
    lo = min(-1, max(-6, -math.ceil(math.log10(most))))  # log10 of the smallest FAR shown
    # TAR axis from the lowest TAR at the smallest FAR shown, rounded down to a tenth
    tars_at_lo = [float(m.tar[np.searchsorted(m.far, 10.0**lo, side="right") - 1]) for m in curves.values()]
    ymin = min(0.9, math.floor(10 * min(tars_at_lo)) / 10)
    pw, ph = w - left - right, h - top - bottom

    def xy(far: np.ndarray, tar: np.ndarray) -> list[tuple[float, float]]:
        x = left + (np.log10(far) - lo) / (0 - lo) * pw
        y = top + (1 - (tar - ymin) / (1 - ymin)) * ph
        return list(zip(x.tolist(), y.tolist(), strict=True))

    img = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=15 * s)
    small = ImageFont.load_default(size=13 * s)
    grey, black = (215, 215, 215), (30, 30, 30)
    for e in range(lo, 1):  # decades
        x = left + (e - lo) / (0 - lo) * pw
        draw.line([(x, top), (x, top + ph)], fill=grey, width=s)
        draw.text((x, top + ph + 8 * s), f"1e{e}" if e else "1", fill=black, font=small, anchor="mt")
        for k in range(2, 10):
            if e < 0:
                xm = left + (e + math.log10(k) - lo) / (0 - lo) * pw
                draw.line([(xm, top + ph - 5 * s), (xm, top + ph)], fill=black, width=s)
    tenths = round(10 * (1 - ymin))  # span of the TAR axis in tenths: 1..10
    step = 0.1 if tenths >= 6 else 0.05 if tenths >= 3 else 0.02 if tenths == 2 else 0.01
    steps = round((1 - ymin) / step)
    for k in range(steps + 1):
        v = ymin + k * step
        y = top + (1 - (v - ymin) / (1 - ymin)) * ph
        draw.line([(left, y), (left + pw, y)], fill=grey, width=s)
        draw.text((left - 8 * s, y), f"{v:.1f}" if step == 0.1 else f"{v:.2f}", fill=black, font=small, anchor="rm")
    draw.rectangle([left, top, left + pw, top + ph], outline=black, width=s)
    for i, m in enumerate(curves.values()):
        keep = m.far > 0
        far = np.r_[10.0**lo, m.far[keep]]
        tar = np.r_[m.tar[np.searchsorted(m.far, 10.0**lo, side="left") - 1], m.tar[keep]]  # TAR below 10^lo
        sel = far >= 10.0**lo
        draw.line(xy(far[sel], tar[sel]), fill=_PALETTE[i % len(_PALETTE)], width=2 * s, joint="curve")
    # legend, lower right
    lx, ly = left + pw - 250 * s, top + ph - (len(curves) * 22 + 12) * s
    draw.rectangle([lx, ly, left + pw - 10 * s, top + ph - 10 * s], fill="white", outline=grey, width=s)
    for i, (name, m) in enumerate(curves.items()):
        y = ly + (14 + 22 * i) * s
        draw.line([(lx + 10 * s, y), (lx + 40 * s, y)], fill=_PALETTE[i % len(_PALETTE)], width=3 * s)
        draw.text((lx + 48 * s, y), f"{name}  AUC {m.auc:.4f}", fill=black, font=small, anchor="lm")
    draw.text((left + pw / 2, 20 * s), title, fill=black, font=font, anchor="mm")
    draw.text((left + pw / 2, h - 28 * s), "FAR (false accept rate, log scale)", fill=black, font=font, anchor="mm")
    label = Image.new("RGB", (300 * s, 24 * s), "white")
    ImageDraw.Draw(label).text((150 * s, 12 * s), "TAR (true accept rate)", fill=black, font=font, anchor="mm")
    label = label.rotate(90, expand=True)
    img.paste(label, (10 * s, top + ph // 2 - label.height // 2))
    img = img.resize((w // s, h // s), Image.LANCZOS)
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        img.save(tmp, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise

"""IJB 1:1 scoring, vectorised: image features to L2-normalised template features, and template-pair scores.

The arithmetic is that of ``recognition/arcface_torch/eval_ijbc.py`` (github.com/deepinsight/insightface @
7fadd420c2351d0ffa8cac403421c1a3ed733365; ``image2template_feature``, ``verification`` and the mode switches), in
its default modes and their alternatives:

- flip (F2): image feature = embedding + embedding of the flipped image (off: the embedding alone);
- norms kept (N1): the image feature is not normalised (``normalize_images``: it is L2-normalised first, N0);
- detector score (D1): the image feature is multiplied by its detector score (off: D0);
- a template is the sum over its media of the media's mean image feature (a single image counts as is), then
  L2-normalised (zero rows stay zero, as sklearn's ``normalize``); a pair's score is the dot product.

Upstream loops over templates in Python (``np.where`` over every image, per template); here the media mean is a
weight ``1 / frames in the media`` on each image, so a template is one weighted sum, accumulated chunk by chunk as
a sparse-times-dense product (memory independent of the number of images). Pair scores are computed in blocks of
pairs sorted by their first template: where few first templates carry many pairs (IJB's layout), a block is one
matrix product of its first templates with the second templates it uses; otherwise the two feature rows of each
pair are gathered. Everything is float64 (upstream keeps image features in float32, so its scores differ from
these by float32 rounding, ~1e-7).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from facetool.bench.verification import l2_normalize
from facetool.pipeline.atomic import Progress
from facetool.pipeline.errors import FacetoolError

#: Images pooled per step (a float64 chunk of 16384 x 512 is 64 MB).
POOL_CHUNK = 16384
#: Distinct first templates per block of pair scores (its product with the second templates: at most 512 x T).
ROW_BLOCK = 512
#: Pairs gathered at once where a matrix product would not pay.
GATHER_BLOCK = 32768
#: Template ids spanning fewer values than this are mapped to rows through a lookup table.
LOOKUP_SPAN = 1 << 26
#: A block is one matrix product when it computes at most this many dot products per pair it needs.
PRODUCT_RATIO = 8


@dataclass(frozen=True)
class ProtocolOptions:
    """The scoring modes; the defaults are eval_ijbc.py's (flip added, norms kept, detector-score weighting)."""

    flip: bool = True
    normalize_images: bool = False
    detector_score: bool = True

    def to_json(self) -> dict[str, Any]:
        """The options as JSON-ready values."""
        return asdict(self)


@dataclass
class TemplateIndex:
    """The sorted distinct template ids, each image's row among them, and each image's pooling weight."""

    ids: np.ndarray
    image_rows: np.ndarray
    weights: np.ndarray


def template_index(
    templates: np.ndarray, medias: np.ndarray, scores: np.ndarray | None, options: ProtocolOptions
) -> TemplateIndex:
    """Which template each image pools into and with which weight: its detector score (when used) over the number
    of images of its (template, media) group, which turns the media mean into part of one weighted sum."""
    ids, rows = np.unique(np.asarray(templates), return_inverse=True)
    media = np.asarray(medias)
    order = np.lexsort((media, rows))
    r, m = rows[order], media[order]
    new_group = np.r_[True, (r[1:] != r[:-1]) | (m[1:] != m[:-1])]
    group = np.cumsum(new_group) - 1
    counts = np.bincount(group)
    per_image = np.empty(len(rows), dtype=np.float64)
    per_image[order] = counts[group]
    weights = 1.0 / per_image
    if options.detector_score:
        if scores is None:
            raise FacetoolError("detector-score weighting needs the detector scores of the 5-point file")
        weights *= np.asarray(scores, dtype=np.float64)
    return TemplateIndex(ids=ids, image_rows=rows.astype(np.intp), weights=weights)


def image_features(
    features: np.ndarray, flips: np.ndarray | None, start: int, stop: int, normalize: bool, out: np.ndarray
) -> np.ndarray:
    """Image features of images ``start:stop`` in float64, written into ``out``: embedding (+ flip embedding),
    L2-normalised when asked."""
    out = out[: stop - start]
    if flips is not None:
        np.add(features[start:stop], flips[start:stop], out=out, dtype=np.float64)
    else:
        out[...] = features[start:stop]
    if normalize:
        out[...] = l2_normalize(out)
    return out


def pool_templates(
    features: np.ndarray,
    flips: np.ndarray | None,
    index: TemplateIndex,
    options: ProtocolOptions,
    progress: Progress | None = None,
) -> np.ndarray:
    """L2-normalised template features (templates x D, float64, rows in ``index.ids`` order).

    The images are read ``POOL_CHUNK`` rows at a time, in order (``features`` may be memory-mapped); a chunk's
    weighted sums per template are one sparse-times-dense product (a row per template of the chunk, one weight per
    image), added to those templates' rows."""
    from scipy.sparse import csr_matrix

    n = len(index.image_rows)
    flips = flips if options.flip else None
    sums = np.zeros((len(index.ids), features.shape[1]), dtype=np.float64)
    buffer = np.empty((min(n, POOL_CHUNK), features.shape[1]), dtype=np.float64)
    for start in range(0, n, POOL_CHUNK):
        stop = min(n, start + POOL_CHUNK)
        x = image_features(features, flips, start, stop, options.normalize_images, buffer)
        rows, local = np.unique(index.image_rows[start:stop], return_inverse=True)
        weights = csr_matrix((index.weights[start:stop], (local, np.arange(stop - start))), (len(rows), stop - start))
        sums[rows] += weights @ x
        if progress is not None:
            progress(stop, n)
    return l2_normalize(sums)


def rows_of(ids: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """Rows of the template ids ``wanted`` among the sorted ``ids`` (every one must be there): a lookup table
    where the ids span a modest range, else a binary search."""
    lo, hi = int(ids[0]), int(ids[-1])
    if hi - lo < LOOKUP_SPAN:
        table = np.full(hi - lo + 2, -1, dtype=np.int32)
        table[ids - lo] = np.arange(len(ids), dtype=np.int32)
        rows = table[np.clip(wanted - lo, -1, hi - lo + 1)]
        ok = bool(np.all(rows >= 0))
    else:
        rows = np.minimum(np.searchsorted(ids, wanted), len(ids) - 1)
        ok = bool(np.all(ids[rows] == wanted))
    if not ok:
        raise FacetoolError("a template id has no image")  # callers check with file and line first
    return rows


def _score_block(feats: np.ndarray, r1: np.ndarray, r2: np.ndarray, out: np.ndarray, at: np.ndarray) -> None:
    """Scores of pairs (r1, r2), all of whose first rows lie in one block, written to ``out[at]``: one product of
    the block's first templates with the second templates it uses, when that costs few dot products per pair."""
    new_row = np.r_[True, r1[1:] != r1[:-1]]
    used = np.zeros(len(feats), dtype=bool)
    used[r2] = True
    cols = np.flatnonzero(used)
    if int(new_row.sum()) * len(cols) <= PRODUCT_RATIO * len(r1):
        col_of = np.cumsum(used) - 1
        product = feats[r1[new_row]] @ feats[cols].T
        out[at] = product[np.cumsum(new_row) - 1, col_of[r2]]
        return
    for a in range(0, len(r1), GATHER_BLOCK):
        b = min(len(r1), a + GATHER_BLOCK)
        out[at[a:b]] = np.einsum("ij,ij->i", feats[r1[a:b]], feats[r2[a:b]])


def pair_scores(feats: np.ndarray, r1: np.ndarray, r2: np.ndarray, progress: Progress | None = None) -> np.ndarray:
    """Dot products of template rows ``r1[k]`` and ``r2[k]`` of ``feats`` (float64, in the pairs' order)."""
    n = len(r1)
    key = r1.astype(np.uint16) if len(feats) <= 1 << 16 else r1  # 16-bit keys sort by radix
    order = np.argsort(key, kind="stable")
    s1 = r1[order]
    firsts = np.flatnonzero(np.r_[True, s1[1:] != s1[:-1]]) if n else np.zeros(0, np.intp)
    bounds = np.r_[firsts[::ROW_BLOCK], n]
    out = np.empty(n, dtype=np.float64)
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        _score_block(feats, s1[a:b], r2[order[a:b]], out, order[a:b])
        if progress is not None:
            progress(int(b), n)
    return out


def template_scores(
    features: np.ndarray,
    flips: np.ndarray | None,
    templates: np.ndarray,
    medias: np.ndarray,
    scores: np.ndarray | None,
    t1: np.ndarray,
    t2: np.ndarray,
    options: ProtocolOptions = ProtocolOptions(),
) -> np.ndarray:
    """The whole 1:1 scoring in one call: the score of each template pair (t1[k], t2[k]) (template ids)."""
    index = template_index(templates, medias, scores, options)
    feats = pool_templates(features, flips, index, options)
    return pair_scores(feats, rows_of(index.ids, t1), rows_of(index.ids, t2))


__all__ = [
    "ProtocolOptions",
    "TemplateIndex",
    "image_features",
    "pair_scores",
    "pool_templates",
    "rows_of",
    "template_index",
    "template_scores",
]

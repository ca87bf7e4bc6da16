"""Verification protocols: how the images of a set are embedded and how its accuracy is scored.

``insightface`` (the default) is InsightFace's ``verification.py``: every image with its horizontal flip, summed,
10 folds, ``(x - 127.5) / 127.5``, the per-image masked flag of the set (what facetool's masked sets record).

``facet`` is what FaceT's code evaluates with (zyainfal/Joint-Holistic-and-Masked-Face-Recognition @
3126602be561ffe114ca9a8244cfef348db13c6b, under ``code/``): 5 folds and no flip everywhere (``trainer.py`` L183,
L208, L456-471: ``run_evaluate(..., nrof_folds=5, tta=False)`` and ``run_test(..., tta=False)``;
``evaluation/run_verification.py`` L240-241); the holistic ``.bin`` sets as pre-normalised arrays, (x - 127.5) /
127.5, with the masked flag 0 (``trainer.py`` L191, L201); the masked sets (FaceT's masked LFW/CFP-FP/AgeDB-30 and
RMFVD, JPEG folders: here the masked versions of ``.bin`` sets and the pair folders) as (x - 127.5) / 128 with the
masked flag 1 on *every* image, holistic pair members included (``evaluation/run_verification.py`` L179-200: the
flag starts at 1 and mask types 1 and 2 only set it to 1 again). Accuracy, thresholds and distances are the same
in both (``verfication.py`` L33-100: ``KFold(shuffle=False)``, ``arange(0, 4, 0.01)``, squared L2 of unit
embeddings).

The colour order stays the model's own (``input_channels``) for every set. FaceT reads its holistic arrays in
InsightFace_Pytorch's BGR and its masked JPEGs as RGB; facetool feeds one order to one model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from facetool.pipeline.errors import FacetoolError

from .sets import PairSet

#: Pixel normalisation (x - 127.5) / scale of facetool's training, InsightFace's and FaceT's holistic sets.
TRAINING_SCALE = 127.5


@dataclass(frozen=True)
class Protocol:
    """How sets are embedded and scored: ``folds`` of the k-fold accuracy, ``flip`` (embed each image with its
    horizontal flip and sum them), ``masked_scale`` (the normalisation (x - 127.5) / scale of the masked sets) and
    ``all_masked`` (a masked set's images all get the masked flag, not each its own)."""

    name: str
    folds: int
    flip: bool
    masked_scale: float
    all_masked: bool

    def scale(self, pair_set: PairSet) -> float:
        """The normalisation divisor of ``pair_set``'s pixels."""
        return self.masked_scale if pair_set.masked_set else TRAINING_SCALE

    def flags(self, pair_set: PairSet) -> np.ndarray:
        """The masked flag each image of ``pair_set`` is embedded with."""
        if self.all_masked:
            return np.full(len(pair_set.images), pair_set.masked_set, dtype=bool)
        return pair_set.masked

    def describe(self) -> str:
        """One line for the report: the protocol's name and what it does."""
        flip = "image + flip" if self.flip else "no flip"
        masked = f"masked sets (x - 127.5) / {self.masked_scale:g}"
        flags = "every image of a masked set flagged masked" if self.all_masked else "per-image masked flags"
        return f"protocol: {self.name} ({self.folds} folds, {flip}, {masked}, {flags})"


INSIGHTFACE = Protocol("insightface", folds=10, flip=True, masked_scale=TRAINING_SCALE, all_masked=False)
FACET = Protocol("facet", folds=5, flip=False, masked_scale=128.0, all_masked=True)
PROTOCOLS: dict[str, Protocol] = {p.name: p for p in (INSIGHTFACE, FACET)}


def get_protocol(name: str) -> Protocol:
    """The protocol called ``name``; an unknown name is a one-line error listing the known ones."""
    if name not in PROTOCOLS:
        raise FacetoolError(f"unknown verification protocol {name!r}; known: {', '.join(PROTOCOLS)}")
    return PROTOCOLS[name]

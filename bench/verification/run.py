"""One verification run, as ``facetool bench verification`` does it: load the sets (and their masked versions),
then embed them with a backbone, or take embeddings computed elsewhere, and score every set."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from facetool.pipeline.atomic import Progress
from facetool.pipeline.errors import FacetoolError

from . import embed
from .protocol import INSIGHTFACE, Protocol, get_protocol
from .report import Report
from .sets import PairSet, known_set_warnings, load_sets

PathLike = str | os.PathLike


def run_verification(
    checkpoint: PathLike | None = None,
    *,
    arch: str | None = None,
    bins: Sequence[PathLike] = (),
    bin_dirs: Sequence[PathLike] = (),
    pairs: Sequence[PathLike] = (),
    masked: str | None = None,
    mask_seed: int = 0,
    features: PathLike | None = None,
    flip_features: PathLike | None = None,
    batch_size: int | None = None,
    device: str | None = None,
    retain_memory: bool = False,
    protocol: str = INSIGHTFACE.name,
    progress: Progress | None = None,
    notify: Callable[[str], None] | None = None,
) -> Report:
    """Score the sets (:func:`load_sets`) with the backbone in ``checkpoint`` (a facetool backbone or training
    checkpoint, a bare state dict of backbone ``arch``, or an ONNX model), or with the embeddings in ``features``
    (and ``flip_features``) of the one set given. ``protocol``: "insightface" (10 folds, image + flip) or "facet"
    (FaceT's: 5 folds, no flip, its normalisation and masked flags of the masked sets; see :mod:`.protocol`); the
    report's ``protocol`` names it.

    The sets are read first, so an untrusted pickle is refused before any model is built. ``progress(done,
    total)`` counts images: those rendered with masks, then those embedded (the total grows once, when the sets are
    known). ``notify`` receives notes as they arise (non-standard pair counts, the model and device). With
    ``retain_memory``, :func:`retain_freed_memory` is applied (process-wide: for short-lived processes).
    """
    say = notify or (lambda _message: None)
    chosen = get_protocol(protocol)
    rendered = [0]

    def masking(done: int, total: int) -> None:
        rendered[0] = total
        progress(done, total)

    sets = load_sets(bins, bin_dirs, pairs, masked, mask_seed, progress=None if progress is None else masking)
    embed.check_sets(sets, decode=False, folds=chosen.folds)  # too few pairs: found before any model is loaded
    for note in known_set_warnings(sets):
        say(note)
    if features is not None:
        flips = None if flip_features is None else Path(flip_features)
        return _features_report(sets, Path(features), flips, chosen)
    if checkpoint is None:
        raise FacetoolError("no backbone to embed with: give a checkpoint, or features computed elsewhere")
    model, name, options = embed.load_model(checkpoint, arch)
    if retain_memory:
        embed.retain_freed_memory()  # CPU forwards reuse their buffers instead of faulting them in every batch
    dev = embed.resolve_device(device)
    shown = ", ".join(f"{k}={val}" for k, val in sorted(options.items()))
    say(f"{checkpoint}: {name}({shown}) on {dev}")
    meta: dict[str, Any] = {"checkpoint": str(checkpoint), "backbone": name, "options": options, "device": dev,
                            "protocol": chosen.name}  # fmt: skip
    if masked is not None:
        meta["masked"] = {"mode": masked, "seed": mask_seed}
    meta["batch_size"] = batch_size or embed.default_batch_size(dev)
    results = {}
    done, total = rendered[0], rendered[0] + sum(len(s.images) for s in sets)
    for s in sets:
        step = None if progress is None else (lambda d, _t, base=done: progress(base + d, total))
        results[s.name] = embed.evaluate_set(model, s, meta["batch_size"], dev, progress=step,
                                             model_name=f"{checkpoint} ({name})", protocol=chosen)  # fmt: skip
        done += len(s.images)
    return Report.build(results, meta, title=f"ROC: {Path(checkpoint).name} ({name})")


def training_evaluation(
    bins: Sequence[PathLike],
    batch_size: int | None = None,
    progress: Progress | None = None,
    protocol: str = INSIGHTFACE.name,
) -> Callable[[Any], dict[str, dict[str, Any]]]:
    """The evaluation a training run is handed (``evaluate(backbone) -> {set name: metrics}``) on the ``.bin``
    sets ``bins``, scored under ``protocol`` (``eval.protocol``): each set is read (an untrusted pickle refused),
    its pairs counted and every image decoded once now, so a damaged set fails before the first step rather than
    after training. ``progress`` counts the images."""
    chosen = get_protocol(protocol)
    sets = load_sets(bins=bins)
    embed.check_sets(sets, decode=True, progress=progress, folds=chosen.folds)
    return functools.partial(embed.evaluate_model, sets=sets, batch_size=batch_size, protocol=chosen)


def _features_report(
    sets: list[PairSet], features: Path, flip_features: Path | None, protocol: Protocol = INSIGHTFACE
) -> Report:
    """The report of embeddings computed elsewhere: row i of ``features`` is image i of the one set."""
    if len(sets) != 1:
        raise FacetoolError(f"{features}: embeddings of one set, but {len(sets)} sets were given")
    feats = embed.load_features(features)
    flips = embed.load_features(flip_features) if flip_features is not None else None
    labels = (str(features), str(flip_features))
    results = {sets[0].name: embed.evaluate_features(sets[0], feats, flips, labels=labels, protocol=protocol)}
    meta = {"features": str(features), "flip_features": None if flip_features is None else str(flip_features),
            "protocol": protocol.name}  # fmt: skip
    return Report.build(results, meta, title=f"ROC: {features.name}")

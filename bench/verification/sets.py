"""Verification sets: ``.bin`` pickles (read with the restricted unpickler), their masked versions, image folders
with a pairs list, and :func:`load_sets`, the one loader of both ``bench verification`` and training's evaluation.

A set is a :class:`PairSet`: encoded images, the two image indices of each pair, same/different flags and a
per-image masked flag (FaceT backbones choose their prompt set by it; holistic ``.bin`` sets are all False). A
masked variant of a set is the same pairs with other images and flags, evaluated by the same code.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from facetool.pipeline.atomic import Progress
from facetool.pipeline.errors import FacetoolError
from facetool.pipeline.pairs import parse_pairs_list, read_text
from facetool.pipeline.verification_bin import load_bin

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


@dataclass
class PairSet:
    """A verification set: encoded images, pair k = images ``pairs[k]``, ``issame[k]``, and ``masked[i]`` per image.

    ``source`` names where it came from and ``image_names[i]`` (optional) an image, for error messages.
    ``masked_set``: a masked benchmark (a rendered masked version of a ``.bin`` set, or a pair folder), which
    FaceT's protocol normalises and flags as its own masked sets.
    """

    name: str
    source: str
    images: list[bytes]
    pairs: np.ndarray
    issame: np.ndarray
    masked: np.ndarray
    image_names: list[str] | None = None
    masked_set: bool = False

    @property
    def num_pairs(self) -> int:
        return int(self.issame.size)

    def describe_image(self, i: int) -> str:
        """``image 17`` or ``image 17 (a/b.jpg)``."""
        return f"image {i}" + (f" ({self.image_names[i]})" if self.image_names else "")

    def where(self) -> str:
        """``lfw.bin: set 'lfw'``: the start of an error message about this set."""
        return f"{self.source}: set {self.name!r}"


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


def masked_bin_set(pair_set: PairSet, mode: str, seed: int = 0, progress: Progress | None = None) -> PairSet:
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
        masked_set=True,
    )


def bin_dir_paths(folder: str | os.PathLike) -> list[Path]:
    """Every ``*.bin`` in ``folder`` (not recursive), well-known sets first."""
    folder = Path(folder)
    paths = [p for p in folder.iterdir() if p.suffix.lower() == ".bin" and p.is_file()]
    if not paths:
        raise FacetoolError(f"{folder}: no .bin verification sets in this folder")
    return sorted(paths, key=lambda p: set_order(canonical_set_name(p)))


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise FacetoolError(f"{path}: cannot read ({err.strerror or err})") from None


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
    parsed = parse_pairs_list(read_text(pairs_file), pairs_file)
    return PairSet(
        name=canonical_set_name(root),
        source=str(pairs_file),
        images=[_read(root / rel) for rel in parsed.names],
        pairs=np.asarray(parsed.pairs, dtype=np.int64),
        issame=np.asarray(parsed.issame, dtype=bool),
        masked=np.asarray(parsed.flags, dtype=bool),
        image_names=parsed.names,
        masked_set=True,
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


def load_sets(
    bins: Sequence[str | os.PathLike] = (),
    bin_dirs: Sequence[str | os.PathLike] = (),
    pairs: Sequence[str | os.PathLike] = (),
    masked: str | None = None,
    mask_seed: int = 0,
    progress: Progress | None = None,
) -> list[PairSet]:
    """The sets of an evaluation in report order: each ``.bin`` (``bins``, then every ``.bin`` of each of
    ``bin_dirs``), followed by its masked version when ``masked`` (``one``/``both``) is given, then the pair folders.

    Every set is read (and an untrusted pickle refused) before masks are rendered; names are checked unique.
    ``progress(done, total)`` counts the images that get a mask drawn on them.
    """
    paths = [*(Path(p) for p in bins), *(p for d in bin_dirs for p in bin_dir_paths(d))]
    if masked is not None and not paths:
        raise FacetoolError(f"masked sets (mode {masked}) are rendered from .bin sets, and none was given")
    holistic = [read_bin_set(p) for p in paths]
    folders = [read_pairs_dir(p) for p in pairs]
    sets: list[PairSet] = []
    if masked is None:
        sets += holistic
    else:
        from facetool.pipeline.masks import masked_positions

        counts = [len(masked_positions(len(s.images), masked)) for s in holistic]
        total, done = sum(counts), 0
        for s, count in zip(holistic, counts, strict=True):
            step = None if progress is None else (lambda d, _t, base=done: progress(base + d, total))
            sets += [s, masked_bin_set(s, masked, mask_seed, progress=step)]
            done += count
    sets += folders
    check_unique_names(sets)
    return sets

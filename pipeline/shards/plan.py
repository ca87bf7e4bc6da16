"""The plan of a conversion: checked options, the source, the seeded permutation and the parts.

The plan is a pure function of (record count, seed, samples per shard): shard ``s`` holds the records at positions
``perm[s*S:(s+1)*S]`` of a seeded permutation, so shards can be written in any order, by any number of processes
or cluster jobs (``part``). ``ConvertJob.plan_id`` identifies a plan (the source's contents, the arguments, the
part count): what a resumed run checks before it reuses anything (``facetool.pipeline.shards.state``).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from facetool.pipeline import DEFAULT_SAMPLES_PER_SHARD
from facetool.pipeline.errors import FacetoolError
from facetool.pipeline.recordio import RecordFile, read_property
from facetool.pipeline.shards.format import manifest_name, shard_name

STATE_DIR = ".facetool-convert"


@dataclass(frozen=True)
class ConvertOptions:
    """What decides the output bytes (plus ``workers``, which does not)."""

    samples_per_shard: int = DEFAULT_SAMPLES_PER_SHARD
    seed: int = 0
    shuffle: bool = True
    on_error: str = "fail"  # or "skip"
    part: tuple[int, int] = (0, 1)  # (I, N): this job writes the I-th of N contiguous blocks of shards
    workers: int = 1
    use_index: bool = True
    mask_fraction: float = 0.0  # share of samples that get a masked twin (``mask.jpg``), chosen by (seed, key)
    mask_weights: tuple[tuple[str, float], ...] | None = None  # (kind, weight) pairs; None: the renderer's defaults
    # image folders and list files only (their source records them): the faces' size (None: 112) and a list's root
    image_size: int | None = None
    root: str | None = None

    def validate(self) -> None:
        """Raise a FacetoolError naming the first option out of range (before any work is done)."""
        if self.samples_per_shard < 1:
            raise FacetoolError(f"--samples-per-shard must be >= 1, got {self.samples_per_shard}")
        if self.on_error not in ("fail", "skip"):
            raise FacetoolError(f"--on-error must be 'fail' or 'skip', got {self.on_error!r}")
        if not 0.0 <= self.mask_fraction <= 1.0:
            raise FacetoolError(f"--mask-fraction must be in [0, 1], got {self.mask_fraction}")
        if self.mask_fraction > 0 and self.seed < 0:
            raise FacetoolError(f"--seed must be >= 0 with --mask-fraction, got {self.seed}")
        self.mask_probabilities()  # unknown kinds or bad weights
        if self.image_size is not None and self.image_size < 1:
            raise FacetoolError(f"--image-size must be >= 1, got {self.image_size}")
        pi, pn = self.part
        if not (pn >= 1 and 0 <= pi < pn):
            raise FacetoolError(f"--part must be I/N with 0 <= I < N, got {pi}/{pn}")

    def mask_probabilities(self) -> dict[str, float] | None:
        """The kinds' normalised weights, or None when no sample is masked."""
        if self.mask_fraction <= 0:
            return None
        from facetool.pipeline.masks import normalise_weights

        return normalise_weights(dict(self.mask_weights) if self.mask_weights is not None else None)

    def output_arguments(self) -> dict:
        """The arguments recorded in the manifest: those that change the shards (not workers, not the part)."""
        return {
            "samples_per_shard": self.samples_per_shard,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "on_error": self.on_error,
            "mask_fraction": self.mask_fraction,
            "mask_weights": self.mask_probabilities(),
        }


@dataclass
class Source:
    """An InsightFace dataset folder (or a ``.rec`` with its ``.idx`` and ``property`` beside it)."""

    rec: Path
    idx: Path | None
    property: Path | None

    @classmethod
    def locate(cls, src: str | os.PathLike, use_index: bool = True) -> Source:
        """Find ``train.rec``/``train.idx``/``property``; a missing ``.idx`` is an error unless ``use_index`` is off."""
        src = Path(src)
        if src.is_dir():
            rec = src / "train.rec"
        elif src.suffix == ".rec":
            rec = src
        else:
            raise FacetoolError(f"{src}: not a dataset folder (with train.rec) nor a .rec file")
        if not rec.is_file():
            raise FacetoolError(f"{rec}: not found")
        idx = rec.with_suffix(".idx")
        if use_index and not idx.is_file():
            raise FacetoolError(
                f"{idx}: index file not found (pass --no-index to scan {rec.name} sequentially instead)"
            )
        prop = rec.parent / "property"
        return cls(rec, idx if use_index else None, prop if prop.is_file() else None)

    def num_classes(self, reader: RecordFile) -> int | None:
        """Classes from ``property``, cross-checked against layout A's identity records and bounded by the image
        records (a class needs one; the count sizes the training head)."""
        if self.property is None:
            return reader.num_identities
        num_classes, _, _ = read_property(self.property)
        if reader.num_identities is not None and reader.num_identities != num_classes:
            raise FacetoolError(
                f"{self.property}: says {num_classes} classes but {self.rec} holds {reader.num_identities} "
                "identity records"
            )
        images = len(reader) + len(reader.index_problems)
        if num_classes > images:
            raise FacetoolError(
                f"{self.property}: says {num_classes} classes but {self.rec} holds only {images} image records"
            )
        return num_classes

    # what every convert source offers (``ConvertSource``); an image folder's is ``facetool.pipeline.imagefolder``
    @property
    def path(self) -> Path:
        """What the manifest names as the source."""
        return self.rec

    def open(self, on_error: str) -> RecordFile:
        """The reader of the image records (index entries that cannot be right: an error, or skipped)."""
        return RecordFile(self.rec, self.idx, on_index_error=on_error)

    def mtime_ns(self) -> int:
        return os.stat(self.rec).st_mtime_ns

    def arguments(self) -> dict:
        """Settings of the source that the manifest records among the arguments: none for RecordIO."""
        return {}

    def label_map(self) -> str | None:
        """An identity -> label map to write beside the manifest: none for RecordIO (its labels are its own)."""
        return None


class ConvertSource(Protocol):
    """A dataset ``convert`` reads: a RecordIO ``Source`` or an ``ImageSource`` (image folder or list file)."""

    @property
    def path(self) -> Path: ...
    def open(self, on_error: str): ...
    def num_classes(self, reader) -> int | None: ...
    def mtime_ns(self) -> int: ...
    def arguments(self) -> dict: ...
    def label_map(self) -> str | None: ...


def plan_permutation(num_records: int, seed: int, shuffle: bool) -> np.ndarray:
    """Positions of the image records in write order: a seeded global permutation (or identity order), as uint32
    below 2**32 records (4 bytes a record). Shuffling ``arange`` in place draws what ``permutation`` draws."""
    perm = np.arange(num_records, dtype=np.uint32 if num_records <= 2**32 else np.int64)
    if shuffle:
        np.random.default_rng(seed).shuffle(perm)
    return perm


def part_shards(num_shards: int, part: tuple[int, int]) -> range:
    """The contiguous block of shard numbers that job ``I`` of ``N`` writes."""
    i, n = part
    return range(num_shards * i // n, num_shards * (i + 1) // n)


@dataclass(frozen=True)
class MaskPlan:
    """Which samples get a masked twin and how it is drawn (see ``facetool.pipeline.masks``)."""

    fraction: float
    seed: int
    weights: dict[str, float]


@dataclass(frozen=True, eq=False)
class ConvertJob:
    """One conversion, planned: everything a shard writer needs, in this process or a worker (sent once)."""

    out: Path
    source: ConvertSource
    options: ConvertOptions
    num_classes: int | None
    layout: str
    source_bytes: int
    perm: np.ndarray
    masks: MaskPlan | None
    source_mtime_ns: int = 0
    index_sha256: str = ""
    index_skipped: tuple[dict, ...] = ()  # index entries left out under ``on_error="skip"``
    plan_id: str = field(init=False, default="")

    def __post_init__(self) -> None:
        text = json.dumps(self.record(), sort_keys=True)
        object.__setattr__(self, "plan_id", hashlib.sha256(text.encode()).hexdigest()[:32])

    @classmethod
    def plan(cls, out: Path, source: ConvertSource, reader: RecordFile, options: ConvertOptions) -> ConvertJob:
        """Plan the conversion of ``reader`` (the open ``source``) into ``out``."""
        num_classes = source.num_classes(reader)
        if len(reader) == 0:
            raise FacetoolError(f"{source.path}: no image records to convert")
        weights = options.mask_probabilities()
        masks = MaskPlan(options.mask_fraction, options.seed, weights) if weights is not None else None
        perm = plan_permutation(len(reader), options.seed, options.shuffle)
        mtime = source.mtime_ns()
        skipped = tuple(p.as_skipped() for p in reader.index_problems)
        return cls(out, source, options, num_classes, reader.layout, reader.size, perm, masks, mtime,
                   reader.index_digest(), skipped)  # fmt: skip

    @property
    def num_shards(self) -> int:
        return -(-self.perm.size // self.options.samples_per_shard)

    @property
    def mine(self) -> range:
        """The shards this part writes."""
        return part_shards(self.num_shards, self.options.part)

    def positions(self, shard: int) -> np.ndarray:
        """The record positions (in the reader's key order) that ``shard`` holds, in write order."""
        S = self.options.samples_per_shard
        return self.perm[shard * S : (shard + 1) * S]

    def is_written(self, shard: int) -> bool:
        """Whether the shard's tar is under its final name (it is renamed last, so then it is complete)."""
        return (self.out / f"{shard_name(shard)}.tar").is_file()

    @property
    def manifest_path(self) -> Path:
        return self.out / manifest_name(self.options.part)

    @property
    def plan_path(self) -> Path:
        pi, pn = self.options.part
        return self.out / STATE_DIR / f"plan.part-{pi:04d}-of-{pn:04d}.json"

    def stats_path(self, shard: int) -> Path:
        """Where a finished shard's stats wait for the manifest."""
        return self.out / STATE_DIR / f"{shard_name(shard)}.json"

    def arguments(self) -> dict:
        """The arguments the manifest records: the options' and the source's own settings."""
        return {**self.options.output_arguments(), **self.source.arguments()}

    def record(self) -> dict:
        """What identifies this plan, whichever part carries it out: the source (path, size, modification time, a
        hash of its index), the records and classes, the arguments and the number of parts."""
        return {
            "source": str(self.source.path.resolve()),
            "source_bytes": self.source_bytes,
            "source_mtime_ns": self.source_mtime_ns,
            "index_sha256": self.index_sha256,
            "records": int(self.perm.size),
            "classes": self.num_classes,
            "arguments": self.arguments(),
            "parts": self.options.part[1],
        }

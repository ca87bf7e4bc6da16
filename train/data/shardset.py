"""A shard folder as the loaders see it: its tars, DALI indexes and counts, checked cheaply before anything runs.

DALI reads members at the offsets its index gives, from a memory map: a tar shorter than its index (a copy cut
short) would fault or return garbage mid-epoch, and a sample without a label would surface as a ragged batch far
from its cause. So every shard is checked at start, in time linear in the index size (a few byte counts per
index, no per-line Python): the index exists and starts with ``v1.2 N``, N and the mask count agree with the
manifest, every sample has one image and one label, the last member ends inside the tar, and no offset or size has
more digits than the tar's size (DALI sizes its buffers by them). Errors name the shard (and the sample, when one
is at fault).
"""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

from facetool.pipeline.errors import FacetoolError
from facetool.pipeline.shards.format import (
    IMAGE_EXTS,
    LABEL_EXT,
    MASK_EXT,
    index_sample_lines,
    parse_index_header,
    parse_index_line,
    read_manifest,
)

#: Above this q / f most of the samples that have a rendered twin are shown masked in most epochs (the same faces
#: masked every epoch), where FaceT picks each image's masked version afresh every epoch from masks rendered for
#: the whole set (zyainfal/Joint-Holistic-and-Masked-Face-Recognition code/data/data_pipe.py L23-38 @
#: 3126602be561ffe114ca9a8244cfef348db13c6b): convert with --mask-fraction 1 for that.
MASK_REUSE_LIMIT = 0.5


class MaskReuseWarning(UserWarning):
    """``masked_prob`` is large against the shards' rendered-mask fraction: the same faces are masked every epoch."""


@dataclass(frozen=True)
class Shard:
    """One tar shard and its DALI index, with the manifest's counts."""

    tar: Path
    index: Path
    samples: int
    masked: int


@dataclass(frozen=True)
class ShardSet:
    """The shards of one conversion, in manifest order (the order DALI concatenates them in)."""

    root: Path
    shards: tuple[Shard, ...]
    classes: int
    manifest: dict

    @property
    def samples(self) -> int:
        return sum(s.samples for s in self.shards)

    @property
    def masked(self) -> int:
        return sum(s.masked for s in self.shards)

    @property
    def rendered_fraction(self) -> float:
        """The share of samples that have a pre-rendered masked twin (``mask.jpg``)."""
        return self.masked / self.samples if self.samples else 0.0

    def mask_pick_probability(self, masked_prob: float) -> float:
        """Probability of showing a sample *that has a twin* masked, so that a share ``masked_prob`` (q) of all
        samples is shown masked; an error when the shards hold too few twins for q."""
        if masked_prob <= 0.0:
            return 0.0
        f = self.rendered_fraction
        if masked_prob > f + 1e-12:
            arg = self.manifest.get("arguments", {}).get("mask_fraction")
            hint = f" (converted with mask_fraction {arg})" if arg is not None else ""
            raise FacetoolError(
                f"{self.root}: masked_prob {masked_prob} exceeds the share of samples with a rendered mask, "
                f"{f:.4f} ({self.masked} of {self.samples}){hint}; lower masked_prob or convert with "
                f"--mask-fraction >= {masked_prob}"
            )
        return min(1.0, masked_prob / f)

    def mask_reuse_note(self, masked_prob: float) -> str | None:
        """The warning for ``masked_prob`` (q) when q / f exceeds :data:`MASK_REUSE_LIMIT` (f: the share of samples
        with a rendered twin, from the manifest), naming the numbers; None otherwise (and for q > f, which
        :meth:`mask_pick_probability` refuses)."""
        f = self.rendered_fraction
        if masked_prob <= 0.0 or masked_prob > f + 1e-12 or masked_prob / f <= MASK_REUSE_LIMIT:
            return None
        arg = self.manifest.get("arguments", {}).get("mask_fraction")
        converted = f", converted with --mask-fraction {arg}" if arg is not None else ""
        return (
            f"{self.root}: masked_prob q = {masked_prob} with a rendered mask for f = {f:.4f} of the samples "
            f"({self.masked} of {self.samples}{converted}): q / f = {masked_prob / f:.2f} > {MASK_REUSE_LIMIT}, so "
            "mostly the same faces are shown masked every epoch; for a masked version picked per image and epoch "
            "(FaceT) convert with --mask-fraction 1"
        )


def warn_mask_reuse(shards: ShardSet, masked_prob: float, rank: int) -> None:
    """Issue :meth:`ShardSet.mask_reuse_note` as a :class:`MaskReuseWarning`, on rank 0 only (once per run: every
    rank reads the same shards); the loaders call it once, when they are built."""
    note = shards.mask_reuse_note(masked_prob) if rank == 0 else None
    if note is not None:
        warnings.warn(note, MaskReuseWarning, stacklevel=3)


def open_shards(path: str | os.PathLike, check: bool = True) -> ShardSet:
    """Load ``manifest.json`` of a shard folder (checked against the format by ``read_manifest``: types, counts,
    shard names inside the folder) and (unless ``check=False``) check every shard against it."""
    root = Path(path)
    manifest = read_manifest(root)
    if manifest["part"]["count"] != 1:
        raise FacetoolError(f"{root}: holds one part of a cluster conversion; run `facetool merge-parts` first")
    shards = []
    for entry in manifest["shards"]:
        tar = root / entry["name"]
        shards.append(Shard(tar=tar, index=root / entry["index"], samples=entry["samples"], masked=entry["masked"]))
        if check:
            check_shard(shards[-1], expected_bytes=entry["bytes"])
    if not shards or sum(s.samples for s in shards) == 0:
        raise FacetoolError(f"{root}: the manifest lists no samples")
    return ShardSet(root=root, shards=tuple(shards), classes=manifest["source"]["classes"], manifest=manifest)


def _count_ext(text: bytes, ext: str) -> int:
    """How many members with extension ``ext`` an index lists (as a field of its own: ``ext OFFSET SIZE NAME``)."""
    token = ext.encode() + b" "
    return text.count(b"\n" + token) + text.count(b" " + token)


def check_shard(shard: Shard, expected_bytes: int | None = None) -> None:
    """Check one shard's tar and index against each other and the manifest; raise FacetoolError naming it."""
    if not shard.tar.is_file():
        raise FacetoolError(f"{shard.tar}: shard listed in the manifest is missing")
    if not shard.index.is_file():
        raise FacetoolError(
            f"{shard.index}: DALI index of {shard.tar.name} is missing (re-run `facetool convert`, or rebuild it "
            f"with `wds2idx {shard.tar.name} {shard.index.name}`)"
        )
    try:
        text = shard.index.read_bytes()
    except OSError as err:
        raise FacetoolError(f"{shard.index}: cannot read ({err.strerror})") from None
    n = parse_index_header(text)
    if n is None:
        raise FacetoolError(f"{shard.index}: not a DALI webdataset index (first line must be 'v1.2 N')")
    lines = text.count(b"\n") - 1
    if n != shard.samples or lines != n:
        raise FacetoolError(
            f"{shard.index}: lists {lines} samples (header says {n}) but the manifest says {shard.tar.name} "
            f"holds {shard.samples}"
        )
    images = sum(_count_ext(text, e) for e in IMAGE_EXTS)
    labels = _count_ext(text, LABEL_EXT)
    if images != n or labels != n:
        _find_incomplete_sample(shard, text)
    masks = _count_ext(text, MASK_EXT)
    if masks != shard.masked:
        raise FacetoolError(
            f"{shard.index}: lists {masks} {MASK_EXT} members but the manifest says {shard.tar.name} has "
            f"{shard.masked} masked samples"
        )
    size = shard.tar.stat().st_size
    end, name = _last_member_end(shard, text)
    if end > size:
        raise FacetoolError(
            f"{shard.tar}: truncated: {size} bytes, but member {name} ends at byte {end} (its index says so); "
            "the shard was cut short, re-copy or re-convert it"
        )
    if expected_bytes is not None and size != int(expected_bytes):
        raise FacetoolError(f"{shard.tar}: {size} bytes, the manifest says {expected_bytes}; the shard was altered")
    # DALI sizes its buffers by the index: no offset or size may have more digits than the tar's size (one scan)
    huge = re.search(rb"(?<= )[0-9]{%d,}(?=[ \n])" % (len(str(size)) + 1), text)
    if huge is not None:
        raise FacetoolError(
            f"{shard.index}: lists an offset or size of {huge.group().decode()} bytes in {shard.tar.name} of {size} "
            "bytes; the index is damaged, rebuild it with wds2idx or re-convert"
        )


def _last_member_end(shard: Shard, text: bytes) -> tuple[int, str]:
    """Where the last sample's members end, and the member that ends last."""
    last = text.rstrip(b"\n").rsplit(b"\n", 1)[-1]
    try:
        members = parse_index_line(last)
    except ValueError:
        raise FacetoolError(f"{shard.index}: malformed last line {last.decode(errors='replace')!r}") from None
    return max((m.offset + m.size, m.name) for m in members)


def _find_incomplete_sample(shard: Shard, text: bytes) -> None:
    """Slow path, only on error: name the first sample that lacks an image or a label (or has two)."""
    for i, line in enumerate(index_sample_lines(text)):
        try:
            members = parse_index_line(line)
        except ValueError:
            raise FacetoolError(f"{shard.index}: malformed line {i + 2} {line.decode(errors='replace')!r}") from None
        exts = [m.ext for m in members]
        key = members[0].key if members else f"#{i}"
        n_images = sum(e in IMAGE_EXTS for e in exts)
        if exts.count(LABEL_EXT) != 1:
            what = "has no label" if LABEL_EXT not in exts else "has more than one label"
            raise FacetoolError(f"{shard.tar}: sample {key} (#{i} in the shard) {what} member ({LABEL_EXT})")
        if n_images != 1:
            what = "has no image" if n_images == 0 else "has more than one image"
            raise FacetoolError(f"{shard.tar}: sample {key} (#{i} in the shard) {what} member (jpg or png)")
    raise FacetoolError(f"{shard.index}: the image and label member counts do not match the sample count")

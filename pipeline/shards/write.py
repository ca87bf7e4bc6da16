"""Writing one shard: its tar (under ``shard-N.tar.tmp``), DALI index and stats, the tar published last.

Plain JPEG records with scalar labels (nearly all of a real dataset) take a vectorised path (``PlainLayout``):
their tar headers, label members and index lines are built with numpy a block of records at a time, leaving two
zero-copy slices per record in Python. Masked twins are spliced into that layout after their labels. Every other
record goes through the checked per-record path, which also produces the error messages.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

from facetool.pipeline.atomic import atomic_path
from facetool.pipeline.recordio import RecordFile, RecordIOError, image_extension
from facetool.pipeline.shards.format import (
    BLOCK,
    JPEG_EXT,
    LABEL_EXT,
    MASK_EXT,
    META_EXT,
    ShardStats,
    publish,
    shard_name,
)
from facetool.pipeline.shards.plan import ConvertJob, MaskPlan
from facetool.pipeline.shards.state import save_stats
from facetool.pipeline.shards.tar import (
    ZEROS,
    ShardWriter,
    ascii_rows,
    key_digits,
    plain_index_lines,
    tar_header,
    tar_headers,
)

FAST_BLOCK = 256  # records per chunk on the plain-JPEG path (~1 MB of 112x112 faces)
_GAP = (BLOCK - 1) + 3 * BLOCK  # the bytes before image i: image i-1's padding, label header and block, i's header


@dataclass
class _Shard:
    """One shard being written: the job, the reader, the writer, its records, progress and skipped records."""

    job: ConvertJob
    reader: RecordFile
    writer: ShardWriter
    keys: np.ndarray
    offsets: np.ndarray
    masked: np.ndarray | None  # which records get a twin; None: none does
    tick: Callable[[int], None]
    skipped: list[dict] = field(default_factory=list)


def write_shard(job: ConvertJob, shard: int, reader: RecordFile, tick: Callable[[int], None]) -> ShardStats:
    """Write one shard (tar, DALI index, stats) under temporary names, then publish them, tar last, so a tar under
    its final name is always complete; ``tick(n)`` reports records processed."""
    name = shard_name(shard)
    tar_path = job.out / f"{name}.tar"
    positions = job.positions(shard)
    keys = np.asarray(reader.keys[positions], dtype=np.int64)  # the index's compact dtypes, widened for a shard
    offsets = np.asarray(reader.offsets[positions], dtype=np.int64)
    with atomic_path(tar_path, tmp=tar_path.with_name(tar_path.name + ".tmp")) as tmp:
        writer = ShardWriter(tmp)
        state = _Shard(job, reader, writer, keys, offsets, _select_masked(keys, job.masks), tick)
        try:
            max_label, num_masked = _write_samples(state)
            size, digest = writer.finish()
        except BaseException:
            writer.abort()
            raise
        stats = ShardStats(
            f"{name}.tar",
            f"{name}.idx",
            writer.samples,
            num_masked,
            size,
            digest,
            max_label,
            state.skipped,
            job.plan_id,
        )
        publish(job.out / f"{name}.idx", writer.index_bytes())
        save_stats(job, shard, stats)
    return stats


def _select_masked(keys: np.ndarray, masks: MaskPlan | None) -> np.ndarray | None:
    if masks is None:
        return None
    from facetool.pipeline.masks import select_masked

    masked = select_masked(keys, masks.fraction, masks.seed)
    return masked if masked.any() else None


def _write_samples(shard: _Shard) -> tuple[int, int]:
    """Write every record of the shard by the fastest path that applies; returns (largest label, twins written)."""
    reader, keys = shard.reader, shard.keys
    ok, starts, lengths, labels = reader.simple_jpegs(shard.offsets)
    with np.errstate(invalid="ignore"):
        ok &= np.isfinite(labels) & (labels >= 0) & (labels < (shard.job.num_classes or 2**31 - 1)) & (keys < 10**9)
    if not ok.all():
        return _write_checked(shard)
    classes = labels.astype(np.int32)
    layout = PlainLayout(shard.writer, reader.view)
    if shard.masked is None:
        layout.write(keys, starts, lengths, classes, tick=shard.tick)
        return int(classes.max()), 0
    return _write_plain_with_twins(shard, layout, starts, lengths, classes)


# the plain-JPEG layout
class _Run(NamedTuple):
    """The per-record arrays of one ``PlainLayout.write`` call."""

    image_names: np.ndarray  # (n, 13) ASCII ``KEY.jpg``
    label_names: np.ndarray  # (n, 19) ASCII ``KEY.label.i32``
    label_bytes: np.ndarray  # (n, 4) the int32 labels
    glue_start: np.ndarray  # (n + 1,) where gap i's bytes start in its glue row
    glue_end: np.ndarray  # (n + 1,) and where they end
    lengths: np.ndarray
    starts: list[int]  # the images' bytes in the source view
    ends: list[int]
    twins: list[bytes | None] | None


class PlainLayout:
    """Lays out plain-JPEG samples (image, label, optional twin) with numpy, byte for byte as ``add_sample`` would.

    The bytes in the gap before image ``i`` (image ``i-1``'s padding, its label member and twin, image ``i``'s
    header) are built a block of records at a time, as one "glue" row per gap in a reused buffer, so the
    per-record work left in Python is two zero-copy slices."""

    def __init__(self, writer: ShardWriter, view: memoryview) -> None:
        self.writer, self.view = writer, view
        self.glue = np.zeros((FAST_BLOCK + 1, _GAP), dtype=np.uint8)  # only header and label bytes ever change
        self.flat = memoryview(self.glue.reshape(-1))

    def write(
        self,
        keys: np.ndarray,
        starts: np.ndarray,
        lengths: np.ndarray,
        classes: np.ndarray,
        twins: list[bytes | None] | None = None,
        tick: Callable[[int], None] | None = None,
    ) -> None:
        """Append the samples whose images lie at ``view[starts:starts+lengths]``; ``twins[i]``, when given and
        not None, is sample i's masked twin. ``tick(n)`` after each block."""
        n = keys.size
        pads = -lengths % BLOCK
        image_names = np.concatenate([key_digits(keys), ascii_rows(f".{JPEG_EXT}", n)], axis=1)
        glue_start = np.concatenate([[_GAP - BLOCK], BLOCK - 1 - pads])  # gap 0 is a header alone
        glue_end = np.full(n + 1, _GAP)
        glue_end[n] -= BLOCK  # the gap after the last image has no header
        gap_bytes = glue_end - glue_start
        if twins is not None:
            twin_len = np.array([len(t) if t is not None else 0 for t in twins], dtype=np.int64)
            has = np.array([t is not None for t in twins])
            gap_bytes = gap_bytes + np.concatenate([[0], np.where(has, BLOCK + twin_len + (-twin_len % BLOCK), 0)])
        image_pos = self.writer.pos + np.cumsum(gap_bytes)[:n] + np.concatenate([[0], np.cumsum(lengths)[:-1]])
        label_pos = image_pos + lengths + pads + BLOCK
        twin_lines = (has, label_pos + 2 * BLOCK, twin_len) if twins is not None else None
        self.writer.add_index_lines(plain_index_lines(image_names, image_pos, lengths, label_pos, twin_lines), n)

        label_names = np.concatenate([image_names[:, :9], ascii_rows(f".{LABEL_EXT}", n)], axis=1)
        label_bytes = classes.astype("<i4").view(np.uint8).reshape(n, 4)
        ends = (starts + lengths).tolist()
        run = _Run(image_names, label_names, label_bytes, glue_start, glue_end, lengths, starts.tolist(), ends, twins)
        for first in range(0, n, FAST_BLOCK):
            last = min(first + FAST_BLOCK, n)
            self._block(run, first, last)
            if tick is not None:
                tick(last - first)

    def _block(self, run: _Run, first: int, last: int) -> None:
        """Write images ``first:last`` and the gap before each (and the closing gap when ``last`` ends the run)."""
        n = run.lengths.size
        gaps = np.arange(first, last + (last == n))  # the gap before each image, and the closing one
        heads, tails = gaps[gaps < n], gaps[gaps > 0]
        glue = self.glue
        glue[heads - first, _GAP - BLOCK :] = tar_headers(run.image_names[heads], run.lengths[heads])
        glue[tails - first, BLOCK - 1 : 2 * BLOCK - 1] = tar_headers(run.label_names[tails - 1], np.full(tails.size, 4))
        glue[tails - first, 2 * BLOCK - 1 : 2 * BLOCK + 3] = run.label_bytes[tails - 1]
        rows = (gaps - first) * _GAP
        glue_from, glue_to = (rows + run.glue_start[gaps]).tolist(), (rows + run.glue_end[gaps]).tolist()
        flat, view = self.flat, self.view
        parts: list[bytes | memoryview] = [flat] * (2 * (last - first) + (last == n))
        parts[0::2] = [flat[a:b] for a, b in zip(glue_from, glue_to, strict=True)]
        parts[1::2] = [view[a:b] for a, b in zip(run.starts[first:last], run.ends[first:last], strict=True)]
        if run.twins is not None:
            for j, g in reversed(list(enumerate(gaps.tolist()))):  # back to front: earlier part numbers hold
                twin = run.twins[g - 1] if g > 0 else None
                if twin is not None:  # sample g-1's twin goes between its label and image g's header
                    split = int(rows[j]) + _GAP - BLOCK
                    header = tar_header(run.image_names[g - 1, :9].tobytes() + f".{MASK_EXT}".encode(), len(twin))
                    pieces = (flat[glue_from[j] : split], header, twin, ZEROS[: -len(twin) % BLOCK])
                    parts[2 * j : 2 * j + 1] = [*pieces, flat[split : glue_to[j]]]
        self.writer.write_parts(parts)


def _write_plain_with_twins(
    shard: _Shard, layout: PlainLayout, starts: np.ndarray, lengths: np.ndarray, classes: np.ndarray
) -> tuple[int, int]:
    """The plain path for a shard where the ``masked`` samples also get a twin (``mask.jpg``, after the label); a
    block of records at a time: render the block's twins, then lay it out. Returns (largest label, twins)."""
    keys, view = shard.keys, shard.reader.view
    max_label, num_masked = -1, 0
    for first in range(0, keys.size, FAST_BLOCK):
        last = min(first + FAST_BLOCK, keys.size)
        kept, twins = [], []
        for i in range(first, last):
            twin = None
            if shard.masked[i]:
                key = int(keys[i])
                try:
                    twin = _render_twin(shard, key, view[int(starts[i]) : int(starts[i] + lengths[i])])
                except RecordIOError as err:
                    if shard.job.options.on_error != "skip":
                        raise
                    shard.skipped.append({"key": key, "error": str(err)})
                    continue
            kept.append(i)
            twins.append(twin)
        shard.tick(last - first)
        if kept:
            b = np.array(kept)
            layout.write(keys[b], starts[b], lengths[b], classes[b], twins)
            max_label = max(max_label, int(classes[b].max()))
            num_masked += sum(t is not None for t in twins)
    return max_label, num_masked


def _render_twin(shard: _Shard, key: int, image: bytes | memoryview) -> bytes:
    from facetool.pipeline.masks import MaskError, mask_jpeg

    masks = shard.job.masks
    try:
        return mask_jpeg(image, masks.seed, key, weights=masks.weights)
    except MaskError as err:
        raise RecordIOError(f"{shard.reader.where(key)}: cannot render its masked twin: {err}") from None


# the checked path
def sample_members(
    key: int, labels: tuple[float, ...], image: bytes | memoryview, num_classes: int | None, rec_path: Path
) -> list[tuple[str, bytes | memoryview]]:
    """The members of one sample, sorted by extension: original image bytes, int32 label, and the full label
    vector (``json``) when the record has one (the checked path adds the masked twin)."""
    ext = image_extension(image)
    if ext is None:
        what = "no image bytes" if not len(image) else "image bytes are neither JPEG nor PNG"
        raise RecordIOError(f"{rec_path}: record {key}: {what}")
    if not math.isfinite(labels[0]):
        raise RecordIOError(f"{rec_path}: record {key}: label {labels[0]} is not a number")
    cls = int(labels[0])
    if cls < 0 or cls > 2**31 - 1 or (num_classes is not None and cls >= num_classes):
        raise RecordIOError(f"{rec_path}: record {key}: label {cls} outside [0, {num_classes}) given by property")
    label = struct.pack("<i", cls)
    if len(labels) == 1:
        return [(ext, image), (LABEL_EXT, label)] if ext == JPEG_EXT else [(LABEL_EXT, label), (ext, image)]
    meta = json.dumps({"label": [float(v) for v in labels]}, separators=(",", ":")).encode()
    return sorted([(ext, image), (LABEL_EXT, label), (META_EXT, meta)], key=lambda m: m[0])


def _write_checked(shard: _Shard) -> tuple[int, int]:
    """Write a shard record by record with every check (PNGs, vector labels, split records, bad records), adding
    the masked twins; returns (largest label, twins written). Errors name the file, record and offset;
    ``on_error="skip"`` collects them in ``shard.skipped`` instead of raising."""
    reader, masked = shard.reader, shard.masked
    max_label, num_masked, pending = -1, 0, 0
    every = 64 if masked is not None else 512
    for i, (key, offset) in enumerate(zip(shard.keys.tolist(), shard.offsets.tolist(), strict=True)):
        try:
            labels, image = reader.read_at(key, offset)
            members = sample_members(key, labels, image, shard.job.num_classes, reader.path)
            twin = _render_twin(shard, key, image) if masked is not None and masked[i] else None
            if twin is not None:
                members = sorted([*members, (MASK_EXT, twin)], key=lambda m: m[0])
        except RecordIOError as err:
            if shard.job.options.on_error != "skip":
                raise
            shard.skipped.append({"key": key, "error": str(err)})
        else:
            shard.writer.add_sample(f"{key:09d}", members)
            max_label = max(max_label, int(labels[0]))
            num_masked += twin is not None
        pending += 1
        if pending == every:
            shard.tick(pending)
            pending = 0
    shard.tick(pending)
    return max_label, num_masked

"""RecordIO -> WebDataset tar shards (format v1, see docs/FORMAT.md): shuffled, indexed, parallel, resumable.

The plan is a pure function of (record count, seed, samples per shard): shard ``s`` holds the records at positions
``perm[s*S:(s+1)*S]`` of a seeded permutation, so shards can be written in any order, by any number of processes
or cluster jobs (``part``), and a re-run after a kill writes exactly the bytes an uninterrupted run would have.
Each shard is written under a temporary name and renamed; the tar is renamed last, so a shard under its final name
is always complete.
"""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing as mp
import os
import struct
import sys
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, Future, ProcessPoolExecutor, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from facetool import __version__
from facetool.pipeline import DEFAULT_SAMPLES_PER_SHARD
from facetool.pipeline.errors import FacetoolError
from facetool.pipeline.recordio import RecordFile, RecordIOError, image_extension, read_property

FORMAT_NAME = "facetool-shards"
FORMAT_VERSION = 1
LABEL_EXT = "label.i32"
MASK_EXT = "mask.jpg"
STATE_DIR = ".facetool-convert"
_BLOCK = 512
_RECORD_SIZE = 20 * _BLOCK  # tar's record size: archives end on a multiple of it, as GNU tar and tarfile write
_TAR_MTIME = 0
_TAR_MODE = 0o444
_ZEROS = bytes(_BLOCK)
_FLUSH_BYTES = 1 << 20  # hash and write in chunks that stay in the CPU cache between the two
_FAST_BLOCK = 256  # records per chunk on the plain-JPEG path (~1 MB of 112x112 faces)
_WRITEBACK_WINDOW = 16 << 20  # how far behind the newest chunk written pages are dropped from the page cache
_fadvise = getattr(os, "posix_fadvise", None)  # Linux and most Unixes; absent on macOS and Windows


# ---------------------------------------------------------------------------------------------------------------
# tar members, written without tarfile (it costs ~10 us a member; these headers cost ~1 us)
# ---------------------------------------------------------------------------------------------------------------
def _header_template() -> tuple[bytes, int]:
    """The fixed fields of our ustar headers, and their byte sum (the checksum counts it as 8 spaces)."""
    header = bytearray(_BLOCK)
    header[100:108] = b"%07o\0" % _TAR_MODE
    header[108:116] = b"0000000\0"  # uid
    header[116:124] = b"0000000\0"  # gid
    header[136:148] = b"%011o\0" % _TAR_MTIME
    header[148:156] = b"        "  # checksum placeholder
    header[156:157] = b"0"  # regular file
    header[257:265] = b"ustar\x0000"
    # uname/gname empty, devmajor/devminor NUL for regular files, as tarfile leaves them
    return bytes(header), sum(header)


_HEADER, _HEADER_SUM = _header_template()


def _tar_header(name: bytes, size: int) -> bytes:
    """A ustar header for a regular file, byte-identical to ``tarfile.TarInfo.tobuf(USTAR_FORMAT)`` with our fields."""
    if len(name) > 100:
        raise ValueError(f"member name too long for ustar: {name!r}")
    size_field = b"%011o\0" % size
    checksum = _HEADER_SUM + sum(name) + sum(size_field)
    return b"".join(
        (name, _HEADER[len(name) : 124], size_field, _HEADER[136:148], b"%06o\0 " % checksum, _HEADER[156:])
    )


def _octal_digits(values: np.ndarray, width: int) -> np.ndarray:
    """ASCII octal digits of each value, zero-padded to ``width`` (vectorised ``b"%0*o" % v``)."""
    return (((values[:, None] >> (3 * np.arange(width - 1, -1, -1))) & 7) + ord("0")).astype(np.uint8)


def _tar_headers(names: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """``_tar_header`` for many members at once: names (n, L) uint8 ASCII, sizes (n,) -> (n, 512) uint8."""
    n, width = names.shape
    headers = np.empty((n, _BLOCK), dtype=np.uint8)
    headers[:] = np.frombuffer(_HEADER, dtype=np.uint8)
    headers[:, :width] = names
    size_digits = _octal_digits(sizes.astype(np.int64), 11)
    headers[:, 124:135] = size_digits
    checksum = _HEADER_SUM + names.sum(axis=1, dtype=np.int64) + size_digits.sum(axis=1, dtype=np.int64)
    headers[:, 148:154] = _octal_digits(checksum, 6)
    headers[:, 154] = 0
    headers[:, 155] = ord(" ")
    return headers


def _key_digits(keys: np.ndarray) -> np.ndarray:
    """The 9-digit zero-padded sample keys as (n, 9) ASCII."""
    return ((keys[:, None] // 10 ** np.arange(8, -1, -1)) % 10 + ord("0")).astype(np.uint8)


def _ascii(text: str, n: int) -> np.ndarray:
    return np.broadcast_to(np.frombuffer(text.encode(), dtype=np.uint8), (n, len(text)))


def _decimal(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ASCII decimal digits of non-negative values, right-aligned in as many columns as the largest needs, and
    which of them to keep (each number without its leading zeros)."""
    width = len(str(int(values.max()))) if values.size else 1
    digits = (values[:, None] // 10 ** np.arange(width - 1, -1, -1, dtype=np.int64)) % 10
    keep = np.logical_or.accumulate(digits != 0, axis=1)
    keep[:, -1] = True
    return digits.astype(np.uint8) + ord("0"), keep


def _plain_index_lines(
    image_names: np.ndarray,
    image_pos: np.ndarray,
    lengths: np.ndarray,
    label_pos: np.ndarray,
    twins: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
) -> bytes:
    """The DALI index lines (``jpg POS SIZE KEY.jpg label.i32 POS 4 KEY.label.i32``) of plain-JPEG samples, all
    at once: laid out in fixed-width columns, then the numbers' leading zeros are dropped. ``twins`` = (which
    samples have one, positions, sizes) adds ``mask.jpg POS SIZE KEY.mask.jpg`` to those lines."""
    n = image_names.shape[0]
    fixed = np.ones(1, dtype=bool)
    columns = [
        (_ascii("jpg ", n), fixed),
        _decimal(image_pos),
        (_ascii(" ", n), fixed),
        _decimal(lengths),
        (_ascii(" ", n), fixed),
        (image_names, fixed),
        (_ascii(" label.i32 ", n), fixed),
        _decimal(label_pos),
        (_ascii(" 4 ", n), fixed),
        (image_names[:, :9], fixed),
        (_ascii(".label.i32", n), fixed),
    ]
    if twins is not None:
        has, twin_pos, twin_len = twins[0][:, None], twins[1], twins[2]
        (pos, pos_keep), (size, size_keep) = _decimal(twin_pos), _decimal(twin_len)
        columns += [
            (_ascii(" mask.jpg ", n), has),
            (pos, pos_keep & has),
            (_ascii(" ", n), has),
            (size, size_keep & has),
            (_ascii(" ", n), has),
            (image_names[:, :9], has),
            (_ascii(".mask.jpg", n), has),
        ]
    columns.append((_ascii("\n", n), fixed))
    chars = np.concatenate([c for c, _ in columns], axis=1)
    keep = np.concatenate([np.broadcast_to(k, c.shape) for c, k in columns], axis=1)
    return chars[keep].tobytes()


class _ShardWriter:
    """Streams members into one tar, hashing as it goes and collecting the DALI index (wds2idx v1.2)."""

    def __init__(self, path: Path) -> None:
        self._f = open(path, "wb")
        self._hash = hashlib.sha256()
        self.parts: list[bytes | memoryview] = []
        self.pos = 0
        self._flushed = 0
        self.index: list[bytes] = []  # DALI index lines, newline-terminated (a sample's, or a block of them)
        self.samples = 0
        # hashing and writing release the GIL: one thread does them while the caller builds the next chunk
        self._io = ThreadPoolExecutor(1, thread_name_prefix="shard-io")
        self._pending: Future | None = None

    def add_sample(self, key: str, members: list[tuple[str, bytes | memoryview]]) -> None:
        """Append one sample's members (adjacent, in the given order) and its index line."""
        pos, entries = self.pos, []
        for ext, data in members:
            name = f"{key}.{ext}"
            size = len(data)
            pad = -size % _BLOCK
            self.parts += (_tar_header(name.encode(), size), data, _ZEROS[:pad])
            entries.append(f"{ext} {pos + _BLOCK} {size} {name}")
            pos += _BLOCK + size + pad
        self.pos = pos
        self.index.append((" ".join(entries) + "\n").encode())
        self.samples += 1
        self.maybe_flush()

    def maybe_flush(self) -> None:
        """Hash and write what has accumulated once it reaches a few MB."""
        if self.pos - self._flushed >= _FLUSH_BYTES:
            self._flush()

    def _flush(self) -> None:
        self.write_chunk(self.parts)
        self.parts.clear()

    def write_chunk(self, parts: list[bytes | memoryview]) -> None:
        """Hash and write ``parts`` (which must end where ``self.pos`` says) in the background, in order."""
        chunk = b"".join(parts)
        self._drain()
        self._pending = self._io.submit(self._store, chunk, self._flushed)
        self._flushed += len(chunk)

    def _drain(self) -> None:
        """Wait for the chunk in flight (raising its error, if any)."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def _store(self, chunk: bytes, offset: int) -> None:
        self._hash.update(chunk)
        self._f.write(chunk)
        end = offset + len(chunk)
        if _fadvise is not None:
            # Shards are written once and read much later, so stream them out instead of filling the page cache
            # (as ``dd oflag=nocache`` does): DONTNEED starts the write-back of the newest chunk, so it overlaps our
            # CPU work and the closing fsync finds little left, and drops the pages of the last few MB that have
            # reached the disk, so a long convert recycles a little memory instead of evicting the whole cache.
            self._f.flush()
            start = max(0, offset - _WRITEBACK_WINDOW)
            _fadvise(self._f.fileno(), start, end - start, os.POSIX_FADV_DONTNEED)

    def finish(self) -> tuple[int, str]:
        """Close the archive (two zero blocks, padded to tar's record size); returns (bytes, sha256)."""
        end = self.pos + 2 * _BLOCK
        end += -end % _RECORD_SIZE
        self.parts.append(bytes(end - self.pos))
        self.pos = end
        self._flush()
        self._drain()
        self._io.shutdown()
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        return self.pos, self._hash.hexdigest()

    def abort(self) -> None:
        self._io.shutdown(wait=True, cancel_futures=True)
        self._f.close()

    def index_bytes(self) -> bytes:
        """The DALI index, as ``wds2idx`` writes it."""
        return b"v1.2 %d\n" % self.samples + b"".join(self.index)


# ---------------------------------------------------------------------------------------------------------------
# the plan
# ---------------------------------------------------------------------------------------------------------------
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


def shard_name(i: int) -> str:
    return f"shard-{i:06d}"


def plan_permutation(num_records: int, seed: int, shuffle: bool) -> np.ndarray:
    """Positions of the image records in write order: a seeded global permutation (or identity order)."""
    if not shuffle:
        return np.arange(num_records, dtype=np.int64)
    return np.random.default_rng(seed).permutation(num_records).astype(np.int64)


def part_shards(num_shards: int, part: tuple[int, int]) -> range:
    """The contiguous block of shard numbers that job ``I`` of ``N`` writes."""
    i, n = part
    return range(num_shards * i // n, num_shards * (i + 1) // n)


@dataclass
class ShardStats:
    """What the manifest says of one finished shard."""

    name: str
    index: str
    samples: int
    masked: int
    bytes: int
    sha256: str
    max_label: int = -1
    skipped: list[dict] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------------------
# one shard (runs in a worker process)
# ---------------------------------------------------------------------------------------------------------------
_WORKER: dict = {}


def _init_worker(reader: RecordFile | None, source: Source, counter, num_classes: int | None) -> None:
    """Process-pool initializer: reuse the parent's mapped reader after fork, or open our own after spawn."""
    _WORKER["reader"] = reader if reader is not None else RecordFile(source.rec, source.idx)
    _WORKER["num_classes"] = num_classes

    _WORKER["tick"] = lambda n: _increment(counter, n)


def _sample_members(
    key: int, labels: tuple[float, ...], image: bytes | memoryview, num_classes: int | None, rec_path: Path
) -> list[tuple[str, bytes | memoryview]]:
    """The members of one sample, sorted by extension: original image bytes, int32 label, and the full label
    vector (``json``) when the record has one (``_write_checked`` adds the masked twin)."""
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
        return [(ext, image), (LABEL_EXT, label)] if ext == "jpg" else [(LABEL_EXT, label), (ext, image)]
    meta = json.dumps({"label": [float(v) for v in labels]}, separators=(",", ":")).encode()
    return sorted([(ext, image), (LABEL_EXT, label), ("json", meta)], key=lambda m: m[0])


@dataclass(frozen=True)
class MaskPlan:
    """Which samples get a masked twin and how it is drawn (see ``facetool.pipeline.masks``)."""

    fraction: float
    seed: int
    weights: dict[str, float]


def write_shard(
    out: Path, shard: int, positions: np.ndarray, on_error: str, masks: MaskPlan | None = None
) -> ShardStats:
    """Write one shard (tar, DALI index, stats) under temporary names, then publish it, tar last.

    Plain JPEG records with scalar labels (nearly all of a real dataset) take a vectorised path: their tar headers
    and label members are built for the whole shard with numpy, leaving list appends in the per-record loop.
    With masks, the runs of such records between masked samples still take that path. Every other record goes
    through the checked per-record path, which also produces the error messages.
    """
    reader: RecordFile = _WORKER["reader"]
    tick = _WORKER["tick"]
    num_classes = _WORKER["num_classes"]
    name = shard_name(shard)
    tar_path, idx_path = out / f"{name}.tar", out / f"{name}.idx"
    stats_path = out / STATE_DIR / f"{name}.json"
    tmp_tar, tmp_idx = tar_path.with_name(tar_path.name + ".tmp"), idx_path.with_name(idx_path.name + ".tmp")
    writer = _ShardWriter(tmp_tar)
    skipped: list[dict] = []
    try:
        keys, offsets = reader.keys[positions], reader.offsets[positions]
        masked = None
        if masks is not None:
            from facetool.pipeline.masks import select_masked

            masked = select_masked(keys, masks.fraction, masks.seed)
            if not masked.any():
                masked = None
        ok, starts, lengths, labels = reader.simple_jpegs(offsets)
        with np.errstate(invalid="ignore"):
            ok &= np.isfinite(labels) & (labels >= 0) & (labels < (num_classes or 2**31 - 1)) & (keys < 10**9)
        if ok.all() and masked is None:
            classes = labels.astype(np.int32)
            _write_plain_jpegs(writer, reader.view, keys, starts, lengths, classes, tick)
            max_label = int(classes.max())
            num_masked = 0
        elif ok.all():
            classes = labels.astype(np.int32)
            max_label, num_masked = _write_plain_jpegs_with_twins(
                writer, reader, keys, starts, lengths, classes, masked, masks, on_error, skipped, tick
            )
        else:
            max_label, num_masked = _write_checked(
                writer, reader, keys, offsets, num_classes, on_error, skipped, tick, masked, masks
            )
        size, digest = writer.finish()
    except BaseException:
        writer.abort()
        tmp_tar.unlink(missing_ok=True)
        raise
    stats = ShardStats(f"{name}.tar", f"{name}.idx", writer.samples, num_masked, size, digest, max_label, skipped)
    _atomic_write(tmp_idx, writer.index_bytes(), final=idx_path)
    _atomic_write(stats_path.with_name(stats_path.name + ".tmp"), json.dumps(asdict(stats)), final=stats_path)
    os.replace(tmp_tar, tar_path)
    return stats


def _write_plain_jpegs(
    writer: _ShardWriter,
    view: memoryview,
    keys: np.ndarray,
    starts: np.ndarray,
    lengths: np.ndarray,
    classes: np.ndarray,
    tick: Callable[[int], None],
) -> None:
    """Write a shard whose records are all plain JPEGs with scalar labels (nearly every shard of a real dataset).

    The bytes in the gap before image ``i`` (image ``i-1``'s padding and label member, image ``i``'s header) are
    built with numpy, a block of records at a time, as one "glue" row per gap, so the per-record work left in
    Python is two zero-copy slices. The tar is the same as ``add_sample`` writes, byte for byte.
    """
    n = keys.size
    pads = -lengths % _BLOCK
    image_names = np.concatenate([_key_digits(keys), _ascii(".jpg", n)], axis=1)
    label_names = np.concatenate([image_names[:, :9], _ascii("." + LABEL_EXT, n)], axis=1)
    # gap i: padding of image i-1 (up to 511 bytes), its label header and label block, image i's header
    width = (_BLOCK - 1) + 3 * _BLOCK
    glue_start = np.concatenate([[width - _BLOCK], _BLOCK - 1 - pads])  # gap 0 is a header alone
    glue_end = np.full(n + 1, width)
    glue_end[n] -= _BLOCK  # the gap after the last image has no header
    image_pos = writer.pos + np.cumsum(glue_end - glue_start)[:n] + np.concatenate([[0], np.cumsum(lengths)[:-1]])
    label_pos = image_pos + lengths + pads + _BLOCK
    writer.index.append(_plain_index_lines(image_names, image_pos, lengths, label_pos))
    writer.samples += n

    glue = np.zeros((_FAST_BLOCK + 1, width), dtype=np.uint8)  # reused: only header and label bytes change
    flat = memoryview(glue.reshape(-1))
    label_bytes = classes.astype("<i4").view(np.uint8).reshape(n, 4)
    ends = (starts + lengths).tolist()
    starts_list = starts.tolist()
    for first in range(0, n, _FAST_BLOCK):
        last = min(first + _FAST_BLOCK, n)
        gaps = np.arange(first, last + (last == n))  # the gap before each image, and the closing one
        heads, tails = gaps[gaps < n], gaps[gaps > 0]
        glue[heads - first, width - _BLOCK :] = _tar_headers(image_names[heads], lengths[heads])
        glue[tails - first, _BLOCK - 1 : 2 * _BLOCK - 1] = _tar_headers(label_names[tails - 1], np.full(tails.size, 4))
        glue[tails - first, 2 * _BLOCK - 1 : 2 * _BLOCK + 3] = label_bytes[tails - 1]
        rows = (gaps - first) * width
        glue_from, glue_to = (rows + glue_start[gaps]).tolist(), (rows + glue_end[gaps]).tolist()
        parts: list[memoryview] = [flat] * (2 * (last - first) + (last == n))
        parts[0::2] = [flat[a:b] for a, b in zip(glue_from, glue_to, strict=True)]
        parts[1::2] = [view[a:b] for a, b in zip(starts_list[first:last], ends[first:last], strict=True)]
        writer.write_chunk(parts)
        tick(last - first)
    writer.pos = int(label_pos[-1]) + _BLOCK


def _write_plain_jpegs_with_twins(
    writer: _ShardWriter,
    reader: RecordFile,
    keys: np.ndarray,
    starts: np.ndarray,
    lengths: np.ndarray,
    classes: np.ndarray,
    masked: np.ndarray,
    masks: MaskPlan,
    on_error: str,
    skipped: list[dict],
    tick: Callable[[int], None],
) -> tuple[int, int]:
    """``_write_plain_jpegs`` for a shard where the ``masked`` samples also get a twin (``mask.jpg``, after the
    label); returns (largest label, twins written). A block of records at a time: render the block's twins, then
    lay out its bytes with numpy as the plain path does, the twins' members spliced in after their labels. The tar
    and index are the same as ``add_sample`` writes, byte for byte."""
    from facetool.pipeline.masks import MaskError, mask_jpeg

    view = reader.view
    width = (_BLOCK - 1) + 3 * _BLOCK  # a gap: padding of image i-1, its label header and block, image i's header
    glue = np.zeros((_FAST_BLOCK + 1, width), dtype=np.uint8)  # reused: only header and label bytes change
    flat = memoryview(glue.reshape(-1))
    max_label, num_masked = -1, 0
    for first in range(0, keys.size, _FAST_BLOCK):
        last = min(first + _FAST_BLOCK, keys.size)
        rows_kept, twins = [], {}
        for i in range(first, last):
            if masked[i]:
                key = int(keys[i])
                try:
                    twins[i] = mask_jpeg(view[int(starts[i]) : int(starts[i] + lengths[i])], masks.seed, key,
                                         weights=masks.weights)  # fmt: skip
                except MaskError as err:
                    message = f"{reader.path}: record {key}: cannot render its masked twin: {err}"
                    if on_error != "skip":
                        raise RecordIOError(message) from None
                    skipped.append({"key": key, "error": message})
                    continue
            rows_kept.append(i)
        tick(last - first)
        if not rows_kept:
            continue
        b = np.array(rows_kept)
        n = b.size
        k, lens, cls = keys[b], lengths[b], classes[b]
        twin_list = [twins.get(i) for i in rows_kept]
        twin_len = np.array([len(t) if t is not None else 0 for t in twin_list], dtype=np.int64)
        has = np.array([t is not None for t in twin_list])
        pads = -lens % _BLOCK
        twin_extra = np.where(has, _BLOCK + twin_len + (-twin_len % _BLOCK), 0)
        image_names = np.concatenate([_key_digits(k), _ascii(".jpg", n)], axis=1)
        label_names = np.concatenate([image_names[:, :9], _ascii("." + LABEL_EXT, n)], axis=1)
        glue_start = np.concatenate([[width - _BLOCK], _BLOCK - 1 - pads])  # gap 0 is a header alone
        glue_end = np.full(n + 1, width)
        glue_end[n] -= _BLOCK  # the closing gap has no header
        gap_bytes = glue_end - glue_start + np.concatenate([[0], twin_extra])
        image_pos = writer.pos + np.cumsum(gap_bytes)[:n] + np.concatenate([[0], np.cumsum(lens)[:-1]])
        label_pos = image_pos + lens + pads + _BLOCK
        mask_pos = label_pos + 2 * _BLOCK
        writer.index.append(_plain_index_lines(image_names, image_pos, lens, label_pos, (has, mask_pos, twin_len)))
        writer.samples += n

        glue[:n, width - _BLOCK :] = _tar_headers(image_names, lens)
        glue[1 : n + 1, _BLOCK - 1 : 2 * _BLOCK - 1] = _tar_headers(label_names, np.full(n, 4))
        glue[1 : n + 1, 2 * _BLOCK - 1 : 2 * _BLOCK + 3] = cls.astype("<i4").view(np.uint8).reshape(n, 4)
        rows = np.arange(n + 1) * width
        glue_from, glue_to = (rows + glue_start).tolist(), (rows + glue_end).tolist()
        parts: list[bytes | memoryview] = []
        for g in range(n + 1):
            twin = twin_list[g - 1] if g > 0 else None
            if twin is None:
                parts.append(flat[glue_from[g] : glue_to[g]])
            else:  # the previous sample's twin goes between its label and this image's header
                split = rows[g] + width - _BLOCK
                name = image_names[g - 1, :9].tobytes() + b"." + MASK_EXT.encode()
                parts += (flat[glue_from[g] : split], _tar_header(name, len(twin)), twin, _ZEROS[: -len(twin) % _BLOCK])
                if g < n:
                    parts.append(flat[split : glue_to[g]])
            if g < n:
                a = int(starts[b[g]])
                parts.append(view[a : a + int(lens[g])])
        writer.write_chunk(parts)
        writer.pos = int(label_pos[-1]) + _BLOCK + int(twin_extra[-1])
        max_label = max(max_label, int(cls.max()))
        num_masked += int(has.sum())
    return max_label, num_masked


def _write_checked(
    writer: _ShardWriter,
    reader: RecordFile,
    keys: np.ndarray,
    offsets: np.ndarray,
    num_classes: int | None,
    on_error: str,
    skipped: list[dict],
    tick: Callable[[int], None],
    masked: np.ndarray | None = None,
    masks: MaskPlan | None = None,
) -> tuple[int, int]:
    """Write a shard record by record with every check (PNGs, vector labels, split records, bad records), adding
    the masked twin of the records ``masked`` selects; returns (largest label, masked samples written). Errors name
    the file, record and offset; ``on_error="skip"`` collects them in ``skipped`` instead of raising."""
    if masked is not None:
        from facetool.pipeline.masks import MaskError, mask_jpeg
    max_label, num_masked, pending = -1, 0, 0
    every = 64 if masked is not None else 512
    for i, (key, offset) in enumerate(zip(keys.tolist(), offsets.tolist(), strict=True)):
        try:
            labels, image = reader.read_at(key, offset)
            members = _sample_members(key, labels, image, num_classes, reader.path)
            twin = None
            if masked is not None and masked[i]:
                try:
                    twin = mask_jpeg(image, masks.seed, key, weights=masks.weights)
                except MaskError as err:
                    raise RecordIOError(f"{reader.path}: record {key}: cannot render its masked twin: {err}") from None
                members = sorted([*members, (MASK_EXT, twin)], key=lambda m: m[0])
        except RecordIOError as err:
            if on_error != "skip":
                raise
            skipped.append({"key": key, "error": str(err)})
        else:
            writer.add_sample(f"{key:09d}", members)
            max_label = max(max_label, int(labels[0]))
            num_masked += twin is not None
        pending += 1
        if pending == every:
            tick(pending)
            pending = 0
    tick(pending)
    return max_label, num_masked


def _atomic_write(tmp: Path, text: str | bytes, final: Path) -> None:
    with open(tmp, "wb") as f:
        f.write(text.encode() if isinstance(text, str) else text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)


# ---------------------------------------------------------------------------------------------------------------
# the command
# ---------------------------------------------------------------------------------------------------------------
def _manifest_name(part: tuple[int, int]) -> str:
    return "manifest.json" if part == (0, 1) else f"manifest.part-{part[0]:04d}-of-{part[1]:04d}.json"


def _check_output_dir(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / STATE_DIR).mkdir(exist_ok=True)
        probe = out / STATE_DIR / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise FacetoolError(f"{out}: output folder is not writable ({err.strerror})") from None


def convert(
    src: str | os.PathLike,
    out: str | os.PathLike,
    options: ConvertOptions = ConvertOptions(),
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Convert an InsightFace RecordIO dataset into shards in ``out``; returns the manifest it wrote.

    ``progress(done, total)`` is called as records are processed. Re-running after an interruption skips the
    shards already complete and gives the same bytes as an uninterrupted run.
    """
    if options.samples_per_shard < 1:
        raise FacetoolError(f"--samples-per-shard must be >= 1, got {options.samples_per_shard}")
    if options.on_error not in ("fail", "skip"):
        raise FacetoolError(f"--on-error must be 'fail' or 'skip', got {options.on_error!r}")
    if not 0.0 <= options.mask_fraction <= 1.0:
        raise FacetoolError(f"--mask-fraction must be in [0, 1], got {options.mask_fraction}")
    if options.mask_fraction > 0 and options.seed < 0:
        raise FacetoolError(f"--seed must be >= 0 with --mask-fraction, got {options.seed}")
    options.mask_probabilities()  # unknown kinds or bad weights: a clear error before any work
    pi, pn = options.part
    if not (pn >= 1 and 0 <= pi < pn):
        raise FacetoolError(f"--part must be I/N with 0 <= I < N, got {pi}/{pn}")
    source = Source.locate(src, options.use_index)
    out = Path(out)
    reader = RecordFile(source.rec, source.idx)
    try:
        num_classes = _num_classes(reader, source)
        total = len(reader)
        if total == 0:
            raise FacetoolError(f"{source.rec}: no image records to convert")
        perm = plan_permutation(total, options.seed, options.shuffle)
        num_shards = -(-total // options.samples_per_shard)
        mine = part_shards(num_shards, options.part)
        manifest_path = out / _manifest_name(options.part)
        plan = {
            "source": str(source.rec.resolve()),
            "source_bytes": reader.size,
            "records": total,
            "arguments": options.output_arguments(),
            "part": list(options.part),
        }
        if manifest_path.is_file() and not (out / STATE_DIR / _plan_name(options.part)).is_file():
            manifest = json.loads(manifest_path.read_text())
            if manifest.get("arguments") != plan["arguments"] or manifest["source"]["path"] != plan["source"]:
                raise FacetoolError(f"{manifest_path}: this folder holds a conversion with other arguments or source")
            if progress:
                progress(total, total)
            return manifest  # already complete: nothing to do
        _check_output_dir(out)
        _claim_plan(out, plan)

        S = options.samples_per_shard
        todo = [s for s in mine if not (out / f"{shard_name(s)}.tar").is_file()]
        mine_records = sum(len(perm[s * S : (s + 1) * S]) for s in mine)
        done_records = mine_records - sum(len(perm[s * S : (s + 1) * S]) for s in todo)
        if progress:
            progress(done_records, mine_records)
        _run_shards(out, todo, perm, S, options, reader, source, num_classes, done_records, mine_records, progress)

        shards = [_load_stats(out, s) for s in mine]
        manifest = _manifest(source, reader, num_classes, options, shards, num_shards)
        _atomic_write(manifest_path.with_name(manifest_path.name + ".tmp"), _dump(manifest), final=manifest_path)
        for s in mine:
            (out / STATE_DIR / f"{shard_name(s)}.json").unlink(missing_ok=True)
        (out / STATE_DIR / _plan_name(options.part)).unlink(missing_ok=True)
        try:
            (out / STATE_DIR).rmdir()
        except OSError:
            pass  # other parts still at work
        return manifest
    finally:
        reader.close()


def _num_classes(reader: RecordFile, source: Source) -> int | None:
    """Classes from ``property``, cross-checked against layout A's identity records."""
    if source.property is None:
        return reader.num_identities
    num_classes, _, _ = read_property(source.property)
    if reader.num_identities is not None and reader.num_identities != num_classes:
        raise FacetoolError(
            f"{source.property}: says {num_classes} classes but {source.rec} holds {reader.num_identities} "
            "identity records"
        )
    return num_classes


def _plan_name(part: tuple[int, int]) -> str:
    return f"plan.part-{part[0]:04d}-of-{part[1]:04d}.json"


def _claim_plan(out: Path, plan: dict) -> None:
    """Record what this output folder is being made from; refuse to mix two different conversions in it."""
    path = out / STATE_DIR / _plan_name(tuple(plan["part"]))
    if path.is_file():
        old = json.loads(path.read_text())
        if old != plan:
            diff = sorted(k for k in plan if old.get(k) != plan[k])
            raise FacetoolError(
                f"{out}: holds an unfinished conversion that differs in {', '.join(diff)}; "
                "re-run it with the same arguments or use another output folder"
            )
        return
    _atomic_write(path.with_name(path.name + ".tmp"), json.dumps(plan, indent=1), final=path)


def _load_stats(out: Path, shard: int) -> ShardStats:
    path = out / STATE_DIR / f"{shard_name(shard)}.json"
    try:
        return ShardStats(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        raise FacetoolError(
            f"{out / (shard_name(shard) + '.tar')}: exists but its record {path} is missing; "
            "delete the shard and re-run"
        ) from None


def _run_shards(out, todo, perm, S, options, reader, source, num_classes, done, total, progress) -> None:
    """Write the given shards, in this process or a pool of ``options.workers``, reporting progress."""
    if not todo:
        return
    workers = max(1, min(options.workers, len(todo)))
    weights = options.mask_probabilities()
    masks = MaskPlan(options.mask_fraction, options.seed, weights) if weights is not None else None
    fork = "fork" in mp.get_all_start_methods() and sys.platform != "darwin"
    ctx = mp.get_context("fork" if fork else "spawn")
    counter = ctx.Value("q", 0)
    if workers == 1:
        _init_worker(reader, source, counter, num_classes)
        if progress:
            _WORKER["tick"] = lambda n: (_increment(counter, n), progress(done + counter.value, total))
        for s in todo:
            write_shard(out, s, perm[s * S : (s + 1) * S], options.on_error, masks)
        return
    with ProcessPoolExecutor(
        workers,
        mp_context=ctx,
        initializer=_init_worker,
        initargs=(reader if fork else None, source, counter, num_classes),
    ) as pool:
        pending = {pool.submit(write_shard, out, s, perm[s * S : (s + 1) * S], options.on_error, masks) for s in todo}
        while pending:
            finished, pending = wait(pending, timeout=0.2, return_when=FIRST_EXCEPTION)
            if progress:
                progress(done + counter.value, total)
            for f in finished:
                if f.exception() is not None:
                    for p in pending:
                        p.cancel()
                    raise f.exception()


def _increment(counter, n: int) -> None:
    with counter.get_lock():
        counter.value += n


def _manifest(source, reader, num_classes, options, shards: list[ShardStats], num_shards: int) -> dict:
    skipped = [s for st in shards for s in st.skipped]
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "tool_version": __version__,
        "source": {
            "path": str(source.rec.resolve()),
            "layout": reader.layout,
            "records": len(reader),
            # from property (or layout A's identity records); else the largest label seen + 1
            "classes": num_classes if num_classes is not None else max(st.max_label for st in shards) + 1,
        },
        "arguments": options.output_arguments(),
        "part": {"index": options.part[0], "count": options.part[1], "total_shards": num_shards},
        "members": {
            "image": "jpg|png",
            "label": LABEL_EXT,
            "label_dtype": "int32-le",
            "meta": "json",
            "masked": MASK_EXT,
        },
        "samples": sum(st.samples for st in shards),
        "masked": sum(st.masked for st in shards),
        "skipped": len(skipped),
        "skipped_records": skipped,
        "shards": [{k: v for k, v in asdict(st).items() if k not in ("skipped", "max_label")} for st in shards],
    }


def _dump(obj: dict) -> str:
    return json.dumps(obj, indent=1, sort_keys=False) + "\n"


def merge_parts(out: str | os.PathLike) -> dict:
    """Merge the ``manifest.part-I-of-N.json`` files of a cluster conversion into one ``manifest.json``."""
    out = Path(out)
    parts = sorted(out.glob("manifest.part-*-of-*.json"))
    if not parts:
        raise FacetoolError(f"{out}: no manifest.part-*-of-*.json files to merge")
    manifests = [json.loads(p.read_text()) for p in parts]
    count = manifests[0]["part"]["count"]
    indices = sorted(m["part"]["index"] for m in manifests)
    if indices != list(range(count)):
        missing = sorted(set(range(count)) - set(indices))
        raise FacetoolError(f"{out}: parts {missing} of {count} are missing; finish them before merging")
    for key in ("source", "arguments", "format_version"):
        if any(m[key] != manifests[0][key] for m in manifests):
            raise FacetoolError(f"{out}: the parts disagree on {key!r}; they are not one conversion")
    manifests.sort(key=lambda m: m["part"]["index"])
    merged = dict(manifests[0])
    merged["part"] = {"index": 0, "count": 1, "total_shards": manifests[0]["part"]["total_shards"]}
    merged["shards"] = [s for m in manifests for s in m["shards"]]
    merged["skipped_records"] = [s for m in manifests for s in m["skipped_records"]]
    for key in ("samples", "masked", "skipped"):
        merged[key] = sum(m[key] for m in manifests)
    if len(merged["shards"]) != merged["part"]["total_shards"]:
        expected = merged["part"]["total_shards"]
        raise FacetoolError(f"{out}: the parts list {len(merged['shards'])} shards, expected {expected}")
    path = out / "manifest.json"
    _atomic_write(path.with_name(path.name + ".tmp"), _dump(merged), final=path)
    return merged


def read_manifest(shards_dir: str | os.PathLike) -> dict:
    """Load ``manifest.json`` from a shard folder, with a clear error if it is not one."""
    path = Path(shards_dir) / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
    except OSError:
        raise FacetoolError(f"{path}: not found (is {shards_dir} a facetool shard folder?)") from None
    except ValueError as err:
        raise FacetoolError(f"{path}: not valid JSON ({err})") from None
    if manifest.get("format") != FORMAT_NAME:
        raise FacetoolError(f"{path}: not a facetool shard manifest")
    return manifest

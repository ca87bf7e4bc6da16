"""What the fallback reads: the runs of samples each worker of a rank takes in an epoch, and the samples of a run,
read at the offsets of the shard's DALI index with every tar header checked."""

from __future__ import annotations

import itertools
import tarfile
from collections.abc import Iterator

import numpy as np

from facetool.pipeline.errors import FacetoolError
from facetool.pipeline.shards.format import BLOCK, IMAGE_EXTS, LABEL_EXT, IndexMember, parse_index_line
from facetool.train.data.epochs import tar_order

READ_BYTES = 1 << 22  # the tar is read about this much at a time (at least one sample)


def epoch_segments(
    counts: list[int], seed: int, epoch: int, rank: int, world_size: int, worker: int, workers: int
) -> list[tuple[int, int, int]]:
    """The (shard, first sample in the shard, count) runs that a worker of a rank reads in an epoch."""
    order = tar_order(len(counts), seed, epoch)
    n = sum(counts)
    part_lo, part_hi = rank * n // world_size, (rank + 1) * n // world_size
    size = part_hi - part_lo
    lo, hi = part_lo + worker * size // workers, part_lo + (worker + 1) * size // workers
    runs, pos = [], 0
    for s in order:
        start, end = max(lo, pos), min(hi, pos + counts[s])
        if start < end:
            runs.append((s, start - pos, end - start))
        pos += counts[s]
    return runs


def read_samples(tar: str, index: str, first: int, count: int) -> Iterator[dict]:
    """``count`` samples of one shard from its ``first``, read where its DALI index puts them, a block of samples
    at a time, each member's tar header checked (checksum, name, size, regular file) and found right after the
    member before it, as a walk through the tar would find it; every sample holds an image and a 4-byte label. A
    damaged tar or index is an error naming the shard, never a skip or a sample read twice."""
    lines = _index_lines(index, first, count)
    n = 0
    try:
        with open(tar, "rb") as f:
            while n < count:
                stop = n + 1
                while stop < count and lines[stop][-1].offset - lines[n][0].offset < READ_BYTES:
                    stop += 1
                yield from _read_block(f, tar, index, lines[n:stop], first + n, first + count)
                n = stop
    except FacetoolError:
        raise
    except Exception as err:  # OSError, tarfile's HeaderError
        raise FacetoolError(f"{tar}: cannot read sample {first + n} of the shard: {err}") from None


def _read_block(f, tar: str, index: str, lines: list[list[IndexMember]], first: int, last: int) -> Iterator[dict]:
    """The samples ``lines`` (``first`` onwards) of an open tar, read at once and checked."""
    members = [m for line in lines for m in line]
    offsets = np.array([m.offset for m in members], dtype=np.int64)
    sizes = np.array([m.size for m in members], dtype=np.int64)
    sample_of = np.repeat(np.arange(len(lines)), [len(line) for line in lines])
    padded_ends = offsets + (sizes + BLOCK - 1) // BLOCK * BLOCK
    apart = np.flatnonzero(offsets[1:] - BLOCK != padded_ends[:-1])
    if len(apart):
        j = int(apart[0]) + 1
        raise FacetoolError(
            f"{index}: sample {first + sample_of[j]}: member {members[j].name} is not where a walk through the tar "
            f"finds it (header at byte {offsets[j] - BLOCK}, not {padded_ends[j - 1]}); the index does not belong "
            f"to {tar} (re-convert or re-copy the shard)"
        )
    start, end = int(offsets[0]) - BLOCK, int(offsets[-1] + sizes[-1])
    f.seek(start)
    data = f.read(end - start)
    if len(data) < end - start:
        last_members = np.r_[np.flatnonzero(np.diff(sample_of)), len(members) - 1]
        ends = offsets[last_members] + sizes[last_members]  # where each sample's last member ends
        complete = int(np.searchsorted(ends, start + len(data), side="right"))
        raise FacetoolError(f"{tar}: ended after {first + complete} samples, its index lists {last}")
    headers = np.frombuffer(data, dtype=np.uint8)[(offsets - BLOCK - start)[:, None] + np.arange(BLOCK)]
    for j in np.flatnonzero(~plain_headers_match(headers, members, sizes)):
        _check_header(headers[j].tobytes(), members[j], tar, index, first + int(sample_of[j]))
    for line in lines:
        key = line[0].key
        sample = {"__key__": key, "__url__": tar}
        for m in line:
            o = m.offset - start
            sample[m.ext] = data[o : o + m.size]
        if len(sample) != len(line) + 2 or any(m.key != key for m in line):
            raise FacetoolError(f"{index}: the line of sample {key} lists members of other samples or twice")
        _check_sample(sample, tar)
        yield sample


def plain_headers_match(headers: np.ndarray, members: list[IndexMember], sizes: np.ndarray) -> np.ndarray:
    """Which (n, 512) ustar headers are, with numpy, plainly those of ``members``: the name in the name field (no
    prefix), a regular file, the size and an unsigned checksum as zero-padded octal digits that match. The others
    get tarfile's own reading (:func:`_check_header`)."""
    names = [m.name.encode() for m in members]
    fits = np.array([len(name) <= 100 for name in names])
    expected = np.frombuffer(b"".join(name[:100].ljust(100, b"\0") for name in names), dtype=np.uint8)
    ok = fits & (headers[:, :100] == expected.reshape(len(names), 100)).all(axis=1)
    ok &= ~headers[:, 345:500].any(axis=1) & ((headers[:, 156] == ord("0")) | (headers[:, 156] == 0))
    size_ok, size = _octal(headers[:, 124:135])
    ok &= size_ok & (headers[:, 135] == 0) & (size == sizes)
    sum_ok, checksum = _octal(headers[:, 148:154])
    computed = headers.sum(axis=1, dtype=np.int64) - headers[:, 148:156].sum(axis=1, dtype=np.int64) + 8 * 32
    return ok & sum_ok & (headers[:, 154] == 0) & (headers[:, 155] == ord(" ")) & (checksum == computed)


def _octal(digits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(all octal digits?, value) of each row of ASCII digits."""
    values = digits.astype(np.int64) - ord("0")
    ok = ((values >= 0) & (values <= 7)).all(axis=1)
    return ok, (values << (3 * np.arange(digits.shape[1] - 1, -1, -1))).sum(axis=1)


def _check_header(header: bytes, member: IndexMember, tar: str, index: str, sample: int) -> None:
    """tarfile's reading of one header (any format it reads): it must be the regular file the index lists."""
    try:
        info = tarfile.TarInfo.frombuf(header, "utf-8", "surrogateescape")
    except tarfile.HeaderError as err:
        raise FacetoolError(f"{tar}: cannot read sample {sample} of the shard: {err}") from None
    if info.name != member.name or info.size != member.size or not info.isreg():
        raise FacetoolError(
            f"{tar}: sample {sample} is {info.name} ({info.size} bytes) in the tar but {member.name} ({member.size} "
            f"bytes) in its index {index}; the two do not belong together (re-convert or re-copy the shard)"
        )


def _index_lines(index: str, first: int, count: int) -> list[list]:
    """The members of samples ``first .. first + count - 1`` of a DALI index (each with at least one member)."""
    try:
        with open(index, "rb") as f:
            raw = list(itertools.islice(f, first + 1, first + count + 1))
    except OSError as err:
        raise FacetoolError(f"{index}: cannot read ({err.strerror})") from None
    lines = []
    for i, line in enumerate(raw):
        try:
            members = parse_index_line(line)
        except ValueError:
            members = []
        if not members:
            raise FacetoolError(f"{index}: malformed line for sample {first + i}")
        lines.append(members)
    if len(lines) != count:
        raise FacetoolError(f"{index}: lists {first + len(lines)} samples, fewer than {first + count}")
    return lines


def _check_sample(sample: dict, tar: str) -> None:
    key = sample.get("__key__")
    if LABEL_EXT not in sample or len(sample[LABEL_EXT]) != 4:
        raise FacetoolError(f"{tar}: sample {key} has no 4-byte label member ({LABEL_EXT})")
    if not any(e in sample for e in IMAGE_EXTS):
        raise FacetoolError(f"{tar}: sample {key} has no image member (jpg or png)")

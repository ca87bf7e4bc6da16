"""What the fallback reads: the runs of samples each worker of a rank takes in an epoch, and the samples of a run,
read at the offsets of the shard's DALI index with every tar header checked."""

from __future__ import annotations

import itertools
import tarfile
from collections.abc import Iterator
from typing import NamedTuple

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


class IndexRun(NamedTuple):
    """The members of a run of samples of a DALI index, flat: each line's ``widths`` members (ext, data offset,
    size, name), from member ``starts[i]`` on for line i; offsets and sizes also as int64 arrays."""

    widths: list[int]
    starts: list[int]
    exts: list[str]
    offsets: list[int]
    sizes: list[int]
    names: list[str]
    offset_array: np.ndarray
    size_array: np.ndarray


def read_samples(tar: str, index: str, first: int, count: int) -> Iterator[dict]:
    """``count`` samples of one shard from its ``first``, read where its DALI index puts them, a block of samples
    at a time, each member's tar header checked (checksum, name, size, regular file) and found right after the
    member before it, as a walk through the tar would find it; every sample holds an image and a 4-byte label. A
    damaged tar or index is an error naming the shard, never a skip or a sample read twice."""
    run = _index_run(index, first, count)
    firsts = [run.offsets[s] for s in run.starts]
    lasts = [run.offsets[s + w - 1] for s, w in zip(run.starts, run.widths, strict=True)]
    n = 0
    try:
        with open(tar, "rb") as f:
            while n < count:
                stop, limit = n + 1, firsts[n] + READ_BYTES
                while stop < count and lasts[stop] < limit:
                    stop += 1
                yield from _read_block(f, tar, index, run, n, stop, first, first + count)
                n = stop
    except FacetoolError:
        raise
    except Exception as err:  # OSError, tarfile's HeaderError
        raise FacetoolError(f"{tar}: cannot read sample {first + n} of the shard: {err}") from None


def _read_block(f, tar: str, index: str, run: IndexRun, n: int, stop: int, first: int, last: int) -> Iterator[dict]:
    """The samples ``n .. stop - 1`` of ``run`` (sample ``first`` of the shard is its 0) read at once, checked."""
    lo = run.starts[n]
    hi = run.starts[stop] if stop < len(run.starts) else len(run.offsets)
    offsets, sizes = run.offset_array[lo:hi], run.size_array[lo:hi]
    sample_of = np.repeat(np.arange(stop - n), run.widths[n:stop])
    padded_ends = offsets + (sizes + BLOCK - 1) // BLOCK * BLOCK
    apart = np.flatnonzero(offsets[1:] - BLOCK != padded_ends[:-1])
    if len(apart):
        j = int(apart[0]) + 1
        raise FacetoolError(
            f"{index}: sample {first + n + sample_of[j]}: member {run.names[lo + j]} is not where a walk through the "
            f"tar finds it (header at byte {offsets[j] - BLOCK}, not {padded_ends[j - 1]}); the index does not "
            f"belong to {tar} (re-convert or re-copy the shard)"
        )
    start, end = int(offsets[0]) - BLOCK, int(offsets[-1] + sizes[-1])
    f.seek(start)
    data = f.read(end - start)
    if len(data) < end - start:
        last_members = np.r_[np.flatnonzero(np.diff(sample_of)), len(offsets) - 1]
        ends = offsets[last_members] + sizes[last_members]  # where each sample's last member ends
        complete = int(np.searchsorted(ends, start + len(data), side="right"))
        raise FacetoolError(f"{tar}: ended after {first + n + complete} samples, its index lists {last}")
    headers = _headers(data, offsets - BLOCK - start, bool((sizes >= 0).all()))
    for j in np.flatnonzero(~plain_headers_match(headers, run.names[lo:hi], sizes)).tolist():
        member = IndexMember(run.exts[lo + j], run.offsets[lo + j], run.sizes[lo + j], run.names[lo + j])
        _check_header(headers[j].tobytes(), member, tar, index, first + n + int(sample_of[j]))
    yield from _samples(data, start, tar, index, run, n, stop)


def _headers(data: bytes, at: np.ndarray, aligned: bool) -> np.ndarray:
    """The (n, 512) tar headers at the positions ``at`` of ``data``: whole blocks of it where the members follow
    each other with no negative size (each header then starts a block, in order, inside ``data``)."""
    if aligned:
        return np.frombuffer(data, dtype=np.uint8, count=len(data) // BLOCK * BLOCK).reshape(-1, BLOCK)[at // BLOCK]
    return np.frombuffer(data, dtype=np.uint8)[at[:, None] + np.arange(BLOCK)]


def _samples(data: bytes, start: int, tar: str, index: str, run: IndexRun, n: int, stop: int) -> Iterator[dict]:
    """The samples ``n .. stop - 1`` of ``run`` from ``data``, the tar's bytes from ``start``: a dict each."""
    exts, offsets, sizes, names = run.exts, run.offsets, run.sizes, run.names
    for i in range(n, stop):
        m = run.starts[i]
        end = m + run.widths[i]
        key = names[m].split(".", 1)[0]
        sample = {"__key__": key, "__url__": tar}
        for j in range(m, end):
            o = offsets[j] - start
            sample[exts[j]] = data[o : o + sizes[j]]
        if len(sample) != end - m + 2 or not all_of_key(names, m + 1, end, key):
            raise FacetoolError(f"{index}: the line of sample {key} lists members of other samples or twice")
        label = sample.get(LABEL_EXT)
        if label is None or len(label) != 4:
            raise FacetoolError(f"{tar}: sample {key} has no 4-byte label member ({LABEL_EXT})")
        if sample.keys().isdisjoint(IMAGE_EXTS):
            raise FacetoolError(f"{tar}: sample {key} has no image member (jpg or png)")
        yield sample


def all_of_key(names: list[str], lo: int, hi: int, key: str) -> bool:
    """Whether the member names ``names[lo:hi]`` all belong to the sample ``key`` (a loop: no generator per sample)."""
    for j in range(lo, hi):
        if names[j].split(".", 1)[0] != key:
            return False
    return True


def plain_headers_match(headers: np.ndarray, names: list[str], sizes: np.ndarray) -> np.ndarray:
    """Which (n, 512) ustar headers are, with numpy, plainly those of the members ``names``: the name in the name
    field (no prefix), a regular file, the size and an unsigned checksum as zero-padded octal digits that match. The
    others get tarfile's own reading (:func:`_check_header`)."""
    encoded = " ".join(names).encode().split(b" ")  # no name holds a space: the index splits on whitespace
    fits = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded)) <= 100
    expected = np.array(encoded, dtype="S100").view(np.uint8).reshape(len(encoded), 100)  # null-padded
    ok = fits & (headers[:, :100] == expected).all(axis=1)
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


def _index_run(index: str, first: int, count: int) -> IndexRun:
    """The members of samples ``first .. first + count - 1`` of a DALI index (each with at least one member)."""
    try:
        with open(index, "rb") as f:
            raw = list(itertools.islice(f, first + 1, first + count + 1))
    except OSError as err:
        raise FacetoolError(f"{index}: cannot read ({err.strerror})") from None
    if len(raw) != count:
        _parse_each(raw, index, first)  # a malformed line among them comes first
        raise FacetoolError(f"{index}: lists {first + len(raw)} samples, fewer than {first + count}")
    try:
        text = b"".join(raw).decode()  # UTF-8: a line decodes alone exactly when it decodes among the others
        fields = text.split()  # one flat list: no list per line for the garbage collector to walk
        counts = [len(line.split()) for line in text.split("\n")[: len(raw)]]
        widths = [c // 4 for c in counts]
        if not all(widths) or any(c % 4 for c in counts):
            raise ValueError
        offsets, sizes = list(map(int, fields[1::4])), list(map(int, fields[2::4]))
    except ValueError:  # UnicodeDecodeError included
        _parse_each(raw, index, first)
        raise
    starts = list(itertools.accumulate(widths, initial=0))[:-1]
    offset_array, size_array = np.array(offsets, dtype=np.int64), np.array(sizes, dtype=np.int64)
    return IndexRun(widths, starts, fields[0::4], offsets, sizes, fields[3::4], offset_array, size_array)


def _parse_each(raw: list[bytes], index: str, first: int) -> None:
    """Parse the index lines one by one: the first malformed one (or empty) is an error naming it."""
    for i, line in enumerate(raw):
        try:
            members = parse_index_line(line)
        except ValueError:
            members = []
        if not members:
            raise FacetoolError(f"{index}: malformed line for sample {first + i}")

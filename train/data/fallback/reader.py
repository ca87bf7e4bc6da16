"""What the fallback reads: the runs of samples each worker of a rank takes in an epoch, and the samples of a run,
read through webdataset's tar iterator and checked against the shard's DALI index."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

from facetool.pipeline.errors import FacetoolError
from facetool.pipeline.shards.format import IMAGE_EXTS, LABEL_EXT, parse_index_line
from facetool.train.data.epochs import tar_order


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
    """``count`` samples of one shard from its ``first``, read through webdataset's tar iterator (whose tar headers
    carry checksums), each checked to be the sample its DALI index lists there and to hold an image and a 4-byte
    label: a damaged tar or index is an error naming the shard, never a skip or a sample read twice."""
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    lines = _index_lines(index, first, count)
    n = 0
    try:
        with open(tar, "rb") as f:
            f.seek(lines[0][0].header_offset if lines else 0)
            files = ({**m, "__url__": tar} for m in tar_file_iterator(f))
            for sample in itertools.islice(group_by_keys(files), count):
                if sample.get("__key__") != lines[n][0].key:
                    raise FacetoolError(
                        f"{tar}: sample {first + n} is {sample.get('__key__')} in the tar but {lines[n][0].key} in "
                        f"its index {index}; the two do not belong together (re-convert or re-copy the shard)"
                    )
                _check_sample(sample, tar)
                yield sample
                n += 1
    except FacetoolError:
        raise
    except Exception as err:  # tarfile.ReadError, EOFError, OSError, webdataset's ValueError
        raise FacetoolError(f"{tar}: cannot read sample {first + n} of the shard: {err}") from None
    if n != count:
        raise FacetoolError(f"{tar}: ended after {first + n} samples, its index lists {first + count}")


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

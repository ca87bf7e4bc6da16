"""Which samples DALI's reader had handed out: its order replayed.

DALI's webdataset reader shuffles each rank's part of an epoch in a buffer filled and drawn from in C++, in an
order nothing outside DALI computes. It is, though, a function of the reader's settings alone (tar order, part,
buffer size, seed), not of the members it reads: a reader of the same settings that reads only each sample's
4-byte label hands out the same samples in the same order, and names each one (its tar and the label member's
offset there). :func:`reader_consumed` runs such a reader for every rank of the interrupted layout, as far as the
cut, and marks what it hands out: what a resume on another layout must not read again. It reads 4 bytes a sample
and decodes nothing: about a second for the 100,000 samples of a test set, mostly the per-sample bookkeeping.
"""

from __future__ import annotations

import functools
import re
from typing import Any

import numpy as np

from facetool.pipeline.errors import FacetoolError
from facetool.pipeline.shards.format import LABEL_EXT
from facetool.train.data.config import LoaderConfig
from facetool.train.data.dali.pipeline import epoch_reader, require_dali
from facetool.train.data.remainder import check_cut
from facetool.train.data.shardset import ShardSet

_LABEL_AT = re.compile(rb"(?:^|(?<=\s))" + re.escape(LABEL_EXT.encode()) + rb" (\d+) ", re.M)


def replay_for(shards: ShardSet, config: LoaderConfig):
    """The ``replay(epoch, cut)`` of :mod:`facetool.train.data.remainder` for DALI reader cuts of these shards."""
    return functools.partial(reader_consumed, shards, config)


def reader_consumed(shards: ShardSet, config: LoaderConfig, epoch: int, cut: dict[str, Any]) -> np.ndarray:
    """A bool per sample id (manifest order): whether DALI's reader, on ``cut["world_size"]`` ranks, had handed it
    out in the first ``cut["batch"]`` batches of ``epoch`` on each rank."""
    require_dali("continuing the DALI loader's epoch on another layout")
    from nvidia.dali import pipeline_def

    if cut.get("reader") != "dali" or cut.get("before") is not None:
        raise FacetoolError(f"{shards.root}: not a cut of DALI's reader: {cut}")
    counts = [s.samples for s in shards.shards]
    world, _, batches = check_cut(cut, sum(counts), config)
    starts = np.concatenate([[0], np.cumsum(counts)])
    offsets = [label_offsets(str(s.index), s.samples) for s in shards.shards]
    shard_of = {str(s.tar): k for k, s in enumerate(shards.shards)}
    mask = np.zeros(int(starts[-1]), dtype=bool)
    for rank in range(world):

        @pipeline_def(batch_size=config.batch_size, num_threads=1, device_id=None, prefetch_queue_depth=1)
        def labels_only(rank=rank):
            return epoch_reader(shards, config, rank, world, epoch, [LABEL_EXT])[0]

        pipe = labels_only()
        pipe.build()
        for _ in range(batches):
            (labels,) = pipe.run()
            for i in range(len(labels)):
                tar, offset = member_of(labels[i].source_info())
                k = shard_of.get(tar)
                j = -1 if k is None else int(np.searchsorted(offsets[k], offset))
                if k is None or j >= len(offsets[k]) or offsets[k][j] != offset:
                    raise FacetoolError(f"{tar}: DALI's reader handed out a label at byte {offset} that the shard's "
                                        "index does not list")  # fmt: skip
                mask[starts[k] + j] = True
        del pipe
    return mask


def member_of(info: str) -> tuple[str, int]:
    """(tar, offset) of a member from the reader's source info, ``TAR:OFFSET:NAME``."""
    tar, offset, _ = info.rsplit(":", 2)
    return tar, int(offset)


def label_offsets(index: str, samples: int) -> np.ndarray:
    """The offset of each sample's label member in its tar, in sample order, from the shard's DALI index."""
    try:
        with open(index, "rb") as f:
            text = f.read()
    except OSError as err:
        raise FacetoolError(f"{index}: cannot read ({err.strerror})") from None
    found = np.array([int(m) for m in _LABEL_AT.findall(text)], dtype=np.int64)
    if len(found) != samples or (len(found) > 1 and bool((np.diff(found) <= 0).any())):
        raise FacetoolError(f"{index}: lists {len(found)} label members in increasing order, the manifest "
                            f"{samples} samples")  # fmt: skip
    return found

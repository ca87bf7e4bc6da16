"""The rest of an interrupted epoch for the DALI pipeline: the samples read in Python, decoded and augmented by DALI.

A run resumed on another layout reads only the epoch's samples not yet handed out (:mod:`..remainder`). DALI's
reader cannot be told to skip samples, so for that one epoch the pipeline's reader is replaced by an external
source: this rank's contiguous part of the ids left, read at the shard index's offsets with every tar header
checked (the fallback's reader), mixed in a shuffle buffer and batched exactly as the webdataset fallback does with
one worker. Both loaders therefore read such an epoch in the same order, and a cut inside it is a plain cut with
``workers = 1`` that either can continue. What follows the reader (the masked choice, decoding, augmentation) is
the pipeline's own.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import numpy as np

from facetool.pipeline.errors import FacetoolError
from facetool.pipeline.shards.format import IMAGE_EXTS, LABEL_EXT, MASK_EXT
from facetool.train.data.checks import check_label, decode_rgb
from facetool.train.data.config import LoaderConfig
from facetool.train.data.epochs import batches_per_epoch
from facetool.train.data.fallback.reader import read_samples
from facetool.train.data.remainder import runs_of, shuffle_seed, slice_ids
from facetool.train.data.shardset import ShardSet

_EMPTY = np.zeros(0, dtype=np.uint8)


class RemainderSource:
    """This rank's batches of the ids ``ids`` left of ``epoch``, as DALI external-source batches (an iterable:
    each pass reads them from the start). ``sizes``: the size of each batch DALI yields; ``total``: the batches
    every rank yields in this epoch (the rest are empty, as with the fallback)."""

    def __init__(
        self, shards: ShardSet, config: LoaderConfig, epoch: int, ids: np.ndarray, rank: int, world_size: int
    ) -> None:
        self.shards, self.config, self.epoch, self.rank = shards, config, epoch, rank
        self.part = slice_ids(ids, rank, world_size, 0, 1)
        B = config.batch_size
        self.total = batches_per_epoch(len(ids), world_size, B, config.last_batch)
        full, rest = divmod(len(self.part), B)
        self.sizes = [B] * min(full, self.total)
        if config.last_batch == "partial" and rest and len(self.sizes) < self.total:
            self.sizes.append(rest)
        self.with_masks = config.masked_prob > 0

    def outputs(self, with_masks: bool) -> list:
        """The external source (inside a pipeline definition): encoded image, (masked twin or empty,) label."""
        from nvidia.dali import fn, types

        self.with_masks = with_masks
        dtypes = [types.UINT8, types.UINT8, types.INT32] if with_masks else [types.UINT8, types.INT32]
        return list(fn.external_source(source=self, num_outputs=len(dtypes), batch=True, dtype=dtypes, cycle="raise"))

    def samples(self) -> Iterator[dict]:
        """This rank's samples in the order they are batched."""
        import webdataset as wds

        counts = [s.samples for s in self.shards.shards]
        runs = runs_of(self.part, counts)
        shards = self.shards.shards
        stream = itertools.chain.from_iterable(
            read_samples(str(shards[s].tar), str(shards[s].index), first, n) for s, first, n in runs
        )
        buf = max(1, self.config.shuffle_buffer)
        return wds.filters.shuffle(buf, initial=buf, seed=shuffle_seed(self.config.seed, self.epoch, self.rank, 0))(
            stream
        )

    def batches(self) -> Iterator[list[dict]]:
        """The samples of each batch DALI yields."""
        stream = self.samples()
        for size in self.sizes:
            yield list(itertools.islice(stream, size))

    def __iter__(self) -> Iterator[tuple[list[np.ndarray], ...]]:
        for chunk in self.batches():
            columns = [[image_of(s) for s in chunk]]
            columns.append([np.frombuffer(s[MASK_EXT], np.uint8) if MASK_EXT in s else _EMPTY for s in chunk])
            columns.append([np.frombuffer(s[LABEL_EXT], "<i4").astype(np.int32) for s in chunk])
            yield tuple(columns if self.with_masks else [columns[0], columns[2]])

    def find_bad_sample(self, first: int, count: int) -> FacetoolError | None:
        """The first sample of batches ``first .. first + count - 1`` that fails the fallback's checks (label,
        Pillow decode of its image and twin), as an error naming its shard and key, else None."""
        try:
            for chunk in itertools.islice(self.batches(), first, first + count):
                for s in chunk:
                    tar, key = s["__url__"], s["__key__"]
                    check_label(tar, key, int(np.frombuffer(s[LABEL_EXT], "<i4")[0]), self.shards.classes)
                    for data in (image_of(s), s.get(MASK_EXT)):
                        if data is not None and len(data):
                            decode_rgb(bytes(data), tar, key)
        except FacetoolError as err:
            return err
        return None


def image_of(sample: dict) -> np.ndarray:
    """A sample's holistic image (its first image member) as bytes for DALI."""
    return np.frombuffer(next(sample[ext] for ext in IMAGE_EXTS if ext in sample), np.uint8)

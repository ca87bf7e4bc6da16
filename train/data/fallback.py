"""The portable loader: webdataset reading + Pillow decoding in torch DataLoader workers, with the DALI loader's
options, augmentations (same probabilities and ranges, Pillow's pixel formulas) and epoch rules.

Used where DALI is not available (macOS, machines without NVIDIA wheels) and as the reference in tests.

Splitting mirrors DALI's reader: each epoch the tar files are put in an order drawn from the seed (the same on
every rank), the concatenated samples are cut into ``world_size`` contiguous parts (rank r takes part r) and each
part into contiguous slices, one per DataLoader worker. A worker seeks straight to its slice's first sample (the
offset comes from the DALI index), reads it with webdataset's tar iterator, shuffles it in a buffer, chooses the
holistic or masked image, decodes that one and augments it. Workers yield full batches and one remainder each;
the main process merges the remainders, so a rank yields the same batches per epoch as the DALI loader
(``last_batch`` "partial": ceil(largest part / B), the last holding what is left, possibly nothing; "drop":
floor(smallest part / B) full batches).
"""

from __future__ import annotations

import gc
import itertools
import multiprocessing as mp
import os
from collections.abc import Iterator

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageFilter
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from facetool.pipeline.errors import FacetoolError
from facetool.pipeline.processes import worker_init
from facetool.pipeline.shards.format import IMAGE_EXTS, LABEL_EXT, MASK_EXT, parse_index_line
from facetool.train.data.batch import Batch
from facetool.train.data.checks import check_label, decode_rgb
from facetool.train.data.config import LoaderConfig
from facetool.train.data.epochs import batches_per_epoch, derive_seed, tar_order
from facetool.train.data.remainder import assemble, remaining_ids, runs_of, shuffle_seed, slice_ids
from facetool.train.data.shardset import ShardSet

_SCALE = np.float32(1.0 / 127.5)


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


class _SampleStream(IterableDataset):
    """Yields, per worker, (images, labels, masked) numpy batches of ``batch_size`` and one final remainder."""

    def __init__(self, shards: ShardSet, config: LoaderConfig, rank: int, world_size: int, pick: float, epoch):
        self.tars = [str(s.tar) for s in shards.shards]
        self.indexes = [str(s.index) for s in shards.shards]
        self.counts = [s.samples for s in shards.shards]
        self.classes = shards.classes
        self.config, self.rank, self.world_size, self.pick = config, rank, world_size, pick
        self.epoch = epoch  # a shared mp.Value: persistent workers read the main process's epoch from it
        self.remainder: tuple[int, np.ndarray, dict] | None = None  # a resumed epoch: (epoch, ids left, cut)

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray] | str]:
        try:
            yield from self._batches()
        except FacetoolError as err:
            if get_worker_info() is None:
                raise
            yield str(err)  # from a DataLoader worker: the message alone, raised again by the loader (one line)

    def _batches(self) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        cfg, epoch = self.config, int(self.epoch.value)
        if self.remainder is not None and self.remainder[0] == epoch:
            runs = runs_of(slice_ids(self.remainder[1], self.rank, self.world_size, worker, workers), self.counts)
        else:
            runs = epoch_segments(self.counts, cfg.seed, epoch, self.rank, self.world_size, worker, workers)
        samples = itertools.chain.from_iterable(self._read(s, first, count) for s, first, count in runs)
        bufsize = max(1, cfg.shuffle_buffer // workers)
        import webdataset as wds

        seed = shuffle_seed(cfg.seed, epoch, self.rank, worker)
        samples = wds.filters.shuffle(bufsize, initial=bufsize, seed=seed)(samples)
        rng = np.random.default_rng(derive_seed(cfg.seed, 4, epoch, self.rank, worker))
        B, S = cfg.batch_size, cfg.image_size
        while True:
            chunk = list(itertools.islice(samples, B))
            if not chunk:
                return
            images = np.empty((len(chunk), 3, S, S), dtype=np.float32)
            labels = np.empty(len(chunk), dtype=np.int64)
            masked = np.zeros(len(chunk), dtype=bool)
            for i, sample in enumerate(chunk):
                labels[i], masked[i] = process_sample(sample, cfg, self.pick, rng, images[i], self.classes)
            if cfg.dtype == "float16":
                images = images.astype(np.float16)
            yield images, labels, masked
            if len(chunk) < B:
                return

    def _read(self, shard: int, first: int, count: int) -> Iterator[dict]:
        return read_samples(self.tars[shard], self.indexes[shard], first, count)


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


def process_sample(
    sample: dict,
    cfg: LoaderConfig,
    pick: float,
    rng: np.random.Generator,
    out: np.ndarray,
    classes: int | None = None,
) -> tuple[int, bool]:
    """Choose, decode and augment one sample into ``out`` (3, S, S) float32 normalised; returns (label, masked).
    A label outside ``[0, classes)`` or an image that does not decode is an error naming the shard and sample.

    Random draws, in order: masked (only for samples with a twin), crop, colour (+ its factors), grayscale,
    blur (+ sigma), down-up (+ size), flip: the DALI pipeline's operations, probabilities and ranges."""
    tar, key = sample.get("__url__"), sample.get("__key__")
    label = int(np.frombuffer(sample[LABEL_EXT], dtype="<i4")[0])
    if classes is not None:
        check_label(tar, key, label, classes)
    masked = MASK_EXT in sample and pick > 0 and rng.random() < pick
    data = sample[MASK_EXT] if masked else next(sample[e] for e in IMAGE_EXTS if e in sample)
    image = augment(decode_rgb(data, tar, key), cfg, rng)
    size = cfg.image_size
    if image.size != (size, size):
        raise FacetoolError(
            f"{sample.get('__url__')}: sample {sample.get('__key__')} is {image.size[0]}x{image.size[1]}, "
            f"the loader expects {size}x{size}"
        )
    pixels = np.asarray(image)
    if cfg.flip_prob > 0 and rng.random() < cfg.flip_prob:
        pixels = pixels[:, ::-1]
    np.subtract(pixels.transpose(2, 0, 1), np.float32(127.5), out=out, casting="unsafe")
    out *= _SCALE
    return label, bool(masked)


def augment(image: Image.Image, cfg: LoaderConfig, rng: np.random.Generator) -> Image.Image:
    """The optional augmentations with Pillow, in the DALI pipeline's order (flip comes with normalisation)."""
    size = cfg.image_size
    if cfg.crop_prob > 0 and rng.random() < cfg.crop_prob:
        w, h = image.size
        area = rng.uniform(*cfg.crop_area) * w * h
        ratio = float(np.exp(rng.uniform(np.log(cfg.crop_aspect[0]), np.log(cfg.crop_aspect[1]))))
        cw = min(w, max(1, round(np.sqrt(area * ratio))))
        ch = min(h, max(1, round(np.sqrt(area / ratio))))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        image = image.resize((size, size), Image.BILINEAR, box=(x, y, x + cw, y + ch))
    if cfg.color_prob > 0 and rng.random() < cfg.color_prob:
        b, c, s = (rng.uniform(1 - v, 1 + v) for v in (cfg.brightness, cfg.contrast, cfg.saturation))
        image = ImageEnhance.Brightness(image).enhance(b)
        image = ImageEnhance.Contrast(image).enhance(c)
        image = ImageEnhance.Color(image).enhance(s)
        if cfg.hue > 0:
            shift = round(rng.uniform(-cfg.hue, cfg.hue) / 360.0 * 256) % 256
            h, s_, v = image.convert("HSV").split()
            h = h.point(lambda x: (x + shift) % 256)
            image = Image.merge("HSV", (h, s_, v)).convert("RGB")
    if cfg.gray_prob > 0 and rng.random() < cfg.gray_prob:
        image = image.convert("L").convert("RGB")
    if cfg.blur_prob > 0 and rng.random() < cfg.blur_prob:
        image = image.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(*cfg.blur_sigma))))
    if cfg.downup_prob > 0 and rng.random() < cfg.downup_prob:
        small = max(1, round(rng.uniform(cfg.downup_scale[0] * size, cfg.downup_scale[1] * size)))
        image = image.resize((small, small), Image.BILINEAR).resize((size, size), Image.BILINEAR)
    return image


class WdsLoader:
    """Iterate epochs of :class:`Batch` from the webdataset fallback; ``for batch in loader`` is one epoch.

    ``workers`` DataLoader processes (``config.workers``, 0: this rank's share of the cores) persist across epochs;
    ``workers=0`` reads in the calling process. Tensors end on ``device`` (pinned and copied without blocking
    when that is a GPU).
    """

    def __init__(
        self,
        shards: ShardSet,
        config: LoaderConfig,
        rank: int = 0,
        world_size: int = 1,
        device: str | torch.device = "cpu",
        workers: int | None = None,
        start_method: str | None = None,
    ) -> None:
        if not (0 <= rank < world_size):
            raise FacetoolError(f"rank {rank} outside world size {world_size}")
        if world_size > shards.samples:
            raise FacetoolError(f"{shards.root}: {shards.samples} samples cannot be split over {world_size} ranks")
        pick = shards.mask_pick_probability(config.masked_prob)  # an error before any worker starts
        self.shards, self.config, self.rank, self.world_size = shards, config, rank, world_size
        self.device = torch.device(device)
        if workers is None:
            workers = config.workers or config.cpu_share()
        ctx = mp.get_context(start_method) if workers > 0 else mp.get_context()
        self._epoch = ctx.Value("q", 0, lock=False)
        self.dataset = _SampleStream(shards, config, rank, world_size, pick, self._epoch)
        self.workers = workers
        self._loader = DataLoader(
            self.dataset,
            batch_size=None,
            num_workers=workers,
            persistent_workers=workers > 0,
            prefetch_factor=2 if workers > 0 else None,
            multiprocessing_context=ctx if workers > 0 else None,
            worker_init_fn=worker_init(os.getpid()) if workers > 0 else None,  # workers end with this process
            pin_memory=self.device.type == "cuda",
        )
        self.epoch = 0
        self._started = False

    def __len__(self) -> int:
        """Batches per epoch on this rank (the same on every rank)."""
        return batches_per_epoch(self.shards.samples, self.world_size, self.config.batch_size, self.config.last_batch)

    def __iter__(self) -> Iterator[Batch]:
        if self._loader.num_workers and not self._started:
            # Collect garbage before the workers fork: an unreachable DALI pipeline (say, from a DALI loader used
            # earlier in this process) collected inside a forked child waits forever on threads that do not exist
            # there. Persistent workers fork once, at the first epoch.
            gc.collect()
            self._started = True
        self._epoch.value = self.epoch
        total, partial = self.batches(self.epoch), self.config.last_batch == "partial"
        for batch in assemble(self._items(), total, self.config.batch_size, partial):
            yield self._empty() if batch is None else self._to_device(*batch)
        self.epoch += 1

    def _items(self) -> Iterator[tuple[torch.Tensor, ...]]:
        """The workers' items (full batches and remainders); a worker's error raised again."""
        for item in self._loader:
            if isinstance(item, str):  # a worker's error
                raise FacetoolError(item)
            yield item

    def batches(self, epoch: int) -> int:
        """Batches of ``epoch`` on this rank: ``len(self)``, or fewer for the rest of a resumed epoch."""
        remainder = self.dataset.remainder
        samples = len(remainder[1]) if remainder is not None and remainder[0] == epoch else self.shards.samples
        return batches_per_epoch(samples, self.world_size, self.config.batch_size, self.config.last_batch)

    def cut(self, epoch: int, batch: int) -> dict:
        """Where this rank's stream stands after ``batch`` batches of ``epoch`` (the checkpoint's loader state)."""
        remainder = self.dataset.remainder
        before = remainder[2] if remainder is not None and remainder[0] == epoch else None
        return {"backend": "wds", "epoch": epoch, "world_size": self.world_size, "workers": self.workers,
                "batch": batch, "before": before}  # fmt: skip

    def resume_epoch(self, cut: dict) -> tuple[int, int]:
        """Continue from a checkpoint's loader state ``cut``: (its epoch, the batches of it to skip). Written by
        this layout (ranks and workers), the stream goes on where it stood; by another, this epoch reads only the
        samples the other had not yet handed out. Called before the first epoch is read (workers persist)."""
        epoch, before = int(cut["epoch"]), cut["before"]
        same = (int(cut["world_size"]), int(cut["workers"])) == (self.world_size, self.workers)
        skip = int(cut["batch"]) if same else 0
        if not same and int(cut["batch"]) > 0:
            before = {k: cut[k] for k in ("world_size", "workers", "batch", "before")}
        if before is not None:
            ids = remaining_ids([s.samples for s in self.shards.shards], self.config, epoch, before)
            self.dataset.remainder = (epoch, ids, before)
        return epoch, skip

    def _to_device(self, images: torch.Tensor, labels: torch.Tensor, masked: torch.Tensor) -> Batch:
        nb = self.device.type == "cuda"
        return Batch(
            images.to(self.device, non_blocking=nb),
            labels.to(self.device, non_blocking=nb),
            masked.to(self.device, non_blocking=nb),
        )

    def _empty(self) -> Batch:
        S, dtype = self.config.image_size, torch.float16 if self.config.dtype == "float16" else torch.float32
        return self._to_device(
            torch.empty((0, 3, S, S), dtype=dtype), torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.bool)
        )

"""The DALI training pipeline: shards -> (holistic or masked) JPEG -> decode -> augment -> normalised NCHW batches.

One definition serves both devices: on a GPU the JPEGs are decoded with ``device="mixed"`` (nvJPEG plus the
hardware decoder, buffers sized for 112x112) and augmented on the GPU; without one the same graph runs on the CPU
with ``device_id=None``. Only one image is decoded per sample: the choice between ``jpg`` and ``mask.jpg`` is made
on the encoded bytes, in a DALI conditional.

Epochs: each epoch is its own pipeline, built from (seed, epoch) alone, so an epoch can be started directly (a
resumed run does not replay the epochs before it). Its reader takes the tar files in an order drawn from
(seed, epoch), the same on every rank, splits their concatenation into ``world_size`` contiguous parts
(``shard_id=rank``, part k = samples [k N / W, (k + 1) N / W)), pads each part to the same number of batches
(``pad_last_batch``), and mixes samples within a rank in a shuffle buffer seeded from (seed, epoch, rank). Every
sample is therefore read exactly once per epoch across ranks, and each rank reads the same samples as the
webdataset fallback does in that epoch. The remainder is handled by ``last_batch``: ``"partial"`` returns it
(every rank gets the same number of batches; the last one of each rank holds what is left of its part, possibly
nothing), ``"drop"`` returns only full batches (all ranks stop after ``floor(smallest part / batch_size)``
batches; the rest of the epoch's samples, fewer than ``world_size * (batch_size + 1)``, are skipped, and since
the order changes, different ones each epoch). Building a pipeline costs well under a second on the CPU (more
for the GPU decoder's buffers), once per epoch.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Iterator
from typing import TypeVar

import numpy as np
import torch

from facetool.pipeline.errors import FacetoolError
from facetool.pipeline.shards.format import IMAGE_EXTS, LABEL_EXT, MASK_EXT
from facetool.train.data.batch import Batch
from facetool.train.data.checks import check_label, decode_rgb
from facetool.train.data.config import LoaderConfig
from facetool.train.data.epochs import batches_per_epoch, derive_seed, tar_order
from facetool.train.data.shardset import ShardSet, warn_mask_reuse

READER_NAME = "Reader"
T = TypeVar("T")
_MEAN = 127.5
_STD = 127.5


#: How to get DALI, for the errors that need it (an optional dependency: wheels exist only for Linux x86_64)
DALI_INSTALL = "pip install 'facetool[dali]' (Linux x86_64)"


def dali_available() -> bool:
    """Whether NVIDIA DALI can be imported here (the optional ``dali`` extra; wheels exist only for Linux)."""
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def require_dali(what: str) -> None:
    """A one-line FacetoolError saying that ``what`` needs NVIDIA DALI and how to install it, unless DALI imports."""
    if not dali_available():
        raise FacetoolError(f"{what} needs NVIDIA DALI, which is not installed here: {DALI_INSTALL}")


def build_pipeline(
    shards: ShardSet,
    config: LoaderConfig,
    rank: int = 0,
    world_size: int = 1,
    device: str = "cpu",
    device_id: int | None = None,
    *,
    epoch: int = 0,
    decode_only: bool = False,
):
    """The DALI pipeline (not yet built) for one rank and one ``epoch``: outputs images (NCHW), labels (int32,
    (1,)) and, when ``masked_prob`` > 0, masked (bool). ``device`` "gpu" decodes with ``device="mixed"`` on
    ``device_id``; "cpu" runs with ``device_id=None``. ``decode_only`` stops after the decoder (uint8 HWC
    images, no augmentation, no normalisation): what `bench loader` times as the cost of reading and decoding."""
    require_dali("the DALI pipeline")
    from nvidia.dali import fn, pipeline_def, types

    _check_split(shards, rank, world_size, device, epoch)
    gpu = device == "gpu"
    pick = shards.mask_pick_probability(config.masked_prob)  # raises before anything is built when q > rendered
    threads = config.dali_threads(device)

    @pipeline_def(
        batch_size=config.batch_size,
        num_threads=threads,
        device_id=(device_id if device_id is not None else 0) if gpu else None,
        seed=derive_seed(config.seed, 5, epoch, rank),  # augmentation draws: per epoch and rank
        prefetch_queue_depth=config.prefetch,
        enable_conditionals=True,
    )
    def graph():
        outputs = _reader(shards, config, rank, world_size, epoch, with_masks=pick > 0)
        if pick > 0:
            encoded, mask, label = outputs
            has_mask = mask.shape()[0] > 0
            masked = fn.random.coin_flip(probability=pick, dtype=types.BOOL) & has_mask
            if masked:  # on the encoded bytes: only the chosen image is decoded
                encoded = mask
        else:
            (encoded, label), masked = outputs, None  # nothing masked: the loader fills the flags itself
        images = _decode(encoded, config, gpu)
        if decode_only:
            return (images, label) if masked is None else (images, label, masked)
        images = _augment(images, config, fn, types)
        images = fn.crop_mirror_normalize(
            images,
            mean=[_MEAN] * 3,
            std=[_STD] * 3,
            mirror=fn.random.coin_flip(probability=config.flip_prob) if config.flip_prob > 0 else 0,
            dtype=types.FLOAT16 if config.dtype == "float16" else types.FLOAT,
            output_layout="CHW",
        )
        if gpu:
            label = label.gpu()
        if masked is None:
            return images, label
        return images, label, masked.gpu() if gpu else masked

    return graph()


def _check_split(shards: ShardSet, rank: int, world_size: int, device: str, epoch: int) -> None:
    if device not in ("cpu", "gpu"):
        raise FacetoolError(f"loader device must be 'cpu' or 'gpu', got {device!r}")
    if not (0 <= rank < world_size):
        raise FacetoolError(f"rank {rank} outside world size {world_size}")
    if world_size > shards.samples:
        raise FacetoolError(f"{shards.root}: {shards.samples} samples cannot be split over {world_size} ranks")
    if epoch < 0:
        raise FacetoolError(f"epoch must be >= 0, got {epoch}")


def _decode(encoded, config: LoaderConfig, gpu: bool):
    """The decoder (inside a pipeline definition): nvJPEG and the hardware decoder on the GPU, else the CPU."""
    from nvidia.dali import fn, types

    if not gpu:
        return fn.decoders.image(encoded, device="cpu", output_type=types.RGB)
    return fn.decoders.image(
        encoded,
        device="mixed",
        output_type=types.RGB,
        hw_decoder_load=config.hw_decoder_load,
        preallocate_width_hint=config.image_size,
        preallocate_height_hint=config.image_size,
        device_memory_padding=1 << 20,  # the 16 MiB default is sized for ImageNet photos
        host_memory_padding=1 << 20,
        jpeg_fancy_upsampling=True,  # chroma upsampled as libjpeg-turbo does on the CPU (and at evaluation)
    )


def _reader(shards: ShardSet, config: LoaderConfig, rank: int, world_size: int, epoch: int, with_masks: bool):
    """The webdataset reader of an epoch's pipeline (inside a pipeline definition): encoded image, (mask,) label.
    The tar files come in an order drawn from (seed, epoch), the same on every rank: one global order."""
    from nvidia.dali import fn, types

    order = tar_order(len(shards.shards), config.seed, epoch)
    images = ";".join(IMAGE_EXTS)
    exts = [images, MASK_EXT, LABEL_EXT] if with_masks else [images, LABEL_EXT]
    return fn.readers.webdataset(
        paths=[str(shards.shards[i].tar) for i in order],
        index_paths=[str(shards.shards[i].index) for i in order],
        ext=exts,
        dtypes=[types.UINT8] * (len(exts) - 1) + [types.INT32],
        missing_component_behavior="empty",  # mask.jpg is optional; open_shards checked the rest
        random_shuffle=True,
        initial_fill=config.shuffle_buffer,
        seed=derive_seed(config.seed, 3, epoch, rank),
        shard_id=rank,
        num_shards=world_size,
        pad_last_batch=True,
        prefetch_queue_depth=config.reader_prefetch,
        tensor_init_bytes=config.tensor_init_bytes,
        name=READER_NAME,
    )


def find_bad_sample(
    shards: ShardSet, config: LoaderConfig, rank: int, world_size: int, epoch: int, first: int, count: int
) -> FacetoolError | None:
    """Re-read batches ``first .. first + count - 1`` of an epoch on the CPU, as the pipeline's reader hands them
    out (the same reader, so the same samples), and check each sample as the fallback loader does (label, Pillow
    decode of its image and twin): the first bad one as an error naming its shard and key, else None."""
    from nvidia.dali import pipeline_def

    @pipeline_def(batch_size=config.batch_size, num_threads=1, device_id=None, prefetch_queue_depth=1)
    def reread():
        return tuple(_reader(shards, config, rank, world_size, epoch, with_masks=config.masked_prob > 0))

    pipe = reread()
    pipe.build()
    for batch in range(first + count):
        outputs = pipe.run()
        if batch < first:
            continue
        *encoded, labels = outputs
        for i in range(len(labels)):
            tar, key = _source(labels[i].source_info())
            try:
                check_label(tar, key, int(np.array(labels[i]).reshape(-1)[0]), shards.classes)
                for images in encoded:
                    data = np.array(images[i]).tobytes()
                    if data:  # an empty mask: this sample has no twin
                        decode_rgb(data, tar, key)
            except FacetoolError as err:
                return err
    return None


def _source(info: str) -> tuple[str, str]:
    """(tar, sample key) from the reader's source info of a member, ``TAR:OFFSET:KEY.EXT``."""
    tar, _, member = info.rsplit(":", 2)
    return tar, member.split(".", 1)[0]


def _summary(err: BaseException) -> str:
    """The line of a DALI error that says what failed (its message is a page of pipeline traceback)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip() and "no longer valid" not in line]
    return lines[-1] if lines else type(err).__name__


def _augment(images, config: LoaderConfig, fn, types):
    """The optional augmentations, each applied to a sample with its probability (a conditional, so samples that
    skip it cost nothing), in the order the fallback applies them: crop, colour, grayscale, blur, down-up."""
    size = config.image_size
    if config.crop_prob > 0:
        if fn.random.coin_flip(probability=config.crop_prob, dtype=types.BOOL):
            images = fn.random_resized_crop(
                images,
                size=[size, size],
                random_area=list(config.crop_area),
                random_aspect_ratio=list(config.crop_aspect),
                interp_type=types.INTERP_LINEAR,
                antialias=False,
            )
    if config.color_prob > 0:
        if fn.random.coin_flip(probability=config.color_prob, dtype=types.BOOL):
            b, c, s = config.brightness, config.contrast, config.saturation
            images = fn.color_twist(
                images,
                brightness=fn.random.uniform(range=[1 - b, 1 + b]),
                contrast=fn.random.uniform(range=[1 - c, 1 + c]),
                saturation=fn.random.uniform(range=[1 - s, 1 + s]),
                hue=fn.random.uniform(range=[-config.hue, config.hue]) if config.hue > 0 else 0.0,
            )
    if config.gray_prob > 0:
        if fn.random.coin_flip(probability=config.gray_prob, dtype=types.BOOL):
            images = fn.hsv(images, saturation=0.0)
    if config.blur_prob > 0:
        if fn.random.coin_flip(probability=config.blur_prob, dtype=types.BOOL):
            sigma = fn.random.uniform(range=list(config.blur_sigma))
            window = 2 * math.ceil(3 * config.blur_sigma[1]) + 1
            images = fn.gaussian_blur(images, sigma=sigma, window_size=window)
    if config.downup_prob > 0:
        if fn.random.coin_flip(probability=config.downup_prob, dtype=types.BOOL):
            lo, hi = config.downup_scale
            small = fn.random.uniform(range=[lo * size, hi * size])
            images = fn.resize(images, resize_x=small, resize_y=small, interp_type=types.INTERP_LINEAR)
            images = fn.resize(images, size=[size, size], interp_type=types.INTERP_LINEAR)
    return images


class DaliLoader:
    """Iterate epochs of :class:`Batch` from the DALI pipeline; ``for batch in loader`` is one epoch, the one
    ``loader.epoch`` names (set it to start anywhere: a resumed run sets it to its checkpoint's epoch).

    Tensors are on the training device (``cuda:device_id`` for the GPU pipeline, else the CPU). The images of a
    batch stay valid after the next one is drawn (DALI hands each batch over as its own torch tensor). The first
    epoch's pipeline is built at construction, so configuration errors surface there.
    """

    def __init__(
        self,
        shards: ShardSet,
        config: LoaderConfig,
        rank: int = 0,
        world_size: int = 1,
        device: str = "cpu",
        device_id: int | None = None,
    ) -> None:
        require_dali("the DALI loader")
        self.shards, self.config, self.rank, self.world_size = shards, config, rank, world_size
        self._device_kind, self._device_id = device, device_id
        self.device = torch.device("cuda", device_id or 0) if device == "gpu" else torch.device("cpu")
        self._with_masks = config.masked_prob > 0
        self.epoch = 0
        warn_mask_reuse(shards, config.masked_prob, rank)
        self._ready: tuple[int, object] | None = None  # (epoch, iterator not yet drawn from)
        self._guarded(0, 0, lambda: self._prepare(0))

    def _prepare(self, epoch: int):
        """The iterator over ``epoch``'s pipeline, built now unless an unused one for that epoch is ready."""
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        if self._ready is not None and self._ready[0] == epoch:
            return self._ready[1]
        self._ready = None  # the previous pipeline goes before the next is built (threads, buffers)
        pipe = build_pipeline(
            self.shards, self.config, self.rank, self.world_size, self._device_kind, self._device_id, epoch=epoch
        )
        pipe.build()
        policy = LastBatchPolicy.PARTIAL if self.config.last_batch == "partial" else LastBatchPolicy.DROP
        iterator = DALIGenericIterator(
            [pipe],
            ["images", "labels", "masked"] if self._with_masks else ["images", "labels"],
            reader_name=READER_NAME,
            last_batch_policy=policy,
        )
        self._ready = (epoch, iterator)
        return iterator

    def __len__(self) -> int:
        """Batches per epoch on this rank (the same on every rank)."""
        return batches_per_epoch(self.shards.samples, self.world_size, self.config.batch_size, self.config.last_batch)

    def __iter__(self) -> Iterator[Batch]:
        epoch = self.epoch
        iterator = self._guarded(epoch, 0, lambda: self._prepare(epoch))
        self._ready = None  # drawn from now: a later epoch, or this one again, gets a fresh pipeline
        for batch in itertools.count():
            out = self._guarded(epoch, batch, functools.partial(next, iterator, None))
            if out is None:
                break
            data = out[0]
            labels = data["labels"].view(-1).long()
            if bool(((labels < 0) | (labels >= self.shards.classes)).any()):  # one sync; the step syncs anyway
                raise self._culprit(epoch, batch, None)
            if self._with_masks:
                masked = data["masked"].view(-1).bool()
            else:
                masked = torch.zeros(labels.shape, dtype=torch.bool, device=labels.device)
            yield Batch(data["images"], labels, masked)
        del iterator
        self.epoch += 1

    def _guarded(self, epoch: int, batch: int, step: Callable[[], T]) -> T:
        """Run ``step`` (building, or drawing from, the pipeline); a DALI failure (a RuntimeError carrying a page
        of pipeline traceback) becomes one line naming the sample at fault."""
        try:
            return step()
        except RuntimeError as err:
            raise self._culprit(epoch, batch, err) from None

    def _culprit(self, epoch: int, batch: int, err: RuntimeError | None) -> FacetoolError:
        """The error for a failure at ``batch`` of ``epoch``: the bad sample, found by re-reading the batches the
        failure can belong to (the pipeline runs ahead by its prefetch depths) on the CPU."""
        ahead = 1 if err is None else self.config.prefetch + self.config.reader_prefetch + 2
        found = find_bad_sample(self.shards, self.config, self.rank, self.world_size, epoch, batch, ahead)
        if found is not None:
            return found
        what = f"a label outside [0, {self.shards.classes})" if err is None else _summary(err)
        return FacetoolError(
            f"{self.shards.root}: the DALI pipeline failed in epoch {epoch}, batch {batch} ({what}), and no sample "
            "of that batch fails when read again on the CPU"
        )


__all__ = ["DALI_INSTALL", "DaliLoader", "build_pipeline", "dali_available", "require_dali"]

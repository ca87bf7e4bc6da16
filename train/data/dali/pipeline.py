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
for the GPU decoder's buffers), once per epoch. The rest of an epoch interrupted on another layout is the one
exception: its samples come from an external source (:mod:`.source`) into the same graph.
"""

from __future__ import annotations

import math

import numpy as np

from facetool.pipeline.errors import FacetoolError
from facetool.pipeline.shards.format import IMAGE_EXTS, LABEL_EXT, MASK_EXT
from facetool.train.data.checks import check_label, decode_rgb
from facetool.train.data.config import LoaderConfig
from facetool.train.data.epochs import derive_seed, tar_order
from facetool.train.data.shardset import ShardSet

READER_NAME = "Reader"
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
    source=None,
):
    """The DALI pipeline (not yet built) for one rank and one ``epoch``: outputs images (NCHW), labels (int32,
    (1,)) and, when ``masked_prob`` > 0, masked (bool). ``device`` "gpu" decodes with ``device="mixed"`` on
    ``device_id``; "cpu" runs with ``device_id=None``. ``decode_only`` stops after the decoder (uint8 HWC
    images, no augmentation, no normalisation): what `bench loader` times as the cost of reading and decoding.
    ``source`` (a :class:`~.source.RemainderSource`) replaces the reader: the rest of an interrupted epoch."""
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
        if source is None:
            outputs = epoch_reader(shards, config, rank, world_size, epoch, sample_exts(pick > 0))
        else:
            outputs = source.outputs(with_masks=pick > 0)
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


def epoch_reader(
    shards: ShardSet, config: LoaderConfig, rank: int, world_size: int, epoch: int, exts: list[str]
) -> list:
    """The webdataset reader of an epoch (inside a pipeline definition): one output per entry of ``exts``, the
    last the label. The tar files come in an order drawn from (seed, epoch), the same on every rank: one global
    order. Which samples it hands out, in which order, depends on these settings alone, not on ``exts``."""
    from nvidia.dali import fn, types

    order = tar_order(len(shards.shards), config.seed, epoch)
    outputs = fn.readers.webdataset(
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
    return list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]


def sample_exts(with_masks: bool) -> list[str]:
    """The members a training pipeline reads: the image, the masked twin (when masks are drawn), the label."""
    images = ";".join(IMAGE_EXTS)
    return [images, MASK_EXT, LABEL_EXT] if with_masks else [images, LABEL_EXT]


def find_bad_sample(
    shards: ShardSet, config: LoaderConfig, rank: int, world_size: int, epoch: int, first: int, count: int
) -> FacetoolError | None:
    """Re-read batches ``first .. first + count - 1`` of an epoch on the CPU, as the pipeline's reader hands them
    out (the same reader, so the same samples), and check each sample as the fallback loader does (label, Pillow
    decode of its image and twin): the first bad one as an error naming its shard and key, else None."""
    from nvidia.dali import pipeline_def

    @pipeline_def(batch_size=config.batch_size, num_threads=1, device_id=None, prefetch_queue_depth=1)
    def reread():
        return tuple(epoch_reader(shards, config, rank, world_size, epoch, sample_exts(config.masked_prob > 0)))

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


def error_line(err: BaseException) -> str:
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

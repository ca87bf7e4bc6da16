"""Whole batches: the masked and flip choices of a batch drawn in one call, its JPEGs decoded by torchvision's
libjpeg-turbo binding, flip and ``(x - 127.5) / 127.5`` applied to the whole batch and written straight into the
batch's buffer (shared memory in a worker).

Where no pixel augmentation is on, the draws, pixels and errors equal the per-sample path's
(:func:`~facetool.train.data.fallback.samples.process_sample`): the same values from the same generator in the same
order, the same libjpeg-turbo decoding (accurate integer IDCT, fancy upsampling) and the same float32 arithmetic.
Images torchvision does not decode as 1 or 3 channels (PNG, CMYK JPEG, damaged data) go to Pillow, which decodes
them as before or raises the sample's error.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from facetool.pipeline.errors import FacetoolError
from facetool.pipeline.shards.format import IMAGE_EXTS, LABEL_EXT, MASK_EXT
from facetool.train.data.checks import check_label, decode_rgb
from facetool.train.data.config import LoaderConfig
from facetool.train.data.fallback.samples import SCALE, process_sample

PIXEL_AUGMENTATIONS = ("crop_prob", "color_prob", "gray_prob", "blur_prob", "downup_prob")
JPEG_MAGIC = b"\xff\xd8"
CHUNK = 16  # images normalised per step: a chunk's float32 pixels stay in the cache between its two passes


def per_sample(cfg: LoaderConfig) -> bool:
    """Pixel augmentations run in Pillow and draw a varying number of values per sample: such batches are built
    one sample at a time."""
    return any(getattr(cfg, name) > 0 for name in PIXEL_AUGMENTATIONS)


def fill_batch(
    chunk: list[dict],
    cfg: LoaderConfig,
    pick: float,
    rng: np.random.Generator,
    classes: int | None,
    out: tuple[np.ndarray, np.ndarray, np.ndarray],
    scratch: torch.Tensor,
) -> None:
    """Build one batch of samples into ``out`` = (images (n, 3, S, S) of ``cfg.dtype``, labels (n,) int64, masked
    (n,) bool); ``scratch`` is a (B, S, S, 3) uint8 tensor the whole-batch path decodes into."""
    if per_sample(cfg):
        fill_per_sample(chunk, cfg, pick, rng, classes, out)
    else:
        fill_whole(chunk, cfg, pick, rng, classes, out, scratch)


def fill_per_sample(
    chunk: list[dict],
    cfg: LoaderConfig,
    pick: float,
    rng: np.random.Generator,
    classes: int | None,
    out: tuple[np.ndarray, np.ndarray, np.ndarray],
) -> None:
    """The per-sample path: :func:`process_sample` for each sample, float16 converted from the float32 result."""
    images, labels, masked = out
    pixels = images if images.dtype == np.float32 else np.empty(images.shape, dtype=np.float32)
    for i, sample in enumerate(chunk):
        labels[i], masked[i] = process_sample(sample, cfg, pick, rng, pixels[i], classes)
    if pixels is not images:
        images[...] = pixels


def draw_choices(has_twin: np.ndarray, pick: float, flip_prob: float, rng: np.random.Generator):
    """(masked, flipped) of a batch from one call to ``rng``: sample by sample, a draw for the masked choice (only
    for samples with a twin, only when ``pick`` > 0), then one for the flip (only when ``flip_prob`` > 0), as the
    per-sample path draws them."""
    n = len(has_twin)
    chooses = has_twin if pick > 0 else np.zeros(n, dtype=bool)
    draws = chooses.astype(np.int64) + (1 if flip_prob > 0 else 0)
    values = rng.random(int(draws.sum()))
    first = np.cumsum(draws) - draws
    masked = np.zeros(n, dtype=bool)
    masked[chooses] = values[first[chooses]] < pick
    flipped = values[first + chooses] < flip_prob if flip_prob > 0 else np.zeros(n, dtype=bool)
    return masked, flipped


def fill_whole(
    chunk: list[dict],
    cfg: LoaderConfig,
    pick: float,
    rng: np.random.Generator,
    classes: int | None,
    out: tuple[np.ndarray, np.ndarray, np.ndarray],
    scratch: torch.Tensor,
) -> None:
    """The whole-batch path (no pixel augmentation): labels, choices, decoding, flip and normalisation."""
    images, labels, masked = out
    n = len(chunk)
    labels[:] = np.frombuffer(b"".join([s[LABEL_EXT] for s in chunk]), dtype="<i4")
    bad = n  # the first sample whose label is out of range: the samples before it decode (or fail) first
    if classes is not None:
        outside = np.flatnonzero((labels < 0) | (labels >= classes))
        bad = int(outside[0]) if len(outside) else n
    has_twin = np.fromiter((MASK_EXT in s for s in chunk), dtype=bool, count=n)
    masked[:], flipped = draw_choices(has_twin, pick, cfg.flip_prob, rng)
    data = [s[MASK_EXT] if m else image_member(s) for s, m in zip(chunk, masked.tolist(), strict=True)]
    decode_into(chunk[:bad], data[:bad], scratch[:bad], cfg.image_size)
    if bad < n:
        check_label(chunk[bad].get("__url__"), chunk[bad].get("__key__"), int(labels[bad]), classes)
    pixels = scratch[:n]
    for i in np.flatnonzero(flipped).tolist():  # image by image: ~10x faster than torch's index_put over the batch
        pixels[i].copy_(pixels[i].flip(1))
    normalise(pixels.permute(0, 3, 1, 2), torch.from_numpy(images))


def image_member(sample: dict) -> bytes:
    """The holistic image of a sample (its first image member)."""
    for ext in IMAGE_EXTS:
        if ext in sample:
            return sample[ext]
    raise KeyError(IMAGE_EXTS[0])  # the reader checked every sample has one


def decode_into(chunk: list[dict], data: list[bytes], out: torch.Tensor, size: int) -> None:
    """Decode the images ``data`` of the samples ``chunk`` as RGB into ``out`` (n, size, size, 3) uint8: JPEGs with
    torchvision (one call for the batch), the rest with Pillow; an image of another size is the sample's error.
    Channels stay last, as decoded: a plain copy here, the transposition to NCHW comes with normalisation."""
    if not data:
        return
    jpegs = [i for i, d in enumerate(data) if d[:2] == JPEG_MAGIC]
    decoded: list[torch.Tensor | None] = [None] * len(data)
    if jpegs:
        for i, image in zip(jpegs, decode_jpegs([data[i] for i in jpegs]), strict=True):
            decoded[i] = image
    if len(jpegs) == len(data) and all(t is not None and t.shape == (3, size, size) for t in decoded):
        torch.stack([t.permute(1, 2, 0) for t in decoded], out=out)  # torchvision's CHW views of HWC pixels
        return
    for i, image in enumerate(decoded):
        if image is None or image.shape[0] not in (1, 3):  # Pillow decodes it as before, or names the sample
            image = torch.from_numpy(np.array(decode_rgb(data[i], chunk[i]["__url__"], chunk[i]["__key__"])))
            image = image.permute(2, 0, 1)
        if image.shape[1:] != (size, size):
            raise FacetoolError(
                f"{chunk[i].get('__url__')}: sample {chunk[i].get('__key__')} is {image.shape[2]}x{image.shape[1]}, "
                f"the loader expects {size}x{size}"
            )
        out[i].copy_(image.permute(1, 2, 0))  # a grayscale JPEG's one channel fills all three, as convert("RGB")


def decode_jpegs(data: list[bytes]) -> list[torch.Tensor | None]:
    """torchvision's decoding of each JPEG, channels as stored (None where it fails: Pillow decides)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    blob = torch.frombuffer(bytearray(b"".join(data)), dtype=torch.uint8)
    parts = list(torch.split(blob, [len(d) for d in data]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torchvision 0.29 warns on every call otherwise
        try:
            return decode_jpeg(parts, mode=ImageReadMode.UNCHANGED)
        except RuntimeError:  # one of them is damaged: decode them one by one
            return [_decode_or_none(p) for p in parts]


def _decode_or_none(data: torch.Tensor) -> torch.Tensor | None:
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        return decode_jpeg(data, mode=ImageReadMode.UNCHANGED)
    except RuntimeError:
        return None


def normalise(pixels: torch.Tensor, out: torch.Tensor) -> None:
    """``out`` = (pixels - 127.5) * float32(1 / 127.5) computed in float32 (then rounded to ``out``'s float16),
    the per-sample path's arithmetic; a chunk of images at a time, so that each stays in the cache. ``pixels`` may be
    a channels-last view: reading it strided costs less than a transposing copy beforehand."""
    staging = None if out.dtype == torch.float32 else torch.empty((CHUNK, *pixels.shape[1:]), dtype=torch.float32)
    scale = float(SCALE)
    for a in range(0, len(pixels), CHUNK):
        src = pixels[a : a + CHUNK]
        dst = out[a : a + CHUNK] if staging is None else staging[: len(src)]
        torch.sub(src, 127.5, out=dst)
        dst.mul_(scale)
        if staging is not None:
            out[a : a + CHUNK].copy_(dst)

"""The per-sample path: choose, decode (Pillow) and augment one sample at a time. Batches with pixel augmentations
take it; the whole-batch path (:mod:`.batches`) gives the same batches where no pixel augmentation is on."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

from facetool.pipeline.errors import FacetoolError
from facetool.pipeline.shards.format import IMAGE_EXTS, LABEL_EXT, MASK_EXT
from facetool.train.data.checks import check_label, decode_rgb
from facetool.train.data.config import LoaderConfig

SCALE = np.float32(1.0 / 127.5)  # (x - 127.5) * SCALE: the normalisation of both paths, bit for bit


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
    out *= SCALE
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

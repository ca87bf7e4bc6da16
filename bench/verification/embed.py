"""Embedding verification sets with a backbone: model loading, device, decoding, batches, image + flip embeddings,
and the metrics of a set from a model or from embeddings computed elsewhere.

Images are normalised as in training ((x - 127.5) / 127.5, RGB, NCHW), each with its horizontal flip, unless the
:class:`~.protocol.Protocol` says otherwise (FaceT's); torch is imported inside the functions that need it.
"""

from __future__ import annotations

import ctypes
import io
import itertools
import os
import re
import sys
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from facetool.pipeline.atomic import Progress
from facetool.pipeline.errors import FacetoolError

from .metrics import FOLDS, SetMetrics, embedding_metrics
from .protocol import INSIGHTFACE, TRAINING_SCALE, Protocol
from .sets import PairSet

IMAGE_SIZE = 112
#: Images per forward pass by default (each with its flip): small on a CPU, where MobileFaceNet's large activation
#: maps outgrow the caches and its throughput falls with bigger batches; large on a GPU.
DEFAULT_BATCH = {"cpu": 16, "cuda": 256}


def load_model(path: str | os.PathLike, arch: str | None = None) -> tuple[Any, str, dict[str, Any]]:
    """The backbone in ``path``: a facetool backbone, a training checkpoint or, with ``arch``, a bare state dict,
    through the one backbone-file resolver; or an ONNX model (``.onnx``, run by onnxruntime). Returns (model in eval
    mode, backbone name, options). A bad file is a one-line FacetoolError."""
    if str(path).lower().endswith(".onnx"):
        if arch is not None:
            raise FacetoolError(f"{path}: an ONNX model brings its own graph; --arch is for state dicts")
        from .onnx_model import OnnxBackbone

        model = OnnxBackbone(path)
        return model, "onnx", model.describe()
    from facetool.train.models.checkpoint import load_backbone

    return load_backbone(path, arch)


def retain_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory for reuse rather than hand it back to the kernel at once.

    A CPU forward pass allocates activation buffers of tens of MB and frees them again; by default glibc returns
    such blocks to the kernel (mmap/munmap, heap trimming), so every batch faults them in afresh and the kernel
    zeroes them: measured on a 2-vCPU VM, 95 s of the 170 s it took to embed 12,000 images with MobileFaceNet went
    to the kernel (BENCHMARKS.md). Raising both thresholds to 1 GiB ends that. Process-wide, so the command calls
    it (a short-lived process) and library callers such as a training loop decide for themselves. Returns whether
    it took effect (glibc only; elsewhere nothing changes).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's <malloc.h> parameter numbers
    return bool(mallopt(m_mmap_threshold, 1 << 30)) and bool(mallopt(m_trim_threshold, 1 << 30))


def resolve_device(device: str | None) -> str:
    """``None``/``auto``: CUDA when available, else CPU; an explicit ``cuda`` without a GPU is an error."""
    import torch

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise FacetoolError(f"--device {device}: no CUDA GPU is available to torch here")
    return device


def decode_face(data: bytes, where: str) -> np.ndarray:
    """One encoded image as RGB uint8 (112, 112, 3), resized (bilinear) when another size, as InsightFace does."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            img = img.convert("RGB")
            if img.size != (IMAGE_SIZE, IMAGE_SIZE):
                img = img.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)
            return np.asarray(img, dtype=np.uint8)
    except Exception as err:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError...
        reason = re.sub(r" <_io\.BytesIO object at 0x[0-9a-f]+>", "", str(err))  # PIL names our buffer
        raise FacetoolError(f"{where}: cannot decode the image ({type(err).__name__}: {reason})") from None


def _decode_batch(pair_set: PairSet, start: int, stop: int) -> np.ndarray:
    return np.stack(
        [
            decode_face(pair_set.images[i], f"{pair_set.where()}, {pair_set.describe_image(i)}")
            for i in range(start, stop)
        ]
    )


def _batches(pair_set: PairSet, batch_size: int) -> Iterator[tuple[int, np.ndarray]]:
    """Decoded batches in order; the next one is decoded on a thread (PIL releases the GIL) while the model runs."""
    n = len(pair_set.images)
    starts = list(range(0, n, batch_size))
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(_decode_batch, pair_set, 0, min(n, batch_size)) if starts else None
        for k, start in enumerate(starts):
            batch = pending.result()
            if k + 1 < len(starts):
                nxt = starts[k + 1]
                pending = pool.submit(_decode_batch, pair_set, nxt, min(n, nxt + batch_size))
            yield start, batch


def _check_image(pair_set: PairSet, i: int) -> None:
    decode_face(pair_set.images[i], f"{pair_set.where()}, {pair_set.describe_image(i)}")


def check_sets(
    sets: Sequence[PairSet], decode: bool = True, progress: Progress | None = None, folds: int = FOLDS
) -> None:
    """Find what would stop an evaluation before it starts: a set with fewer pairs than the ``folds``, and with
    ``decode`` an image that does not decode (each decoded once, on a few threads: seconds for a few thousand
    JPEGs), as one-line errors naming the set's file (and the image). ``progress(images_done, images)``."""
    for s in sets:
        if s.num_pairs < folds:
            raise FacetoolError(f"{s.where()}: {folds}-fold accuracy needs at least {folds} pairs, got {s.num_pairs}")
    if not decode:
        return
    total, done = sum(len(s.images) for s in sets), 0
    pool = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1))
    try:
        for s in sets:
            for _ in pool.map(_check_image, [s] * len(s.images), range(len(s.images))):  # in order: the first bad
                done += 1
                if progress is not None:
                    progress(done, total)
    finally:
        pool.shutdown(cancel_futures=True)


def default_batch_size(device: str) -> int:
    """Images per forward (plus as many flips) when the user gives none: 16 on a CPU, 256 on a GPU."""
    return DEFAULT_BATCH["cuda" if device.startswith("cuda") else "cpu"]


def embed_batch(
    model: Any,
    batch: np.ndarray,
    device: str,
    masked: np.ndarray | bool = False,
    flip: bool = True,
    scale: float = TRAINING_SCALE,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Embeddings (float32) of a uint8 NHWC RGB batch, normalised as (x - 127.5) / ``scale`` (training's 127.5 by
    default), and with ``flip`` of its horizontal flips, appended to the same forward; ``(embeddings, flipped or
    None)``. A backbone that takes the mask flag (FaceT with prompts) gets ``masked`` (one bool for all, or one
    per image); one whose weights expect BGR (``model.input_channels``) gets the channels reversed."""
    import torch

    from facetool.train.models.state_dict import BGR, RGB

    x = torch.from_numpy(batch).to(device).permute(0, 3, 1, 2).float().contiguous().sub_(127.5).div_(scale)
    if getattr(model, "input_channels", RGB) == BGR:  # weights trained on BGR images (InsightFace_Pytorch's)
        x = x.flip(1)
    if flip:
        x = torch.cat([x, torch.flip(x, dims=[3])])
    if getattr(model, "uses_masked", False):
        flags = torch.as_tensor(np.broadcast_to(np.asarray(masked, dtype=bool), (len(batch),)).copy())
        emb = model(x, (torch.cat([flags, flags]) if flip else flags).to(device))
    else:
        emb = model(x)
    emb = emb.float().cpu().numpy()
    return (emb[: len(batch)], emb[len(batch) :]) if flip else (emb, None)


def embed_set(
    model: Any,
    pair_set: PairSet,
    batch_size: int | None = None,
    device: str | None = None,
    progress: Progress | None = None,
    protocol: Protocol = INSIGHTFACE,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Raw embeddings of every image of ``pair_set`` and of its horizontal flip, (images, D) float32 each (no flip
    embeddings, None, when the ``protocol`` has no flip).

    Images are normalised as in training ((x - 127.5) / 127.5, RGB, NCHW; FaceT's protocol: / 128 for masked sets);
    each batch goes through the model once with its flips appended. Backbones that take the mask flag (FaceT with
    prompts) get ``pair_set.masked`` (FaceT's protocol: every image of a masked set masked). ``progress(images_done,
    images)`` is called after each batch. The model is put in eval mode. ``batch_size`` None: see
    :func:`default_batch_size`.
    """
    import torch

    device = resolve_device(device)
    batch_size = batch_size or default_batch_size(device)
    model = model.eval().to(device)
    takes_flag = bool(getattr(model, "uses_masked", False))
    masked, scale = protocol.flags(pair_set), protocol.scale(pair_set)
    n = len(pair_set.images)
    if n == 0:
        raise FacetoolError(f"{pair_set.where()} has no images")
    # Results go into arrays allocated once: keeping each batch's small output alive between the large transient
    # buffers of the next forwards fragments the heap (measured: hundreds of MB more per 10,000 images on a CPU).
    out = out_flip = None
    with torch.inference_mode():
        for start, batch in _batches(pair_set, batch_size):
            flags = masked[start : start + len(batch)] if takes_flag else False
            emb, emb_flip = embed_batch(model, batch, device, flags, flip=protocol.flip, scale=scale)
            if out is None:
                out = np.empty((n, emb.shape[1]), dtype=np.float32)
                out_flip = np.empty_like(out) if protocol.flip else None
            out[start : start + len(batch)] = emb
            if out_flip is not None:
                out_flip[start : start + len(batch)] = emb_flip
            del emb, emb_flip
            if progress is not None:
                progress(start + len(batch), n)
    return out, out_flip


def evaluate_set(
    model: Any,
    pair_set: PairSet,
    batch_size: int | None = None,
    device: str | None = None,
    progress: Progress | None = None,
    *,
    model_name: str | None = None,
    protocol: Protocol = INSIGHTFACE,
) -> SetMetrics:
    """Embed ``pair_set`` with ``model`` (image + flip, or as ``protocol`` says) and compute its metrics; timings
    go into ``extra``. ``model_name`` (its file, say) names the model in error messages."""
    t0 = time.perf_counter()
    emb, flip = embed_set(model, pair_set, batch_size, device, progress, protocol)
    t1 = time.perf_counter()
    metrics = _set_metrics(pair_set, emb, flip, model_name, protocol.folds)
    t2 = time.perf_counter()
    metrics.extra.update(_set_extra(pair_set, embed_seconds=t1 - t0, metric_seconds=t2 - t1))
    return metrics


def evaluate_features(
    pair_set: PairSet,
    features: np.ndarray,
    flip_features: np.ndarray | None = None,
    labels: tuple[str, str] = ("features", "flip features"),
    protocol: Protocol = INSIGHTFACE,
) -> SetMetrics:
    """Metrics of embeddings computed elsewhere: row i is image i of the set (and of its flip, when given), scored
    with the ``protocol``'s folds. ``labels`` name the two arrays in error messages (their files, say)."""
    if flip_features is not None and not protocol.flip:
        raise FacetoolError(f"{labels[1]}: the {protocol.name} protocol embeds no flips; leave them out")
    for label, arr in zip(labels, (features, flip_features), strict=True):
        if arr is None:
            continue
        if arr.ndim != 2 or arr.shape[0] != len(pair_set.images):
            raise FacetoolError(
                f"{label}: shape {arr.shape}, expected ({len(pair_set.images)}, D): one row per image of "
                f"{pair_set.source} in its order"
            )
        if not np.issubdtype(arr.dtype, np.floating) and not np.issubdtype(arr.dtype, np.integer):
            raise FacetoolError(f"{label}: expected a numeric array, got dtype {arr.dtype}")
    if flip_features is not None and flip_features.shape != features.shape:
        raise FacetoolError(f"{labels[1]}: shape {flip_features.shape} differs from {labels[0]} {features.shape}")
    t0 = time.perf_counter()
    metrics = _set_metrics(pair_set, features, flip_features, labels[0], protocol.folds)
    metrics.extra.update(_set_extra(pair_set, embed_seconds=None, metric_seconds=time.perf_counter() - t0))
    return metrics


def _set_metrics(
    pair_set: PairSet,
    embeddings: np.ndarray,
    flipped: np.ndarray | None,
    source: str | None = None,
    folds: int = FOLDS,
) -> SetMetrics:
    """:func:`embedding_metrics` of the set's pairs over ``folds``; an error names the set and ``source`` (the
    model, or the embeddings' file)."""
    try:
        return embedding_metrics(embeddings, pair_set.pairs, pair_set.issame, flipped, folds)
    except FacetoolError as err:
        raise FacetoolError(f"{pair_set.where()}: {source + ': ' if source else ''}{err}") from None


def _set_extra(pair_set: PairSet, embed_seconds: float | None, metric_seconds: float) -> dict[str, Any]:
    return {
        "images": len(pair_set.images),
        "masked_images": int(pair_set.masked.sum()),
        "source": pair_set.source,
        "embed_seconds": None if embed_seconds is None else round(embed_seconds, 4),
        "metric_seconds": round(metric_seconds, 6),
    }


def model_device(model: Any) -> str | None:
    """Where a torch module lives (its first parameter or buffer); None for a model without any (ONNX graphs)."""
    for tensor in itertools.chain(getattr(model, "parameters", tuple)(), getattr(model, "buffers", tuple)()):
        return str(tensor.device)
    return None


def evaluate_model(
    model: Any,
    sets: Sequence[PairSet],
    batch_size: int | None = None,
    device: str | None = None,
    protocol: Protocol = INSIGHTFACE,
) -> dict[str, dict[str, Any]]:
    """The report's ``sets`` object for ``model`` on ``sets`` under ``protocol``; leaves the model's train/eval
    mode as it found it. ``device`` None: the model's own device (a live backbone is never moved), else as
    :func:`resolve_device`.

    This is the evaluation the training engine is handed as a callable (e.g. ``functools.partial`` over the sets).
    """
    device = device or model_device(model)
    was_training = bool(getattr(model, "training", False))
    try:
        return {s.name: evaluate_set(model, s, batch_size, device, protocol=protocol).to_json() for s in sets}
    finally:
        model.train(was_training)


def load_features(path: str | os.PathLike, mmap: bool = False) -> np.ndarray:
    """A ``.npy`` array of embeddings, without pickles (``allow_pickle=False``); ``mmap``: memory-mapped, read-only
    (features of hundreds of thousands of images stay on disk)."""
    try:
        arr = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except OSError as err:
        raise FacetoolError(f"{path}: cannot read ({err.strerror or err})") from None
    except ValueError as err:
        raise FacetoolError(f"{path}: not a plain numeric .npy array ({err})") from None
    if not isinstance(arr, np.ndarray):
        raise FacetoolError(f"{path}: expected one array (.npy), got an archive")
    return arr

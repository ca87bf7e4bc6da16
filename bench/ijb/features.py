"""Streaming embedding of IJB images: read, align, (mask,) embed with the flip, batch by batch.

As ``recognition/arcface_torch/eval_ijbc.py`` (github.com/deepinsight/insightface @
7fadd420c2351d0ffa8cac403421c1a3ed733365, ``Embedding.get`` and ``forward_db``): each image of the 5-point file is
read as RGB, aligned from its five points onto the 112x112 ArcFace template, and it and its horizontal flip go
through the network as ``(x - 127.5) / 127.5``. Only one batch of images is in memory at a time (the next one is
read and aligned on worker threads while the model runs); the embeddings go into float32 (N, D) arrays, in memory
or memory-mapped ``.npy`` files (``save_dir``), so the working memory does not grow with N.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from facetool.bench.verification.embed import embed_batch
from facetool.pipeline.align import LandmarkList, align_face, read_rgb, relative_name
from facetool.pipeline.atomic import Progress, atomic_path

#: Names of the arrays ``save_dir`` receives; they are what ``--features`` and ``--flip-features`` read back.
FEATURES_FILE, FLIP_FEATURES_FILE = "features.npy", "flip_features.npy"


def aligned_batch(
    images: LandmarkList, image_dir: Path, start: int, stop: int, masked: bool = False, mask_seed: int = 0
) -> np.ndarray:
    """Images ``start:stop`` of the list, read from ``image_dir`` and aligned ((B, 112, 112, 3) uint8); with
    ``masked`` each gets a synthetic mask from facetool's renderer, keyed by its index in the list."""
    out = np.empty((stop - start, 112, 112, 3), dtype=np.uint8)
    for k, i in enumerate(range(start, stop)):
        where = images.where(i)
        face = align_face(read_rgb(image_dir / relative_name(images.names[i], where), where), images.points[i])
        if masked:
            from facetool.pipeline.masks import render_mask

            face = render_mask(face, mask_seed, i).image
        out[k] = face
    return out


def _batches(images: LandmarkList, image_dir: Path, batch_size: int, masked: bool, seed: int) -> Iterator:
    """(start, aligned batch) in order; two batches are prepared ahead on worker threads (PIL releases the GIL)."""
    n = len(images)
    starts = list(range(0, n, batch_size))
    with ThreadPoolExecutor(max_workers=2) as pool:
        pending = [
            pool.submit(aligned_batch, images, image_dir, s, min(n, s + batch_size), masked, seed) for s in starts[:2]
        ]
        for k, start in enumerate(starts):
            batch = pending.pop(0).result()
            if k + 2 < len(starts):
                s = starts[k + 2]
                pending.append(pool.submit(aligned_batch, images, image_dir, s, min(n, s + batch_size), masked, seed))
            yield start, batch


def _allocate(stack: contextlib.ExitStack, save_dir: Path | None, name: str, shape: tuple[int, int]) -> np.ndarray:
    if save_dir is None:
        return np.empty(shape, dtype=np.float32)
    tmp = stack.enter_context(atomic_path(save_dir / name))
    return np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=shape)


def embed_images(
    model: Any,
    images: LandmarkList,
    image_dir: str | os.PathLike,
    *,
    batch_size: int,
    device: str,
    flip: bool = True,
    masked: bool = False,
    mask_seed: int = 0,
    save_dir: str | os.PathLike | None = None,
    progress: Progress | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """(features, flip features or None) of every image of ``images`` (float32, one row per line, in order).

    With ``save_dir`` the arrays are memory-mapped ``features.npy`` / ``flip_features.npy`` there, published
    atomically when complete (they can be given back as ``--features`` / ``--flip-features``)."""
    import torch

    model = model.eval().to(device)
    n = len(images)
    save = Path(save_dir) if save_dir is not None else None
    if save is not None:
        save.mkdir(parents=True, exist_ok=True)
    out: list[np.ndarray] = []
    with contextlib.ExitStack() as stack, torch.inference_mode():
        for start, batch in _batches(images, Path(image_dir), batch_size, masked, mask_seed):
            embs = [e for e in embed_batch(model, batch, device, masked, flip) if e is not None]
            if not out:
                names = (FEATURES_FILE, FLIP_FEATURES_FILE)[: len(embs)]
                out = [_allocate(stack, save, name, (n, embs[0].shape[1])) for name in names]
            for arr, emb in zip(out, embs, strict=True):
                arr[start : start + len(batch)] = emb
            if progress is not None:
                progress(start + len(batch), n)
        for arr in out:
            if isinstance(arr, np.memmap):
                arr.flush()
    return out[0], (out[1] if flip else None)


__all__ = ["FEATURES_FILE", "FLIP_FEATURES_FILE", "aligned_batch", "embed_images"]

"""Training checkpoints: one folder per step, one file per rank, made atomic by writing a temporary folder and
renaming it once every rank has written its part (and a ``COMPLETE`` marker), so a killed run never leaves a
checkpoint that looks usable but is not.

Layout: ``OUTPUT/checkpoints/step-00000100/rank-00000.pt`` (rank 0's file also holds the backbone as
``save_backbone`` writes it, so ``facetool bench verification`` reads it directly). Files load with
``torch.load(weights_only=True)``: only tensors, numbers, strings, lists and dicts are stored (RNG states as
uint8 tensors, the loader position as integers).
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from facetool.pipeline.atomic import atomic_open, fsync_dir, write_bytes_atomic, write_error
from facetool.pipeline.errors import FacetoolError

COMPLETE = "COMPLETE"
_STEP_DIR = re.compile(r"step-(\d{8})$")


def step_dir(root: Path, step: int) -> Path:
    """The folder of the complete checkpoint of ``step``."""
    return root / f"step-{step:08d}"


def rank_file(folder: Path, rank: int) -> Path:
    """Rank ``rank``'s file in a checkpoint folder."""
    return folder / f"rank-{rank:05d}.pt"


def write_rank(root: Path, step: int, rank: int, state: dict[str, Any]) -> Path:
    """Write this rank's state into the step's temporary folder (atomically: a temp name, then a rename)."""
    tmp_dir = root / f".step-{step:08d}.tmp"
    tmp_dir.mkdir(parents=True, exist_ok=True)
    with atomic_open(rank_file(tmp_dir, rank), "wb") as f:
        torch.save(state, f)
    return tmp_dir


def commit(root: Path, step: int, world_size: int, keep: int) -> Path:
    """On rank 0, after every rank has written: mark the folder complete, rename it into place, prune old ones."""
    tmp_dir = root / f".step-{step:08d}.tmp"
    missing = [r for r in range(world_size) if not rank_file(tmp_dir, r).is_file()]
    if missing:
        raise FacetoolError(f"{tmp_dir}: rank {missing[0]} did not write its checkpoint file")
    write_bytes_atomic(tmp_dir / COMPLETE, f"{world_size}\n")
    final = step_dir(root, step)
    try:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp_dir, final)
    except OSError as err:
        raise write_error(final, err) from None
    fsync_dir(root)
    for old in complete_checkpoints(root)[:-keep]:
        shutil.rmtree(old[1], ignore_errors=True)
    return final


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and (p / COMPLETE).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest(root: Path) -> tuple[int, Path] | None:
    """The newest complete checkpoint, or None."""
    found = complete_checkpoints(root)
    return found[-1] if found else None


def written_ranks(folder: Path) -> int:
    """How many ranks wrote the complete checkpoint ``folder`` (its ``COMPLETE`` marker says)."""
    marker = folder / COMPLETE
    try:
        text = marker.read_text().strip()
        written = int(text)
    except OSError as err:
        raise FacetoolError(f"{marker}: cannot read ({err.strerror or err})") from None
    except ValueError:
        raise FacetoolError(f"{marker}: damaged (expected the number of ranks, got {text[:40]!r})") from None
    if written < 1:
        raise FacetoolError(f"{marker}: damaged (expected the number of ranks, got {written})")
    return written


def read_rank(folder: Path, rank: int, mmap: bool = False) -> dict[str, Any]:
    """Rank ``rank``'s state from a complete checkpoint folder; ``mmap``: its tensors mapped from the file, read
    only where used (a resume on another number of ranks takes a few rows of each old rank's class shards)."""
    path = rank_file(folder, rank)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except OSError as err:
        raise FacetoolError(f"{path}: cannot read ({err.strerror or err})") from None
    except Exception as err:
        raise FacetoolError(f"{path}: not a facetool training checkpoint ({str(err).splitlines()[0][:200]})") from None


def rng_state(generator: torch.Generator | None = None) -> torch.Tensor:
    """A copy of ``generator``'s state (torch's global generator by default)."""
    return (generator.get_state() if generator is not None else torch.get_rng_state()).clone()


def numpy_state() -> dict[str, Any]:
    """numpy's and Python's global RNG states as plain containers (weights_only-safe)."""
    import random

    import numpy as np

    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    return {
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(keys.astype("int64")),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "python": {"version": version, "internal": list(internal), "gauss": gauss},
    }


def set_numpy_state(state: dict[str, Any]) -> None:
    """Put back numpy's and Python's global RNG states saved by :func:`numpy_state`."""
    import random

    import numpy as np

    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype("uint32"), n["pos"], n["has_gauss"], n["cached"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss"]))

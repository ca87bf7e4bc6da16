"""Test fixture: give chosen samples of a converted shard folder a masked twin, in the shard format's contract.

Until the real mask renderer writes them, loader tests need shards with ``mask.jpg`` members. This rewrites the
shards of a ``facetool convert`` output exactly as the contract says convert will: a ``mask.jpg`` (a JPEG of the
same size as ``jpg``; here the face with its lower half painted over) for the chosen samples, members sorted by
extension (``jpg``, ``label.i32``, ``mask.jpg``), listed in the DALI index like every member, and the manifest's
per-shard ``masked`` counts, ``bytes``, ``sha256``, total ``masked`` and ``arguments.mask_fraction`` updated.
It is a fixture, not a renderer: the "mask" is a flat patch, just visibly different from the face.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from facetool.pipeline.shards import _ShardWriter


def fake_mask_jpeg(jpg: bytes) -> bytes:
    """The face with its lower half (nose tip to chin) painted a light blue with stripes, re-encoded as JPEG."""
    pixels = np.array(Image.open(io.BytesIO(jpg)).convert("RGB"))
    h = pixels.shape[0]
    lower = pixels[h * 9 // 16 :]
    lower[:] = (150, 190, 220)
    lower[::6] = (120, 160, 200)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=90)
    return out.getvalue()


def is_chosen(key: str, fraction: float, seed: int = 0) -> bool:
    """A deterministic, key-only choice of about ``fraction`` of the samples."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") < fraction * 2**64


def _members(tar: bytes, line: bytes) -> tuple[str, list[tuple[str, bytes]]]:
    fields = line.split()
    members = []
    for i in range(0, len(fields), 4):
        ext, offset, size = fields[i].decode(), int(fields[i + 1]), int(fields[i + 2])
        members.append((ext, tar[offset : offset + size]))
    return fields[3].decode().split(".", 1)[0], members


def rewrite_shard(path: Path, samples: list[tuple[str, list[tuple[str, bytes]]]]) -> tuple[int, str, int]:
    """Write ``samples`` (key, members) as the tar at ``path`` and its index; returns (bytes, sha256, masked)."""
    writer = _ShardWriter(path.with_suffix(".tar.tmp"))
    masked = 0
    for key, members in samples:
        writer.add_sample(key, sorted(members, key=lambda m: m[0]))
        masked += any(ext == "mask.jpg" for ext, _ in members)
    size, digest = writer.finish()
    path.with_suffix(".idx").write_bytes(writer.index_bytes())
    path.with_suffix(".tar.tmp").replace(path)
    return size, digest, masked


def read_samples(tar_path: Path) -> list[tuple[str, list[tuple[str, bytes]]]]:
    """All samples of a shard, via its index: (key, [(ext, bytes), ...])."""
    tar = tar_path.read_bytes()
    lines = tar_path.with_suffix(".idx").read_bytes().split(b"\n")[1:-1]
    return [_members(tar, line) for line in lines]


def add_masks(shards_dir: Path, fraction: float, seed: int = 0) -> set[str]:
    """Give about ``fraction`` of the samples (chosen by key) a ``mask.jpg``; returns the keys that got one."""
    manifest_path = shards_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    chosen: set[str] = set()
    for entry in manifest["shards"]:
        tar_path = shards_dir / entry["name"]
        samples = []
        for key, members in read_samples(tar_path):
            if is_chosen(key, fraction, seed):
                jpg = dict(members)["jpg"]
                members = [*members, ("mask.jpg", fake_mask_jpeg(jpg))]
                chosen.add(key)
            samples.append((key, members))
        entry["bytes"], entry["sha256"], entry["masked"] = rewrite_shard(tar_path, samples)
    manifest["masked"] = sum(e["masked"] for e in manifest["shards"])
    manifest["arguments"]["mask_fraction"] = fraction
    manifest_path.write_text(json.dumps(manifest, indent=1) + "\n")
    return chosen


def update_manifest_entry(shards_dir: Path, name: str, size: int, digest: str, masked: int, samples: int) -> None:
    """Record a hand-edited shard in the manifest (for tests that damage one sample but keep counts honest)."""
    manifest_path = shards_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    for entry in manifest["shards"]:
        if entry["name"] == name:
            entry.update(bytes=size, sha256=digest, masked=masked, samples=samples)
    manifest["masked"] = sum(e["masked"] for e in manifest["shards"])
    manifest["samples"] = sum(e["samples"] for e in manifest["shards"])
    manifest_path.write_text(json.dumps(manifest, indent=1) + "\n")

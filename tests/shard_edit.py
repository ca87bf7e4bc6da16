"""Test helpers that read a converted shard folder sample by sample and rewrite a shard in format v1 (members
sorted by extension, a wds2idx-identical index, the manifest's counts and checksums kept honest), so tests can
damage one sample on purpose."""

from __future__ import annotations

import json
from pathlib import Path

from facetool.pipeline.shards import _ShardWriter


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

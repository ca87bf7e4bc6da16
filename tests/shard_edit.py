"""Test helpers that read a converted shard folder sample by sample and rewrite a shard in format v1 (members
sorted by extension, a wds2idx-identical index, the manifest's counts and checksums kept honest), so tests can
damage one sample on purpose."""

from __future__ import annotations

from pathlib import Path

from facetool.pipeline.atomic import atomic_path, write_bytes_atomic
from facetool.pipeline.shards.format import (
    MANIFEST,
    MASK_EXT,
    index_sample_lines,
    parse_index_line,
    read_manifest,
    write_manifest,
)
from facetool.pipeline.shards.tar import ShardWriter


def _members(tar: bytes, line: bytes) -> tuple[str, list[tuple[str, bytes]]]:
    members = parse_index_line(line)
    return members[0].key, [(m.ext, tar[m.offset : m.offset + m.size]) for m in members]


def rewrite_shard(path: Path, samples: list[tuple[str, list[tuple[str, bytes]]]]) -> tuple[int, str, int]:
    """Write ``samples`` (key, members) as the tar at ``path`` and its index; returns (bytes, sha256, masked)."""
    with atomic_path(path) as tmp:
        writer = ShardWriter(tmp)
        masked = 0
        for key, members in samples:
            writer.add_sample(key, sorted(members, key=lambda m: m[0]))
            masked += any(ext == MASK_EXT for ext, _ in members)
        size, digest = writer.finish()
        write_bytes_atomic(path.with_suffix(".idx"), writer.index_bytes())
    return size, digest, masked


def read_samples(tar_path: Path) -> list[tuple[str, list[tuple[str, bytes]]]]:
    """All samples of a shard, via its index: (key, [(ext, bytes), ...])."""
    tar = tar_path.read_bytes()
    lines = index_sample_lines(tar_path.with_suffix(".idx").read_bytes())
    return [_members(tar, line) for line in lines]


def update_manifest_entry(shards_dir: Path, name: str, size: int, digest: str, masked: int, samples: int) -> None:
    """Record a hand-edited shard in the manifest (for tests that damage one sample but keep counts honest)."""
    manifest = read_manifest(shards_dir)
    for entry in manifest["shards"]:
        if entry["name"] == name:
            entry.update(bytes=size, sha256=digest, masked=masked, samples=samples)
    manifest["masked"] = sum(e["masked"] for e in manifest["shards"])
    manifest["samples"] = sum(e["samples"] for e in manifest["shards"])
    write_manifest(shards_dir / MANIFEST, manifest)

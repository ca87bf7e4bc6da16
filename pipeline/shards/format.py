"""The shard format (v1, see docs/FORMAT.md): member names, file names, DALI index lines and the manifest.

The one home of these names for the writer (``facetool convert``), the loaders (``facetool.train.data``), the
benchmarks and the tests: a reader parses index lines with ``parse_index_line`` and loads manifests with
``read_manifest``.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

from facetool import __version__
from facetool.pipeline.atomic import atomic_open
from facetool.pipeline.errors import FacetoolError

FORMAT_NAME = "facetool-shards"
FORMAT_VERSION = 1
BLOCK = 512  # tar's block: every member is a 512-byte header, then its data padded to a whole block
JPEG_EXT, PNG_EXT = "jpg", "png"
IMAGE_EXTS = (JPEG_EXT, PNG_EXT)  # the original image bytes, as the source held them
LABEL_EXT = "label.i32"  # the class, one little-endian int32
LABEL_DTYPE = "int32-le"
META_EXT = "json"  # the full label vector, for records that have more than one label
MASK_EXT = "mask.jpg"  # the masked twin of the image, for the samples chosen by the mask fraction
MANIFEST = "manifest.json"
INDEX_VERSION = b"v1.2"  # the DALI index version ``wds2idx`` writes
_INDEX_HEADER = re.compile(rb"v1\.2 (\d+)\n")


def shard_name(i: int) -> str:
    """The stem of shard ``i``'s files (``shard-000012``: its ``.tar`` and its DALI ``.idx``)."""
    return f"shard-{i:06d}"


def manifest_name(part: tuple[int, int]) -> str:
    """``manifest.json``, or the manifest of part I of N of a cluster conversion."""
    return MANIFEST if part == (0, 1) else f"manifest.part-{part[0]:04d}-of-{part[1]:04d}.json"


def publish(path: Path, data: bytes | str) -> None:
    """Write ``path`` atomically under the fixed temporary name ``NAME.tmp``: a run killed mid-write leaves a name
    that the resumed run writes again, never an orphan beside the shards."""
    with atomic_open(path, "wb", tmp=path.with_name(path.name + ".tmp")) as f:
        f.write(data.encode() if isinstance(data, str) else data)


# DALI index lines: ``v1.2 N``, then one line per sample of ``EXT OFFSET SIZE NAME`` groups, one per member
class IndexMember(NamedTuple):
    """One member of an index line: extension, data offset and size in the tar, member name."""

    ext: str
    offset: int
    size: int
    name: str

    @property
    def key(self) -> str:
        """The sample key (the member name up to its first dot)."""
        return self.name.split(".", 1)[0]

    @property
    def header_offset(self) -> int:
        """Where the member's tar header starts."""
        return self.offset - BLOCK


def index_header(samples: int) -> bytes:
    """The first line of a DALI index of ``samples`` samples."""
    return b"%s %d\n" % (INDEX_VERSION, samples)


def parse_index_header(text: bytes) -> int | None:
    """The sample count of an index's first line, or None when it is not ``v1.2 N``."""
    head = _INDEX_HEADER.match(text)
    return int(head.group(1)) if head is not None else None


def index_sample_lines(text: bytes) -> list[bytes]:
    """The sample lines of an index (without the header line)."""
    return text.split(b"\n")[1:-1]


def parse_index_line(line: bytes | str) -> list[IndexMember]:
    """The members of one sample's index line; ValueError when it is not groups of ``EXT OFFSET SIZE NAME``."""
    fields = (line.decode() if isinstance(line, bytes) else line).split()
    if len(fields) % 4:
        raise ValueError(f"not groups of 'EXT OFFSET SIZE NAME': {' '.join(fields)!r}")
    return [
        IndexMember(fields[i], int(fields[i + 1]), int(fields[i + 2]), fields[i + 3]) for i in range(0, len(fields), 4)
    ]


def read_index(path: str | os.PathLike) -> list[list[IndexMember]]:
    """Every sample of a DALI index file, as its members."""
    return [parse_index_line(line) for line in index_sample_lines(Path(path).read_bytes())]


# the manifest
@dataclass
class ShardStats:
    """What the manifest says of one finished shard."""

    name: str
    index: str
    samples: int
    masked: int
    bytes: int
    sha256: str
    max_label: int = -1
    skipped: list[dict] = field(default_factory=list)


def build_manifest(
    *,
    source: str,
    layout: str,
    records: int,
    classes: int | None,
    arguments: dict,
    part: tuple[int, int],
    total_shards: int,
    shards: list[ShardStats],
) -> dict:
    """The manifest of a conversion (or of one part of it); ``classes`` None: the largest label seen + 1."""
    skipped = [s for st in shards for s in st.skipped]
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "tool_version": __version__,
        "source": {
            "path": source,
            "layout": layout,
            "records": records,
            # from property (or layout A's identity records); else the largest label seen + 1
            "classes": classes if classes is not None else max(st.max_label for st in shards) + 1,
        },
        "arguments": arguments,
        "part": {"index": part[0], "count": part[1], "total_shards": total_shards},
        "members": {
            "image": "|".join(IMAGE_EXTS),
            "label": LABEL_EXT,
            "label_dtype": LABEL_DTYPE,
            "meta": META_EXT,
            "masked": MASK_EXT,
        },
        "samples": sum(st.samples for st in shards),
        "masked": sum(st.masked for st in shards),
        "skipped": len(skipped),
        "skipped_records": skipped,
        "shards": [{k: v for k, v in asdict(st).items() if k not in ("skipped", "max_label")} for st in shards],
    }


def write_manifest(path: Path, manifest: dict) -> None:
    """Publish a manifest (indented JSON, one trailing newline)."""
    publish(path, json.dumps(manifest, indent=1, sort_keys=False) + "\n")


def read_manifest(shards_dir: str | os.PathLike) -> dict:
    """Load ``manifest.json`` from a shard folder, with a clear error if it is not one."""
    path = Path(shards_dir) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except OSError:
        raise FacetoolError(f"{path}: not found (is {shards_dir} a facetool shard folder?)") from None
    except ValueError as err:
        raise FacetoolError(f"{path}: not valid JSON ({err})") from None
    if manifest.get("format") != FORMAT_NAME:
        raise FacetoolError(f"{path}: not a facetool shard manifest")
    return manifest


def merge_parts(out: str | os.PathLike) -> dict:
    """Merge the ``manifest.part-I-of-N.json`` files of a cluster conversion into one ``manifest.json``."""
    out = Path(out)
    parts = sorted(out.glob("manifest.part-*-of-*.json"))
    if not parts:
        raise FacetoolError(f"{out}: no manifest.part-*-of-*.json files to merge")
    manifests = [json.loads(p.read_text()) for p in parts]
    count = manifests[0]["part"]["count"]
    indices = sorted(m["part"]["index"] for m in manifests)
    if indices != list(range(count)):
        missing = sorted(set(range(count)) - set(indices))
        raise FacetoolError(f"{out}: parts {missing} of {count} are missing; finish them before merging")
    for key in ("source", "arguments", "format_version"):
        if any(m[key] != manifests[0][key] for m in manifests):
            raise FacetoolError(f"{out}: the parts disagree on {key!r}; they are not one conversion")
    manifests.sort(key=lambda m: m["part"]["index"])
    merged = dict(manifests[0])
    merged["part"] = {"index": 0, "count": 1, "total_shards": manifests[0]["part"]["total_shards"]}
    merged["shards"] = [s for m in manifests for s in m["shards"]]
    merged["skipped_records"] = [s for m in manifests for s in m["skipped_records"]]
    for key in ("samples", "masked", "skipped"):
        merged[key] = sum(m[key] for m in manifests)
    if len(merged["shards"]) != merged["part"]["total_shards"]:
        expected = merged["part"]["total_shards"]
        raise FacetoolError(f"{out}: the parts list {len(merged['shards'])} shards, expected {expected}")
    write_manifest(out / MANIFEST, merged)
    return merged

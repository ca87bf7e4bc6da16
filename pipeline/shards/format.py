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
from pathlib import Path, PurePosixPath, PureWindowsPath
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
LABEL_MAP = "labels.json"  # identity -> label, beside the manifest of an image folder's or list file's shards
#: What a manifest's ``source.layout`` may say: RecordIO layout A or B, an image folder, a list file of images, or
#: shards facetool drew itself (benchmarks).
SOURCE_LAYOUTS = ("A", "B", "folder", "list", "synthetic")
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
    plan: str = ""  # the plan that wrote it (``ConvertJob.plan_id``): a resumed run reuses only its own shards


_STATE_ONLY = ("skipped", "max_label", "plan")  # kept in the state folder, not in the manifest's shard entries


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
    plan: str | None = None,
    index_skipped: list[dict] | tuple[dict, ...] = (),
) -> dict:
    """The manifest of a conversion (or of one part of it); ``classes`` None: the largest label seen + 1. A part's
    manifest names its ``plan`` (all parts of one conversion share it); ``index_skipped`` lists the index entries
    left out under ``--on-error skip``, ahead of the records skipped while writing."""
    skipped = [*index_skipped, *(s for st in shards for s in st.skipped)]
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
        "part": {"index": part[0], "count": part[1], "total_shards": total_shards, **({"plan": plan} if plan else {})},
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
        "shards": [{k: v for k, v in asdict(st).items() if k not in _STATE_ONLY} for st in shards],
    }


def write_manifest(path: Path, manifest: dict) -> None:
    """Publish a manifest (indented JSON, one trailing newline)."""
    publish(path, json.dumps(manifest, indent=1, sort_keys=False) + "\n")


def read_manifest(shards_dir: str | os.PathLike) -> dict:
    """Load and check ``manifest.json`` from a shard folder, with a clear error if it is not one."""
    path = Path(shards_dir) / MANIFEST
    if not path.is_file():
        raise FacetoolError(f"{path}: not found (is {shards_dir} a facetool shard folder?)")
    return load_manifest(path)


def load_manifest(path: str | os.PathLike) -> dict:
    """Load a manifest file (``manifest.json`` or a part's) and check it against the format (``check_manifest``):
    every reader goes through here, so a damaged manifest is one line naming the file and the field."""
    path = Path(path)
    try:
        manifest = json.loads(path.read_bytes())
    except OSError as err:
        raise FacetoolError(f"{path}: cannot read ({err.strerror})") from None
    except (ValueError, RecursionError) as err:
        raise FacetoolError(f"{path}: not valid JSON ({str(err).splitlines()[0] if str(err) else 'nesting'})") from None
    check_manifest(manifest, path)
    return manifest


def check_manifest(manifest: object, path: str | os.PathLike) -> None:
    """Raise a FacetoolError naming ``path`` and the first field that does not follow format v1: types, ranges,
    shard names that are plain file names in the folder, and the totals against the shards."""
    if not isinstance(manifest, dict):
        raise FacetoolError(f"{path}: not a manifest (a JSON object), but {_kind(manifest)}")
    if manifest.get("format") != FORMAT_NAME:
        raise FacetoolError(f"{path}: not a facetool shard manifest")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION or isinstance(version, bool):
        raise FacetoolError(f"{path}: shard format version {version!r}, this facetool reads {FORMAT_VERSION}")
    check = _Checker(path)
    source, part = check.table(manifest, "source"), check.table(manifest, "part")
    check.value(source, "source.path", str)
    check.value(source, "source.layout", SOURCE_LAYOUTS)
    records, classes = check.count(source, "source.records"), check.count(source, "source.classes")
    check.table(manifest, "arguments")
    index, count, total = (check.count(part, f"part.{k}", low=int(k == "count")) for k in _PART_KEYS)
    samples, masked, skipped = (check.count(manifest, k) for k in ("samples", "masked", "skipped"))
    listed = check.value(manifest, "skipped_records", list)
    for i, entry in enumerate(listed):
        check.value(
            check.value({"e": entry}, f"skipped_records[{i}]", dict, key="e"), f"skipped_records[{i}].error", str
        )
    shards = check.value(manifest, "shards", list)
    names: set[str] = set()
    for i, entry in enumerate(shards):
        entry = check.value({"e": entry}, f"shards[{i}]", dict, key="e")
        for key in ("name", "index"):
            name = check.value(entry, f"shards[{i}].{key}", str)
            if not is_plain_name(name) or name in names:
                what = "names a file twice" if name in names else "is not a plain file name in the folder"
                raise FacetoolError(f"{path}: shards[{i}].{key} {name!r} {what}")
            names.add(name)
        n, m = check.count(entry, f"shards[{i}].samples"), check.count(entry, f"shards[{i}].masked")
        check.count(entry, f"shards[{i}].bytes")
        check.value(entry, f"shards[{i}].sha256", str)
        check.rule(m <= n, f"shards[{i}].masked {m} exceeds its samples {n}")
    check.rule(index < count, f"part.index {index} is not below part.count {count}")
    block = total * (index + 1) // count - total * index // count
    check.rule(len(shards) == block, f"lists {len(shards)} shards, its part holds {block} of {total}")
    check.rule(samples == sum(e["samples"] for e in shards), f"samples {samples} is not the sum over its shards")
    check.rule(masked == sum(e["masked"] for e in shards), f"masked {masked} is not the sum over its shards")
    check.rule(skipped == len(listed), f"skipped {skipped} but skipped_records lists {len(listed)}")
    check.rule(samples <= records, f"samples {samples} exceeds source.records {records}")
    check.rule(count > 1 or records <= samples + skipped, f"source.records {records} exceeds samples plus skipped")
    check.rule(classes <= records, f"source.classes {classes} exceeds source.records {records}")


_PART_KEYS = ("index", "count", "total_shards")


def is_plain_name(name: str) -> bool:
    """Whether ``name`` is a plain file name (no folder part, not absolute, not ``.``/``..``): a manifest names
    files inside its own folder and nowhere else."""
    return (
        name not in ("", ".", "..")
        and "\0" not in name
        and PurePosixPath(name).name == name
        and PureWindowsPath(name).name == name
    )


def _kind(value: object) -> str:
    return {type(None): "null", str: "a string", list: "a list", dict: "an object", bool: "a boolean"}.get(
        type(value), "a number"
    )


def _shown(value: object) -> str:
    """A value as an error message shows it: its kind, and a scalar's (shortened) text."""
    if value is None or isinstance(value, list | dict):
        return _kind(value)
    return f"{_kind(value)} {value!r:.60}"


class _Checker:
    """Field checks of ``check_manifest``, each raising a FacetoolError that names the file and the field."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = path

    def value(self, table: dict, name: str, kind: type | tuple, key: str | None = None):
        key = key or name.rsplit(".", 1)[-1]
        if key not in table:
            raise FacetoolError(f"{self.path}: missing {name!r}")
        value = table[key]
        ok = value in kind if isinstance(kind, tuple) else isinstance(value, kind)
        if not ok:
            wanted = " or ".join(map(repr, kind)) if isinstance(kind, tuple) else _kind(kind())
            raise FacetoolError(f"{self.path}: {name} must be {wanted}, got {_shown(value)}")
        return value

    def table(self, table: dict, name: str) -> dict:
        return self.value(table, name, dict)

    def count(self, table: dict, name: str, low: int = 0) -> int:
        key = name.rsplit(".", 1)[-1]
        value = table.get(key)
        if key not in table or isinstance(value, bool) or not isinstance(value, int) or value < low:
            got = _shown(value) if key in table else "nothing"
            raise FacetoolError(f"{self.path}: {name} must be an integer >= {low}, got {got}")
        return value

    def rule(self, holds: bool, what: str) -> None:
        if not holds:
            raise FacetoolError(f"{self.path}: {what}")


def merge_parts(out: str | os.PathLike) -> dict:
    """Merge the ``manifest.part-I-of-N.json`` files of a cluster conversion into one ``manifest.json``, after
    checking that they are the parts of one plan and that their shards are there (under the folder's lock)."""
    from facetool.pipeline.lock import LOCK_NAME, check_unlocked, folder_lock

    out = Path(out)
    with folder_lock(out, "merge-parts", wait=60.0):
        check_unlocked(out, f"{LOCK_NAME}.part-*")  # no part is still being written
        parts = sorted(out.glob("manifest.part-*-of-*.json"))
        if not parts:
            raise FacetoolError(f"{out}: no manifest.part-*-of-*.json files to merge")
        first = load_manifest(parts[0])
        manifests = [_check_part(p, load_manifest(p) if p != parts[0] else first, parts[0], first) for p in parts]
        count = manifests[0]["part"]["count"]
        indices = sorted(m["part"]["index"] for m in manifests)
        if indices != list(range(count)):
            missing = sorted(set(range(count)) - set(indices))
            raise FacetoolError(f"{out}: parts {missing} of {count} are missing; finish them before merging")
        manifests.sort(key=lambda m: m["part"]["index"])
        merged = dict(manifests[0])
        merged["part"] = {"index": 0, "count": 1, "total_shards": manifests[0]["part"]["total_shards"]}
        merged["shards"] = [s for m in manifests for s in m["shards"]]
        merged["skipped_records"] = [s for m in manifests for s in m["skipped_records"]]
        for key in ("samples", "masked", "skipped"):
            merged[key] = sum(m[key] for m in manifests)
        check_manifest(merged, out / MANIFEST)
        write_manifest(out / MANIFEST, merged)
        return merged


def _check_part(path: Path, manifest: dict, first_path: Path, first: dict) -> dict:
    """A part manifest belongs to the same plan as the first one, and its shards are in the folder as listed."""
    index, count, total = (manifest["part"][k] for k in _PART_KEYS)
    if path.name != manifest_name((index, count)):
        raise FacetoolError(f"{path}: says it is part {index} of {count}, its name says otherwise")
    for key in ("count", "total_shards", "plan"):
        if manifest["part"].get(key) != first["part"].get(key):
            raise FacetoolError(
                f"{path}: not a part of the same conversion as {first_path.name} (they differ in part.{key}); "
                "convert every part with the same source and arguments into one folder"
            )
    for key in ("source", "arguments"):
        if manifest[key] != first[key]:
            raise FacetoolError(f"{path}: disagrees with {first_path.name} on {key!r}; they are not one conversion")
    first_shard = total * index // count
    for i, entry in enumerate(manifest["shards"]):
        tar = path.parent / entry["name"]
        if entry["name"] != f"{shard_name(first_shard + i)}.tar":
            raise FacetoolError(
                f"{path}: lists {entry['name']} where part {index} of {count} holds shard {first_shard + i}"
            )
        if not tar.is_file() or tar.stat().st_size != entry["bytes"]:
            what = "is missing" if not tar.is_file() else f"has {tar.stat().st_size} bytes, not {entry['bytes']}"
            raise FacetoolError(f"{tar}: listed in {path.name} but {what}")
    return manifest

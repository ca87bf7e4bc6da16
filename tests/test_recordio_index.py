"""Impossible `.idx` entries and layout-A headers that promise more than the file holds: one-line errors naming the
file and line (or, with --on-error skip, entries left out and listed), never a silent duplicate, loss or
an allocation sized by a damaged number."""

from __future__ import annotations

import re
import struct
from pathlib import Path

import numpy as np
import pytest
from conftest import MXNET_FIXTURES, write_layout_a
from helpers import error_line, run_cli

from facetool.pipeline.errors import FacetoolError
from facetool.pipeline.recordio import RecordFile
from facetool.pipeline.shards import ConvertOptions, convert, read_manifest

CLASSES, PER_CLASS = 4, 5  # images are keys 1..20, identity records 21..24, the header record 0 (idx line 25)


@pytest.fixture
def dataset(tmp_path) -> Path:
    src = tmp_path / "src"
    write_layout_a(src, CLASSES, PER_CLASS, seed=2)
    return src


def _entries(src: Path) -> list[list[int]]:
    return [[int(v) for v in line.split()] for line in (src / "train.idx").read_text().splitlines()]


def _write_entries(src: Path, entries: list[list[int]]) -> None:
    (src / "train.idx").write_text("".join(f"{k}\t{o}\n" for k, o in entries))


def _edit(line: int, key: int | None = None, offset_of: int | None = None, shift: int = 0):
    """Change line ``line`` (1-based) of the index: its key, and/or its offset to another line's plus ``shift``."""

    def damage(src: Path) -> None:
        entries = _entries(src)
        if key is not None:
            entries[line - 1][0] = key
        if offset_of is not None:
            entries[line - 1][1] = entries[offset_of - 1][1] + shift
        _write_entries(src, entries)

    return damage


def _header_label(first: float, end: float):
    """Rewrite the label range [a, b) of the layout-A header record 0 in place."""

    def damage(src: Path) -> None:
        offset = dict((k, o) for k, o in _entries(src))[0]
        data = bytearray((src / "train.rec").read_bytes())
        data[offset + 8 + 24 : offset + 8 + 32] = struct.pack("<ff", first, end)
        (src / "train.rec").write_bytes(bytes(data))

    return damage


def _record_length(key: int, delta: int):
    """Change the length field of record ``key``'s frame (a damaged .rec, its index intact)."""

    def damage(src: Path) -> None:
        offset = dict((k, o) for k, o in _entries(src))[key]
        data = bytearray((src / "train.rec").read_bytes())
        (lrecord,) = struct.unpack_from("<I", data, offset + 4)
        struct.pack_into("<I", data, offset + 4, lrecord + delta)
        (src / "train.rec").write_bytes(bytes(data))

    return damage


CASES = {
    "same-offset": (_edit(5, offset_of=6), [r"train\.idx: line [56]\b", r"record 5\b", r"record 6\b", "byte offset"]),
    "inside-another": (_edit(5, offset_of=4, shift=8), [r"train\.idx: line 5\b", "starts inside record 4"]),
    "negative-key": (_edit(5, key=-5), [r"train\.idx: line 5\b", "record key -5 is negative"]),
    "key-twice": (_edit(6, key=5), [r"train\.idx: line [56]\b", "record key 5 appears twice"]),
    "past-the-end": (_edit(7, offset_of=7, shift=10**9), [r"train\.idx: line 7\b", "past the end"]),
    "past-2^40": (_edit(7, offset_of=7, shift=2**40), [r"train\.idx: line 7\b", r"byte offset 10995116\d+ is past"]),
    "key-twice-rotated": (_edit(25, key=3), [r"train\.idx: line (3|25)\b", "record key 3 appears twice"]),
    "key-2^40": (_edit(7, key=2**40), [r"train\.idx", "header announces images 1..20 but record 7 is not in"]),
    "length-shrunk": (_record_length(3, -8), [r"train\.idx: line 3\b", "record 3 .*frames end at byte"]),
    "length-grown": (_record_length(3, 64), [r"train\.idx: line 4\b", "record 4 .* starts inside record 3"]),
    "more-identities": (_header_label(21, 26), [r"train\.idx", r"identity records 21\.\.25", "record 25 is not in"]),
    "2^40-images": (_header_label(2**40, 2**40 + 4), [r"train\.idx", "announces 1099511627775 images", "only 25"]),
    "nan-header": (_header_label(float("nan"), 25), [r"train\.rec: record 0: header label range"]),
    "fewer-images": (_header_label(18, 25), [r"train\.rec: record 18 .*not an identity record"]),
}


@pytest.mark.parametrize("case", CASES)
def test_impossible_index_entries_are_one_line_errors_naming_file_and_line(dataset, case):
    damage, patterns = CASES[case]
    damage(dataset)
    line = error_line("inspect", str(dataset))
    with pytest.raises(FacetoolError) as err:
        convert(dataset, dataset.parent / "out", ConvertOptions(samples_per_shard=8))
    for pattern in patterns:
        assert re.search(pattern, line), (pattern, line)
        assert re.search(pattern, str(err.value)), (pattern, str(err.value))
    assert not (dataset.parent / "out" / "manifest.json").exists()


def test_on_error_skip_leaves_out_and_lists_the_entries_at_fault(dataset, tmp_path):
    _edit(5, offset_of=6)(dataset)  # records 5 and 6 share an offset: which one is there is unknown
    _edit(9, key=-9)(dataset)
    proc = run_cli("convert", str(dataset), str(tmp_path / "out"), "--on-error", "skip", "--quiet")
    assert proc.returncode == 0, proc.stderr
    manifest = read_manifest(tmp_path / "out")
    listed = {s["key"]: s["error"] for s in manifest["skipped_records"]}
    assert set(listed) == {5, 6, -9, 9} and all("train.idx" in e for e in listed.values())
    assert re.search(r"line 9\b.*negative", listed[-9]) and "not in the index" in listed[9]
    assert manifest["samples"] == 17 and manifest["skipped"] == 4
    with RecordFile(dataset / "train.rec", dataset / "train.idx", on_index_error="skip") as rf:
        assert sorted(rf.keys.tolist()) == [k for k in range(1, 21) if k not in (5, 6, 9)]


def test_index_problems_fail_without_skip_in_the_library(dataset):
    _edit(5, offset_of=6)(dataset)
    with pytest.raises(FacetoolError, match=r"train\.idx: line \d+: record \d+ has byte offset"):
        RecordFile(dataset / "train.rec", dataset / "train.idx")


def test_a_comment_sign_in_an_index_is_an_error_not_a_skipped_line(dataset):
    entries = (dataset / "train.idx").read_text().splitlines()
    entries[4] = "#" + entries[4]
    (dataset / "train.idx").write_text("\n".join(entries) + "\n")
    line = error_line("inspect", str(dataset))
    assert "train.idx" in line and "'#5'" in line


def test_classes_beyond_the_records_are_refused_before_anything_is_sized(tmp_path):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(MXNET_FIXTURES / "layout_b", src)
    (src / "property").write_text("1000000000000,112,112\n")
    line = error_line("convert", str(src), str(tmp_path / "out"), "--quiet")
    assert "property" in line and "1000000000000 classes" in line


def test_filtered_index_with_records_left_out_still_reads(dataset, tmp_path):
    """An index may leave records out (a filtered dataset): the gap holds a record, so that is no error."""
    entries = [e for e in _entries(dataset) if e[0] not in (7, 8)]
    _write_entries(dataset, entries)
    src = tmp_path / "b"
    src.mkdir()
    images = [e for e in entries if 1 <= e[0] <= 20]
    (src / "train.rec").write_bytes((dataset / "train.rec").read_bytes())
    _write_entries(src, images)  # layout B: no header record, no identity records
    with RecordFile(src / "train.rec", src / "train.idx") as rf:
        assert rf.layout == "B" and len(rf) == 18 and all(r.image for r in rf)
    convert(src, tmp_path / "out", ConvertOptions(samples_per_shard=8))


def test_a_scan_whose_ids_do_not_fit_int64_keys_the_records_by_file_order(tmp_path):
    from conftest import random_jpeg

    from facetool.pipeline.recordio import RecordIOWriter, pack_payload

    rng = np.random.default_rng(1)
    with RecordIOWriter(tmp_path / "train.rec", tmp_path / "train.idx") as writer:
        for i in range(3):
            writer.write(i, pack_payload(float(i), random_jpeg(rng), id=2**64 - 1 - i))
    with RecordFile(tmp_path / "train.rec", None) as rf:
        assert rf.keys.tolist() == [0, 1, 2] and [int(r.label[0]) for r in rf] == [0, 1, 2]

"""RecordIO reading: MXNet-written fixtures, DALI's reader as an independent second opinion, and corrupt input."""

from __future__ import annotations

import hashlib
import json
import shutil
import struct

import numpy as np
import pytest
from conftest import MXNET_FIXTURES

from facetool.pipeline.errors import FacetoolError
from facetool.pipeline.recordio import (
    MAGIC_BYTES,
    RecordFile,
    RecordIOError,
    RecordIOWriter,
    frame_record,
    pack_payload,
    read_payload,
    read_property,
    unpack_payload,
    write_layout_a,
)

EXPECTED = json.loads((MXNET_FIXTURES / "expected.json").read_text())


def _as_dicts(rf: RecordFile) -> list[dict]:
    return [
        {"key": r.key, "label": r.label.tolist(), "sha256": hashlib.sha256(r.image).hexdigest(), "size": len(r.image)}
        for r in rf
    ]


@pytest.mark.parametrize("layout", ["layout_a", "layout_b"])
@pytest.mark.parametrize("with_index", [True, False])
def test_reader_returns_exactly_what_mxnet_wrote(layout, with_index):
    d = MXNET_FIXTURES / layout
    with RecordFile(d / "train.rec", d / "train.idx" if with_index else None) as rf:
        assert rf.layout == EXPECTED[layout]["layout"]
        assert _as_dicts(rf) == EXPECTED[layout]["images"]
        if rf.layout == "A":
            assert rf.num_identities == EXPECTED[layout]["num_classes"]
            assert rf.identity_ranges().tolist() == EXPECTED[layout]["identities"]


def test_fixtures_hold_png_and_split_records():
    """The fixtures really exercise PNG payloads and MXNet's multi-part split (flag 1 present in the file)."""
    for layout in ("layout_a", "layout_b"):
        data = (MXNET_FIXTURES / layout / "train.rec").read_bytes()
        flags, pos = [], 0
        while pos < len(data):
            magic, lrec = struct.unpack_from("<II", data, pos)
            flags.append(lrec >> 29)
            pos += 8 + (((lrec & (2**29 - 1)) + 3) & ~3)
        assert 1 in flags and 3 in flags
        with RecordFile(MXNET_FIXTURES / layout / "train.rec", MXNET_FIXTURES / layout / "train.idx") as rf:
            assert any(r.image.startswith(b"\x89PNG") for r in rf)
            assert any(MAGIC_BYTES in r.image for r in rf)


def test_vector_labels_kept_whole():
    d = MXNET_FIXTURES / "layout_b"
    with RecordFile(d / "train.rec", d / "train.idx") as rf:
        r = rf[4]
        assert r.label.tolist() == [4.0, 1.0, 7.0] and r.class_id == 4


@pytest.mark.parametrize("layout", ["layout_a", "layout_b"])
@pytest.mark.dali
def test_dali_mxnet_reader_agrees(layout, tmp_path):
    """DALI's own fn.readers.mxnet over an image-only index yields the same (sha256, label) pairs as ours."""
    from nvidia.dali import fn, pipeline_def

    d = MXNET_FIXTURES / layout
    with RecordFile(d / "train.rec", d / "train.idx") as rf:
        ours = sorted((hashlib.sha256(r.image).hexdigest(), r.class_id) for r in rf)
        idx = tmp_path / "images.idx"
        idx.write_text("".join(f"{k}\t{o}\n" for k, o in zip(rf.keys, rf.offsets, strict=True)))
        n = len(rf)

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def pipe():
        images, labels = fn.readers.mxnet(path=[str(d / "train.rec")], index_path=[str(idx)], name="r")
        return images, labels

    p = pipe()
    p.build()
    assert p.epoch_size("r") == n
    theirs = []
    for _ in range(n):
        images, labels = p.run()
        img = np.array(images[0]).tobytes()
        theirs.append((hashlib.sha256(img).hexdigest(), int(np.array(labels[0]).ravel()[0])))
    assert sorted(theirs) == ours


def test_frame_record_splits_like_mxnet_and_reads_back():
    rng = np.random.default_rng(1)
    for trial in range(200):
        body = bytearray(rng.integers(0, 256, int(rng.integers(0, 200)), dtype=np.uint8).tobytes())
        for _ in range(int(rng.integers(0, 4))):  # plant magic words, aligned or not
            pos = int(rng.integers(0, len(body) + 1))
            body[pos:pos] = MAGIC_BYTES
        payload = bytes(body)
        framed = frame_record(payload)
        assert len(framed) % 4 == 0
        back, end = read_payload(framed, 0, "mem", trial)
        assert back == payload and end == len(framed)


def test_writer_reader_roundtrip(tmp_path):
    payloads = {k: pack_payload(float(k % 3), b"\xff\xd8\xff" + bytes([k]) * k + MAGIC_BYTES * 2) for k in range(40)}
    with RecordIOWriter(tmp_path / "train.rec", tmp_path / "train.idx") as w:
        for k, p in payloads.items():
            w.write(k, p)
    with RecordFile(tmp_path / "train.rec", tmp_path / "train.idx") as rf:
        assert rf.layout == "B" and len(rf) == 40
        for r in rf:
            assert pack_payload(r.label[0], r.image) == pack_payload(
                float(r.key % 3), unpack_payload(payloads[r.key])[2]
            )


def test_write_layout_a_reads_back_as_layout_a(tmp_path):
    images = [[b"\xff\xd8\xff" + bytes([c, k]) * 9 for k in range(n)] for c, n in enumerate([3, 1, 4])]
    assert write_layout_a(tmp_path / "set", iter(images), image_size=(96, 80)) == (8, 3)
    assert read_property(tmp_path / "set" / "property") == (3, 96, 80)
    with RecordFile(tmp_path / "set" / "train.rec", tmp_path / "set" / "train.idx") as rf:
        assert rf.layout == "A" and len(rf) == 8 and rf.num_identities == 3
        assert rf.identity_ranges().tolist() == [[1, 4], [4, 5], [5, 9]]
        assert [(r.key, r.class_id, r.image) for r in rf] == [
            (key, c, img) for key, (c, img) in enumerate(((c, i) for c, imgs in enumerate(images) for i in imgs), 1)
        ]
    # the MXNet-written layout-A fixture is this writer's output, byte for byte
    fixture = MXNET_FIXTURES / "layout_a"
    with RecordFile(fixture / "train.rec", fixture / "train.idx") as rf:
        by_identity = [[rf.read_key(k).image for k in range(a, b)] for a, b in rf.identity_ranges()]
    write_layout_a(tmp_path / "again", by_identity)
    for name in ("train.rec", "train.idx"):
        assert (tmp_path / "again" / name).read_bytes() == (fixture / name).read_bytes(), name


def test_writer_publishes_nothing_on_error_and_names_the_file(tmp_path):
    with pytest.raises(KeyError), RecordIOWriter(tmp_path / "train.rec", tmp_path / "train.idx") as w:
        w.write(1, pack_payload(1.0, b"x"))
        raise KeyError("stop")
    w = RecordIOWriter(tmp_path / "b.rec", tmp_path / "b.idx")
    w.write(1, pack_payload(1.0, b"x"))
    w.abort()
    assert list(tmp_path.iterdir()) == []  # no output, no temporary file left
    with pytest.raises(FacetoolError, match=r"missing/train\.(rec|idx): cannot write"):
        RecordIOWriter(tmp_path / "missing" / "train.rec", tmp_path / "missing" / "train.idx")


def _copy_fixture(tmp_path, layout="layout_b"):
    d = tmp_path / layout
    shutil.copytree(MXNET_FIXTURES / layout, d)
    return d


def test_corrupt_magic_names_file_record_offset(tmp_path):
    d = _copy_fixture(tmp_path)
    with RecordFile(d / "train.rec", d / "train.idx") as rf:
        key, offset = int(rf.keys[3]), int(rf.offsets[3])
    data = bytearray((d / "train.rec").read_bytes())
    data[offset] ^= 0xFF
    (d / "train.rec").write_bytes(bytes(data))
    with RecordFile(d / "train.rec", d / "train.idx") as rf, pytest.raises(RecordIOError) as err:
        rf[3]
    msg = str(err.value)
    assert "train.rec" in msg and f"record {key}" in msg and f"offset {offset}" in msg and "magic" in msg


def test_truncated_file_names_file_record_offset(tmp_path):
    d = _copy_fixture(tmp_path)
    data = (d / "train.rec").read_bytes()
    with RecordFile(d / "train.rec", d / "train.idx") as rf:
        last_key, last_offset = int(rf.keys[-1]), int(rf.offsets[-1])
    (d / "train.rec").write_bytes(data[: last_offset + 100])
    with RecordFile(d / "train.rec", d / "train.idx") as rf, pytest.raises(RecordIOError) as err:
        rf[len(rf) - 1]
    msg = str(err.value)
    assert "train.rec" in msg and f"record {last_key}" in msg and "truncated" in msg and str(last_offset) in msg
    with pytest.raises(RecordIOError, match="truncated"):  # the sequential scan finds it too
        RecordFile(d / "train.rec", None)


def test_index_offset_past_end(tmp_path):
    d = _copy_fixture(tmp_path)
    size = (d / "train.rec").stat().st_size
    lines = (d / "train.idx").read_text().splitlines()
    lines[5] = f"5\t{size + 4096}"
    (d / "train.idx").write_text("\n".join(lines) + "\n")
    with pytest.raises(RecordIOError) as err:
        RecordFile(d / "train.rec", d / "train.idx")
    msg = str(err.value)
    assert "train.idx" in msg and "record 5" in msg and str(size + 4096) in msg and "past the end" in msg


def test_empty_and_missing_files(tmp_path):
    (tmp_path / "train.rec").write_bytes(b"")
    with pytest.raises(RecordIOError, match="empty"):
        RecordFile(tmp_path / "train.rec", None)
    d = _copy_fixture(tmp_path)
    with pytest.raises(RecordIOError, match="index file not found"):
        RecordFile(d / "train.rec", d / "missing.idx")

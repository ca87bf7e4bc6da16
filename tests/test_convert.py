"""facetool convert: shards readable by webdataset and DALI, deterministic, resumable after kill -9, clean errors."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import MXNET_FIXTURES, write_layout_a

from facetool.cli import main
from facetool.pipeline.recordio import RecordFile
from facetool.pipeline.shards import ConvertOptions, _tar_header, convert


def _source_multiset(src: Path) -> Counter:
    with RecordFile(src / "train.rec", src / "train.idx") as rf:
        return Counter((hashlib.sha256(r.image).hexdigest(), r.class_id) for r in rf)


def _tree_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def converted(small_dataset, tmp_path_factory):
    src, _ = small_dataset
    out = tmp_path_factory.mktemp("shards")
    manifest = convert(src, out, ConvertOptions(samples_per_shard=50, workers=2))
    return src, out, manifest


def test_manifest_counts_and_hashes(converted):
    src, out, manifest = converted
    assert manifest["samples"] == 240 and manifest["skipped"] == 0
    assert [s["samples"] for s in manifest["shards"]] == [50, 50, 50, 50, 40]
    assert manifest["source"] == {
        "path": str((src / "train.rec").resolve()),
        "layout": "A",
        "records": 240,
        "classes": 24,
    }
    for s in manifest["shards"]:
        data = (out / s["name"]).read_bytes()
        assert len(data) == s["bytes"] and hashlib.sha256(data).hexdigest() == s["sha256"]
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert not (out / ".facetool-convert").exists() and not list(out.glob("*.tmp"))


def test_globally_shuffled(converted):
    """The first shard mixes identities from all over the (identity-sorted) source."""
    _, out, _ = converted
    first = (out / "shard-000000.idx").read_text().splitlines()[1:]
    keys = [int(line.split()[3].split(".")[0]) for line in first]
    assert len(set(k // 10 for k in keys)) > 15  # 50 samples from > 15 of the 24 identities


def test_webdataset_library_reads_every_sample_once(converted):
    import webdataset as wds

    src, out, manifest = converted
    urls = [str(out / s["name"]) for s in manifest["shards"]]
    got = Counter()
    keys = []
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        label = int(np.frombuffer(sample["label.i32"], "<i4")[0])
        got[(hashlib.sha256(sample["jpg"]).hexdigest(), label)] += 1
        keys.append(sample["__key__"])
    assert got == _source_multiset(src)
    assert len(keys) == len(set(keys)) == 240


def test_dali_webdataset_reader_reads_every_sample_once(converted):
    from nvidia.dali import fn, pipeline_def, types

    src, out, manifest = converted
    paths = [str(out / s["name"]) for s in manifest["shards"]]
    index_paths = [str(out / s["index"]) for s in manifest["shards"]]
    batch = 16

    @pipeline_def(batch_size=batch, num_threads=1, device_id=None)
    def pipe():
        img, label = fn.readers.webdataset(
            paths=paths,
            index_paths=index_paths,
            ext=["jpg;png", "label.i32"],
            dtypes=[types.UINT8, types.INT32],
            missing_component_behavior="error",
            pad_last_batch=True,
            name="r",
        )
        return img, label

    p = pipe()
    p.build()
    n = p.epoch_size("r")
    assert n == 240
    got = Counter()
    seen = 0
    for _ in range(-(-n // batch)):
        imgs, labels = p.run()
        for i in range(batch):
            if seen == n:
                break
            got[(hashlib.sha256(np.array(imgs[i]).tobytes()).hexdigest(), int(np.array(labels[i])[0]))] += 1
            seen += 1
    assert got == _source_multiset(src)


def test_index_files_identical_to_wds2idx(converted, tmp_path):
    from wds2idx import IndexCreator

    _, out, manifest = converted
    for s in manifest["shards"]:
        with IndexCreator(str(out / s["name"]), str(tmp_path / "ref.idx"), verbose=False) as ic:
            ic.create_index()
        assert (tmp_path / "ref.idx").read_bytes() == (out / s["index"]).read_bytes()


def test_tar_headers_as_tarfile_writes_them():
    for name, size in [(b"000000001.jpg", 5321), (b"123456789.label.i32", 4), (b"000000002.json", 0)]:
        info = tarfile.TarInfo(name.decode())
        info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = size, 0, 0o444, 0, 0, "", ""
        assert _tar_header(name, size) == info.tobuf(format=tarfile.USTAR_FORMAT)


def test_deterministic_across_runs_and_worker_counts(small_dataset, converted, tmp_path):
    src, out, _ = small_dataset[0], converted[1], None
    convert(src, tmp_path / "w1", ConvertOptions(samples_per_shard=50, workers=1))
    assert _tree_bytes(tmp_path / "w1") == _tree_bytes(out)
    convert(src, tmp_path / "seed1", ConvertOptions(samples_per_shard=50, seed=1))
    assert (tmp_path / "seed1" / "shard-000000.tar").read_bytes() != (out / "shard-000000.tar").read_bytes()


def test_no_index_scan_gives_same_shards(small_dataset, converted, tmp_path):
    src, _ = small_dataset
    convert(src, tmp_path / "scan", ConvertOptions(samples_per_shard=50, use_index=False))
    a, b = _tree_bytes(tmp_path / "scan"), _tree_bytes(converted[1])
    assert {k: v for k, v in a.items() if k != "manifest.json"} == {k: v for k, v in b.items() if k != "manifest.json"}


def test_parts_merge_to_the_single_run(small_dataset, converted, tmp_path):
    src, _ = small_dataset
    out = tmp_path / "parts"
    runner = CliRunner()
    for i in range(3):
        r = runner.invoke(
            main, ["convert", str(src), str(out), "--samples-per-shard", "50", "--part", f"{i}/3", "--quiet"]
        )
        assert r.exit_code == 0, r.output
    assert not (out / "manifest.json").exists()
    r = runner.invoke(main, ["merge-parts", str(out)])
    assert r.exit_code == 0, r.output
    for p in out.glob("manifest.part-*"):
        p.unlink()
    assert _tree_bytes(out) == _tree_bytes(converted[1])


def test_merge_refuses_missing_part(small_dataset, tmp_path):
    src, _ = small_dataset
    convert(src, tmp_path / "p", ConvertOptions(samples_per_shard=50, part=(0, 2)))
    r = CliRunner().invoke(main, ["merge-parts", str(tmp_path / "p")])
    assert r.exit_code != 0 and "parts [1] of 2 are missing" in r.output


def test_vector_labels_and_png_pass_through(tmp_path):
    import webdataset as wds

    src = MXNET_FIXTURES / "layout_b"
    convert(src, tmp_path, ConvertOptions(samples_per_shard=4))
    expected = json.loads((MXNET_FIXTURES / "expected.json").read_text())["layout_b"]["images"]
    by_key = {f"{e['key']:09d}": e for e in expected}
    urls = sorted(str(p) for p in tmp_path.glob("*.tar"))
    n = 0
    for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        e = by_key[s["__key__"]]
        image = s.get("jpg", s.get("png"))
        assert hashlib.sha256(image).hexdigest() == e["sha256"]
        assert json.loads(s["json"])["label"] == pytest.approx(e["label"])
        assert int(np.frombuffer(s["label.i32"], "<i4")[0]) == int(e["label"][0])
        n += 1
    assert n == 10


def _corrupt_record(dst: Path, position: int) -> tuple[int, int]:
    with RecordFile(dst / "train.rec", dst / "train.idx") as rf:
        key, offset = int(rf.keys[position]), int(rf.offsets[position])
    data = bytearray((dst / "train.rec").read_bytes())
    data[offset : offset + 4] = b"JUNK"
    (dst / "train.rec").write_bytes(bytes(data))
    return key, offset


def test_on_error_skip_counts_and_reports(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(MXNET_FIXTURES / "layout_b", src)
    key, offset = _corrupt_record(src, 6)
    runner = CliRunner()
    r = runner.invoke(main, ["convert", str(src), str(tmp_path / "fail"), "--quiet"])
    assert r.exit_code != 0 and f"record {key}" in r.output and f"offset {offset}" in r.output
    r = runner.invoke(main, ["convert", str(src), str(tmp_path / "skip"), "--on-error", "skip", "--quiet"])
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "skip" / "manifest.json").read_text())
    assert m["samples"] == 9 and m["skipped"] == 1 and m["skipped_records"][0]["key"] == key
    assert "1 skipped" in r.output


def _error_line(args: list[str]) -> str:
    """Run the real command line; assert a one-line error, non-zero exit and no traceback; return the line."""
    proc = subprocess.run([sys.executable, "-m", "facetool", *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_bad_inputs_give_one_line_errors(tmp_path):
    base = MXNET_FIXTURES / "layout_a"

    def copy(name: str) -> Path:
        d = tmp_path / name
        shutil.copytree(base, d)
        return d

    d = copy("magic")
    key, offset = _corrupt_record(d, 2)
    line = _error_line(["convert", str(d), str(tmp_path / "o1"), "--quiet"])
    assert "train.rec" in line and f"record {key}" in line and f"offset {offset}" in line

    d = copy("truncated")
    data = (d / "train.rec").read_bytes()
    (d / "train.rec").write_bytes(data[: len(data) // 2])
    line = _error_line(["convert", str(d), str(tmp_path / "o2"), "--quiet"])
    assert "train.rec" in line and "record" in line and ("truncated" in line or "past the end" in line)

    d = copy("noidx")
    (d / "train.idx").unlink()
    line = _error_line(["convert", str(d), str(tmp_path / "o3"), "--quiet"])
    assert "train.idx" in line and "--no-index" in line

    d = copy("property")
    (d / "property").write_text("5,112,112\n")
    line = _error_line(["convert", str(d), str(tmp_path / "o4"), "--quiet"])
    assert "property" in line and "5 classes" in line
    (d / "property").write_text("lots,of,faces\n")
    assert "num_classes,height,width" in _error_line(["convert", str(d), str(tmp_path / "o4"), "--quiet"])

    d = tmp_path / "empty"
    d.mkdir()
    (d / "train.rec").write_bytes(b"")
    (d / "train.idx").write_text("")
    assert "train.rec" in _error_line(["convert", str(d), str(tmp_path / "o5"), "--quiet"])

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    line = _error_line(["convert", str(base), str(blocker / "out"), "--quiet"])
    assert "a-file" in line


def _kill_then_resume(tmp_path: Path, classes: int, per_class: int, min_done: int, extra: list[str]) -> None:
    """Convert into shards of 5, kill -9 once ``min_done`` shards exist, resume; compare with an uninterrupted run."""
    src = tmp_path / "src"
    write_layout_a(src, classes, per_class, seed=3)
    args = [sys.executable, "-m", "facetool", "convert", str(src), "--samples-per-shard", "5", "--quiet", *extra]
    total = classes * per_class // 5
    reference = tmp_path / "reference"
    subprocess.run([*args[:4], str(src), str(reference), *args[5:]], check=True, timeout=300)

    out = tmp_path / "out"
    proc = subprocess.Popen([*args[:4], str(src), str(out), *args[5:]])
    deadline = time.monotonic() + 120
    while len(list(out.glob("*.tar"))) < min_done and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.005)
    assert proc.poll() is None, "convert finished before it could be killed; make the test dataset larger"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = sorted(out.glob("*.tar"))
    assert min_done <= len(finished) < total and not (out / "manifest.json").exists()
    for tar in finished:  # nothing partial under a final name
        assert tar.read_bytes() == (reference / tar.name).read_bytes()
    subprocess.run([*args[:4], str(src), str(out), *args[5:]], check=True, timeout=300)
    assert _tree_bytes(out) == _tree_bytes(reference)
    assert not (out / ".facetool-convert").exists()


def test_kill_minus_nine_then_resume_is_byte_identical(tmp_path):
    _kill_then_resume(tmp_path, 60, 50, 40, [])  # 3,000 records into 600 shards: long enough to be killed mid-way


def test_kill_minus_nine_then_resume_with_masks_is_byte_identical(tmp_path):
    _kill_then_resume(tmp_path, 20, 40, 20, ["--mask-fraction", "0.5", "--workers", "2"])
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert 300 <= manifest["masked"] <= 500


def test_rerun_of_finished_conversion_is_a_no_op_and_other_arguments_are_refused(small_dataset, tmp_path):
    src, _ = small_dataset
    runner = CliRunner()
    args = ["convert", str(src), str(tmp_path), "--samples-per-shard", "100", "--quiet"]
    assert runner.invoke(main, args).exit_code == 0
    before = _tree_bytes(tmp_path)
    assert runner.invoke(main, args).exit_code == 0
    assert _tree_bytes(tmp_path) == before
    r = runner.invoke(
        main, ["convert", str(src), str(tmp_path), "--samples-per-shard", "100", "--seed", "7", "--quiet"]
    )
    assert r.exit_code != 0 and "other arguments" in r.output


def test_bench_convert_reports_both_rates(small_dataset, tmp_path):
    src, _ = small_dataset
    r = CliRunner().invoke(main, ["bench", "convert", str(src), "--workers", "2", "--json", str(tmp_path / "b.json")])
    assert r.exit_code == 0, r.output
    result = json.loads((tmp_path / "b.json").read_text())
    assert result["records"] == 240
    for key in ("seconds", "records_per_s", "copy_records_per_s", "ratio_to_copy"):
        assert result[key] > 0
    assert result["ratio_to_copy"] == pytest.approx(result["records_per_s"] / result["copy_records_per_s"])
    assert "ratio convert / copy" in r.output
    assert not list(src.glob(".facetool-bench-*"))


def test_vectorised_headers_equal_single_headers():
    from facetool.pipeline.shards import _tar_headers

    rng = np.random.default_rng(5)
    sizes = np.concatenate([rng.integers(0, 10**7, 200), [0, 1, 511, 512, 8**11 - 1]])
    names = [f"{int(k):09d}.label.i32".encode() for k in rng.integers(0, 10**9, sizes.size)]
    block = _tar_headers(np.frombuffer(b"".join(names), np.uint8).reshape(len(names), -1), sizes)
    for row, name, size in zip(block, names, sizes.tolist(), strict=True):
        assert row.tobytes() == _tar_header(name, size)


def test_shard_mixing_fast_and_checked_records(tmp_path):
    """Layout A fixture: plain JPEGs (vectorised path), a PNG and a split record (checked path) in one shard."""
    import webdataset as wds
    from wds2idx import IndexCreator

    convert(MXNET_FIXTURES / "layout_a", tmp_path, ConvertOptions(samples_per_shard=100))
    expected = json.loads((MXNET_FIXTURES / "expected.json").read_text())["layout_a"]["images"]
    got = Counter()
    for s in wds.WebDataset([str(tmp_path / "shard-000000.tar")], shardshuffle=False, empty_check=False):
        image = s.get("jpg", s.get("png"))
        got[(hashlib.sha256(image).hexdigest(), int(np.frombuffer(s["label.i32"], "<i4")[0]))] += 1
    assert got == Counter((e["sha256"], int(e["label"][0])) for e in expected)
    with IndexCreator(str(tmp_path / "shard-000000.tar"), str(tmp_path / "ref.idx"), verbose=False) as ic:
        ic.create_index()
    assert (tmp_path / "ref.idx").read_bytes() == (tmp_path / "shard-000000.idx").read_bytes()


def test_label_beyond_property_classes_is_an_error(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(MXNET_FIXTURES / "layout_b", src)
    (src / "property").write_text("3,112,112\n")
    line = _error_line(["convert", str(src), str(tmp_path / "out"), "--quiet"])
    assert "train.rec" in line and "outside [0, 3)" in line and "record" in line


# ---------------------------------------------------------------------------------------------------------------
# masked twins
# ---------------------------------------------------------------------------------------------------------------
def _tar_members(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]


@pytest.fixture(scope="module")
def masked(small_dataset, tmp_path_factory):
    src, _ = small_dataset
    out = tmp_path_factory.mktemp("masked")
    manifest = convert(src, out, ConvertOptions(samples_per_shard=50, workers=2, mask_fraction=1.0))
    return src, out, manifest


def test_mask_fraction_one_gives_every_sample_a_decodable_twin(masked):
    from PIL import Image

    src, out, manifest = masked
    assert manifest["samples"] == manifest["masked"] == 240
    assert [s["masked"] for s in manifest["shards"]] == [s["samples"] for s in manifest["shards"]]
    assert manifest["arguments"]["mask_fraction"] == 1.0 and manifest["members"]["masked"] == "mask.jpg"
    originals = Counter()
    for s in manifest["shards"]:
        members = _tar_members(out / s["name"])
        names = [name for name, _ in members]
        keys = [name[:9] for name in names[::3]]
        assert names == [f"{k}.{ext}" for k in keys for ext in ("jpg", "label.i32", "mask.jpg")]  # sorted members
        for (_, jpg), (_, label), (_, twin) in zip(members[0::3], members[1::3], members[2::3], strict=True):
            a, b = Image.open(io.BytesIO(jpg)), Image.open(io.BytesIO(twin))
            b.load()  # decodable
            assert b.format == "JPEG" and b.size == a.size and twin != jpg
            originals[(hashlib.sha256(jpg).hexdigest(), int(np.frombuffer(label, "<i4")[0]))] += 1
    assert originals == _source_multiset(src)  # the originals still pass through untouched


def test_masked_index_files_identical_to_wds2idx(masked, tmp_path):
    from wds2idx import IndexCreator

    _, out, manifest = masked
    jobs = [(out, s["name"], s["index"]) for s in manifest["shards"]]
    for layout in ("layout_a", "layout_b"):  # PNGs, split records and vector labels (json) with their twins
        dst = tmp_path / layout
        m = convert(MXNET_FIXTURES / layout, dst, ConvertOptions(samples_per_shard=4, mask_fraction=1.0))
        assert m["masked"] == m["samples"]
        jobs += [(dst, s["name"], s["index"]) for s in m["shards"]]
    for folder, tar, idx in jobs:
        with IndexCreator(str(folder / tar), str(tmp_path / "ref.idx"), verbose=False) as ic:
            ic.create_index()
        assert (tmp_path / "ref.idx").read_bytes() == (folder / idx).read_bytes(), tar
        for line in (folder / idx).read_text().splitlines()[1:]:
            exts = line.split()[0::4]
            assert exts == sorted(exts) and "mask.jpg" in exts


def test_tenth_of_10000_faces_masked_and_counts_match_the_shards(tmp_path):
    from facetool.pipeline.masks import select_masked

    src = tmp_path / "src"
    write_layout_a(src, 100, 100, seed=5)  # 10,000 small synthetic images, keys 1..10,000
    out = tmp_path / "out"
    r = CliRunner().invoke(
        main,
        ["convert", str(src), str(out), "--samples-per-shard", "2500", "--workers", "2", "--mask-fraction", "0.1",
         "--quiet"],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    manifest = json.loads((out / "manifest.json").read_text())
    masked_keys = []
    for s in manifest["shards"]:
        lines = (out / s["index"]).read_text().splitlines()[1:]
        twins = [line.split()[3][:9] for line in lines if " mask.jpg " in line]
        assert s["masked"] == len(twins)
        masked_keys += [int(k) for k in twins]
    assert manifest["masked"] == len(masked_keys) == sum(s["masked"] for s in manifest["shards"])
    assert 0.08 * 10_000 <= manifest["masked"] <= 0.12 * 10_000
    keys = np.arange(1, 10_001)
    assert sorted(masked_keys) == keys[select_masked(keys, 0.1, seed=0)].tolist()
    assert f"({manifest['masked']} with a masked twin)" in r.output


def test_masked_conversion_deterministic_across_workers_and_fast_path_kept(small_dataset, converted, tmp_path):
    src, _ = small_dataset
    options = {"samples_per_shard": 50, "mask_fraction": 0.3, "mask_weights": (("kn95", 1.0), ("cloth", 1.0))}
    a = convert(src, tmp_path / "w1", ConvertOptions(workers=1, **options))
    convert(src, tmp_path / "w2", ConvertOptions(workers=2, **options))
    assert _tree_bytes(tmp_path / "w1") == _tree_bytes(tmp_path / "w2")
    assert 0 < a["masked"] < 240 and a["arguments"]["mask_weights"] == {
        "surgical": 0.0,
        "kn95": 0.5,
        "n95": 0.0,
        "cloth": 0.5,
    }
    # the same tar as the plain conversion once the twins are taken out; --mask-fraction 0 writes no twin at all
    for s in converted[2]["shards"]:
        with_twins = _tar_members(tmp_path / "w1" / s["name"])
        assert [m for m in with_twins if not m[0].endswith(".mask.jpg")] == _tar_members(converted[1] / s["name"])
    plain = _tree_bytes(converted[1])
    assert converted[2]["masked"] == 0 and converted[2]["arguments"]["mask_fraction"] == 0.0
    assert not any(b"mask.jpg" in v for k, v in plain.items() if k.endswith(".idx"))


def test_dali_reads_masked_shards(tmp_path, small_dataset):
    from nvidia.dali import fn, pipeline_def, types

    src, _ = small_dataset
    m = convert(src, tmp_path, ConvertOptions(samples_per_shard=240, mask_fraction=0.5))
    twins = {
        line.split()[3][:9]
        for line in (tmp_path / m["shards"][0]["index"]).read_text().splitlines()[1:]
        if " mask.jpg " in line
    }
    assert len(twins) == m["masked"]

    @pipeline_def(batch_size=16, num_threads=1, device_id=None)
    def pipe():
        img, label, twin = fn.readers.webdataset(
            paths=[str(tmp_path / m["shards"][0]["name"])],
            index_paths=[str(tmp_path / m["shards"][0]["index"])],
            ext=["jpg", "label.i32", "mask.jpg"],
            dtypes=[types.UINT8, types.INT32, types.UINT8],
            missing_component_behavior="empty",
        )
        return img, label, twin

    p = pipe()
    p.build()
    with_twin = 0
    for _ in range(15):
        imgs, _, twin = p.run()
        for i in range(16):
            t = np.array(twin[i])
            if t.size:
                assert t[:2].tolist() == [0xFF, 0xD8]  # a JPEG
                with_twin += 1
    assert with_twin == len(twins)


def test_other_mask_fraction_is_refused_on_resume(small_dataset, tmp_path):
    src, _ = small_dataset
    runner = CliRunner()
    args = ["convert", str(src), str(tmp_path), "--samples-per-shard", "100", "--quiet"]
    assert runner.invoke(main, args).exit_code == 0
    r = runner.invoke(main, [*args, "--mask-fraction", "0.2"])
    assert r.exit_code != 0 and "other arguments" in r.output


def test_undecodable_jpeg_chosen_for_a_twin_is_an_error_or_skipped(tmp_path):
    """A record whose bytes look like a JPEG but do not decode passes through plain, but cannot get a twin."""
    from wds2idx import IndexCreator

    from facetool.pipeline.recordio import write_layout_a as write_dataset

    src = tmp_path / "src"
    records = write_layout_a(src, 4, 10, seed=8)
    broken = 7
    cut = [[img[:40] if key == broken else img for key, label, img in records if label == c] for c in range(4)]
    write_dataset(src, cut)  # rewrite with record 7 cut short
    convert(src, tmp_path / "plain", ConvertOptions(samples_per_shard=16))  # no twins: passes through
    line = _error_line(["convert", str(src), str(tmp_path / "fail"), "--mask-fraction", "1", "--quiet"])
    assert "train.rec" in line and f"record {broken}" in line and "masked twin" in line
    m = convert(src, tmp_path / "skip", ConvertOptions(samples_per_shard=16, mask_fraction=1.0, on_error="skip"))
    assert m["samples"] == m["masked"] == 39 and [s["key"] for s in m["skipped_records"]] == [broken]
    for s in m["shards"]:
        with IndexCreator(str(tmp_path / "skip" / s["name"]), str(tmp_path / "ref.idx"), verbose=False) as ic:
            ic.create_index()
        assert (tmp_path / "ref.idx").read_bytes() == (tmp_path / "skip" / s["index"]).read_bytes()

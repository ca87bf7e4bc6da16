"""facetool convert: shards readable by webdataset and DALI, deterministic, resumable after kill -9, clean errors."""

from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import MXNET_FIXTURES, write_layout_a
from helpers import error_line, kill_when, run_cli, tree_bytes

from facetool.cli import main
from facetool.pipeline.errors import FacetoolError
from facetool.pipeline.recordio import RecordFile
from facetool.pipeline.shards import STATE_DIR, ConvertOptions, convert
from facetool.pipeline.shards.format import (
    IMAGE_EXTS,
    JPEG_EXT,
    LABEL_EXT,
    MANIFEST,
    MASK_EXT,
    META_EXT,
    read_index,
    read_manifest,
)
from facetool.pipeline.shards.tar import ShardWriter, tar_header, tar_headers


def _source_multiset(src: Path) -> Counter:
    with RecordFile(src / "train.rec", src / "train.idx") as rf:
        return Counter((hashlib.sha256(r.image).hexdigest(), r.class_id) for r in rf)


def _index_keys(path: Path, member: str | None = None) -> list[str]:
    """The sample keys an index lists (only those with a ``member`` of that extension, when given)."""
    samples = read_index(path)
    return [s[0].key for s in samples if member is None or any(m.ext == member for m in s)]


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
    assert read_manifest(out) == manifest
    assert not (out / STATE_DIR).exists() and not list(out.glob("*.tmp"))


def test_globally_shuffled(converted):
    """The first shard mixes identities from all over the (identity-sorted) source."""
    _, out, _ = converted
    keys = [int(k) for k in _index_keys(out / "shard-000000.idx")]
    assert len(set(k // 10 for k in keys)) > 15  # 50 samples from > 15 of the 24 identities


def test_webdataset_library_reads_every_sample_once(converted):
    import webdataset as wds

    src, out, manifest = converted
    urls = [str(out / s["name"]) for s in manifest["shards"]]
    got = Counter()
    keys = []
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        label = int(np.frombuffer(sample[LABEL_EXT], "<i4")[0])
        got[(hashlib.sha256(sample["jpg"]).hexdigest(), label)] += 1
        keys.append(sample["__key__"])
    assert got == _source_multiset(src)
    assert len(keys) == len(set(keys)) == 240


@pytest.mark.dali
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
            ext=[";".join(IMAGE_EXTS), LABEL_EXT],
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
        assert tar_header(name, size) == info.tobuf(format=tarfile.USTAR_FORMAT)


def test_deterministic_across_runs_and_worker_counts(small_dataset, converted, tmp_path):
    src, out, _ = small_dataset[0], converted[1], None
    convert(src, tmp_path / "w1", ConvertOptions(samples_per_shard=50, workers=1))
    assert tree_bytes(tmp_path / "w1") == tree_bytes(out)
    convert(src, tmp_path / "seed1", ConvertOptions(samples_per_shard=50, seed=1))
    assert (tmp_path / "seed1" / "shard-000000.tar").read_bytes() != (out / "shard-000000.tar").read_bytes()


def test_no_index_scan_gives_same_shards(small_dataset, converted, tmp_path):
    src, _ = small_dataset
    convert(src, tmp_path / "scan", ConvertOptions(samples_per_shard=50, use_index=False))
    a, b = tree_bytes(tmp_path / "scan"), tree_bytes(converted[1])
    assert {k: v for k, v in a.items() if k != MANIFEST} == {k: v for k, v in b.items() if k != MANIFEST}


def test_parts_merge_to_the_single_run(small_dataset, converted, tmp_path):
    src, _ = small_dataset
    out = tmp_path / "parts"
    runner = CliRunner()
    for i in range(3):
        r = runner.invoke(
            main, ["convert", str(src), str(out), "--samples-per-shard", "50", "--part", f"{i}/3", "--quiet"]
        )
        assert r.exit_code == 0, r.output
    assert not (out / MANIFEST).exists()
    r = runner.invoke(main, ["merge-parts", str(out)])
    assert r.exit_code == 0, r.output
    for p in out.glob("manifest.part-*"):
        p.unlink()
    assert tree_bytes(out) == tree_bytes(converted[1])


def test_merge_refuses_missing_part(small_dataset, tmp_path):
    src, _ = small_dataset
    convert(src, tmp_path / "p", ConvertOptions(samples_per_shard=50, part=(0, 2)))
    line = error_line("merge-parts", str(tmp_path / "p"))
    assert "parts [1] of 2 are missing" in line


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
        assert json.loads(s[META_EXT])["label"] == pytest.approx(e["label"])
        assert int(np.frombuffer(s[LABEL_EXT], "<i4")[0]) == int(e["label"][0])
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
    line = error_line("convert", str(src), str(tmp_path / "fail"), "--quiet")
    assert f"record {key}" in line and f"offset {offset}" in line
    r = runner.invoke(main, ["convert", str(src), str(tmp_path / "skip"), "--on-error", "skip", "--quiet"])
    assert r.exit_code == 0, r.output
    m = read_manifest(tmp_path / "skip")
    assert m["samples"] == 9 and m["skipped"] == 1 and m["skipped_records"][0]["key"] == key
    assert "1 skipped" in r.output


def _copy_fixture(tmp_path: Path, layout: str) -> Path:
    d = tmp_path / "src"
    shutil.copytree(MXNET_FIXTURES / layout, d)
    return d


def _bad_magic(tmp_path: Path) -> tuple[Path, list[str]]:
    d = _copy_fixture(tmp_path, "layout_a")
    key, offset = _corrupt_record(d, 2)
    return d, [r"train\.rec", rf"record {key}\b", rf"offset {offset}\b"]


def _truncated(tmp_path: Path) -> tuple[Path, list[str]]:
    d = _copy_fixture(tmp_path, "layout_a")
    data = (d / "train.rec").read_bytes()
    (d / "train.rec").write_bytes(data[: len(data) // 2])
    return d, [r"train\.rec", "record", "truncated|past the end"]


def _no_index(tmp_path: Path) -> tuple[Path, list[str]]:
    d = _copy_fixture(tmp_path, "layout_a")
    (d / "train.idx").unlink()
    return d, [r"train\.idx", "--no-index"]


def _property(text: str, *patterns: str, layout: str = "layout_a"):
    def damage(tmp_path: Path) -> tuple[Path, list[str]]:
        d = _copy_fixture(tmp_path, layout)
        (d / "property").write_text(text)
        return d, list(patterns)

    return damage


def _empty(tmp_path: Path) -> tuple[Path, list[str]]:
    d = tmp_path / "empty"
    d.mkdir()
    (d / "train.rec").write_bytes(b"")
    (d / "train.idx").write_text("")
    return d, [r"train\.rec"]


def _output_under_a_file(tmp_path: Path) -> tuple[Path, list[str]]:
    (tmp_path / "a-file").write_text("not a folder")
    return MXNET_FIXTURES / "layout_a", ["a-file"]


@pytest.mark.parametrize(
    "damage",
    [
        _bad_magic,
        _truncated,
        _no_index,
        _property("5,112,112\n", "property", "5 classes"),
        _property("lots,of,faces\n", "num_classes,height,width"),
        _property("3,112,112\n", r"train\.rec", r"outside \[0, 3\)", "record", layout="layout_b"),
        _empty,
        _output_under_a_file,
    ],
    ids=["bad-magic", "truncated", "no-index", "property-count", "property-garbage", "label-beyond-property",
         "empty", "output-under-a-file"],
)  # fmt: skip
def test_bad_inputs_give_one_line_errors(tmp_path, damage):
    src, patterns = damage(tmp_path)  # only the last case makes a-file a file
    line = error_line("convert", str(src), str(tmp_path / "a-file" / "out"), "--quiet")
    for pattern in patterns:
        assert re.search(pattern, line), (pattern, line)


def _kill_then_resume(tmp_path: Path, classes: int, per_class: int, min_done: int, extra: list[str]) -> None:
    """Convert into shards of 5, kill -9 once ``min_done`` shards exist, resume; compare with an uninterrupted run."""
    src, reference, out = tmp_path / "src", tmp_path / "reference", tmp_path / "out"
    write_layout_a(src, classes, per_class, seed=3)
    args = ["--samples-per-shard", "5", "--quiet", *extra]
    total = classes * per_class // 5
    assert run_cli("convert", str(src), str(reference), *args).returncode == 0
    kill_when(["convert", str(src), str(out), *args], lambda: len(list(out.glob("*.tar"))) >= min_done)
    finished = sorted(out.glob("*.tar"))
    assert min_done <= len(finished) < total and not (out / MANIFEST).exists()
    for tar in finished:  # nothing partial under a final name
        assert tar.read_bytes() == (reference / tar.name).read_bytes()
    assert run_cli("convert", str(src), str(out), *args).returncode == 0
    assert tree_bytes(out) == tree_bytes(reference)
    assert not (out / STATE_DIR).exists()


@pytest.mark.parametrize("command", ["convert", "masks-bin"])
def test_bad_mask_weights_are_one_line_errors(small_dataset, tmp_path, command):
    src, _ = small_dataset
    if command == "convert":
        args = ["convert", str(src), str(tmp_path / "out"), "--mask-fraction", "0.5", "--quiet"]
    else:
        args = ["masks", "bin", str(src / "property"), str(tmp_path / "m.bin"), "--quiet"]  # weights come first
    proc = run_cli(*args, "--mask-weights", "gas=1")
    assert proc.returncode == 1 and re.fullmatch(
        r"Error: unknown mask kind\(s\) gas; expected some of [a-z0-9, ]+\n", proc.stderr
    )


def _file_size_limit(limit: int):
    def limit_file_size() -> None:  # in the child: writes beyond ``limit`` fail with EFBIG instead of SIGXFSZ
        import resource
        import signal

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return limit_file_size


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_file_too_large_names_the_shard_being_written(small_dataset, tmp_path, workers):
    src, _ = small_dataset
    out = tmp_path / "out"
    args = ["convert", str(src), str(out), "--samples-per-shard", "240", "--workers", workers, "--quiet"]
    line = error_line(*args, preexec=_file_size_limit(300_000))
    assert re.fullmatch(rf"Error: {re.escape(str(out))}/shard-000000\.tar(\.tmp)?: cannot write: File too large", line)
    assert not list(out.glob("shard-*"))


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_a_full_disk_under_the_streaming_writer_names_the_file():
    writer = ShardWriter(Path("/dev/full"))
    with pytest.raises(FacetoolError, match=r"^/dev/full: cannot write: No space left on device$"):
        for key in range(8):  # chunks go out on the writer's thread; its error surfaces here or at finish
            writer.add_sample(f"{key:09d}", [("jpg", bytes(1 << 20)), (LABEL_EXT, bytes(4))])
        writer.finish()
    writer.abort()


def test_kill_minus_nine_then_resume_is_byte_identical(tmp_path):
    _kill_then_resume(tmp_path, 60, 50, 40, [])  # 3,000 records into 600 shards: long enough to be killed mid-way


def test_kill_minus_nine_then_resume_with_masks_is_byte_identical(tmp_path):
    _kill_then_resume(tmp_path, 20, 40, 20, ["--mask-fraction", "0.5", "--workers", "2"])
    manifest = read_manifest(tmp_path / "out")
    assert 300 <= manifest["masked"] <= 500


def test_rerun_of_finished_conversion_is_a_no_op_and_other_arguments_are_refused(small_dataset, tmp_path):
    src, _ = small_dataset
    runner = CliRunner()
    args = ["convert", str(src), str(tmp_path), "--samples-per-shard", "100", "--quiet"]
    assert runner.invoke(main, args).exit_code == 0
    before = tree_bytes(tmp_path)
    assert runner.invoke(main, args).exit_code == 0
    assert tree_bytes(tmp_path) == before
    line = error_line("convert", str(src), str(tmp_path), "--samples-per-shard", "100", "--seed", "7", "--quiet")
    assert "other arguments" in line and "differs in seed)" in line


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
    rng = np.random.default_rng(5)
    sizes = np.concatenate([rng.integers(0, 10**7, 200), [0, 1, 511, 512, 8**11 - 1]])
    names = [f"{int(k):09d}.label.i32".encode() for k in rng.integers(0, 10**9, sizes.size)]
    block = tar_headers(np.frombuffer(b"".join(names), np.uint8).reshape(len(names), -1), sizes)
    for row, name, size in zip(block, names, sizes.tolist(), strict=True):
        assert row.tobytes() == tar_header(name, size)


def test_shard_mixing_fast_and_checked_records(tmp_path):
    """Layout A fixture: plain JPEGs (vectorised path), a PNG and a split record (checked path) in one shard."""
    import webdataset as wds
    from wds2idx import IndexCreator

    convert(MXNET_FIXTURES / "layout_a", tmp_path, ConvertOptions(samples_per_shard=100))
    expected = json.loads((MXNET_FIXTURES / "expected.json").read_text())["layout_a"]["images"]
    got = Counter()
    for s in wds.WebDataset([str(tmp_path / "shard-000000.tar")], shardshuffle=False, empty_check=False):
        image = s.get("jpg", s.get("png"))
        got[(hashlib.sha256(image).hexdigest(), int(np.frombuffer(s[LABEL_EXT], "<i4")[0]))] += 1
    assert got == Counter((e["sha256"], int(e["label"][0])) for e in expected)
    with IndexCreator(str(tmp_path / "shard-000000.tar"), str(tmp_path / "ref.idx"), verbose=False) as ic:
        ic.create_index()
    assert (tmp_path / "ref.idx").read_bytes() == (tmp_path / "shard-000000.idx").read_bytes()


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
        assert names == [f"{k}.{ext}" for k in keys for ext in (JPEG_EXT, LABEL_EXT, MASK_EXT)]  # sorted members
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
        for sample in read_index(folder / idx):
            exts = [m.ext for m in sample]
            assert exts == sorted(exts) and MASK_EXT in exts


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
    manifest = read_manifest(out)
    masked_keys = []
    for s in manifest["shards"]:
        twins = _index_keys(out / s["index"], MASK_EXT)
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
    assert tree_bytes(tmp_path / "w1") == tree_bytes(tmp_path / "w2")
    assert 0 < a["masked"] < 240 and a["arguments"]["mask_weights"] == {
        "surgical": 0.0,
        "kn95": 0.5,
        "n95": 0.0,
        "cloth": 0.5,
    }
    # the same tar as the plain conversion once the twins are taken out; --mask-fraction 0 writes no twin at all
    for s in converted[2]["shards"]:
        with_twins = _tar_members(tmp_path / "w1" / s["name"])
        assert [m for m in with_twins if not m[0].endswith(f".{MASK_EXT}")] == _tar_members(converted[1] / s["name"])
    plain = tree_bytes(converted[1])
    assert converted[2]["masked"] == 0 and converted[2]["arguments"]["mask_fraction"] == 0.0
    assert not any(MASK_EXT.encode() in v for k, v in plain.items() if k.endswith(".idx"))


@pytest.mark.dali
def test_dali_reads_masked_shards(tmp_path, small_dataset):
    from nvidia.dali import fn, pipeline_def, types

    src, _ = small_dataset
    m = convert(src, tmp_path, ConvertOptions(samples_per_shard=240, mask_fraction=0.5))
    twins = set(_index_keys(tmp_path / m["shards"][0]["index"], MASK_EXT))
    assert len(twins) == m["masked"]

    @pipeline_def(batch_size=16, num_threads=1, device_id=None)
    def pipe():
        img, label, twin = fn.readers.webdataset(
            paths=[str(tmp_path / m["shards"][0]["name"])],
            index_paths=[str(tmp_path / m["shards"][0]["index"])],
            ext=[JPEG_EXT, LABEL_EXT, MASK_EXT],
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
    line = error_line(*args, "--mask-fraction", "0.2")
    assert "other arguments" in line


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
    line = error_line("convert", str(src), str(tmp_path / "fail"), "--mask-fraction", "1", "--quiet")
    assert "train.rec" in line and f"record {broken}" in line and "masked twin" in line
    m = convert(src, tmp_path / "skip", ConvertOptions(samples_per_shard=16, mask_fraction=1.0, on_error="skip"))
    assert m["samples"] == m["masked"] == 39 and [s["key"] for s in m["skipped_records"]] == [broken]
    for s in m["shards"]:
        with IndexCreator(str(tmp_path / "skip" / s["name"]), str(tmp_path / "ref.idx"), verbose=False) as ic:
            ic.create_index()
        assert (tmp_path / "ref.idx").read_bytes() == (tmp_path / "skip" / s["index"]).read_bytes()

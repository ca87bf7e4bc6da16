"""Convert at scale: the `.rec` generator of `facetool bench make-rec`, the index in compact arrays (parsed as
np.loadtxt parses it, widened where values need it) and the memory a plan holds per record."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from facetool.bench.make_rec import make_rec, tiny_jpeg
from facetool.cli import main
from facetool.pipeline.recordio import RecordFile, RecordIOWriter, pack_payload, write_layout_a
from facetool.pipeline.recordio import index as index_module
from facetool.pipeline.shards import ConvertOptions, Source
from facetool.pipeline.shards.plan import ConvertJob


def test_make_rec_writes_the_files_write_layout_a_writes(tmp_path):
    make_rec(tmp_path / "fast", 103, 7)
    first = 1 + np.arange(8) * 103 // 7
    write_layout_a(tmp_path / "slow", [[tiny_jpeg()] * int(n) for n in np.diff(first)])
    for name in ("train.rec", "train.idx", "property"):
        assert (tmp_path / "fast" / name).read_bytes() == (tmp_path / "slow" / name).read_bytes(), name


def test_bench_make_rec_and_convert_memory_commands(tmp_path):
    runner = CliRunner()
    r = runner.invoke(main, ["bench", "make-rec", str(tmp_path / "d"), "--records", "900", "--identities", "30"])
    assert r.exit_code == 0 and "900 images, 30 identities" in r.output, r.output
    args = ["bench", "convert-memory", str(tmp_path / "d"), "--samples-per-shard", "300", "--json", str(tmp_path / "m")]
    r = runner.invoke(main, args)
    assert r.exit_code == 0, r.output
    result = json.loads((tmp_path / "m").read_text())
    assert result["records"] == 900 and result["seconds"] > 0 and result["parent_rss_anon"] > 0
    assert len(result["worker_rss_anon"]) == 2 and result["tree_pss_anon"] > 0
    assert not list((tmp_path / "d").glob(".facetool-bench-*"))
    r = runner.invoke(main, ["bench", "make-rec", str(tmp_path / "e"), "--records", "3", "--identities", "4"])
    assert r.exit_code != 0 and "1 <= identities <= records" in r.output


INDEX_TEXTS = {
    "plain": b"1\t0\n2\t40\n0\t80\n",
    "leading-zeros": b"0001\t00\n2\t0040\n",
    "beyond-u32": b"4294967296\t7\n5\t4294967295\n",
    "18-digits": b"999999999999999999\t1\n",
    "19-digits": b"1000000000000000000\t1\n",
    "spaces": b"1 0\n2\t 40\n",
    "blank-line": b"1\t0\n\n2\t40\n",
    "crlf": b"1\t0\r\n2\t40\r\n",
    "negative": b"-1\t0\n2\t40\n",
}


@pytest.mark.parametrize("case", INDEX_TEXTS)
@pytest.mark.parametrize("block", [5, 1 << 20])
def test_index_parses_as_loadtxt_does_into_the_smallest_dtype(tmp_path, monkeypatch, case, block):
    monkeypatch.setattr(index_module, "PARSE_BLOCK", block)  # lines cut across blocks, or one block
    path = tmp_path / "train.idx"
    path.write_bytes(INDEX_TEXTS[case])
    keys, offsets = index_module.parse_index(path)
    table = np.loadtxt(path, dtype=np.int64, ndmin=2, comments=None)
    assert keys.tolist() == table[:, 0].tolist() and offsets.tolist() == table[:, 1].tolist()
    for values in (keys, offsets):
        fits = values.min() >= 0 and values.max() < 2**32
        assert values.dtype == (np.uint32 if fits else np.int64)


def test_keys_beyond_u32_read_back(tmp_path):
    jpeg = tiny_jpeg()
    with RecordIOWriter(tmp_path / "train.rec", tmp_path / "train.idx") as writer:
        for k in (2**33 + 2, 5, 2**33):
            writer.write(k, pack_payload(float(k % 7), jpeg, id=k))
    with RecordFile(tmp_path / "train.rec", tmp_path / "train.idx") as rf:
        assert rf.layout == "B" and rf.keys.dtype == np.int64
        assert [r.key for r in rf] == [5, 2**33, 2**33 + 2] and rf.read_key(2**33).class_id == 2**33 % 7
        assert rf[2].image == jpeg


def _plan_memory(folder: Path, records: int) -> tuple[int, int]:
    """Bytes (peak, held) that opening a dataset of 5 records an identity (as MS1M) and planning its conversion
    allocate (numpy reports its arrays to tracemalloc)."""
    make_rec(folder, records, records // 5)
    tracemalloc.start()
    try:
        with RecordFile(folder / "train.rec", folder / "train.idx") as reader:
            job = ConvertJob.plan(folder / "out", Source.locate(folder), reader, ConvertOptions())
            held, peak = tracemalloc.get_traced_memory()
            assert job.perm.size == len(reader) == records
    finally:
        tracemalloc.stop()
    return peak, held


def test_a_plan_holds_few_bytes_a_record(tmp_path):
    """The parsed, checked and sorted index, layout A's views of it, the permutation and the plan: per record (the
    growth from 100k to 400k records, past the fixed blocks' temporaries) under 40 bytes at the peak, 16 held."""
    small, large = _plan_memory(tmp_path / "small", 100_000), _plan_memory(tmp_path / "large", 400_000)
    peak, held = ((b - a) / 300_000 for a, b in zip(small, large, strict=True))
    assert peak < 40 and held < 16, (peak, held)


def test_layout_a_images_are_views_of_the_index(tmp_path):
    make_rec(tmp_path, 50, 10)
    with RecordFile(tmp_path / "train.rec", tmp_path / "train.idx") as rf:
        assert rf.keys.base is not None and rf.offsets.base is not None  # slices, no copies
        assert rf.keys.tolist() == list(range(1, 51)) and rf.num_identities == 10
        assert [r.class_id for r in rf] == np.repeat(np.arange(10), 5).tolist()

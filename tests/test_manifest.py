"""Damaged manifests: checked once against the format (``read_manifest``), so `inspect`, `train` and `bench loader`
all give one line naming the file and the field; shard names are plain file names inside the folder."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from helpers import error_line, run_cli

from facetool.pipeline.errors import FacetoolError
from facetool.pipeline.shards import ConvertOptions, convert
from facetool.pipeline.shards.format import MANIFEST, read_manifest
from facetool.train.data import open_shards

ENV = {"OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def shards(small_dataset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("manifest") / "shards"
    convert(small_dataset[0], out, ConvertOptions(samples_per_shard=100))
    return out


def _set(path: str, value):
    """Set ``path`` (dotted, ``shards.1`` for a list item) in the manifest; ``...`` removes the key."""

    def edit(m):
        *parents, last = path.split(".")
        for p in parents:
            m = m[int(p)] if isinstance(m, list) else m[p]
        if value is ...:
            del m[last]
        elif isinstance(m, list):
            m[int(last)] = value
        else:
            m[last] = value

    return edit


CASES = {
    "not-an-object": (lambda m: [m], "not a manifest (a JSON object), but a list"),
    "no-shards": (_set("shards", ...), "missing 'shards'"),
    "no-source": (_set("source", ...), "missing 'source'"),
    "no-classes": (_set("source.classes", ...), "source.classes must be an integer >= 0, got nothing"),
    "no-shard-name": (_set("shards.1.name", ...), "missing 'shards[1].name'"),
    "shards-null": (_set("shards", None), "shards must be a list, got null"),
    "shard-a-string": (_set("shards.0", "shard-000000.tar"), "shards[0] must be an object, got a string"),
    "samples-abc": (_set("shards.2.samples", "abc"), "shards[2].samples must be an integer >= 0, got a string 'abc'"),
    "negative-masked": (_set("masked", -1), "masked must be an integer >= 0, got a number -1"),
    "huge-classes": (_set("source.classes", 10**12), "source.classes 1000000000000 exceeds source.records 240"),
    "samples-not-the-sum": (_set("samples", 239), "samples 239 is not the sum over its shards"),
    "part-a-list": (_set("part", [0, 1]), "part must be an object, got a list"),
    "version-2": (_set("format_version", 2), "shard format version 2, this facetool reads 1"),
    "parent-folder": (_set("shards.0.name", "../x.tar"), "shards[0].name '../x.tar' is not a plain file name"),
    "absolute": (_set("shards.1.name", "/etc/passwd"), "shards[1].name '/etc/passwd' is not a plain file name"),
    "subfolder-index": (_set("shards.0.index", "sub/shard.idx"), "shards[0].index 'sub/shard.idx' is not a plain"),
    "dot-dot": (_set("shards.0.index", ".."), "shards[0].index '..' is not a plain file name"),
    "a-shard-twice": (_set("shards.1.name", "shard-000000.tar"), "shards[1].name 'shard-000000.tar' names a file"),
    "invalid-json": (None, "not valid JSON"),
}


@pytest.fixture(params=CASES)
def damaged(request, shards, tmp_path) -> tuple[Path, str]:
    out = tmp_path / "shards"
    shutil.copytree(shards, out)
    edit, message = CASES[request.param]
    if edit is None:
        (out / MANIFEST).write_text((shards / MANIFEST).read_text()[:-40])
    else:
        manifest = json.loads((shards / MANIFEST).read_text())
        manifest = edit(manifest) or manifest
        (out / MANIFEST).write_text(json.dumps(manifest))
    return out, message


def test_damaged_manifest_is_one_line_naming_file_and_field(damaged):
    out, message = damaged
    for read in (read_manifest, open_shards):  # every reader: inspect, the loaders, train, bench loader
        with pytest.raises(FacetoolError) as err:
            read(out)
        assert str(err.value).startswith(f"{out / MANIFEST}: ") and message in str(err.value), str(err.value)
    line = error_line("inspect", str(out))
    assert line == f"Error: {err.value}"


@pytest.mark.parametrize("case", ["shards-null", "parent-folder"])
def test_train_and_bench_loader_give_the_same_line(shards, tmp_path, case):
    from test_train import write_config

    out = tmp_path / "shards"
    shutil.copytree(shards, out)
    edit, message = CASES[case]
    manifest = json.loads((shards / MANIFEST).read_text())
    edit(manifest)
    (out / MANIFEST).write_text(json.dumps(manifest))
    config = write_config(tmp_path / "c.toml", tmp_path, data={"shards": str(out)})
    line = error_line("train", str(config), "--output", str(tmp_path / "run"), "--quiet", env=ENV)
    assert line.startswith(f"Error: {out / MANIFEST}: ") and message in line
    line = error_line("bench", "loader", str(out), "--loader", "wds", "--batches", "1", "--warmup", "0", env=ENV)
    assert line.startswith(f"Error: {out / MANIFEST}: ") and message in line


def test_a_manifest_of_format_v1_without_later_fields_still_loads(shards, tmp_path):
    """Readers take any format-v1 manifest: the optional ``members`` and ``tool_version`` may be absent, and a
    part's ``plan`` is only in part manifests."""
    out = tmp_path / "shards"
    shutil.copytree(shards, out)
    manifest = json.loads((shards / MANIFEST).read_text())
    del manifest["members"], manifest["tool_version"]
    (out / MANIFEST).write_text(json.dumps(manifest))
    assert open_shards(out).samples == 240
    proc = run_cli("inspect", str(out))
    assert proc.returncode == 0 and re.search(r"240 samples in 3 shards", proc.stdout), proc.stderr

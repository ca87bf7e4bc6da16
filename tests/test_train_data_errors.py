"""A shard with a bad label (negative, >= classes) or an image that does not decode: training stops with one line
naming the shard and the sample, with either loader (DALI, the webdataset fallback in-process or in DataLoader
workers), never a traceback."""

from __future__ import annotations

import os
import re
import shutil
import struct
from pathlib import Path

import pytest
from helpers import descendants, error_line, loader_params
from shard_edit import read_samples, rewrite_shard, update_manifest_entry
from test_train import ENV, write_config

from facetool.pipeline.errors import FacetoolError
from facetool.pipeline.shards import ConvertOptions, convert
from facetool.pipeline.shards.format import JPEG_EXT, LABEL_EXT
from facetool.pipeline.synth import write_synth
from facetool.train.data import LoaderConfig, create_loader, open_shards

VICTIM = ("shard-000001.tar", 5)
BACKENDS = {"wds": {"backend": "wds", "workers": 0}, "wds-workers": {"backend": "wds", "workers": 2},
            "dali": {"backend": "dali", "threads": 1}}  # fmt: skip


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """16 synthetic identities x 8 images as 4 shards of 32 (test_train's fixture, without masked twins)."""
    root = tmp_path_factory.mktemp("train_errors")
    write_synth(root / "src", identities=16, images_per_identity=8, pairs=2, seed=5, workers=1)
    convert(root / "src", root / "shards", ConvertOptions(samples_per_shard=32))
    return root


def _negative_label(members: dict) -> None:
    members[LABEL_EXT] = struct.pack("<i", -3)


def _label_beyond_classes(members: dict) -> None:
    members[LABEL_EXT] = struct.pack("<i", 16 + 4)  # the fixture has 16 classes


def _undecodable(members: dict) -> None:
    members[JPEG_EXT] = b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4  # a JPEG signature, then nothing of a JPEG


DAMAGES = {
    "negative-label": (_negative_label, r"label -3 outside \[0, 16\)"),
    "label-beyond-classes": (_label_beyond_classes, r"label 20 outside \[0, 16\)"),
    "undecodable": (_undecodable, "cannot decode"),
}


def damage(data: Path, tmp_path: Path, kind: str) -> tuple[Path, str]:
    """A copy of the training fixture's shards with one sample damaged; returns (folder, the sample's key)."""
    out = tmp_path / "shards"
    shutil.copytree(data / "shards", out)
    name, victim = VICTIM
    samples = read_samples(out / name)
    key, members = samples[victim]
    members = dict(members)
    DAMAGES[kind][0](members)
    samples[victim] = (key, list(members.items()))
    size, digest, masked = rewrite_shard(out / name, samples)
    update_manifest_entry(out, name, size, digest, masked, len(samples))
    return out, key


@pytest.mark.parametrize("backend", loader_params(*BACKENDS))
@pytest.mark.parametrize("kind", DAMAGES)
def test_loader_names_shard_and_sample(data, tmp_path, kind, backend):
    shards, key = damage(data, tmp_path, kind)
    options = BACKENDS[backend]
    config = LoaderConfig(batch_size=8, shuffle_buffer=16, threads=1, workers=options.get("workers", 0))
    loader = create_loader(open_shards(shards), config, backend=options["backend"], device="cpu")
    assert_names_the_sample(loader, shards, key, kind)


def assert_names_the_sample(loader, shards: Path, key: str, kind: str) -> None:
    """Reading an epoch of ``loader`` stops with one line naming the damaged sample's shard and key."""
    with pytest.raises(FacetoolError) as err:
        for _ in loader:
            pass
    message = str(err.value)
    assert "\n" not in message and re.search(DAMAGES[kind][1], message), message
    assert message.startswith(f"{shards / VICTIM[0]}: sample {key}"), message


@pytest.mark.dali
@pytest.mark.parametrize("kind", DAMAGES)
def test_the_dali_loader_names_shard_and_sample_in_the_rest_of_an_epoch(data, tmp_path, kind):
    """The rest of an epoch interrupted on 2 ranks, read by the DALI loader's external source on 1."""
    shards, key = damage(data, tmp_path, kind)
    config = LoaderConfig(batch_size=8, shuffle_buffer=16, threads=1)
    loader = create_loader(open_shards(shards), config, backend="dali", device="cpu")
    cut = {"backend": "wds", "epoch": 0, "world_size": 2, "workers": 1, "batch": 1, "before": None}
    assert loader.resume_epoch(cut) == (0, 0) and loader.batches(0) == (128 - 16) // 8
    assert_names_the_sample(loader, shards, key, kind)


def test_a_worker_error_ends_the_workers_before_it_is_raised(data, tmp_path):
    """The error is raised after the workers are shut down, not when the garbage collector meets their iterator (which,
    collected with the error's traceback, used to wait out each worker's status-check interval)."""
    shards, key = damage(data, tmp_path, "undecodable")
    config = LoaderConfig(batch_size=8, shuffle_buffer=16, threads=1, workers=2)
    before = set(descendants(os.getpid()))
    loader = create_loader(open_shards(shards), config, backend="wds", device="cpu")
    with pytest.raises(FacetoolError, match=f"sample {key}"):
        for _ in loader:
            pass
    assert set(descendants(os.getpid())) <= before  # the traceback is still held here: nothing else keeps them


@pytest.mark.parametrize(
    "kind, backend",
    [(kind, backend) if backend != "dali" else pytest.param(kind, backend, marks=pytest.mark.dali)
     for kind, backend in [("negative-label", "wds-workers"), ("negative-label", "dali"),
                           ("label-beyond-classes", "wds"), ("label-beyond-classes", "dali"),
                           ("undecodable", "wds-workers"), ("undecodable", "dali")]],
)  # fmt: skip
def test_facetool_train_stops_with_one_line_naming_shard_and_sample(data, tmp_path, kind, backend):
    shards, key = damage(data, tmp_path, kind)
    config = write_config(tmp_path / "c.toml", data, run={"steps": 16},
                          data={"shards": str(shards), "masked_prob": 0.0, **BACKENDS[backend]})  # fmt: skip
    line = error_line("train", str(config), "--output", str(tmp_path / "run"), "--quiet", env=ENV)
    assert line.startswith(f"Error: {shards / VICTIM[0]}: sample {key}") and re.search(DAMAGES[kind][1], line), line


_FORK_AFTER_DALI = """
import gc, os, sys
from facetool.train.data import LoaderConfig, create_loader, open_shards
from facetool.train.data.dali import build_pipeline
shards = sys.argv[1]
gc.disable()  # the DALI pipeline below becomes garbage the parent has not collected when the workers fork ...
os.register_at_fork(after_in_child=gc.collect)  # ... and a forked child collects at once (as it may at any time)
pipe = build_pipeline(open_shards(shards), LoaderConfig(batch_size=8, threads=1))
pipe.build()
pipe.run()
cycle = [pipe]
cycle.append(cycle)  # held by a cycle, as a traceback's frames hold a failed pipeline
del pipe, cycle
wds = create_loader(shards, LoaderConfig(batch_size=8, workers=2), device="cpu", backend="wds")
print(sum(len(labels) for _, labels, _ in wds))
"""


@pytest.mark.dali
def test_fallback_workers_fork_after_a_dali_loader_without_hanging(data, tmp_path) -> None:
    """A DALI pipeline left as garbage in the parent, collected in a forked worker, waited forever for threads the
    child does not have: the loader collects garbage before its workers fork."""
    import subprocess
    import sys

    script = tmp_path / "fork_after_dali.py"
    script.write_text(_FORK_AFTER_DALI)
    proc = subprocess.run(
        [sys.executable, str(script), str(data / "shards")], capture_output=True, text=True, timeout=90
    )
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout.split()[-1]) == open_shards(data / "shards").samples

"""Verification .bin loading: every historical encoding loads, and a pickle that would run code never does."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from bin_payloads import ENCODINGS, EvalEvil, Evil
from conftest import random_jpeg
from helpers import error_line

from facetool.pipeline.errors import FacetoolError
from facetool.pipeline.verification_bin import UnsafePickleError, load_bin, write_bin

rng = np.random.default_rng(0)
IMAGES = [random_jpeg(rng) for _ in range(6)]
ISSAME = [True, False, True]


@pytest.mark.parametrize("encoding", list(ENCODINGS))
def test_all_historical_encodings_load(tmp_path, encoding):
    path = tmp_path / "lfw.bin"
    path.write_bytes(ENCODINGS[encoding](IMAGES, ISSAME))
    vs = load_bin(path)
    assert vs.name == "lfw" and vs.num_pairs == 3
    assert vs.images == IMAGES
    assert vs.issame.tolist() == ISSAME


def test_write_bin_roundtrip(tmp_path):
    write_bin(tmp_path / "x.bin", IMAGES, ISSAME)
    vs = load_bin(tmp_path / "x.bin")
    assert vs.images == IMAGES and vs.issame.tolist() == ISSAME
    assert (tmp_path / "x.bin").read_bytes() == pickle.dumps((IMAGES, ISSAME), protocol=4)  # InsightFace's layout
    assert [p.name for p in tmp_path.iterdir()] == ["x.bin"]  # no temporary file left behind
    with pytest.raises(FacetoolError, match=r"y.bin: 5 images for 3 pairs"):
        write_bin(tmp_path / "y.bin", IMAGES[:5], ISSAME)
    assert not (tmp_path / "y.bin").exists()


@pytest.mark.parametrize("evil", ["os.system", "builtins.eval"])
def test_malicious_pickle_refused_and_nothing_runs(tmp_path, evil, monkeypatch):
    marker = tmp_path / "pwned"
    obj = Evil(f"touch {marker}") if evil == "os.system" else EvalEvil()
    path = tmp_path / "evil.bin"
    path.write_bytes(pickle.dumps(([obj] + IMAGES[1:], ISSAME)))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UnsafePickleError) as err:
        load_bin(path)
    assert "evil.bin" in str(err.value) and ("system" in str(err.value) or "eval" in str(err.value))
    assert not marker.exists() and not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        pytest.param(lambda: pickle.dumps((IMAGES[:5], ISSAME)), r"agedb_30.*5 images for 3 pairs", id="count"),
        pytest.param(lambda: pickle.dumps((IMAGES[:2] + [123] + IMAGES[3:], ISSAME)), r"agedb_30.*image 2", id="int"),
        pytest.param(lambda: b"not a pickle at all", "agedb_30.bin: not a readable pickle", id="not-a-pickle"),
        pytest.param(lambda: pickle.dumps({"a": 1}), "agedb_30.bin: expected a pickled", id="dict"),
        pytest.param(lambda: pickle.dumps((IMAGES, [1, 0, 1])), "agedb_30.*issame must be", id="int-flags"),
    ],
)
def test_malformed_sets_name_set_and_index(tmp_path, payload, match):
    path = tmp_path / "agedb_30.bin"
    path.write_bytes(payload())
    with pytest.raises(FacetoolError, match=match):
        load_bin(path)


def test_cli_refuses_malicious_bin_cleanly(tmp_path):
    """Every command that reads a .bin goes through the restricted loader; here `facetool inspect`."""
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.bin"
    path.write_bytes(pickle.dumps(([Evil(f"touch {marker}")], [True])))
    line = error_line("inspect", str(path))
    assert "refused" in line and "evil.bin" in line
    assert not marker.exists()

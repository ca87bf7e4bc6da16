"""Verification .bin loading: every historical encoding loads, and a pickle that would run code never does."""

from __future__ import annotations

import io
import os
import pickle
import struct

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import random_jpeg

from facetool.pipeline.errors import FacetoolError
from facetool.pipeline.verification_bin import UnsafePickleError, load_bin, write_bin

rng = np.random.default_rng(0)
IMAGES = [random_jpeg(rng) for _ in range(6)]
ISSAME = [True, False, True]


def _py2_pickle(images: list[bytes], issame: list[bool]) -> bytes:
    """Protocol 2 as Python 2's cPickle writes a tuple of (list of str, list of bool): BINSTRING opcodes."""
    out = io.BytesIO()
    out.write(b"\x80\x02")  # PROTO 2
    out.write(b"]q\x00(")  # EMPTY_LIST, BINPUT 0, MARK
    for img in images:
        out.write(b"T" + struct.pack("<I", len(img)) + img)  # BINSTRING (a py2 str)
    out.write(b"e")  # APPENDS
    out.write(b"]q\x01(")
    for v in issame:
        out.write(b"\x88" if v else b"\x89")  # NEWTRUE / NEWFALSE
    out.write(b"e\x86q\x02.")  # APPENDS, TUPLE2, BINPUT 2, STOP
    return out.getvalue()


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(lambda: _py2_pickle(IMAGES, ISSAME), id="python2-str"),
        pytest.param(lambda: pickle.dumps((IMAGES, ISSAME), protocol=2), id="python3-protocol2-bytes"),
        pytest.param(lambda: pickle.dumps((IMAGES, ISSAME), protocol=4), id="python3-protocol4-bytes"),
        pytest.param(
            lambda: pickle.dumps(([np.frombuffer(b, np.uint8) for b in IMAGES], np.array(ISSAME)), protocol=3),
            id="numpy-uint8-and-bool-array",
        ),
        pytest.param(
            lambda: pickle.dumps(([np.frombuffer(b, np.uint8) for b in IMAGES], [np.bool_(v) for v in ISSAME]), 2),
            id="numpy-arrays-protocol2-numpy-bools",
        ),
    ],
)
def test_all_historical_encodings_load(tmp_path, payload):
    path = tmp_path / "lfw.bin"
    path.write_bytes(payload())
    vs = load_bin(path)
    assert vs.name == "lfw" and vs.num_pairs == 3
    assert vs.images == IMAGES
    assert vs.issame.tolist() == ISSAME


def test_write_bin_roundtrip(tmp_path):
    write_bin(tmp_path / "x.bin", IMAGES, ISSAME)
    vs = load_bin(tmp_path / "x.bin")
    assert vs.images == IMAGES and vs.issame.tolist() == ISSAME


class _Evil:
    def __init__(self, cmd: str) -> None:
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


class _EvalEvil:
    def __reduce__(self):
        return (eval, ("__import__('pathlib').Path('x').touch()",))


@pytest.mark.parametrize("evil", ["os.system", "builtins.eval"])
def test_malicious_pickle_refused_and_nothing_runs(tmp_path, evil, monkeypatch):
    marker = tmp_path / "pwned"
    obj = _Evil(f"touch {marker}") if evil == "os.system" else _EvalEvil()
    path = tmp_path / "evil.bin"
    path.write_bytes(pickle.dumps(([obj] + IMAGES[1:], ISSAME)))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UnsafePickleError) as err:
        load_bin(path)
    assert "evil.bin" in str(err.value) and ("system" in str(err.value) or "eval" in str(err.value))
    assert not marker.exists() and not (tmp_path / "x").exists()


def test_malformed_sets_name_set_and_index(tmp_path):
    path = tmp_path / "agedb_30.bin"
    path.write_bytes(pickle.dumps((IMAGES[:5], ISSAME)))
    with pytest.raises(FacetoolError, match=r"agedb_30.*5 images for 3 pairs"):
        load_bin(path)
    path.write_bytes(pickle.dumps((IMAGES[:2] + [123] + IMAGES[3:], ISSAME)))
    with pytest.raises(FacetoolError, match=r"agedb_30.*image 2"):
        load_bin(path)
    path.write_bytes(b"not a pickle at all")
    with pytest.raises(FacetoolError, match="not a readable pickle"):
        load_bin(path)


def test_cli_refuses_malicious_bin_cleanly(tmp_path):
    """Every command that reads a .bin goes through the restricted loader; here `facetool inspect`."""
    from facetool.cli import main

    marker = tmp_path / "pwned"
    path = tmp_path / "evil.bin"
    path.write_bytes(pickle.dumps(([_Evil(f"touch {marker}")], [True])))
    result = CliRunner().invoke(main, ["inspect", str(path)])
    assert result.exit_code != 0
    assert "refused" in result.output and "Traceback" not in result.output
    assert not marker.exists()

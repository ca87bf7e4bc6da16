"""Verification .bin files: every historical encoding loads, a pickle that would run code never does, and make-bin
writes what InsightFace reads."""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np
import pytest
from bin_payloads import ENCODINGS, EvalEvil, Evil
from conftest import random_jpeg
from helpers import error_line, run_cli
from PIL import Image

from facetool.pipeline.errors import FacetoolError
from facetool.pipeline.verification_bin import UnsafePickleError, load_bin, make_bin, write_bin

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


# ---------------------------------------------------------------------------------------------------------------
# make-bin: a .bin from a pairs list


def _faces(root: Path) -> dict[str, bytes]:
    """A JPEG, a PNG, a BMP (re-encoded) and a JPEG in a subfolder, written under ``root``."""
    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 255, (112, 112, 3), dtype=np.uint8)
    files = {"a.jpg": IMAGES[0], "b.jpg": IMAGES[1], "sub/c.jpg": IMAGES[2]}
    for name, fmt in (("d.png", "PNG"), ("e.bmp", "BMP")):
        out = io.BytesIO()
        Image.fromarray(pixels).save(out, format=fmt)
        files[name] = out.getvalue()
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return files


PAIRS = "# name1 name2 same\na.jpg b.jpg 0\n\nd.png e.bmp 1\nsub/c.jpg a.jpg 1\n"


def test_make_bin_is_read_by_plain_pickle_and_holds_the_listed_files(tmp_path):
    files = _faces(tmp_path / "faces")
    (tmp_path / "pairs.txt").write_text(PAIRS)
    proc = run_cli("make-bin", str(tmp_path / "pairs.txt"), str(tmp_path / "mine.bin"), "--root",
                   str(tmp_path / "faces"), "--quiet")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "3 pairs (2 same) of 5 images" in proc.stdout and "1 re-encoded as PNG" in proc.stdout
    with open(tmp_path / "mine.bin", "rb") as f:
        images, issame = pickle.load(f, encoding="bytes")  # as InsightFace's verification.py reads it
    assert issame == [False, True, True]
    listed = ["a.jpg", "b.jpg", "d.png", "e.bmp", "sub/c.jpg", "a.jpg"]
    assert len(images) == 6 and all(isinstance(b, bytes) for b in images)
    for name, data in zip(listed, images, strict=True):
        if name.endswith(".bmp"):  # not JPEG/PNG: re-encoded losslessly
            assert data.startswith(b"\x89PNG") and np.array_equal(
                np.asarray(Image.open(io.BytesIO(data))), np.asarray(Image.open(io.BytesIO(files[name])))
            )
        else:
            assert data == files[name], name
    vs = load_bin(tmp_path / "mine.bin")  # and facetool's restricted loader
    assert vs.images == images and vs.issame.tolist() == issame


def test_make_bin_root_defaults_to_the_lists_folder(tmp_path):
    _faces(tmp_path)
    (tmp_path / "pairs.txt").write_text(PAIRS)
    assert make_bin(tmp_path / "pairs.txt", tmp_path / "x.bin") == {"pairs": 3, "same": 2, "images": 5, "reencoded": 1}


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("a.jpg b.jpg 1\na.jpg missing.jpg 0\n", r"pairs.txt line 2: image 'missing.jpg' not found in "),
        ("a.jpg b.jpg 1\n\nbad.jpg a.jpg 0\n", r"pairs.txt line 3: image 'bad.jpg': cannot decode the image"),
        ("a.jpg ../outside.jpg 1\n", r"pairs.txt line 1: image '../outside.jpg' lies outside "),
        ("a.jpg sub 1\n", r"pairs.txt line 1: image 'sub' not found"),
        ("a.jpg b.jpg yes\n", r"pairs.txt line 1: label and mask flags must be 0 or 1"),
        ("a.jpg b.jpg\n", r"pairs.txt line 1: expected 'path1 path2 label"),
        ("# nothing\n", r"pairs.txt: no pairs"),
    ],
)
def test_make_bin_errors_name_the_line(tmp_path, text, match):
    root = tmp_path / "faces"
    _faces(root)
    (root / "bad.jpg").write_bytes(IMAGES[0][:300])  # a truncated JPEG
    (tmp_path / "outside.jpg").write_bytes(IMAGES[0])
    (root / "pairs.txt").write_text(text)
    with pytest.raises(FacetoolError, match=match):
        make_bin(root / "pairs.txt", tmp_path / "x.bin")
    assert not (tmp_path / "x.bin").exists()


def test_make_bin_command_error_is_one_line(tmp_path):
    (tmp_path / "pairs.txt").write_bytes(b"a.jpg \xff.jpg 1\n")
    line = error_line("make-bin", str(tmp_path / "pairs.txt"), str(tmp_path / "x.bin"))
    assert "pairs.txt: not a UTF-8 text file" in line

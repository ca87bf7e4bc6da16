"""Five-point alignment: the least-squares similarity, the warp, and `facetool align` with its one-line errors."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from facetool.pipeline.align import (
    TEMPLATE,
    align_face,
    five_points,
    read_landmark_list,
    similarity_transform,
    template_points,
    warp_affine,
)
from facetool.pipeline.errors import FacetoolError
from facetool.pipeline.synth import render
from tests.helpers import error_line, run_cli


def similarity(scale: float, angle: float, tx: float, ty: float) -> np.ndarray:
    c, s = scale * np.cos(angle), scale * np.sin(angle)
    return np.array([[c, -s, tx], [s, c, ty]])


def apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    return points @ matrix[:, :2].T + matrix[:, 2]


def umeyama(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Umeyama's least-squares similarity (what scikit-image's SimilarityTransform.estimate computes), by SVD."""
    ms, md = src.mean(0), dst.mean(0)
    sc, dc = src - ms, dst - md
    u, sv, vt = np.linalg.svd(dc.T @ sc / len(src))
    d = np.eye(2)
    if np.linalg.det(dc.T @ sc) < 0:
        d[1, 1] = -1
    rot = u @ d @ vt
    scale = np.trace(np.diag(sv) @ d) / sc.var(0).sum()
    return np.c_[scale * rot, md - scale * rot @ ms]


def face(identity: int = 1, k: int = 0) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(render(0, identity, k))).convert("RGB"))


@pytest.mark.parametrize("params", [(1.0, 0.0, 0, 0), (1.7, 0.3, 5, -3), (0.6, -1.2, 40.5, 12.25), (2.5, 3.0, -7, 9)])
def test_similarity_recovers_a_known_transform(params):
    rng = np.random.default_rng(0)
    src = rng.uniform(0, 100, (5, 2))
    m = similarity(*params)
    np.testing.assert_allclose(similarity_transform(src, apply(m, src)), m, atol=1e-9)


def test_similarity_is_the_least_squares_fit_of_umeyama():
    rng = np.random.default_rng(1)
    for _ in range(20):
        src = rng.uniform(0, 200, (5, 2))
        dst = apply(similarity(rng.uniform(0.5, 2), rng.uniform(-3, 3), 10, 20), src) + rng.normal(0, 4, (5, 2))
        np.testing.assert_allclose(similarity_transform(src, dst), umeyama(src, dst), atol=1e-9)


def test_template_scales_as_insightface_norm_crop():
    np.testing.assert_allclose(template_points(112), TEMPLATE)
    np.testing.assert_allclose(template_points(224), TEMPLATE * 2)
    np.testing.assert_allclose(template_points(128), TEMPLATE + [8, 0])  # the 128 crop: 8 more pixels a side
    with pytest.raises(FacetoolError, match="multiple of 112 or 128"):
        template_points(100)


def test_warp_identity_and_integer_shift_with_zero_border():
    img = face()
    assert np.array_equal(warp_affine(img, similarity(1, 0, 0, 0), (112, 112)), img)
    shifted = warp_affine(img, similarity(1, 0, 3, -2), (112, 112))
    assert np.array_equal(shifted[:-2, 3:], img[2:, :-3])
    assert not shifted[:, :3].any() and not shifted[-2:].any()  # outside the source: 0


@pytest.mark.parametrize("params", [(1.3, 0.2, 40, 20), (1.1, -0.35, 30, 45), (1.5, 0.0, 25, 25)])
def test_alignment_brings_back_a_face_warped_away_by_a_known_similarity(params):
    original = face()
    m = similarity(*params)
    loose = warp_affine(original, m, (220, 220))
    back = align_face(loose, apply(m, TEMPLATE))
    error = np.abs(back.astype(int) - original.astype(int))[8:-8, 8:-8].mean()
    assert error < 3.0  # two bilinear resamplings
    off = align_face(loose, apply(m, TEMPLATE) + [3.0, 0.0])  # landmarks 3 px off
    assert np.abs(off.astype(int) - original.astype(int))[8:-8, 8:-8].mean() > 2 * error


def test_68_points_reduce_to_five():
    pts = np.zeros((68, 2))
    pts[36], pts[39], pts[42], pts[45] = (10, 20), (20, 22), (40, 20), (50, 18)
    pts[30], pts[48], pts[54] = (30, 40), (15, 60), (45, 60)
    np.testing.assert_allclose(five_points(pts), [[15, 21], [45, 19], [30, 40], [15, 60], [45, 60]])


def write_loose_faces(folder, count=3, scores=True):
    """Loose crops under folder/imgs/ and a list file with their landmarks; returns (list path, originals)."""
    rng = np.random.default_rng(3)
    lines, originals = [], {}
    for i in range(count):
        m = similarity(rng.uniform(1.1, 1.4), rng.uniform(-0.3, 0.3), 30, 35)
        name = f"imgs/sub{i % 2}/{i}.jpg"
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(warp_affine(face(i), m, (190, 200))).save(folder / name, quality=97)
        coords = " ".join(f"{v:.4f}" for v in apply(m, TEMPLATE).ravel())
        lines.append(f"{name} {coords}" + (" 0.9" if scores else ""))
        originals[name] = face(i)
    (folder / "list.txt").write_text("\n".join(lines) + "\n")
    return folder / "list.txt", originals


@pytest.mark.parametrize("png", [False, True])
def test_align_command_writes_aligned_faces_under_the_same_names(tmp_path, png):
    lst, originals = write_loose_faces(tmp_path, scores=not png)
    out = tmp_path / "out"
    proc = run_cli("align", str(lst), str(out), *(["--png"] if png else []), "--quiet")
    assert proc.returncode == 0, proc.stderr
    for name, original in originals.items():
        path = out / (name.replace(".jpg", ".png") if png else name)
        with Image.open(path) as im:
            assert im.format == ("PNG" if png else "JPEG") and im.size == (112, 112)
            got = np.asarray(im.convert("RGB")).astype(int)
        assert np.abs(got - original)[8:-8, 8:-8].mean() < 4.0


def test_landmark_list_reader_keeps_line_numbers(tmp_path):
    lst, _ = write_loose_faces(tmp_path, count=2)
    lst.write_text("\n" + lst.read_text())  # a blank first line
    faces = read_landmark_list(lst, require_score=True)
    assert faces.names == ["imgs/sub0/0.jpg", "imgs/sub1/1.jpg"] and faces.where(1) == f"{lst}:3"
    np.testing.assert_allclose(faces.scores, [0.9, 0.9])


BAD_LINES = [
    ("a.jpg 1 2 3", "expected 'name x1 y1 ... x5 y5 [score]'"),
    ("a.jpg 1 2 3 4 5 6 7 8 9 x", "'x' is not a number"),
    ("a.jpg 1 2 3 4 5 6 7 8 9 nan", "must be finite"),
    ("../a.jpg 1 2 3 4 5 6 7 8 9 10", "must be a relative path"),
    ("/etc/a.jpg 1 2 3 4 5 6 7 8 9 10", "must be a relative path"),
    ("a.jpg 1 2 3 4 5 6 7 8 9 10 0.9", "a detector score on some lines"),
    ("missing.jpg 30 40 60 40 45 60 35 80 55 80", "cannot read image"),
    ("bad.jpg 30 40 60 40 45 60 35 80 55 80", "cannot decode image"),
    ("a.bmpx 30 40 60 40 45 60 35 80 55 80", "cannot write 'a.bmpx'"),
]


@pytest.mark.parametrize("line, message", BAD_LINES)
def test_bad_list_lines_are_one_line_errors_naming_file_and_line(tmp_path, line, message):
    Image.fromarray(face()).save(tmp_path / "ok.jpg")
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    lst = tmp_path / "list.txt"
    lst.write_text(f"ok.jpg {' '.join(f'{v:.3f}' for v in TEMPLATE.ravel())}\n\n{line}\n")
    err = error_line("align", str(lst), str(tmp_path / "out"), "--quiet")
    assert f"{lst}:3" in err and message in err, err

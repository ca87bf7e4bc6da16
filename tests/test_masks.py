"""Synthetic masks: template coverage, kind weights, determinism, realism cues, masked .bin sets, preview, bench."""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import random_jpeg
from helpers import error_line, run_cli
from PIL import Image

from facetool.cli import main
from facetool.pipeline.errors import FacetoolError
from facetool.pipeline.masks import (
    CHIN,
    DEFAULT_WEIGHTS,
    KINDS,
    TEMPLATE,
    decode_image,
    eye_limit_row,
    mask_jpeg,
    mask_verification_images,
    parse_weights,
    render_mask,
    select_masked,
)
from facetool.pipeline.masks.sprites import get_sprite
from facetool.pipeline.synth import render
from facetool.pipeline.verification_bin import load_bin, write_bin

#: Documented bounds (pipeline/masks/__init__.py, README): share of the image the mask region covers, per render.
COVERAGE_BOUNDS = (0.14, 0.32)
#: The top edge at the centre column lies between the nose bridge and the nose tip (rows, 112x112).
TOP_EDGE_ROWS = (57, 71)


@pytest.fixture(scope="module")
def faces() -> list[np.ndarray]:
    """40 synthetic aligned faces (8 identities x 5 images)."""
    return [decode_image(render(0, i % 8, i // 8))[0] for i in range(40)]


def _points(size: int) -> list[tuple[int, int]]:
    """Nose tip, mouth corners and chin as (row, col) pixels of a size x size face."""
    s = size / 112
    return [(round((y + 0.5) * s - 0.5), round((x + 0.5) * s - 0.5)) for x, y in [*TEMPLATE[2:], CHIN]]


@pytest.mark.parametrize("kind", KINDS)
def test_template_coverage_over_1000_renders(kind, faces):
    """Eyes region untouched, nose tip, both mouth corners and chin covered, coverage inside documented bounds."""
    limit = eye_limit_row(112)
    points = _points(112)
    coverage, tops, bottoms = [], [], []
    for key in range(1000):
        face = faces[key % len(faces)]
        r = render_mask(face, 7, key, kind=kind)
        assert r.params.kind == kind
        assert np.array_equal(r.image[:limit], face[:limit]), f"key {key}: rows above the nose bridge changed"
        assert not r.region[:limit].any()
        for row, col in points:
            assert r.region[row, col], f"key {key}: ({row}, {col}) not covered"
        coverage.append(r.region.mean())
        column = np.nonzero(r.region[:, 56])[0]
        tops.append(column[0])
        bottoms.append(column[-1])
    cov = np.array(coverage)
    print(
        f"\n{kind:9s} coverage of the image: mean {cov.mean():.3f} min {cov.min():.3f} max {cov.max():.3f} "
        f"(std {cov.std():.3f}); top edge at the centre column: rows {min(tops)}-{max(tops)} "
        f"(mean {np.mean(tops):.1f}); lowest covered row {min(bottoms)}-{max(bottoms)}"
    )
    assert COVERAGE_BOUNDS[0] <= cov.min() and cov.max() <= COVERAGE_BOUNDS[1]
    assert TOP_EDGE_ROWS[0] <= min(tops) and max(tops) <= TOP_EDGE_ROWS[1]
    assert min(bottoms) >= 106  # at or below the chin
    assert cov.std() > 0.005  # coverage really varies


@pytest.mark.parametrize("size", [96, 128])
def test_other_sizes_scale_the_template(size):
    rng = np.random.default_rng(size)
    face = np.asarray(Image.fromarray(rng.integers(60, 200, (8, 8, 3), dtype=np.uint8)).resize((size, size)))
    limit = eye_limit_row(size)
    for key in range(200):
        r = render_mask(face, 1, key)
        assert r.image.shape == face.shape and r.region.shape == (size, size)
        assert np.array_equal(r.image[:limit], face[:limit])
        assert all(r.region[p] for p in _points(size))


def _chi_square(counts: np.ndarray, probabilities: np.ndarray) -> float:
    expected = counts.sum() * probabilities
    return float(((counts - expected) ** 2 / expected).sum())


# upper 0.1 % points of the chi-square distribution (df 1..3): a correct sampler fails once in a thousand seeds
CHI2_999 = {1: 10.828, 2: 13.816, 3: 16.266}


@pytest.mark.parametrize(
    "weights", [None, {"surgical": 1, "kn95": 1, "n95": 1, "cloth": 1}, {"n95": 3, "cloth": 1}], ids=str
)
def test_kind_frequencies_match_weights(weights, faces):
    probabilities = {k: v / sum((weights or DEFAULT_WEIGHTS).values()) for k, v in (weights or DEFAULT_WEIGHTS).items()}
    kinds = [k for k in KINDS if probabilities.get(k, 0) > 0]
    counts = dict.fromkeys(KINDS, 0)
    n = 2000
    for key in range(n):
        counts[render_mask(faces[key % len(faces)], 3, key, weights=weights).params.kind] += 1
    assert all(counts[k] == 0 for k in KINDS if k not in kinds)  # a kind of weight 0 never appears
    stat = _chi_square(np.array([counts[k] for k in kinds]), np.array([probabilities[k] for k in kinds]))
    print(f"\nweights {weights}: counts {counts}, chi-square {stat:.2f} (df {len(kinds) - 1})")
    assert stat < CHI2_999[len(kinds) - 1]


def test_chi_square_test_detects_wrong_weights(faces):
    """The same statistic rejects draws made with other weights than the ones claimed (so the test can fail)."""
    counts = dict.fromkeys(KINDS, 0)
    for key in range(2000):
        counts[render_mask(faces[key % len(faces)], 3, key, weights={"surgical": 0.35, "kn95": 0.35}).params.kind] += 1
    claimed = np.array([0.5, 0.5])
    assert _chi_square(np.array([counts["surgical"], counts["kn95"]]), claimed) < CHI2_999[1]
    wrong = np.array([DEFAULT_WEIGHTS[k] for k in KINDS]) / sum(DEFAULT_WEIGHTS.values())
    assert _chi_square(np.array([counts[k] for k in KINDS]) + 1, wrong) > CHI2_999[3]


def test_same_seed_and_key_give_identical_bytes_in_another_process():
    jpegs = [render(0, i, 0) for i in range(6)]
    here = [hashlib.sha256(mask_jpeg(j, 11, 100 + i)).hexdigest() for i, j in enumerate(jpegs)]
    assert here == [hashlib.sha256(mask_jpeg(j, 11, 100 + i)).hexdigest() for i, j in enumerate(jpegs)]
    code = (
        "import hashlib; from facetool.pipeline.synth import render; from facetool.pipeline.masks import mask_jpeg\n"
        "print(' '.join(hashlib.sha256(mask_jpeg(render(0, i, 0), 11, 100 + i)).hexdigest() for i in range(6)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.split() == here
    assert hashlib.sha256(mask_jpeg(jpegs[0], 12, 100)).hexdigest() != here[0]  # another seed: another mask


def test_different_keys_give_visibly_different_masks(faces):
    face = faces[0]
    results = [render_mask(face, 0, key) for key in range(60)]
    for a, b in zip(results, results[1:], strict=False):
        pa, pb = a.params, b.params
        colour_gap = max(abs(x - y) for x, y in zip(pa.color, pb.color, strict=True))
        union = (a.region | b.region).sum()
        iou = (a.region & b.region).sum() / union
        assert pa.kind != pb.kind or colour_gap > 12 or iou < 0.93 or pa.variant != pb.variant
        region = a.region | b.region
        diff = np.abs(a.image.astype(int) - b.image.astype(int))[region].mean()
        assert diff > 8, f"masks look alike (mean difference {diff:.1f} grey levels)"
    assert len({r.params.kind for r in results}) == len(KINDS)
    assert len({r.params.variant for r in results}) > 20


def test_region_is_where_the_pixels_changed(faces):
    face = faces[3]
    for key in range(20):
        r = render_mask(face, 0, key)
        diff = np.abs(r.image.astype(int) - face.astype(int)).max(axis=2)
        assert diff[r.region].mean() > 15
        grown = r.region.copy()
        for _ in range(3):  # anti-aliased edges, straps' soft sides and the contact shadow sit next to the region
            grown[1:] |= grown[:-1]
            grown[:-1] |= grown[1:]
            grown[:, 1:] |= grown[:, :-1]
            grown[:, :-1] |= grown[:, 1:]
        assert np.percentile(diff[~grown], 99.5) <= 12


def _mask_luma(r) -> np.ndarray:
    return r.image.astype(float) @ np.array([0.299, 0.587, 0.114])


def test_shading_follows_the_faces_own_light_and_colour(faces):
    """A face lit from the right gets a mask brighter on the right; a blue-lit face a bluer mask."""
    face = faces[5].astype(float)
    ramp = np.linspace(0.55, 1.45, 112)[None, :, None]
    right_lit = np.clip(face * ramp, 0, 255).astype(np.uint8)
    left_lit = right_lit[:, ::-1].copy()
    blue = np.clip(face * np.array([0.8, 0.95, 1.25]), 0, 255).astype(np.uint8)
    ratios, casts = [], []
    for key in range(30):
        a, b = render_mask(right_lit, 0, key), render_mask(left_lit, 0, key)
        ratio = []
        for r in (a, b):
            luma, region = _mask_luma(r), r.region.copy()
            ratio.append(luma[:, 64:][region[:, 64:]].mean() / luma[:, :48][region[:, :48]].mean())
        ratios.append(ratio)
        neutral, tinted = render_mask(faces[5], 0, key), render_mask(blue, 0, key)
        rb = [r.image[r.region].mean(axis=0) for r in (neutral, tinted)]
        casts.append((rb[1][2] / rb[1][0]) / (rb[0][2] / rb[0][0]))
    ratios = np.array(ratios)
    assert (ratios[:, 0] > ratios[:, 1]).mean() > 0.9 and np.median(ratios[:, 0] / ratios[:, 1]) > 1.3
    assert np.median(casts) > 1.05


def test_noise_and_blur_are_matched_to_the_image(faces):
    face = faces[6]
    rng = np.random.default_rng(0)
    noisy = np.clip(face + rng.normal(0, 8, face.shape), 0, 255).astype(np.uint8)
    soft = np.asarray(Image.fromarray(face).resize((56, 56), Image.BILINEAR).resize((112, 112), Image.BICUBIC))
    clean_r, noisy_r, soft_r = (render_mask(x, 0, 4, kind="n95") for x in (face, noisy, soft))
    assert noisy_r.params.noise_sigma > 2 * clean_r.params.noise_sigma
    assert soft_r.params.blur > clean_r.params.blur

    def grain(r) -> float:  # high-frequency energy inside the mask (away from its edges)
        inner = r.region.copy()
        for _ in range(3):
            inner[1:-1, 1:-1] &= inner[:-2, 1:-1] & inner[2:, 1:-1] & inner[1:-1, :-2] & inner[1:-1, 2:]
        g = r.image.astype(float).mean(axis=2)
        lap = np.abs(4 * g[1:-1, 1:-1] - g[:-2, 1:-1] - g[2:, 1:-1] - g[1:-1, :-2] - g[1:-1, 2:])
        return lap[inner[1:-1, 1:-1]].mean()

    assert grain(noisy_r) > 1.5 * grain(clean_r)


def test_masked_jpeg_keeps_size_tables_and_mode():
    src = render(0, 2, 0)
    out = mask_jpeg(src, 0, 5)
    a, b = Image.open(io.BytesIO(src)), Image.open(io.BytesIO(out))
    assert b.format == "JPEG" and b.size == a.size and b.mode == a.mode
    assert b.quantization == a.quantization  # the twin carries the source's compression
    grey = io.BytesIO()
    a.convert("L").save(grey, format="JPEG", quality=80)
    assert Image.open(io.BytesIO(mask_jpeg(grey.getvalue(), 0, 5))).mode == "L"
    png = io.BytesIO()
    a.save(png, format="PNG")
    twin = Image.open(io.BytesIO(mask_jpeg(png.getvalue(), 0, 5)))
    assert twin.format == "JPEG" and twin.size == a.size
    with pytest.raises(FacetoolError, match="cannot decode"):
        mask_jpeg(src[: len(src) // 3], 0, 5)


def test_selector_is_a_per_key_coin():
    keys = np.arange(1, 10_001)  # the keys of a 10,000-face synthetic set
    chosen = select_masked(keys, 0.1, seed=0)
    assert 0.08 <= chosen.mean() <= 0.12
    perm = np.random.default_rng(1).permutation(keys.size)
    assert np.array_equal(select_masked(keys[perm], 0.1, 0), chosen[perm])  # order and grouping do not matter
    assert not np.array_equal(select_masked(keys, 0.1, 1), chosen)
    assert not select_masked(keys, 0.0, 0).any() and select_masked(keys, 1.0, 0).all()
    for fraction in (0.01, 0.25, 0.5, 0.9):
        assert abs(select_masked(keys, fraction, 3).mean() - fraction) < 0.02
    with pytest.raises(FacetoolError, match=r"\[0, 1\]"):
        select_masked(keys, 1.5, 0)


def test_parse_weights():
    assert parse_weights("surgical=1, cloth=3") == {"surgical": 0.25, "kn95": 0.0, "n95": 0.0, "cloth": 0.75}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("gas=1", "unknown mask kind(s) gas"),
        ("surgical", "expected KIND=WEIGHT"),
        ("surgical=-1", "non-negative"),
        ("surgical=0", "positive sum"),
        ("surgical=x", "expected KIND=WEIGHT"),
        ("surgical=nan", "non-negative"),
    ],
)
def test_parse_weights_refuses_bad_text(text, message):
    with pytest.raises(FacetoolError) as err:
        parse_weights(text)
    assert message in str(err.value) and "\n" not in str(err.value)


_GREY = np.full((112, 112, 3), 128, dtype=np.uint8)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: render_mask(_GREY, 0, 1, kind="gas"), "unknown mask kind 'gas'"),
        (lambda: render_mask(_GREY, 0, -1), "keys must be >= 0"),
        (lambda: render_mask(_GREY, 0, 1, weights={"surgical": "x"}), "must be numbers"),
        (lambda: render_mask(_GREY, 0, 1, weights={"surgical": 0}), "positive sum"),
        (lambda: render_mask(_GREY, 0, 1, weights={"gas": 1}), "unknown mask kind(s) gas"),
        (lambda: render_mask(_GREY[:16, :16], 0, 1), "32 to 256 pixels"),
        (lambda: render_mask(_GREY.astype(np.float32), 0, 1), "uint8"),
        (lambda: get_sprite(112, 112, "gas", 0), "unknown mask kind 'gas'"),
        (lambda: select_masked([1, 2], -0.1), "[0, 1]"),
        (lambda: mask_verification_images([b"x", b"y"], "three"), "'one' or 'both'"),
        (lambda: mask_jpeg(b"not an image", 0, 1), "cannot decode"),
    ],
    ids=["kind", "key", "weight-type", "weight-sum", "weight-kind", "size", "dtype", "sprite", "fraction", "mode",
         "bytes"],
)  # fmt: skip
def test_bad_mask_inputs_are_one_line_facetool_errors(call, message):
    with pytest.raises(FacetoolError) as err:
        call()
    assert message in str(err.value) and "\n" not in str(err.value)


def _synthetic_bin(tmp_path, pairs: int = 6):
    images = [render(0, 100 + p % 3, j) for p in range(pairs) for j in range(2)]
    issame = [p % 2 == 0 for p in range(pairs)]
    return images, issame


def test_verification_images_one_and_both():
    images, _ = _synthetic_bin(None)
    one = mask_verification_images(images, "one", seed=2)
    both = mask_verification_images(images, "both", seed=2)
    assert [a == b for a, b in zip(one, images, strict=True)] == [True, False] * 6
    assert not any(a == b for a, b in zip(both, images, strict=True))
    assert one[1::2] == both[1::2]  # image i gets the same mask in both modes
    assert mask_verification_images(images, "one", seed=2) == one


def _py2_pickle(images: list[bytes], issame: list[bool]) -> bytes:
    """Protocol 2 as Python 2's cPickle writes (list of str, list of bool)."""
    out = io.BytesIO()
    out.write(b"\x80\x02]q\x00(")
    for img in images:
        out.write(b"T" + len(img).to_bytes(4, "little") + img)
    out.write(b"e]q\x01(")
    for v in issame:
        out.write(b"\x88" if v else b"\x89")
    out.write(b"e\x86q\x02.")
    return out.getvalue()


@pytest.mark.parametrize("encoding", ["python2-str", "python3-bytes", "numpy-arrays-bool-array", "bool-list-numpy"])
def test_masks_bin_command_reads_every_encoding(tmp_path, encoding):
    images, issame = _synthetic_bin(tmp_path)
    src = tmp_path / "lfw.bin"
    if encoding == "python2-str":
        src.write_bytes(_py2_pickle(images, issame))
    elif encoding == "python3-bytes":
        src.write_bytes(pickle.dumps((images, issame), protocol=4))
    elif encoding == "numpy-arrays-bool-array":
        src.write_bytes(pickle.dumps(([np.frombuffer(b, np.uint8) for b in images], np.array(issame)), protocol=3))
    else:
        src.write_bytes(pickle.dumps(([np.frombuffer(b, np.uint8) for b in images], [np.bool_(v) for v in issame]), 2))
    out = tmp_path / "lfw_masked.bin"
    r = CliRunner().invoke(main, ["masks", "bin", str(src), str(out), "--mode", "one", "--seed", "4", "--quiet"])
    assert r.exit_code == 0, r.output
    assert "6 of 12 images masked" in r.output
    vs = load_bin(out)
    assert vs.issame.tolist() == issame and vs.images[0::2] == images[0::2]
    assert vs.images == mask_verification_images(images, "one", seed=4)  # what the masked benchmark uses


def test_masks_bin_both_and_determinism(tmp_path):
    images, issame = _synthetic_bin(tmp_path)
    write_bin(tmp_path / "a.bin", images, issame)
    runner = CliRunner()
    for name in ("x.bin", "y.bin"):
        args = ["masks", "bin", str(tmp_path / "a.bin"), str(tmp_path / name), "--mode", "both", "--quiet"]
        assert runner.invoke(main, args).exit_code == 0
    assert (tmp_path / "x.bin").read_bytes() == (tmp_path / "y.bin").read_bytes()
    assert not any(a == b for a, b in zip(load_bin(tmp_path / "x.bin").images, images, strict=True))


class _Evil:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.path}",))


def test_masks_bin_refuses_a_malicious_pickle(tmp_path):
    marker = tmp_path / "pwned"
    src = tmp_path / "evil.bin"
    src.write_bytes(pickle.dumps(([_Evil(str(marker)), b"x"], [True])))
    out = tmp_path / "out.bin"
    line = error_line("masks", "bin", str(src), str(out))
    assert "refused" in line and "evil.bin" in line and "system" in line
    assert not marker.exists() and not out.exists() and not list(tmp_path.glob("*.tmp"))


def test_preview_from_synthetic_and_from_a_dataset(tmp_path, small_dataset):
    runner = CliRunner()
    r = runner.invoke(main, ["masks", "preview", str(tmp_path / "p.png"), "--count", "3"])
    assert r.exit_code == 0, r.output
    sheet = Image.open(tmp_path / "p.png")
    assert sheet.format == "PNG" and sheet.size == (112 * (1 + len(KINDS)), 14 + 3 * 112)
    src, records = small_dataset
    r = runner.invoke(main, ["masks", "preview", str(tmp_path / "q.png"), "--src", str(src), "--count", "4"])
    assert r.exit_code == 0, r.output
    sheet = np.asarray(Image.open(tmp_path / "q.png").convert("RGB"))
    first = np.asarray(Image.open(io.BytesIO(records[0][2])).convert("RGB"))
    assert np.array_equal(sheet[14 : 14 + 112, :112], first)  # row 0 starts with the dataset's first record
    r = runner.invoke(main, ["masks", "preview", str(tmp_path / "r.png"), "--count", "0"])
    assert r.exit_code != 0


def test_bench_masks_reports_both_rates(tmp_path):
    r = CliRunner().invoke(
        main, ["bench", "masks", "--count", "64", "--repeats", "1", "--json", str(tmp_path / "b.json")]
    )
    assert r.exit_code == 0, r.output
    result = json.loads((tmp_path / "b.json").read_text())
    assert result["images"] == 64
    for key in ("images_per_s", "images_per_s_per_core", "decode_encode_images_per_s", "cores"):
        assert result[key] > 0
    assert result["images_per_s"] < result["decode_encode_images_per_s"]  # the render costs something
    assert "decode + encode only" in r.output


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--mask-fraction", "1.5"], "--mask-fraction"),
        (["--mask-fraction", "0.5", "--mask-weights", "gas=1"], "unknown mask kind(s) gas"),
        (["--mask-fraction", "0.5", "--mask-weights", "surgical=-1"], "non-negative"),
        (["--mask-fraction", "0.5", "--mask-weights", "surgical"], "KIND=WEIGHT"),
    ],
)
def test_convert_refuses_bad_mask_options(small_dataset, tmp_path, options, message):
    src, _ = small_dataset
    proc = run_cli("convert", str(src), str(tmp_path / "o"), *options, "--quiet")
    assert proc.returncode != 0 and message in proc.stderr
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_masks_bin_refuses_bad_weights_and_a_bad_file(tmp_path):
    images, issame = _synthetic_bin(tmp_path)
    write_bin(tmp_path / "a.bin", images, issame)
    proc = run_cli("masks", "bin", str(tmp_path / "a.bin"), str(tmp_path / "b.bin"), "--mask-weights", "gas=1")
    assert proc.returncode != 0 and "unknown mask kind(s) gas" in proc.stderr and not (tmp_path / "b.bin").exists()
    (tmp_path / "c.bin").write_bytes(pickle.dumps(([images[0], b"not a jpeg"], [True]), protocol=4))
    line = error_line("masks", "bin", str(tmp_path / "c.bin"), str(tmp_path / "d.bin"), "--quiet")
    assert "c.bin" in line and "image 1" in line and "cannot decode" in line and not (tmp_path / "d.bin").exists()


def test_random_noise_images_are_masked_too():
    """Anything of the right shape is masked (the renderer needs no detector), e.g. conftest's noise JPEGs."""
    data = random_jpeg(np.random.default_rng(0))
    twin = Image.open(io.BytesIO(mask_jpeg(data, 0, 1)))
    assert twin.size == (112, 112)

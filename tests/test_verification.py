"""bench verification: InsightFace's protocol against an independent float64 loop implementation, TAR@FAR / AUC /
EER against direct computations, safe and clear set and checkpoint loading, and the command end to end."""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from bin_payloads import ENCODINGS, Evil
from conftest import random_jpeg
from helpers import error_line, run_cli
from PIL import Image

from facetool.bench import verification as v
from facetool.bench.verification import embed as verification_embed
from facetool.pipeline.errors import FacetoolError
from facetool.pipeline.synth import write_synth
from facetool.pipeline.verification_bin import UnsafePickleError, load_bin, write_bin
from facetool.train.models import create_backbone, save_backbone

# ---------------------------------------------------------------------------------------------------------------
# The reference: InsightFace verification.py's algorithm, written plainly (loops, float64).


def _ref_accuracy(threshold: float, dist: np.ndarray, issame: np.ndarray) -> float:
    predict = dist < threshold
    tp = np.sum(predict & issame)
    tn = np.sum(~predict & ~issame)
    return float(tp + tn) / dist.size


def _ref_folds(n: int, k: int) -> list[np.ndarray]:
    """Contiguous folds as sklearn's KFold(k, shuffle=False): the first n % k folds one longer."""
    out, start = [], 0
    for f in range(k):
        size = n // k + (1 if f < n % k else 0)
        out.append(np.arange(start, start + size))
        start += size
    return out


def _ref_protocol_from_dist(dist: np.ndarray, issame: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
    thresholds = np.arange(0, 4, 0.01)
    folds = _ref_folds(dist.size, k)
    acc, best_thr = np.zeros(k), np.zeros(k)
    for f, test in enumerate(folds):
        train = np.setdiff1d(np.arange(dist.size), test)
        acc_train = np.zeros(thresholds.size)
        for i, t in enumerate(thresholds):
            acc_train[i] = _ref_accuracy(t, dist[train], issame[train])
        best = int(np.argmax(acc_train))
        best_thr[f] = thresholds[best]
        acc[f] = _ref_accuracy(thresholds[best], dist[test], issame[test])
    return acc, best_thr


def _ref_evaluate(emb: np.ndarray, flip: np.ndarray, issame: np.ndarray) -> tuple[float, float, np.ndarray]:
    summed = emb.astype(np.float64) + flip.astype(np.float64)
    unit = np.array([row / np.sqrt(np.sum(row * row)) for row in summed])
    diff = unit[0::2] - unit[1::2]
    dist = np.sum(np.square(diff), 1)
    acc, thr = _ref_protocol_from_dist(dist, issame)
    return float(np.mean(acc)), float(np.std(acc)), thr


def _random_embeddings(pairs: int, seed: int, dim: int = 64, noise: float = 0.9):
    """Raw embeddings and flips of 2P images: genuine pairs share a base vector plus noise."""
    rng = np.random.default_rng(seed)
    issame = rng.random(pairs) < 0.5
    base = rng.standard_normal((pairs, 2, dim))
    base[issame, 1] = base[issame, 0]
    emb = base.reshape(2 * pairs, dim) + noise * rng.standard_normal((2 * pairs, dim))
    flip = emb + 0.3 * rng.standard_normal(emb.shape)
    return (3 * emb).astype(np.float32), (3 * flip).astype(np.float32), issame


@pytest.mark.parametrize(("pairs", "seed"), [(6000, 0), (1003, 1), (37, 2)])
def test_accuracy_equals_insightface_reference(pairs, seed):
    emb, flip, issame = _random_embeddings(pairs, seed)
    m = v.embedding_metrics(emb, np.arange(2 * pairs).reshape(-1, 2), issame, flip)
    ref_mean, ref_std, ref_thr = _ref_evaluate(emb, flip, issame)
    assert 0.6 < m.accuracy < 0.999  # a non-trivial operating point
    assert abs(m.accuracy - ref_mean) <= 1e-9
    assert abs(m.accuracy_std - ref_std) <= 1e-9
    np.testing.assert_allclose(m.fold_thresholds, ref_thr, rtol=0, atol=1e-9)
    assert abs(m.threshold - float(np.mean(ref_thr))) <= 1e-9


def test_accuracy_with_distances_on_the_grid_and_ties():
    """Distances exactly on threshold values and many equally good thresholds: same choice as the reference."""
    rng = np.random.default_rng(3)
    dist = v.THRESHOLDS[rng.integers(0, 400, 503)]
    dist[::7] = 4.0  # beyond the grid: never accepted
    issame = rng.random(503) < 0.5
    acc, thr = v.kfold_accuracy(dist, issame)
    ref_acc, ref_thr = _ref_protocol_from_dist(dist, issame)
    np.testing.assert_array_equal(thr, ref_thr)
    np.testing.assert_allclose(acc, ref_acc, rtol=0, atol=1e-12)
    coarse = np.round(rng.random(200) * 3, 1)  # few distinct distances: wide plateaus of best thresholds
    same = coarse < 1.5
    np.testing.assert_array_equal(v.kfold_accuracy(coarse, same)[1], _ref_protocol_from_dist(coarse, same)[1])


def test_too_few_pairs_for_ten_folds():
    with pytest.raises(FacetoolError, match="at least 10 pairs"):
        v.kfold_accuracy(np.ones(9), np.ones(9, bool))


# ---------------------------------------------------------------------------------------------------------------
# TAR@FAR, AUC, EER


def _random_scores(n: int, seed: int, decimals: int | None = None):
    rng = np.random.default_rng(seed)
    issame = rng.random(n) < 0.4
    dist = np.where(issame, rng.normal(0.8, 0.3, n), rng.normal(1.6, 0.3, n))
    return (np.round(dist, decimals) if decimals is not None else dist), issame


@pytest.mark.parametrize(("n", "seed", "decimals"), [(25_000, 0, None), (6000, 1, None), (3000, 2, 1)])
def test_tar_at_far_equals_direct_computation(n, seed, decimals):
    dist, issame = _random_scores(n, seed, decimals)
    impostors = sorted(dist[~issame].tolist())
    genuine = dist[issame]
    got = v.tar_at_far(dist, issame)
    for e in (1, 2, 3, 4):
        k = len(impostors) // 10**e
        if k < 1:
            assert got[f"1e-{e}"] is None, e
            continue
        threshold = impostors[k]  # accept strictly below the (k+1)-th smallest impostor distance
        direct = sum(1 for d in genuine if d < threshold) / len(genuine)
        assert got[f"1e-{e}"] == direct
        if n > 10_000:
            continue
        # and it is the best TAR of any threshold whose FAR stays within 10^-e
        best = max(
            np.mean(genuine < t)
            for t in [*np.unique(dist), np.inf]
            if np.sum(dist[~issame] < t) <= len(impostors) / 10**e
        )
        assert got[f"1e-{e}"] == best
    if n == 6000:  # 3,600 impostor pairs: 1e-4 cannot be estimated, 1e-3 can
        assert got["1e-4"] is None and got["1e-3"] is not None


@pytest.mark.parametrize("decimals", [None, 1])
def test_auc_is_the_trapezoid_area_and_eer_the_crossing(decimals):
    dist, issame = _random_scores(4000, 5, decimals)
    far, tar, _ = v.roc_curve(dist, issame)
    # the ROC by a loop over the distinct distances, accept dist <= t
    pts = [(0.0, 0.0)]
    for t in np.unique(dist):
        pts.append((np.mean(dist[~issame] <= t), np.mean(dist[issame] <= t)))
    ref_far, ref_tar = np.array(pts).T
    np.testing.assert_allclose(far, ref_far, atol=1e-15)
    np.testing.assert_allclose(tar, ref_tar, atol=1e-15)
    area = sum((ref_far[i + 1] - ref_far[i]) * (ref_tar[i + 1] + ref_tar[i]) / 2 for i in range(len(pts) - 1))
    m = v.pair_metrics(dist, issame)
    assert abs(m.auc - area) <= 1e-12
    # the same area as the Mann-Whitney statistic (ties count half)
    g, i = dist[issame][:, None], dist[~issame][None, :]
    assert abs(m.auc - (np.mean(g < i) + 0.5 * np.mean(g == i))) <= 1e-12
    # EER: on the segment where FRR - FAR changes sign, both are equal there
    frr = 1 - ref_tar
    j = int(np.argmax(ref_far - frr >= 0))
    w = (frr[j - 1] - ref_far[j - 1]) / ((frr[j - 1] - ref_far[j - 1]) - (frr[j] - ref_far[j]))
    assert abs(m.eer - (ref_far[j - 1] + w * (ref_far[j] - ref_far[j - 1]))) <= 1e-12
    assert abs(m.eer - (frr[j - 1] + w * (frr[j] - frr[j - 1]))) <= 1e-12


def test_extreme_rocs():
    issame = np.array([True] * 20 + [False] * 20)
    separated = v.pair_metrics(np.r_[np.full(20, 0.5), np.full(20, 1.5)], issame)
    assert separated.auc == 1.0 and separated.eer == 0.0 and separated.accuracy == 1.0
    reversed_ = v.pair_metrics(np.r_[np.full(20, 1.5), np.full(20, 0.5)], issame)
    assert reversed_.auc == 0.0 and reversed_.eer == 1.0
    only_same = v.pair_metrics(np.linspace(0, 2, 20), np.ones(20, bool))
    assert only_same.auc is None and only_same.eer is None and only_same.tar_at_far["1e-1"] is None


# ---------------------------------------------------------------------------------------------------------------
# Sets and checkpoints

RNG = np.random.default_rng(7)
IMAGES = [random_jpeg(RNG) for _ in range(24)]
ISSAME = [bool(b) for b in RNG.random(12) < 0.5]


@pytest.fixture(scope="module")
def mbf_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "mbf.pt"
    torch.manual_seed(0)
    save_backbone(path, create_backbone("mobilefacenet"), "mobilefacenet", {})
    return path


def _bench(*args: str):
    """``facetool bench verification ARGS`` in a fresh process (never a traceback)."""
    return run_cli("bench", "verification", *args)


def _failure(*args: str) -> str:
    """``facetool bench verification ARGS`` must fail with exit 1 and an ``Error: `` line last on stderr (notes
    about the sets and the model may come before it); returns that line."""
    proc = _bench(*args)
    assert proc.returncode == 1, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("Error: "), proc.stderr
    assert not any(line.startswith("Error: ") for line in lines[:-1]), proc.stderr
    return lines[-1]


def test_bin_encodings_evaluate_identically(tmp_path, mbf_checkpoint):
    """Every historical encoding gives the same set, so the command's report is the same: one command scores a
    file of each encoding (their sets are named after the files) and every set's metrics equal the reference's."""
    files, names = [], ["lfw"] + [f"e{i}" for i in range(1, len(ENCODINGS))]  # LFW.bin is the set "lfw"
    for name, encode in zip(names, ENCODINGS.values(), strict=True):
        files.append(tmp_path / ("LFW.bin" if name == "lfw" else f"{name}.bin"))
        files[-1].write_bytes(encode(IMAGES, ISSAME))
        s = v.read_bin_set(files[-1])
        assert s.name == name and s.images == IMAGES and s.issame.tolist() == ISSAME and not s.masked.any()
    bins = [arg for path in files for arg in ("--bin", str(path))]
    proc = _bench(str(mbf_checkpoint), *bins, "--json", str(tmp_path / "r.json"), "--quiet")
    assert proc.returncode == 0, proc.stderr
    sets = json.loads((tmp_path / "r.json").read_text())["sets"]
    assert list(sets) == names
    expected_path = tmp_path / "expected.bin"
    write_bin(expected_path, IMAGES, ISSAME)
    expected = v.evaluate_set(v.load_model(mbf_checkpoint)[0], v.read_bin_set(expected_path)).to_json()
    for name, got in sets.items():
        for key in ("accuracy", "accuracy_std", "threshold", "tar_at_far", "auc", "eer", "fold_thresholds"):
            assert got[key] == expected[key], (name, key)


def test_malicious_bin_refused_before_any_model(tmp_path, mbf_checkpoint, monkeypatch):
    marker = tmp_path / "pwned"
    path = tmp_path / "lfw.bin"
    path.write_bytes(pickle.dumps(([Evil(f"touch {marker}")] + IMAGES[1:], ISSAME)))
    # through the command, with a CHECKPOINT that would fail if it were read first
    not_a_model = tmp_path / "notes.txt"
    not_a_model.write_text("certainly not a checkpoint\n")
    line = error_line("bench", "verification", str(not_a_model), "--bin", str(path))
    assert "refused" in line and "lfw.bin" in line and "system" in line  # os.system pickles as posix.system
    # through the library, with the model loader that run_verification calls replaced
    loaded = []
    monkeypatch.setattr(verification_embed, "load_model", lambda p: loaded.append(p))
    with pytest.raises(UnsafePickleError):
        v.run_verification(mbf_checkpoint, bins=[path])
    assert not marker.exists() and not loaded
    with pytest.raises(UnsafePickleError):
        v.read_bin_set(path)
    assert not marker.exists()


def test_wrong_image_count_through_the_command(tmp_path):
    path = tmp_path / "cfp_fp.bin"
    path.write_bytes(pickle.dumps((IMAGES[:23], ISSAME)))
    line = error_line("bench", "verification", "--features", str(path), "--bin", str(path))
    assert "cfp_fp" in line and "23 images for 12 pairs" in line and "image 23" in line


@pytest.mark.parametrize(
    ("images", "match"),
    [
        (IMAGES[:22], r"'cfp_fp'.*pair 11 lacks image 22 and 23"),
        (IMAGES[:23], r"'cfp_fp'.*23 images for 12 pairs.*pair 11 lacks image 23\)"),
        (IMAGES + IMAGES[:3], r"'cfp_fp'.*image 24 onwards belongs to no pair"),
    ],
)
def test_wrong_image_count_names_set_and_index(tmp_path, images, match):
    path = tmp_path / "cfp_fp.bin"
    path.write_bytes(pickle.dumps((images, ISSAME)))
    with pytest.raises(FacetoolError, match=match):
        load_bin(path)


@pytest.mark.parametrize(
    ("broken", "needles"),
    [
        pytest.param(b"\xff\xd8\xff\xe0 not really a jpeg", ("'agedb_30'", "image 17", "decode"), id="garbage"),
        pytest.param(IMAGES[17][: len(IMAGES[17]) // 2], ("'agedb_30'", "image 17"), id="truncated-jpeg"),
    ],
)
def test_undecodable_image_names_set_and_index(tmp_path, mbf_checkpoint, broken, needles):
    path = tmp_path / "agedb_30.bin"
    write_bin(path, [*IMAGES[:17], broken, *IMAGES[18:]], ISSAME)
    line = _failure(str(mbf_checkpoint), "--bin", str(path), "--quiet")
    assert all(needle in line for needle in needles), line


def _nan_checkpoint(tmp_path) -> str:
    model = create_backbone("tinynet", width=4)
    with torch.no_grad():
        model.linear.weight.fill_(float("nan"))
    save_backbone(tmp_path / "nan.pt", model, "tinynet", {"width": 4})
    return str(tmp_path / "nan.pt")


def _nan_features(tmp_path) -> str:
    feats = np.ones((24, 8), np.float32)
    feats[5, 3] = np.nan
    np.save(tmp_path / "f.npy", feats)
    return str(tmp_path / "f.npy")


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (lambda t, b: [_nan_checkpoint(t), "--bin", b], ["{b}: set 'lfw': ", "nan.pt (tinynet): embeddings contain"]),
        (lambda t, b: ["--features", _nan_features(t), "--bin", b], ["{b}: set 'lfw': ", "f.npy: embeddings contain"]),
        (lambda t, b: [str(Path(b).with_name("few.bin")), "--bin", str(Path(b).with_name("few.bin"))],
         ["few.bin: set 'few': 10-fold accuracy needs at least 10 pairs, got 2"]),
    ],
    ids=["nan-model", "nan-features", "two-pairs"],
)  # fmt: skip
def test_errors_name_the_set_file_and_the_model(tmp_path, args, needles):
    """Each message a user can trigger names the set's file (and the model or the embeddings' file); too few pairs
    is found before any model is read (the CHECKPOINT given here is the set itself, not a model)."""
    good = tmp_path / "lfw.bin"
    write_bin(good, IMAGES, ISSAME)
    write_bin(tmp_path / "few.bin", IMAGES[:4], ISSAME[:2])
    line = _failure(*args(tmp_path, str(good)), "--quiet")
    assert all(needle.format(b=good) in line for needle in needles), line


def _wrong_arch(tmp_path, checkpoint):
    torch.save({**torch.load(checkpoint, weights_only=True), "backbone": "ir50"}, tmp_path / "wrong_arch.pt")
    return tmp_path / "wrong_arch.pt"


def _text(tmp_path, checkpoint):
    (tmp_path / "notes.txt").write_text("certainly not a checkpoint\n")
    return tmp_path / "notes.txt"


def _state_dict(tmp_path, checkpoint):
    torch.save(torch.load(checkpoint, weights_only=True)["state_dict"], tmp_path / "state_dict.pt")
    return tmp_path / "state_dict.pt"


@pytest.mark.parametrize(
    ("make", "needles"),
    [
        (_wrong_arch, ("wrong_arch.pt", "does not fit backbone 'ir50'")),
        (_text, ("notes.txt", "not a facetool checkpoint")),
        (_state_dict, ("state_dict.pt", "not a facetool checkpoint")),
    ],
)
def test_checkpoint_errors(tmp_path, mbf_checkpoint, make, needles):
    good = tmp_path / "lfw.bin"
    write_bin(good, IMAGES, ISSAME)
    line = _failure(str(make(tmp_path, mbf_checkpoint)), "--bin", str(good))
    assert all(needle in line for needle in needles), line


def test_a_set_file_is_not_a_checkpoint(tmp_path):
    good = tmp_path / "lfw.bin"
    write_bin(good, IMAGES, ISSAME)
    with pytest.raises(FacetoolError, match="not a facetool checkpoint"):
        v.load_model(good)  # a .bin is a pickle, but not one torch's weights-only loader accepts


def test_training_checkpoint_holding_a_backbone(tmp_path, mbf_checkpoint):
    payload = torch.load(mbf_checkpoint, weights_only=True)
    training = tmp_path / "step_100.pt"
    torch.save({"step": 100, "backbone": payload, "optimizer": {"state": {}, "lr": 0.1}}, training)
    model, name, _ = v.load_model(training)
    assert name == "mobilefacenet"
    ref, _, _ = v.load_model(mbf_checkpoint)
    x = torch.randn(2, 3, 112, 112)
    with torch.inference_mode():
        assert torch.equal(model(x), ref(x))


def test_set_names_and_bin_dir_order(tmp_path):
    assert v.canonical_set_name("/x/AgeDB-30.bin") == "agedb_30"
    assert v.canonical_set_name("cfpfp.bin") == "cfp_fp"
    assert v.canonical_set_name("lfw.bin") == "lfw"
    assert v.canonical_set_name("my_set.bin") == "my_set"
    for name in ("zeta.bin", "cplfw.bin", "lfw.bin", "alpha.bin", "cfp_fp.bin"):
        write_bin(tmp_path / name, IMAGES, ISSAME)
    (tmp_path / "readme.txt").write_text("not a set")
    assert [p.name for p in v.bin_dir_paths(tmp_path)] == [
        "lfw.bin",
        "cfp_fp.bin",
        "cplfw.bin",
        "alpha.bin",
        "zeta.bin",
    ]
    assert v.known_set_warnings([v.read_bin_set(tmp_path / "lfw.bin")]) == [
        "note: lfw has 12 pairs, the standard lfw has 6000"
    ]
    # load_sets: the --bin files, then each folder's sets in that order; one name twice is refused
    (tmp_path / "more").mkdir()
    write_bin(tmp_path / "more" / "CALFW.bin", IMAGES, ISSAME)
    sets = v.load_sets(bins=[tmp_path / "more" / "CALFW.bin"], bin_dirs=[tmp_path])
    assert [s.name for s in sets] == ["calfw", "lfw", "cfp_fp", "cplfw", "alpha", "zeta"]
    with pytest.raises(FacetoolError, match="two sets named 'zeta'"):
        v.load_sets(bins=[tmp_path / "zeta.bin"], bin_dirs=[tmp_path])


def _features(tmp_path, rows: int = 23):
    np.save(tmp_path / "f.npy", np.ones((rows, 8), np.float32))
    return tmp_path / "f.npy"


def _object_array(tmp_path):
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    return tmp_path / "obj.npy"


@pytest.mark.parametrize(
    ("make", "needles"),
    [
        (_features, ("f.npy: shape (23, 8)", "(24, D)")),
        (_object_array, ("obj.npy", "not a plain")),
    ],
)
def test_features_errors(tmp_path, make, needles):
    path = tmp_path / "lfw.bin"
    write_bin(path, IMAGES, ISSAME)
    line = _failure("--features", str(make(tmp_path)), "--bin", str(path))
    assert all(needle in line for needle in needles), line


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("--features", "{f}"), "exactly one --bin"),
        (("--features", "{f}", "--bin", "{bin}", "--bin", "{bin}"), "exactly one --bin"),
        (("{ckpt}", "--features", "{f}", "--bin", "{bin}"), "not both"),
        (("--flip-features", "{f}", "--bin", "{bin}"), "--flip-features goes with --features"),
        (("--bin", "{bin}"), "give a CHECKPOINT"),
        (("{ckpt}",), "no sets"),
        (("{ckpt}", "--pairs", "{tmp}", "--masked", "one"), "--masked masks .bin sets"),
        (("--features", "{f}", "--bin", "{bin}", "--masked", "one"), "--masked renders new images"),
        (("--features", "{tmp}/missing.npy", "--bin", "{bin}"), "does not exist"),
    ],
)
def test_usage_errors(tmp_path, mbf_checkpoint, args, needle):
    path = tmp_path / "lfw.bin"
    write_bin(path, IMAGES, ISSAME)
    names = {"f": _features(tmp_path, 24), "bin": path, "ckpt": mbf_checkpoint, "tmp": tmp_path}
    proc = _bench(*(a.format(**names) for a in args))
    assert proc.returncode == 2 and needle in proc.stderr, proc.stderr


# ---------------------------------------------------------------------------------------------------------------
# End to end on synthetic faces


@pytest.fixture(scope="module")
def synth_bin(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    write_synth(out, identities=1, images_per_identity=1, pairs=40, seed=0, workers=1)
    return out / "synth.bin"


def test_end_to_end_checkpoint_json_plot_and_features(tmp_path, synth_bin, mbf_checkpoint):
    report, plot = tmp_path / "report.json", tmp_path / "roc.png"
    lfw = tmp_path / "lfw.bin"
    lfw.write_bytes(synth_bin.read_bytes())  # a second set, under a well-known name
    result = _bench(
        str(mbf_checkpoint), "--bin", str(synth_bin), "--bin", str(lfw), "--device", "cpu", "--batch-size", "16",
        "--json", str(report), "--plot", str(plot), "--quiet",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = result.stdout.splitlines()  # the table; notes (the "lfw" set is small) go to stderr
    assert "note: lfw has 40 pairs" in result.stderr
    assert rows[0].split()[:3] == ["set", "pairs", "accuracy"]
    assert rows[1].split()[:2] == ["synth", "40"] and rows[2].split()[:2] == ["lfw", "40"]
    assert "not estimable at FAR 1e-2" in result.stdout  # 20 impostor pairs: only 1e-1 can be estimated
    data = json.loads(report.read_text())
    assert data["backbone"] == "mobilefacenet" and data["device"] == "cpu" and data["batch_size"] == 16
    assert list(data["sets"]) == ["synth", "lfw"]
    s = data["sets"]["synth"]
    assert s["pairs"] == 40 and s["images"] == 80 and s["masked_images"] == 0
    assert 0 <= s["accuracy"] <= 1 and len(s["fold_accuracies"]) == 10
    assert s["tar_at_far"]["1e-1"] is not None and s["tar_at_far"]["1e-2"] is None
    assert 0 <= s["auc"] <= 1 and 0 <= s["eer"] <= 1
    for key in ("accuracy", "accuracy_std", "tar_at_far", "auc", "eer"):
        assert data["sets"]["lfw"][key] == s[key]
    with Image.open(plot) as img:
        assert img.format == "PNG" and img.size == (960, 660)
        colours = {c for _, c in img.convert("RGB").getcolors(1 << 20)}
    assert any(abs(r - 31) + abs(g - 119) + abs(b - 180) < 30 for r, g, b in colours)  # the first curve's blue

    # the same numbers from the same embeddings handed over as --features / --flip-features
    model, _, _ = v.load_model(mbf_checkpoint)
    emb, flip = v.embed_set(model, v.read_bin_set(synth_bin), batch_size=7, device="cpu")
    np.save(tmp_path / "f.npy", emb)
    np.save(tmp_path / "g.npy", flip)
    result = _bench(
        "--features", str(tmp_path / "f.npy"), "--flip-features", str(tmp_path / "g.npy"), "--bin", str(synth_bin),
        "--json", str(tmp_path / "f.json"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1].startswith("metrics: ")
    feat = json.loads((tmp_path / "f.json").read_text())["sets"]["synth"]
    assert feat["accuracy"] == s["accuracy"] and feat["fold_thresholds"] == s["fold_thresholds"]
    assert feat["tar_at_far"] == s["tar_at_far"] and abs(feat["auc"] - s["auc"]) < 1e-12


@pytest.mark.parametrize("mode", ["one", "both"])
def test_masked_sets_are_the_masks_bin_sets(tmp_path, synth_bin, mbf_checkpoint, mode):
    """--masked evaluates, beside each .bin set, exactly the set `facetool masks bin` writes (same seed), with the
    masked flag on the images that got a mask; the masked rows differ from the holistic ones."""
    written = tmp_path / f"synth_{mode}.bin"
    result = run_cli("masks", "bin", str(synth_bin), str(written), "--mode", mode, "--seed", "3")
    assert result.returncode == 0, result.stderr
    rendered = v.masked_bin_set(v.read_bin_set(synth_bin), mode, seed=3)
    assert rendered.images == load_bin(written).images and rendered.name == f"synth_masked_{mode}"
    expected = np.zeros(len(rendered.images), dtype=bool)
    expected[slice(1, None, 2) if mode == "one" else slice(None)] = True
    assert np.array_equal(rendered.masked, expected)
    assert sum(a != b for a, b in zip(rendered.images, v.read_bin_set(synth_bin).images, strict=True)) == expected.sum()

    report = tmp_path / "report.json"
    result = _bench(
        str(mbf_checkpoint), "--bin", str(synth_bin), "--masked", mode, "--mask-seed", "3", "--device", "cpu",
        "--json", str(report), "--quiet",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    data = json.loads(report.read_text())
    assert list(data["sets"]) == ["synth", f"synth_masked_{mode}"] and data["masked"] == {"mode": mode, "seed": 3}
    holistic, masked = data["sets"]["synth"], data["sets"][f"synth_masked_{mode}"]
    assert masked["masked_images"] == int(expected.sum()) and holistic["masked_images"] == 0
    assert masked["fold_accuracies"] != holistic["fold_accuracies"] or masked["auc"] != holistic["auc"]
    assert _bench("--features", str(tmp_path / "x.npy"), "--bin", str(synth_bin), "--masked", mode).returncode != 0


@pytest.mark.portable
def test_run_verification_reports_progress_and_json(tmp_path, synth_bin):
    """The library call behind the command: one (done, total) over masking then embedding, its Report's JSON the
    command's object, and the same metrics as evaluating each set on its own."""
    path = tmp_path / "tiny.pt"
    torch.manual_seed(0)
    save_backbone(path, create_backbone("tinynet"), "tinynet", {})
    calls: list[tuple[int, int]] = []
    got = v.run_verification(path, bins=[synth_bin], masked="one", device="cpu", progress=lambda *a: calls.append(a))
    assert list(got.results) == ["synth", "synth_masked_one"] and got.meta["masked"] == {"mode": "one", "seed": 0}
    assert got.json == v.report_json(got.results, **got.meta) and got.title == "ROC: tiny.pt (tinynet)"
    assert got.meta["batch_size"] == 16 and got.meta["embed_seconds"] > 0
    sets = v.load_sets(bins=[synth_bin], masked="one")
    model = v.load_model(path)[0]
    for s in sets:
        expected = v.evaluate_set(model, s, device="cpu").to_json()
        for key in ("accuracy", "fold_thresholds", "tar_at_far", "auc", "eer", "masked_images"):
            assert got.json["sets"][s.name][key] == expected[key], (s.name, key)
    rendered, embedded = 40, 160  # the second image of each of the 40 pairs gets a mask; 2 x 80 images embedded
    assert calls[-1] == (rendered + embedded, rendered + embedded) and (rendered, rendered) in calls
    done = [d for d, _ in calls]
    assert done == sorted(done) and {t for _, t in calls} == {rendered, rendered + embedded}


def test_embedding_is_image_plus_flip(synth_bin, mbf_checkpoint):
    model, _, _ = v.load_model(mbf_checkpoint)
    s = v.read_bin_set(synth_bin)
    emb, flip = v.embed_set(model, s, batch_size=5, device="cpu")
    x = torch.from_numpy(np.array(Image.open(io.BytesIO(s.images[3])).convert("RGB"))).permute(2, 0, 1)
    x = (x.float()[None] - 127.5) / 127.5
    with torch.inference_mode():
        torch.testing.assert_close(torch.from_numpy(emb[3]), model(x)[0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(torch.from_numpy(flip[3]), model(torch.flip(x, dims=[3]))[0], atol=1e-5, rtol=1e-4)


def _pairs_folder(root, synth_bin, explicit: bool = False):
    """An RMFVD-like folder: person folders, 'unmasked' in the names of holistic images, masked_pairs.txt."""
    s = v.read_bin_set(synth_bin)
    lines = []
    for p in range(s.num_pairs):
        names = []
        for j in range(2):
            kind = "unmasked" if j == 0 else "masked"
            rel = f"masked_whn_a/person{p:02d}/{kind}_{p}_{j}.jpg"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(s.images[2 * p + j])
            names.append(rel)
        flags = " 0 1" if explicit else ""
        lines.append(f"{names[0]} {names[1]} {int(s.issame[p])}{flags}")
    lines.insert(3, "# a comment line")
    lines.append(lines[0])  # a repeated pair reuses its images
    (root / "masked_pairs.txt").write_text("\n".join(lines) + "\n")
    return s


def test_pairs_folder_and_masked_flags_reach_facet(tmp_path, synth_bin):
    root = tmp_path / "rmfvd"
    s = _pairs_folder(root, synth_bin)
    ps = v.read_pairs_dir(root)
    assert ps.name == "rmfvd" and ps.num_pairs == s.num_pairs + 1 and len(ps.images) == 2 * s.num_pairs
    assert ps.masked.tolist() == [False, True] * s.num_pairs
    assert ps.issame[:-1].tolist() == s.issame.tolist() and ps.pairs[-1].tolist() == [0, 1]

    torch.manual_seed(0)
    facet = create_backbone("facet_tiny").eval()  # prompts: the flag changes the embedding
    small = v.PairSet(ps.name, ps.source, ps.images[:4], ps.pairs[:2], ps.issame[:2], ps.masked[:4])
    emb, _ = v.embed_set(facet, small, batch_size=3, device="cpu")
    x = torch.stack(
        [(torch.from_numpy(np.array(Image.open(io.BytesIO(b)).convert("RGB"))).permute(2, 0, 1).float() - 127.5)
         / 127.5 for b in small.images]
    )  # fmt: skip
    with torch.inference_mode():
        right = facet(x, torch.tensor([False, True, False, True]))
        wrong = facet(x, torch.zeros(4, dtype=torch.bool))
    torch.testing.assert_close(torch.from_numpy(emb), right, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(torch.from_numpy(emb[1]), wrong[1], atol=1e-3)

    # explicit columns override the naming rule; errors name the line
    explicit = tmp_path / "explicit"
    _pairs_folder(explicit, synth_bin, explicit=True)
    text = (explicit / "masked_pairs.txt").read_text()
    first = text.splitlines()[0]
    (explicit / "masked_pairs.txt").write_text(text.replace(first, first[:-3] + "1 1"))  # the pair occurs twice
    assert v.read_pairs_dir(explicit / "masked_pairs.txt").masked[:4].tolist() == [True, True, False, True]
    (explicit / "masked_pairs.txt").write_text(text.replace(first, first[:-3] + "1 1", 1))
    with pytest.raises(FacetoolError, match="line 42: image .*unmasked_0_0.jpg' is marked both masked and holistic"):
        v.read_pairs_dir(explicit)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        (b"a.jpg b.jpg 1\n", r"masked_pairs.txt line 1: image 'a.jpg' not found"),
        (b"../x.jpg b.jpg 1\n", r"masked_pairs.txt line 1: image '../x.jpg' lies outside"),
        (b"\n\nx.jpg 1\n", r"masked_pairs.txt line 3: expected 'path1 path2 label"),
        (b"a.jpg b.jpg 2\n", r"masked_pairs.txt line 1: label and mask flags must be 0 or 1"),
        (b"a.jpg b.jpg 1 0 x\n", r"masked_pairs.txt line 1: label and mask flags must be 0 or 1"),
        (b"# a comment, nothing else\n", r"masked_pairs.txt: no pairs"),
        (b"a.jpg \xff.jpg 1\n", r"masked_pairs.txt: not a UTF-8 text file"),
        (None, r"no pairs list masked_pairs.txt"),
    ],
)
def test_pairs_list_errors_name_the_file_and_line(tmp_path, text, match):
    if text is not None:
        (tmp_path / "masked_pairs.txt").write_bytes(text)
    with pytest.raises(FacetoolError, match=match):
        v.read_pairs_dir(tmp_path)


def test_pairs_folder_through_the_command(tmp_path, synth_bin, mbf_checkpoint):
    root = tmp_path / "rmfvd"
    _pairs_folder(root, synth_bin)
    result = _bench(str(mbf_checkpoint), "--pairs", str(root), "--json", str(tmp_path / "r.json"), "--quiet")
    assert result.returncode == 0, result.stderr
    got = json.loads((tmp_path / "r.json").read_text())["sets"]["rmfvd"]
    assert got["pairs"] == 41 and got["images"] == 80 and got["masked_images"] == 40


def test_retain_freed_memory_stops_refaulting(tmp_path):
    """After it, a large block freed and allocated again is reused, not faulted in afresh (in a child process:
    the setting is process-wide)."""
    import subprocess
    import sys

    code = (
        "import resource, numpy as np\n"
        "from facetool.bench.verification import retain_freed_memory\n"
        "def faults(): return resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "import sys; applied = retain_freed_memory() if sys.argv[1] == 'on' else False\n"
        "a = np.ones(64 << 20, np.uint8); del a\n"
        "f = faults(); a = np.ones(64 << 20, np.uint8); del a\n"
        "print(int(applied), faults() - f)\n"
    )
    got = {}
    for mode in ("off", "on"):
        out = subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True, check=True).stdout
        got[mode] = [int(x) for x in out.split()]
    if not got["on"][0]:
        pytest.skip("not glibc: mallopt unavailable")
    assert got["off"][1] >= 32  # 64 MiB faulted in again: at least one fault per 2 MiB (huge pages)
    assert got["on"][1] * 10 < got["off"][1]

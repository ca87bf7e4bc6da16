"""`facetool bench ijb`: the protocol against a plain float64 implementation of eval_ijbc.py's arithmetic, the
nearest-FPR rule, 1:N identification, the modes, the meta-file errors and an end-to-end run on the fixture."""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import auc, roc_curve

from facetool.bench.ijb import FARS, ProtocolOptions, identification, nearest_tar, roc, run_ijb, tar_at_far
from facetool.bench.ijb import protocol as protocol_module
from facetool.bench.ijb.features import aligned_batch
from facetool.bench.ijb.fixture import write_ijb_fixture
from facetool.bench.ijb.meta import read_meta
from facetool.bench.ijb.protocol import pair_scores, pool_templates, rows_of, template_index
from facetool.bench.ijb.synthetic import make_synthetic, synthetic_counts
from facetool.bench.verification.embed import embed_batch
from facetool.pipeline.align import align_face, read_landmark_list, read_rgb
from facetool.pipeline.errors import FacetoolError
from facetool.pipeline.masks import render_mask
from facetool.pipeline.synth import render
from facetool.train.models import create_backbone
from facetool.train.models.checkpoint import save_backbone
from tests.helpers import error_line, run_cli

# ---------------------------------------------------------------------------------------------------------------
# The oracle: eval_ijbc.py's arithmetic written plainly, in float64, one template at a time.


def oracle_scores(feats, flips, det, templates, medias, t1, t2, flip=True, normalize=False, detector=True):
    img = np.asarray(feats, dtype=np.float64).copy()
    if flip and flips is not None:
        img += flips
    if normalize:
        for i in range(len(img)):
            n = np.linalg.norm(img[i])
            img[i] = img[i] / n if n > 0 else img[i]
    if detector:
        img *= np.asarray(det, dtype=np.float64)[:, None]
    pooled = {}
    for tid in sorted(set(templates.tolist())):
        members = [i for i in range(len(img)) if templates[i] == tid]
        total = np.zeros(img.shape[1])
        for media in sorted({medias[i] for i in members}):
            frames = [i for i in members if medias[i] == media]
            total += img[frames[0]] if len(frames) == 1 else img[frames].mean(axis=0)
        n = np.linalg.norm(total)
        pooled[tid] = total / n if n > 0 else total
    return np.array([pooled[a] @ pooled[b] for a, b in zip(t1.tolist(), t2.tolist(), strict=True)])


def oracle_tar(labels, scores):
    """eval_ijbc.py's table: sklearn's ROC reversed, then min over (|fpr - x|, index)."""
    fpr, tpr, _ = roc_curve(labels, scores)
    fpr, tpr = np.flipud(fpr), np.flipud(tpr)
    return {key: float(tpr[min(zip(abs(fpr - x), range(len(fpr)), strict=True))[1]]) for key, x in FARS.items()}


@pytest.fixture(scope="module")
def ijb_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("ijb") / "IJBC"
    write_ijb_fixture(out, subjects=6, probes_per_subject=2, seed=0)
    return out


@pytest.fixture(scope="module")
def meta(ijb_dir):
    return read_meta(ijb_dir, "IJBC")


def random_features(n, dim=16, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(0, 1, (n, dim)).astype(np.float32), rng.normal(0, 1, (n, dim)).astype(np.float32)


def save_features(folder, feats, flips):
    np.save(folder / "f.npy", feats)
    np.save(folder / "g.npy", flips)
    return str(folder / "f.npy"), str(folder / "g.npy")


def oracle_for(meta, feats, flips, **modes):
    args = (feats, flips, meta.scores, meta.templates, meta.medias, meta.pair_t1, meta.pair_t2)
    return oracle_scores(*args, **modes)


# ---------------------------------------------------------------------------------------------------------------
# The protocol against the oracle


MODES = [
    {},
    {"flip": False},
    {"normalize": True},
    {"detector": False},
    {"flip": False, "normalize": True, "detector": False},
]


@pytest.mark.parametrize("modes", MODES)
def test_features_equal_the_plain_protocol_in_every_mode(ijb_dir, meta, tmp_path, modes):
    feats, flips = random_features(len(meta.templates))
    f, g = save_features(tmp_path, feats, flips)
    options = ProtocolOptions(modes.get("flip", True), modes.get("normalize", False), modes.get("detector", True))
    report = run_ijb(ijb_dir, features=f, flip_features=g, options=options)
    expected = oracle_for(meta, feats, flips, **modes)
    np.testing.assert_allclose(report.scores, expected, rtol=0, atol=1e-9)
    assert report.tar_at_far == oracle_tar(meta.labels, expected)
    fpr, tpr, _ = roc_curve(meta.labels, expected)
    assert report.auc == pytest.approx(auc(fpr, tpr), abs=1e-12)
    if modes:  # each option changes the scores, as the oracle with it does
        assert np.abs(report.scores - oracle_for(meta, feats, flips)).max() > 1e-3


def test_cli_mode_flags_reach_the_protocol(ijb_dir, meta, tmp_path):
    feats, flips = random_features(len(meta.templates), seed=1)
    f, g = save_features(tmp_path, feats, flips)
    for flags, modes in (([], {}), (["--no-flip", "--normalize-images", "--no-detector-score"], MODES[-1])):
        proc = run_cli("bench", "ijb", str(ijb_dir), "--features", f, "--flip-features", g, *flags,
                       "--json", str(tmp_path / "r.json"), "--scores", str(tmp_path / "s.npy"))  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        report = json.loads((tmp_path / "r.json").read_text())
        expected = oracle_for(meta, feats, flips, **modes)
        np.testing.assert_allclose(np.load(tmp_path / "s.npy"), expected, rtol=0, atol=1e-9)
        assert report["tar_at_far"] == oracle_tar(meta.labels, expected)
        assert report["protocol"] == {"flip": "--no-flip" not in flags, "normalize_images": bool(flags),
                                      "detector_score": not flags, "masked": None}  # fmt: skip
        assert list(report)[:7] == ["target", "images", "templates", "pairs", "tar_at_far", "auc", "protocol"]
        assert list(report["tar_at_far"]) == ["1e-6", "1e-5", "1e-4", "1e-3", "1e-2", "1e-1"]


def test_ties_and_sparse_template_ids(ijb_dir, meta, tmp_path):
    """Templates pooled onto a few axis directions: scores are exactly 0 or about 1, with genuine and impostor pairs
    tied at both, so the ROC's tie groups decide the TARs."""
    rng = np.random.default_rng(5)
    ids = np.unique(meta.templates)
    assert ids.min() > 1 and len(ids) < ids.max() - ids.min()  # sparse, unordered ids
    axis_of = dict(zip(ids.tolist(), rng.integers(0, 3, len(ids)).tolist(), strict=True))
    feats = np.zeros((len(meta.templates), 8), dtype=np.float32)
    feats[np.arange(len(feats)), [axis_of[t] for t in meta.templates.tolist()]] = rng.uniform(0.5, 2, len(feats))
    f, g = save_features(tmp_path, feats, feats)
    report = run_ijb(ijb_dir, features=f, flip_features=g)
    expected = oracle_for(meta, feats, feats)
    assert sorted(np.unique(expected)) == [0.0, 1.0]  # exact: a sum along one axis normalises to exactly 1
    assert np.array_equal(report.scores, expected)
    assert report.tar_at_far == oracle_tar(meta.labels, expected)


def test_roc_of_presorted_pairs_is_sklearns_roc():
    rng = np.random.default_rng(2)
    for _ in range(20):
        n = int(rng.integers(20, 3000))
        labels = (rng.random(n) < rng.uniform(0.05, 0.5)).astype(np.int8)
        labels[:2] = (0, 1)
        scores = np.round(rng.normal(labels, 1.0), int(rng.integers(0, 3)))  # rounding makes ties
        fpr, tpr, _ = roc_curve(labels, scores)
        curve = roc(labels, scores)
        assert np.array_equal(curve.far, fpr) and np.array_equal(curve.tar, tpr)
        assert tar_at_far(curve) == oracle_tar(labels, scores)


@pytest.mark.parametrize(
    "far, tar, at, expected",
    [
        ([0, 0.1, 0.1, 0.3, 1], [0, 0.5, 0.7, 0.9, 1], 0.1, 0.7),  # equal FPR: the highest TPR
        ([0, 0.05, 0.15, 1], [0, 0.4, 0.6, 1], 0.1, 0.6),  # equally far: the larger FPR
        ([0, 0.5, 1], [0, 0.8, 1], 1e-6, 0.0),  # the nearest point, not an interpolation
        ([0, 2e-6, 1], [0, 0.9, 1], 1.5e-6, 0.9),  # and it may lie above the FAR asked for
    ],
)
def test_nearest_fpr_rule_breaks_ties_as_eval_ijbc(far, tar, at, expected):
    far, tar = np.array(far), np.array(tar)
    rev_far, rev_tar = np.flipud(far), np.flipud(tar)
    upstream = rev_tar[min(zip(abs(rev_far - at), range(len(rev_far)), strict=True))[1]]
    assert nearest_tar(far, tar, at) == upstream == expected


def test_pair_scores_product_and_gather_paths_and_id_lookup():
    rng = np.random.default_rng(3)
    feats = rng.normal(size=(3000, 8))
    few = (rng.integers(0, 5, 4000), rng.integers(0, 3000, 4000))  # few first templates: matrix products
    many = (rng.permutation(3000)[:2500], rng.integers(0, 3000, 2500))  # all distinct: gathered pairs
    for r1, r2 in (few, many):
        np.testing.assert_allclose(pair_scores(feats, r1, r2), np.einsum("ij,ij->i", feats[r1], feats[r2]), atol=1e-12)
    for ids in (np.array([3, 17, 40, 99]), np.array([5, 10**12, 3 * 10**12, 4 * 10**12])):  # table / binary search
        assert rows_of(ids, ids[[2, 0, 3, 3]]).tolist() == [2, 0, 3, 3]
        with pytest.raises(FacetoolError):
            rows_of(ids, np.array([ids[0] + 1]))


def test_pooling_streams_in_chunks(meta, monkeypatch):
    feats, flips = random_features(len(meta.templates))
    index = template_index(meta.templates, meta.medias, meta.scores, ProtocolOptions())
    whole = pool_templates(feats, flips, index, ProtocolOptions())
    monkeypatch.setattr(protocol_module, "POOL_CHUNK", 5)
    np.testing.assert_allclose(pool_templates(feats, flips, index, ProtocolOptions()), whole, rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# 1:N


def oracle_gallery(probe_feats, probe_ids, gallery_feats, gallery_ids, fpirs):
    """ijb_evals.py's evaluation_1N, plainly (a stable argsort stands for its argsort)."""
    sim = probe_feats @ gallery_feats.T
    hits = {1: 0, 5: 0, 10: 0}
    pos, neg_max, non_mated = [], [], []
    for i, pid in enumerate(probe_ids):
        if pid in gallery_ids:
            mate = int(np.argwhere(gallery_ids == pid)[0, 0])
            ranked = np.argsort(sim[i], kind="stable")[::-1]
            for k in hits:
                hits[k] += int(mate in ranked[:k])
            pos.append(sim[i][gallery_ids == pid][0])
            neg_max.append(sim[i][gallery_ids != pid].max())
        else:
            non_mated.append(sim[i].max())
    pos, neg_max, ordered = np.array(pos), np.array(neg_max), np.sort(non_mated)[::-1]
    tpir = [np.sum((pos > neg_max) & (pos > ordered[max(int(len(ordered) * f) - 1, 0)])) / len(pos) for f in fpirs]
    return hits, tpir


def test_identification_equals_a_plain_implementation_with_ties():
    rng = np.random.default_rng(4)
    probes = np.round(rng.normal(size=(300, 6)), 1)  # coarse values: tied scores
    g1, g2 = np.round(rng.normal(size=(20, 6)), 1), np.round(rng.normal(size=(25, 6)), 1)
    s1, s2 = np.arange(20) * 3 + 1, np.arange(20, 45) * 3 + 1
    g1[5] = g1[6]  # two gallery templates with equal features
    probe_ids = rng.choice(np.r_[s1, s2, [999]], 300)  # a few probes enrolled in neither gallery
    got = identification(probes, probe_ids, {"G1": (g1, s1), "G2": (g2, s2)})
    (h1, t1), (h2, t2) = (oracle_gallery(probes, probe_ids, g, s, [0.01, 0.1]) for g, s in ((g1, s1), (g2, s2)))
    for k in (1, 5, 10):
        assert got[f"rank{k}"] == (h1[k] + h2[k]) / 300
    assert got["tpir_at_fpir"] == pytest.approx({"1e-2": (t1[0] + t2[0]) / 2, "1e-1": (t1[1] + t2[1]) / 2}, abs=1e-15)


# ---------------------------------------------------------------------------------------------------------------
# Meta files: one-line errors naming file and line


def edit_line(path, lineno, text):
    lines = path.read_text().splitlines()
    lines[lineno - 1] = text(lines[lineno - 1]) if callable(text) else text
    path.write_text("\n".join(lines) + "\n")


BAD_META = [
    ("face_tid_mid.txt", 2, "2.jpg 17", "expected 'image template_id media_id'"),
    ("face_tid_mid.txt", 3, lambda s: s.replace(s.split()[1], "abc"), "template id 'abc' is not an integer"),
    ("face_tid_mid.txt", 4, lambda s: "x" + s, "(the two files must list the same images in the same order)"),
    ("name_5pts_score.txt", 2, lambda s: s.rsplit(" ", 1)[0], "expected 'name x1 y1 ... x5 y5 score'"),
    ("name_5pts_score.txt", 5, lambda s: s.replace(s.split()[3], "abc"), "'abc' is not a number"),
    ("template_pair_label.txt", 3, "1 2", "expected 'template_id_1 template_id_2 label'"),
    ("template_pair_label.txt", 4, lambda s: s[:-1] + "2", "neither 1 (genuine) nor 0 (impostor)"),
    ("template_pair_label.txt", 5, lambda s: "99999999 " + s.split(" ", 1)[1], "template 99999999 has no image"),
    ("template_pair_label.txt", 6, lambda s: "x" + s, "is not an integer"),
    ("1N_gallery_G1.csv", 3, "abc,1000,x.jpg", "template id 'abc' is not an integer"),
    ("1N_probe_mixed.csv", 2, "424242,1000,x.jpg", "template 424242 has no image"),
]


@pytest.mark.parametrize("name, lineno, text, message", BAD_META)
def test_bad_meta_files_are_one_line_errors_naming_file_and_line(ijb_dir, meta, tmp_path, name, lineno, text, message):
    root = tmp_path / "IJBC"
    shutil.copytree(ijb_dir / "meta", root / "meta")
    path = root / "meta" / f"ijbc_{name}"
    edit_line(path, lineno, text)
    feats, flips = random_features(len(meta.templates))
    f, _ = save_features(tmp_path, feats, flips)
    err = error_line("bench", "ijb", str(root), "--features", f)
    assert f"{path}:{lineno}" in err and message in err, err


# ---------------------------------------------------------------------------------------------------------------
# Images: alignment of the fixture, masking, and an end-to-end run with a backbone


def test_fixture_landmarks_align_the_loose_crops_back_to_the_faces(ijb_dir):
    faces = read_landmark_list(ijb_dir / "meta" / "ijbc_name_5pts_score.txt", require_score=True)
    for i in range(4):  # the first gallery template: subject 0, frames 0-3
        crop = read_rgb(ijb_dir / "loose_crop" / faces.names[i], faces.where(i))
        original = np.asarray(Image.open(io.BytesIO(render(0, 0, i))).convert("RGB")).astype(int)
        assert np.abs(align_face(crop, faces.points[i]).astype(int) - original)[8:-8, 8:-8].mean() < 5.0


class FlagRecorder(torch.nn.Module):
    uses_masked = True

    def forward(self, x, masked):
        self.flags = masked
        return x.mean(dim=(2, 3))


def test_masked_mode_masks_every_aligned_image_and_sets_the_flag(ijb_dir, meta):
    plain = aligned_batch(meta.images, ijb_dir / "loose_crop", 0, 4)
    masked = aligned_batch(meta.images, ijb_dir / "loose_crop", 0, 4, masked=True, mask_seed=3)
    for i in range(4):
        assert np.array_equal(masked[i], render_mask(plain[i], 3, i).image) and not np.array_equal(masked[i], plain[i])
    model = FlagRecorder()
    emb, flipped = embed_batch(model, masked, "cpu", masked=True, flip=True)
    assert emb.shape == flipped.shape == (4, 3) and model.flags.tolist() == [True] * 8
    embed_batch(model, plain, "cpu", masked=False, flip=False)
    assert model.flags.tolist() == [False] * 4


def test_end_to_end_on_the_fixture_with_a_tinynet(ijb_dir, tmp_path):
    torch.manual_seed(0)
    save_backbone(tmp_path / "tiny.pt", create_backbone("tinynet", width=8), "tinynet", {"width": 8})
    out = {k: str(tmp_path / k) for k in ("r.json", "roc.png", "s.npy", "feats", "m.json", "again.json")}
    proc = run_cli("bench", "ijb", str(ijb_dir), str(tmp_path / "tiny.pt"), "--json", out["r.json"], "--plot",
                   out["roc.png"], "--scores", out["s.npy"], "--save-features", out["feats"], "--quiet")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert (report["images"], report["templates"], report["pairs"]) == (47, 18, 72)
    tars = list(report["tar_at_far"].values())
    assert all(0 <= t <= 1 for t in tars) and tars == sorted(tars) and 0.5 < report["auc"] <= 1
    ranks = [report["identification"][f"rank{k}"] for k in (1, 5, 10)]
    assert 0 < ranks[0] <= ranks[1] <= ranks[2] <= 1
    assert Image.open(tmp_path / "roc.png").format == "PNG" and np.load(out["s.npy"]).shape == (72,)
    # the saved embeddings, given back, give the same numbers
    feats = tmp_path / "feats"
    again = run_cli("bench", "ijb", str(ijb_dir), "--features", str(feats / "features.npy"), "--flip-features",
                    str(feats / "flip_features.npy"), "--json", out["again.json"])  # fmt: skip
    assert again.returncode == 0, again.stderr
    second = json.loads((tmp_path / "again.json").read_text())
    assert (second["tar_at_far"], second["auc"]) == (report["tar_at_far"], report["auc"])
    # masked: every image masked, so other scores
    masked = run_ijb(ijb_dir, tmp_path / "tiny.pt", masked=True, device="cpu", batch_size=16)
    assert masked.protocol["masked"] == "all" and np.abs(masked.scores - np.load(out["s.npy"])).max() > 1e-4


def test_a_bare_state_dict_and_an_onnx_model_embed_as_the_backbone_file(ijb_dir, tmp_path):
    """bench ijb reads backbones through the same loader as bench verification: a bare state dict with arch= and
    an ONNX export give the scores of the facetool file."""
    from facetool.train.models.export import export_onnx

    torch.manual_seed(0)
    model = create_backbone("tinynet")  # a bare state dict is built with the default options
    save_backbone(tmp_path / "tiny.pt", model, "tinynet", {})
    torch.save(model.state_dict(), tmp_path / "tiny.pth")
    export_onnx(model, tmp_path / "tiny.onnx")
    settings = {"device": "cpu", "batch_size": 16}
    reference = run_ijb(ijb_dir, tmp_path / "tiny.pt", **settings)
    assert reference.source["backbone"] == "tinynet"
    bare = run_ijb(ijb_dir, tmp_path / "tiny.pth", arch="tinynet", **settings)
    assert np.array_equal(bare.scores, reference.scores) and bare.source["backbone"] == "tinynet"
    onnx_run = run_ijb(ijb_dir, tmp_path / "tiny.onnx", **settings)
    assert onnx_run.source["backbone"] == "onnx" and np.abs(onnx_run.scores - reference.scores).max() < 1e-4
    with pytest.raises(FacetoolError, match="tiny.pth: not a facetool checkpoint but a bare state dict"):
        run_ijb(ijb_dir, tmp_path / "tiny.pth", **settings)


# ---------------------------------------------------------------------------------------------------------------
# The synthetic IJB-C-sized set and the baseline loop


def test_synthetic_set_has_ijbc_counts_and_a_consistent_structure():
    full = synthetic_counts("full")
    assert full["images"] == 469_375 and full["g1"] + full["g2"] + full["probes"] == 23_124
    assert full["genuine"] + full["impostor"] == 15_658_489
    meta, feats, flips = make_synthetic(4000, seed=1, dim=8)
    subject = {int(t): int(s) for lst in (*meta.galleries.values(), meta.probes)
               for t, s in zip(lst.templates, lst.subjects, strict=True)}  # fmt: skip
    same = np.array(
        [subject[a] == subject[b] for a, b in zip(meta.pair_t1.tolist(), meta.pair_t2.tolist(), strict=True)]
    )
    assert np.array_equal(same, meta.labels == 1)
    assert len(set(zip(meta.pair_t1.tolist(), meta.pair_t2.tolist(), strict=True))) == len(meta.labels)
    assert set(subject) == set(meta.templates.tolist()) and feats.shape == flips.shape == (len(meta.templates), 8)


def test_reference_loop_agrees_with_the_vectorised_protocol():
    report = run_ijb(synthetic=3000, seed=2, reference=True)
    assert report.reference["same_tar_at_far"] and report.reference["max_score_difference"] < 1e-6
    assert report.identification is not None and report.pairs == len(report.scores)

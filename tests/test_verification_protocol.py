"""``bench verification --protocol facet``: FaceT's evaluation (5 folds, no flip, its normalisation and masked
flags of the masked sets) against an independent computation written after FaceT's own code."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from helpers import run_cli
from PIL import Image
from sklearn.model_selection import KFold

from facetool.bench import verification as v
from facetool.pipeline.errors import FacetoolError
from facetool.pipeline.synth import write_synth
from facetool.pipeline.verification_bin import write_bin
from facetool.train.models import create_backbone, save_backbone

# ---------------------------------------------------------------------------------------------------------------
# The reference: FaceT's verfication.py (calculate_roc, calculate_accuracy) and trainer.run_evaluate, written out
# as FaceT's code runs them: each embedding L2-normalised on its own (tta=False), pairs (2k, 2k+1), sklearn's
# KFold(5, shuffle=False), thresholds arange(0, 4, 0.01), the first best threshold on the training folds.


def _facet_accuracy(threshold: float, dist: np.ndarray, issame: np.ndarray) -> float:
    predict = np.less(dist, threshold)
    tp = np.sum(np.logical_and(predict, issame))
    tn = np.sum(np.logical_and(np.logical_not(predict), np.logical_not(issame)))
    return float(tp + tn) / dist.size


def _facet_evaluate(embeddings: np.ndarray, issame: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    emb = embeddings.astype(np.float64)
    emb = emb / np.linalg.norm(emb, axis=1, keepdims=True)  # l2_norm(model(batch, ismask)) per image
    thresholds = np.arange(0, 4, 0.01)
    dist = np.sum(np.square(np.subtract(emb[0::2], emb[1::2])), 1)
    accuracy, best_thresholds = np.zeros(5), np.zeros(5)
    for fold, (train, test) in enumerate(KFold(n_splits=5, shuffle=False).split(np.arange(dist.size))):
        acc_train = np.array([_facet_accuracy(t, dist[train], issame[train]) for t in thresholds])
        best = int(np.argmax(acc_train))
        best_thresholds[fold] = thresholds[best]
        accuracy[fold] = _facet_accuracy(thresholds[best], dist[test], issame[test])
    return accuracy, best_thresholds


@pytest.fixture(scope="module")
def synth_bin(tmp_path_factory):
    out = tmp_path_factory.mktemp("protocol")
    write_synth(out, identities=1, images_per_identity=1, pairs=63, seed=4, workers=1)
    return out / "synth.bin"


@pytest.fixture(scope="module")
def small_bin(synth_bin):
    """The first 10 pairs of ``synth_bin``: as few images as the default protocol's 10 folds allow."""
    s = v.read_bin_set(synth_bin)
    path = synth_bin.parent / "small.bin"
    write_bin(path, s.images[:20], s.issame[:10].tolist())
    return path


def test_facet_protocol_gives_facets_five_fold_numbers(tmp_path, synth_bin):
    """The same embeddings through the command: --protocol facet reports FaceT's 5 fold accuracies and thresholds;
    the default protocol reports 10 folds; flip embeddings have no place in FaceT's protocol."""
    s = v.read_bin_set(synth_bin)
    rng = np.random.default_rng(0)
    base = rng.standard_normal((s.num_pairs, 2, 32))
    base[s.issame, 1] = base[s.issame, 0]
    emb = (base.reshape(-1, 32) + 0.9 * rng.standard_normal((2 * s.num_pairs, 32))) * rng.uniform(1, 20, (126, 1))
    np.save(tmp_path / "f.npy", emb.astype(np.float32))
    ref_acc, ref_thr = _facet_evaluate(emb.astype(np.float32), s.issame)
    assert 0.6 < ref_acc.mean() < 1.0  # a non-trivial operating point

    out = tmp_path / "facet.json"
    result = run_cli("bench", "verification", "--features", str(tmp_path / "f.npy"), "--bin", str(synth_bin),
                     "--protocol", "facet", "--json", str(out))  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "protocol: facet (5 folds, no flip" in result.stdout
    got = json.loads(out.read_text())
    assert got["protocol"] == "facet"
    m = got["sets"]["synth"]
    np.testing.assert_allclose(m["fold_accuracies"], ref_acc, rtol=0, atol=1e-12)
    np.testing.assert_allclose(m["fold_thresholds"], ref_thr, rtol=0, atol=1e-12)
    assert m["accuracy"] == pytest.approx(ref_acc.mean(), abs=1e-12)
    assert m["threshold"] == pytest.approx(ref_thr.mean(), abs=1e-12)

    default = v.run_verification(bins=[synth_bin], features=tmp_path / "f.npy")
    assert default.json["protocol"] == "insightface" and len(default.json["sets"]["synth"]["fold_accuracies"]) == 10
    np.save(tmp_path / "g.npy", emb.astype(np.float32))
    with pytest.raises(FacetoolError, match="g.npy: the facet protocol embeds no flips"):
        v.run_verification(bins=[synth_bin], features=tmp_path / "f.npy", flip_features=tmp_path / "g.npy",
                           protocol="facet")  # fmt: skip
    with pytest.raises(FacetoolError, match="unknown verification protocol 'lfw'; known: insightface, facet"):
        v.run_verification(bins=[synth_bin], features=tmp_path / "f.npy", protocol="lfw")


def _pixels(images: list[bytes], scale: float) -> torch.Tensor:
    arrays = [np.array(Image.open(io.BytesIO(b)).convert("RGB")) for b in images]
    return (torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() - 127.5) / scale


def test_facet_protocol_embeds_as_facet_does(small_bin):
    """FaceT-protocol embeddings: no flip; a .bin set at (x - 127.5) / 127.5 with the holistic prompts; its masked
    version at (x - 127.5) / 128 with the masked prompts on every image (the holistic pair members too)."""
    torch.manual_seed(0)
    facet = create_backbone("facet_tiny").eval()
    s = v.read_bin_set(small_bin)
    holistic = v.PairSet(s.name, s.source, s.images[:2], s.pairs[:1], s.issame[:1], s.masked[:2])
    masked = v.masked_bin_set(holistic, "one")
    assert not holistic.masked_set and masked.masked_set and masked.masked.tolist() == [False, True]
    for small, scale, flag in ((holistic, 127.5, False), (masked, 128.0, True)):
        emb, flip = v.embed_set(facet, small, batch_size=2, device="cpu", protocol=v.FACET)
        assert flip is None
        with torch.inference_mode():
            expected = facet(_pixels(small.images, scale), torch.full((2,), flag))
        torch.testing.assert_close(torch.from_numpy(emb), expected, atol=1e-4, rtol=1e-4)
    with torch.inference_mode():
        insightface = facet(_pixels(masked.images, 127.5), torch.tensor([False, True]))
    assert not torch.allclose(torch.from_numpy(emb), insightface, atol=1e-4, rtol=1e-4)  # scale and flags matter


def test_facet_protocol_through_the_library_with_a_checkpoint(tmp_path, small_bin):
    """A backbone evaluated with each protocol: the report names it, FaceT's has 5 folds and differs."""
    path = tmp_path / "tiny.pt"
    torch.manual_seed(0)
    save_backbone(path, create_backbone("tinynet", width=4), "tinynet", {"width": 4})
    facet = v.run_verification(path, bins=[small_bin], masked="both", device="cpu", protocol="facet")
    insight = v.run_verification(path, bins=[small_bin], masked="both", device="cpu")
    assert facet.meta["protocol"] == "facet" and insight.meta["protocol"] == "insightface"
    assert v.protocol_line(insight).startswith("protocol: insightface (10 folds, image + flip")
    for name in ("small", "small_masked_both"):
        assert len(facet.json["sets"][name]["fold_accuracies"]) == 5
        assert len(insight.json["sets"][name]["fold_accuracies"]) == 10
    assert facet.json["sets"]["small"]["auc"] != insight.json["sets"]["small"]["auc"]  # no flip fusion

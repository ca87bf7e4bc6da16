"""The synthetic face dataset: layout A, determinism across workers, identity signal, held-out pairs."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from helpers import error_line, run_cli
from PIL import Image

from facetool.pipeline import synth
from facetool.pipeline.errors import FacetoolError
from facetool.pipeline.recordio import RecordFile, read_property
from facetool.pipeline.verification_bin import load_bin

IDS, PER, PAIRS, SEED = 5, 4, 24, 7
FILES = ("train.rec", "train.idx", "synth.bin", "property", "synth_meta.json")


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("synth")
    outs = {}
    for name, seed, workers in (("w1", SEED, 1), ("w2", SEED, 2), ("other", SEED + 1, 1)):
        outs[name] = root / name
        summary = synth.write_synth(outs[name], IDS, PER, PAIRS, seed=seed, workers=workers)
        assert summary["records"] == IDS * PER and summary["identities"] == IDS and summary["pairs"] == PAIRS
        assert summary["images_per_s"] > 0
    return outs


def _gray28(jpeg: bytes) -> np.ndarray:
    img = Image.open(io.BytesIO(jpeg)).convert("L").resize((28, 28), Image.BILINEAR)
    return np.asarray(img, dtype=np.float32).ravel()


def test_same_seed_is_byte_identical_for_any_worker_count(made: dict[str, Path]) -> None:
    for name in FILES:
        assert (made["w1"] / name).read_bytes() == (made["w2"] / name).read_bytes(), name
    assert not list(made["w1"].glob("*.tmp"))


def test_different_seeds_differ(made: dict[str, Path]) -> None:
    for name in ("train.rec", "synth.bin"):
        assert (made["w1"] / name).read_bytes() != (made["other"] / name).read_bytes(), name


def test_layout_a_reads_back(made: dict[str, Path]) -> None:
    out = made["w1"]
    assert read_property(out / "property") == (IDS, 112, 112)
    with RecordFile(out / "train.rec", out / "train.idx") as rec:
        assert rec.layout == "A" and len(rec) == IDS * PER and rec.num_identities == IDS
        assert rec.header_label.tolist() == [IDS * PER + 1, IDS * PER + IDS + 1]
        ranges = rec.identity_ranges()
        assert ranges.tolist() == [[1 + c * PER, 1 + (c + 1) * PER] for c in range(IDS)]
        for i, record in enumerate(rec):
            assert record.key == i + 1 and record.class_id == i // PER and record.label.size == 1
            img = Image.open(io.BytesIO(record.image))
            assert img.format == "JPEG" and img.size == (112, 112) and img.mode == "RGB"
    # the header record is the last one written, as InsightFace's RecBuilder does
    last_line = (out / "train.idx").read_text().splitlines()[-1]
    assert last_line.split("\t")[0] == "0"


def test_verification_bin_uses_held_out_identities(made: dict[str, Path]) -> None:
    out = made["w1"]
    ver = load_bin(out / "synth.bin")
    assert ver.num_pairs == PAIRS and int(ver.issame.sum()) == PAIRS // 2
    assert 0 < int(np.abs(np.diff(ver.issame.astype(int))).sum())  # not all positives first
    assert all(Image.open(io.BytesIO(b)).size == (112, 112) for b in ver.images)
    meta = json.loads((out / "synth_meta.json").read_text())
    held = meta["heldout_identities"]
    assert len(held) == max(50, PAIRS // 10) and not set(held) & set(range(IDS))
    assert meta["arguments"] == {"identities": IDS, "images_per_identity": PER, "pairs": PAIRS, "seed": SEED}
    who, issame = synth.plan_pairs(SEED, IDS, len(held), PAIRS)
    assert np.array_equal(issame, ver.issame)
    assert all((a == b) == s for (a, b), s in zip(who, issame, strict=True))
    assert all(a in held and b in held for a, b in who)


def test_images_vary_but_identities_are_recognisable() -> None:
    """Nearest class mean on 28x28 grey pixels, 20 identities, 5 train / 5 test images each: chance is 5%."""
    n_ids, per = 20, 10
    x = np.stack([_gray28(synth.render(3, i, k)) for i in range(n_ids) for k in range(per)])
    y = np.repeat(np.arange(n_ids), per)
    # every image differs clearly from the identity's other images
    same_pair_diff = np.abs(x[0::per] - x[1::per]).mean(axis=1)
    assert same_pair_diff.min() > 4.0
    x = (x - x.mean(axis=1, keepdims=True)) / x.std(axis=1, keepdims=True)
    train = np.tile(np.arange(per) < per // 2, n_ids)
    means = np.stack([x[train & (y == c)].mean(axis=0) for c in range(n_ids)])
    dist = ((x[~train][:, None, :] - means[None]) ** 2).sum(axis=-1)
    accuracy = float((dist.argmin(axis=1) == y[~train]).mean())
    assert accuracy >= 0.4, accuracy


def test_identities_stay_on_the_arcface_template() -> None:
    for i in range(40):
        idn = synth.make_identity(11, i)
        lm = np.asarray(idn.landmarks).reshape(5, 2)
        assert np.abs(lm - synth.TEMPLATE).max() <= 1.5
        assert idn == synth.make_identity(11, i)  # identity i depends only on (seed, i)
    img = synth.draw_face(synth.make_identity(11, 0), np.random.default_rng(0))
    assert img.shape == (112, 112, 3) and img.dtype == np.uint8
    again = synth.draw_face(synth.make_identity(11, 0), np.random.default_rng(0))
    assert np.array_equal(img, again)


@pytest.mark.parametrize(
    "bad",
    [{"identities": 0}, {"images_per_identity": 0}, {"pairs": 1}, {"workers": 0}],
    ids=lambda bad: next(iter(bad)),
)
def test_rejects_bad_arguments(tmp_path: Path, bad: dict) -> None:
    with pytest.raises(FacetoolError, match=">= 1"):
        synth.write_synth(tmp_path / "out", **bad)
    assert not (tmp_path / "out").exists()


def test_progress_counts_every_drawn_image(tmp_path: Path) -> None:
    calls: list[tuple[int, int]] = []
    synth.write_synth(tmp_path, 3, 2, pairs=4, progress=lambda done, total: calls.append((done, total)))
    total = 3 * 2 + 2 * 4  # training images, then two images per verification pair
    assert calls[-1] == (total, total) and all(t == total for _, t in calls)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)


def test_command_writes_the_dataset_and_reports_one_line_errors(tmp_path: Path) -> None:
    out = tmp_path / "data"
    proc = run_cli("synth", str(out), "--identities", "2", "--images-per-identity", "2", "--pairs", "2")
    assert proc.returncode == 0 and "4 images of 2 identities" in proc.stdout
    assert read_property(out / "property") == (2, 112, 112)
    (tmp_path / "file").write_bytes(b"")
    line = error_line("synth", str(tmp_path / "file" / "data"), "--identities", "1", "--quiet")
    assert "file" in line

"""Training loaders (DALI on the CPU, the webdataset fallback) over synthetic shards: epochs, pixels, masks, errors.

Two ranks are simulated by two loaders with rank 0 and 1 of world size 2. Every output image is identified by
comparing it with Pillow decodes of the candidates of its label (each sample's jpg and mask.jpg, plain and
mirrored), which checks the label against the source, the decoded pixels, the masked flag and the flip at once.
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from helpers import loader_params
from PIL import Image
from shard_edit import read_samples, rewrite_shard, update_manifest_entry

from facetool.pipeline.errors import FacetoolError
from facetool.pipeline.recordio import RecordFile
from facetool.pipeline.shards import ConvertOptions, convert
from facetool.pipeline.shards.format import JPEG_EXT, LABEL_EXT, MASK_EXT, PNG_EXT, index_header, read_index
from facetool.pipeline.synth import write_synth
from facetool.train.data import (
    DaliLoader,
    LoaderConfig,
    MaskReuseWarning,
    WdsLoader,
    batches_per_epoch,
    build_pipeline,
    create_loader,
    dali_available,
    open_shards,
)
from facetool.train.data.fallback import batches as fallback_batches
from facetool.train.data.fallback import loader as fallback_loader
from facetool.train.data.fallback import read_samples as fallback_read_samples

# DALI's CPU decoder and Pillow both use libjpeg-turbo with the accurate integer IDCT and fancy upsampling: the
# pixels agree exactly; the tolerance only absorbs the float round trip of the normalisation.
PIXEL_TOLERANCE = 0.01
BATCH = 32


def _decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float32)


class Reference:
    """Pillow decodes of every sample of a shard folder, grouped by the label the *source .rec* gives its key."""

    def __init__(self, src: Path, shards: Path) -> None:
        with RecordFile(src / "train.rec", src / "train.idx") as rf:
            source_label = {f"{r.key:09d}": r.class_id for r in rf}
        self.keys: set[str] = set()
        self.has_mask: set[str] = set()
        by_label: dict[int, list[tuple[tuple[str, bool, bool], np.ndarray]]] = {}
        for tar in sorted(shards.glob("shard-*.tar")):
            for key, members in read_samples(tar):
                members = dict(members)
                self.keys.add(key)
                variants = [(False, members[JPEG_EXT])]
                if MASK_EXT in members:
                    self.has_mask.add(key)
                    variants.append((True, members[MASK_EXT]))
                for masked, data in variants:
                    pixels = _decode(data)
                    for flipped, img in ((False, pixels), (True, pixels[:, ::-1])):
                        by_label.setdefault(source_label[key], []).append(((key, masked, flipped), img))
        self.candidates = {
            label: ([c[0] for c in items], np.stack([c[1] for c in items])) for label, items in by_label.items()
        }

    def identify(self, image, label: int) -> tuple[str, bool, bool, float]:
        """(key, masked, flipped, max abs pixel difference) of the best candidate with this label."""
        assert label in self.candidates, f"label {label} is not a label of the source"
        names, stack = self.candidates[label]
        pixels = image.float().numpy().transpose(1, 2, 0) * 127.5 + 127.5
        diff = np.abs(stack - pixels).max(axis=(1, 2, 3))
        best = int(np.argmin(diff))
        assert np.partition(diff, 1)[1] > 20, "two candidates look alike; the identification would be ambiguous"
        return (*names[best], float(diff[best]))


def _epoch(ref: Reference, loaders) -> list[list[tuple[str, bool, bool, float, int, bool]]]:
    """One epoch of every rank's loader: per rank, per sample (key, masked, flipped, pixel diff, label, flag)."""
    return [[(*ref.identify(img, int(lab)), int(lab), bool(m)) for img, lab, m in _samples(ld)] for ld in loaders]


def _samples(loader):
    for batch in loader:
        yield from zip(batch.images, batch.labels, batch.masked, strict=True)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """240 synthetic faces (24 identities) as 5 shards (50 samples each, the last 40), and the same converted with
    a masked twin for about half of the samples."""
    root = tmp_path_factory.mktemp("loader")
    src, plain, masked = root / "src", root / "shards", root / "masked"
    write_synth(src, identities=24, images_per_identity=10, pairs=2, seed=3, workers=1)
    convert(src, plain, ConvertOptions(samples_per_shard=50))
    convert(src, masked, ConvertOptions(samples_per_shard=50, mask_fraction=0.5))
    return {"src": src, "plain": plain, "masked": masked}


@pytest.fixture(scope="module")
def ref(data) -> Reference:
    return Reference(data["src"], data["plain"])


@pytest.fixture(scope="module")
def ref_masked(data) -> Reference:
    return Reference(data["src"], data["masked"])


def _config(**kw) -> LoaderConfig:
    return LoaderConfig(**{"batch_size": BATCH, "threads": 1, "shuffle_buffer": 64, **kw})


def _two_ranks(kind, shards, config):
    if kind == "dali":
        return [DaliLoader(shards, config, rank=r, world_size=2) for r in range(2)]
    return [WdsLoader(shards, config, rank=r, world_size=2, workers=0) for r in range(2)]


# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", loader_params("dali", "wds", portable=True))
def test_two_ranks_see_every_sample_once_per_epoch_with_source_labels_and_exact_pixels(data, ref, kind):
    shards = open_shards(data["plain"])
    loaders = _two_ranks(kind, shards, _config(flip_prob=0.0))
    orders = []
    for _ in range(3):
        per_rank = _epoch(ref, loaders)
        assert [len(r) for r in per_rank] == [120, 120]
        seen = per_rank[0] + per_rank[1]
        keys = Counter(s[0] for s in seen)
        assert set(keys) == ref.keys and set(keys.values()) == {1}
        assert all(not s[1] and not s[2] and not s[5] for s in seen)  # no masks, no flips
        assert max(s[3] for s in seen) <= PIXEL_TOLERANCE
        orders.append([s[0] for s in seen])
    assert orders[0] != orders[1] != orders[2], "each epoch must come in a new order"
    assert [len(ld) for ld in loaders] == [4, 4]


@pytest.mark.parametrize("kind", loader_params("dali", "wds", portable=True))
def test_same_seed_same_batches_other_seed_other_batches(data, kind):
    shards = open_shards(data["masked"])

    def run(seed):
        config = _config(seed=seed, masked_prob=0.3, flip_prob=0.5)
        loader = DaliLoader(shards, config) if kind == "dali" else WdsLoader(shards, config, workers=0)
        kept, copies = [], []
        for _ in range(2):
            epoch = [(tuple(batch), tuple(t.clone() for t in batch)) for batch in loader]  # copies made at draw
            kept.append([e[0] for e in epoch])
            copies.append([e[1] for e in epoch])
        return kept, copies

    (a, a_copies), (b, _), (c, _) = run(5), run(5), run(6)
    for x, y in zip(sum(a, []), sum(a_copies, []), strict=True):  # batches stay valid after later ones are drawn
        assert all(u.equal(v) for u, v in zip(x, y, strict=True))
    for ea, eb in zip(a, b, strict=True):
        assert len(ea) == len(eb)
        for x, y in zip(ea, eb, strict=True):
            assert all(u.equal(v) for u, v in zip(x, y, strict=True))
    assert [x[1].tolist() for x in a[0]] != [x[1].tolist() for x in a[1]]  # epochs differ
    assert [x[1].tolist() for x in a[0]] != [x[1].tolist() for x in c[0]]  # seeds differ


@pytest.mark.parametrize("kind", loader_params("dali", "wds", portable=True))
def test_masked_and_flip_shares_match_their_probabilities(data, ref_masked, kind):
    shards = open_shards(data["masked"])
    q, flip, epochs = 0.3, 0.5, 6
    loaders = _two_ranks(kind, shards, _config(masked_prob=q, flip_prob=flip))
    seen = [s for _ in range(epochs) for rank in _epoch(ref_masked, loaders) for s in rank]
    n = len(seen)
    assert n == epochs * len(ref_masked.keys)
    assert max(s[3] for s in seen) <= PIXEL_TOLERANCE
    assert all(s[1] == s[5] for s in seen), "the masked flag must say which image was decoded"
    assert all(s[0] in ref_masked.has_mask for s in seen if s[1]), "only samples with a twin can be masked"
    # masked: each sample with a twin is shown masked with probability q / f, so q of all samples on average
    pick = shards.mask_pick_probability(q)
    with_twin = sum(s[0] in ref_masked.has_mask for s in seen)
    sigma = math.sqrt(with_twin * pick * (1 - pick))
    masked = sum(s[1] for s in seen)
    assert abs(masked - q * n) <= 3 * sigma, (masked, q * n, sigma)
    flipped = sum(s[2] for s in seen)
    assert abs(flipped - flip * n) <= 3 * math.sqrt(n * flip * (1 - flip)), (flipped, flip * n)


@pytest.mark.parametrize("kind", loader_params("dali", "wds", portable=True))
def test_an_epoch_can_be_started_directly_and_gives_the_same_batches(data, kind):
    shards = open_shards(data["masked"])
    config = _config(seed=9, masked_prob=0.3, flip_prob=0.5)
    make = (lambda: DaliLoader(shards, config)) if kind == "dali" else (lambda: WdsLoader(shards, config, workers=0))
    walked = make()
    for _ in range(2):
        for _ in walked:
            pass
    assert walked.epoch == 2
    expected = [tuple(t.clone() for t in batch) for batch in walked]
    jumped = make()
    jumped.epoch = 2  # what a resumed run does: no replay of epochs 0 and 1
    got = [tuple(batch) for batch in jumped]
    assert len(got) == len(expected) == len(jumped)
    for x, y in zip(expected, got, strict=True):
        assert all(u.equal(v) for u, v in zip(x, y, strict=True))
    jumped.epoch = 2  # the same epoch drawn again
    again = [tuple(batch) for batch in jumped]
    assert all(u.equal(v) for x, y in zip(expected, again, strict=True) for u, v in zip(x, y, strict=True))


@pytest.mark.dali
def test_dali_and_fallback_ranks_read_the_same_samples_each_epoch(data, ref):
    shards = open_shards(data["plain"])
    config = _config(flip_prob=0.0)
    dali, wds = _two_ranks("dali", shards, config), _two_ranks("wds", shards, config)
    for _ in range(2):
        a = [sorted(s[0] for s in rank) for rank in _epoch(ref, dali)]
        b = [sorted(s[0] for s in rank) for rank in _epoch(ref, wds)]
        assert a == b and set(a[0]).isdisjoint(a[1])


@pytest.mark.dali
def test_fallback_and_dali_give_the_same_label_masked_multiset(data):
    shards = open_shards(data["masked"])
    q = shards.rendered_fraction  # every twin is shown: the masked flag is then a property of the sample
    config = _config(masked_prob=q)
    dali, wds = _two_ranks("dali", shards, config), _two_ranks("wds", shards, config)
    for _ in range(2):
        a = Counter((int(lab), bool(m)) for ld in dali for _, lab, m in _samples(ld))
        b = Counter((int(lab), bool(m)) for ld in wds for _, lab, m in _samples(ld))
        assert a == b
        assert sum(n for (_, m), n in a.items() if m) == shards.masked


@pytest.mark.portable
def test_fallback_workers_split_a_rank_without_overlap(data, ref):
    shards = open_shards(data["plain"])
    loaders = [WdsLoader(shards, _config(flip_prob=0.0), rank=r, world_size=2, workers=2) for r in range(2)]
    for _ in range(2):
        per_rank = _epoch(ref, loaders)
        assert [len(r) for r in per_rank] == [120, 120]
        keys = Counter(s[0] for r in per_rank for s in r)
        assert set(keys) == ref.keys and set(keys.values()) == {1}


@pytest.mark.parametrize("kind", loader_params("dali", "wds", portable=True))
def test_drop_keeps_full_batches_and_equal_counts(data, kind):
    shards = open_shards(data["plain"])
    config = _config(batch_size=50, last_batch="drop")
    loaders = _two_ranks(kind, shards, config)
    for _ in range(2):
        sizes = [[len(b.labels) for b in ld] for ld in loaders]
        assert sizes == [[50, 50], [50, 50]]  # 120 per rank: two full batches, 20 + 20 samples skipped
    assert batches_per_epoch(240, 2, config.batch_size, config.last_batch) == 2


@pytest.mark.dali
def test_partial_gives_every_rank_the_same_batch_count(data):
    shards = open_shards(data["plain"])
    config = _config(batch_size=40)
    loaders = {k: [*_two_ranks(k, shards, config)] for k in ("dali", "wds")}
    for kind, (r0, r1) in loaders.items():
        assert [len(b.labels) for b in r0] == [40, 40, 40], kind
        assert [len(b.labels) for b in r1] == [40, 40, 40], kind
    # 7 ranks: parts of 34 or 35 samples, batches of 34: the parts of 34 end with an empty batch
    config = _config(batch_size=34)
    for kind in ("dali", "wds"):
        make = DaliLoader if kind == "dali" else lambda *a, **k: WdsLoader(*a, **k, workers=0)
        sizes = [[len(b.labels) for b in make(shards, config, rank=r, world_size=7)] for r in range(7)]
        assert sorted(sizes) == [[34, 0]] * 5 + [[34, 1]] * 2, (kind, sizes)


# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.dali
def test_gpu_pipeline_is_the_same_graph_with_mixed_decoding(data):
    """Without a GPU only the construction can be checked: the graph the GPU loader would build."""
    shards = open_shards(data["masked"])
    config = _config(masked_prob=0.2, crop_prob=0.5, color_prob=0.2, gray_prob=0.1, blur_prob=0.1, downup_prob=0.1)
    devices = {}
    for device in ("cpu", "gpu"):
        pipe = build_pipeline(shards, config, rank=1, world_size=2, device=device, device_id=0)
        pipe._build_graph()  # DALI's graph construction (no device needed); build() would start the executor
        devices[device] = {op._op.__class__.__name__: op.spec.OutputDevice(0) for op in pipe._ops}
    assert devices["cpu"].keys() == devices["gpu"].keys()
    assert devices["gpu"]["Image"] == "gpu" and devices["cpu"]["Image"] == "cpu"  # decoders.image mixed vs cpu
    for op in ("RandomResizedCrop", "ColorTwist", "Hsv", "GaussianBlur", "Resize", "CropMirrorNormalize"):
        assert devices["gpu"][op] == "gpu" and devices["cpu"][op] == "cpu", op
    assert devices["gpu"]["Webdataset"] == "cpu"  # the masked/holistic choice is made on encoded bytes, on CPU


@pytest.mark.parametrize("kind", loader_params("dali", "wds", portable=True))
def test_loader_runs_every_augmentation(data, kind):
    shards = open_shards(data["masked"])
    config = _config(
        masked_prob=0.4, crop_prob=0.5, color_prob=0.5, hue=10.0, gray_prob=0.3, blur_prob=0.3, downup_prob=0.3
    )
    for dtype in ("float32", "float16"):
        loader = create_loader(shards, config.replace(dtype=dtype), backend=kind)
        batch = next(iter(loader))
        assert batch.images.shape == (BATCH, 3, 112, 112) and str(batch.images.dtype) == f"torch.{dtype}"
        assert batch.images.min() >= -1 and batch.images.max() <= 1
        assert str(batch.labels.dtype) == "torch.int64" and str(batch.masked.dtype) == "torch.bool"


# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture
def damaged(data, tmp_path) -> Path:
    out = tmp_path / "shards"
    shutil.copytree(data["plain"], out)
    return out


@pytest.mark.parametrize("kind", loader_params("dali", "wds", portable=True))
def test_missing_index_is_an_error_naming_the_shard(damaged, kind):
    (damaged / "shard-000002.idx").unlink()
    with pytest.raises(FacetoolError, match=r"shard-000002\.idx.*missing"):
        create_loader(damaged, _config(), backend=kind)


@pytest.mark.parametrize("kind", loader_params("dali", "wds", portable=True))
def test_truncated_shard_is_an_error_naming_the_shard(damaged, kind):
    tar = damaged / "shard-000001.tar"
    image = read_index(damaged / "shard-000001.idx")[29][0]
    cut = image.offset + image.size // 2  # in the middle of sample 29's image
    with open(tar, "r+b") as f:
        f.truncate(cut)
    with pytest.raises(FacetoolError, match=r"shard-000001\.tar: truncated"):
        create_loader(damaged, _config(), backend=kind)


@pytest.mark.portable
def test_fallback_without_the_precheck_still_names_a_truncated_shard(damaged):
    tar = damaged / "shard-000001.tar"
    with open(tar, "r+b") as f:
        f.truncate(tar.stat().st_size // 2)
    shards = open_shards(damaged, check=False)
    with pytest.raises(FacetoolError, match=r"shard-000001\.tar"):
        for r in range(2):
            list(WdsLoader(shards, _config(), rank=r, world_size=2, workers=0))


def _drop_label(shards: Path, name: str, victim: int) -> str:
    tar = shards / name
    samples = read_samples(tar)
    key, members = samples[victim]
    samples[victim] = (key, [m for m in members if m[0] != LABEL_EXT])
    size, digest, masked = rewrite_shard(tar, samples)
    update_manifest_entry(shards, name, size, digest, masked, len(samples))
    return key


@pytest.mark.parametrize("kind", loader_params("dali", "wds", portable=True))
def test_sample_without_label_is_an_error_naming_shard_and_sample(damaged, kind):
    key = _drop_label(damaged, "shard-000003.tar", 17)
    with pytest.raises(FacetoolError, match=rf"shard-000003\.tar: sample {key} .*has no label"):
        create_loader(damaged, _config(), backend=kind)


@pytest.mark.portable
def test_fallback_without_the_precheck_still_names_a_sample_without_label(damaged):
    key = _drop_label(damaged, "shard-000003.tar", 17)
    shards = open_shards(damaged, check=False)
    with pytest.raises(FacetoolError, match=rf"shard-000003\.tar: sample {key} has no 4-byte label"):
        for r in range(2):
            list(WdsLoader(shards, _config(), rank=r, world_size=2, workers=0))


@pytest.mark.parametrize("kind", loader_params("dali", "wds", portable=True))
def test_masked_prob_above_the_rendered_fraction_fails_before_anything_runs(data, kind, monkeypatch):
    if dali_available():  # where DALI is installed, no pipeline of it may be created either
        import nvidia.dali.pipeline

        def no_pipeline(*args, **kwargs):
            raise AssertionError("a DALI pipeline was created despite an invalid masked_prob")

        monkeypatch.setattr(nvidia.dali.pipeline.Pipeline, "__init__", no_pipeline)
    masked = open_shards(data["masked"])
    with pytest.raises(FacetoolError, match=r"masked_prob 0\.9 exceeds .* rendered mask"):
        create_loader(masked, _config(masked_prob=0.9), backend=kind)
    with pytest.raises(FacetoolError, match=r"masked_prob 0\.1 exceeds .* 0\.0000 \(0 of 240\)"):
        create_loader(data["plain"], _config(masked_prob=0.1), backend=kind)


@pytest.mark.parametrize("kind", ["dali", "wds"])
def test_masked_prob_large_against_the_mask_fraction_warns_once_naming_the_numbers(data, kind):
    """q / f > 0.5 (f from the manifest, about 0.5 here): one MaskReuseWarning on rank 0, even over two epochs
    (DALI builds a pipeline per epoch), naming q, f and the conversion to use; none at q / f <= 0.5."""
    shards = open_shards(data["masked"])
    f = shards.rendered_fraction
    assert 0.4 < f < 0.6
    cases = [(0.4, 0, 1), (0.2, 0, 0)] + ([(0.4, 1, 0), (0.5 * f, 0, 0)] if kind == "wds" else [])  # DALI: slower
    for q, rank, expected in cases:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            config = _config(masked_prob=q)
            if kind == "dali":
                loader = DaliLoader(shards, config, rank=rank, world_size=2)
            else:
                loader = WdsLoader(shards, config, rank=rank, world_size=2, workers=0)
            for epoch in range(2):
                loader.epoch = epoch
                next(iter(loader))
        found = [w for w in caught if issubclass(w.category, MaskReuseWarning)]
        assert len(found) == expected, (q, rank, [str(w.message) for w in caught])
        if expected:
            text = str(found[0].message)
            assert f"q = {q}" in text and f"f = {f:.4f}" in text and f"q / f = {q / f:.2f} > 0.5" in text
            assert "--mask-fraction 0.5" in text and "convert with --mask-fraction 1" in text


def test_index_that_disagrees_with_the_manifest_is_an_error(damaged):
    idx = damaged / "shard-000004.idx"
    lines = idx.read_bytes().split(b"\n")
    idx.write_bytes(index_header(39) + b"\n".join([*lines[1:-2], b""]))
    with pytest.raises(FacetoolError, match=r"shard-000004\.idx: lists 39 samples .* manifest says .* 40"):
        open_shards(damaged)


def test_config_rejects_out_of_range_options():
    with pytest.raises(FacetoolError, match="crop_area"):
        LoaderConfig(crop_area=(0.08, 1.0))
    with pytest.raises(FacetoolError, match="masked_prob"):
        LoaderConfig(masked_prob=1.5)
    with pytest.raises(FacetoolError, match="last_batch"):
        LoaderConfig(last_batch="pad")
    with pytest.raises(FacetoolError, match="batch_size"):
        LoaderConfig(batch_size=0)


# ---------------------------------------------------------------------------------------------------------------
def test_dali_threads_default_to_the_rank_share_plus_one_on_the_cpu(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    config = LoaderConfig()
    assert config.dali_threads("cpu", local_ranks=1) == 9 and config.dali_threads("gpu", local_ranks=1) == 8
    assert config.dali_threads("cpu", local_ranks=4) == 3 and config.dali_threads("gpu", local_ranks=16) == 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert config.dali_threads("cpu") == 5
    assert config.replace(threads=3).dali_threads("cpu") == 3


@pytest.mark.dali
def test_decode_only_pipeline_gives_the_decoded_pixels(data, ref):
    import torch

    pipe = build_pipeline(open_shards(data["plain"]), _config(flip_prob=0.5), decode_only=True)  # flip is not run
    pipe.build()
    images, labels = pipe.run()
    assert len(labels) == BATCH
    for i in range(BATCH):
        image = np.array(images.at(i))
        assert image.shape == (112, 112, 3) and image.dtype == np.uint8
        chw = torch.from_numpy(image.transpose(2, 0, 1).astype(np.float32) / 127.5 - 1)
        key, masked, flipped, diff = ref.identify(chw, int(np.array(labels.at(i))[0]))
        assert not masked and not flipped and diff <= PIXEL_TOLERANCE


@pytest.mark.dali
def test_bench_contenders_measure_what_they_claim(data):
    from facetool.bench.loader import ArcfaceRecDataset, decode_loop, locate_rec, read_jpegs, run_dali, run_rec

    shards = str(data["plain"])
    out = run_dali(shards, "cpu", batch_size=16, threads=1, warmup=1, batches=3)
    assert out["images"] == 48 and out["seconds"] > 0 and out["threads"] == 1
    out = run_dali(shards, "cpu", batch_size=16, threads=None, warmup=1, batches=3, decode_only=True)
    assert out["images"] == 48 and out["threads"] == LoaderConfig().cpu_share() + 1
    rec, idx = locate_rec(shards, None)  # the manifest's source
    assert rec == (data["src"] / "train.rec").resolve()
    out = run_rec(str(rec), str(idx), "cpu", batch_size=16, workers=0, warmup=1, batches=20)  # wraps an epoch
    assert out["images"] == 320
    dataset = ArcfaceRecDataset(rec, idx)
    with RecordFile(rec, idx) as rf:
        first = rf[0]
    image, label = dataset[0]
    expected = _decode(first.image).transpose(2, 0, 1) / 127.5 - 1
    assert int(label) == first.class_id and image.shape == (3, 112, 112)
    flipped = expected[:, :, ::-1]
    assert min(np.abs(image.numpy() - e).max() for e in (expected, flipped)) < 1e-5
    jpegs = read_jpegs(shards, 70)
    assert len(jpegs) == 70 and all(j[:3] == b"\xff\xd8\xff" for j in jpegs)
    for decoder in ("pillow", "torchvision"):
        n, t0, t1, cpu = decode_loop((decoder, jpegs, 0.0))
        assert n == 70 and t1 > t0


def test_bench_loader_command_prints_a_table_and_writes_json(data, tmp_path):
    from click.testing import CliRunner

    from facetool.cli import main

    out = tmp_path / "bench.json"
    args = ["bench", "loader", str(data["plain"]), "--loader", "decode", "--batch-size", "8", "--batches", "3"]
    result = CliRunner().invoke(main, [*args, "--warmup", "1", "--threads", "1", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "decode-limit (pillow)" in result.output and "x decode limit" in result.output
    report = json.loads(out.read_text())
    assert report["batch_size"] == 8 and report["cores"] == 1
    rows = {r["decoder"]: r for r in report["results"]}
    assert set(rows) == {"pillow", "torchvision"}
    assert all(r["loader"] == "decode-limit" and r["device"] == "cpu" and r["images"] == 32 for r in rows.values())
    assert max(r["ratio_to_decode_limit"] for r in rows.values()) == 1.0
    bad = CliRunner().invoke(main, ["bench", "loader", str(tmp_path)])
    assert bad.exit_code != 0 and "manifest.json" in bad.output


def test_an_index_size_beyond_the_tar_is_refused_before_dali_sizes_a_buffer_by_it(damaged):
    idx = damaged / "shard-000002.idx"
    lines = idx.read_bytes().split(b"\n")
    fields = lines[7].split(b" ")
    fields[2] = b"9" * 12  # the image's size, on a line in the middle (the last line's end is checked apart)
    lines[7] = b" ".join(fields)
    idx.write_bytes(b"\n".join(lines))
    with pytest.raises(FacetoolError, match=r"shard-000002\.idx: lists an offset or size of 999999999999 bytes"):
        open_shards(damaged)


# ---------------------------------------------------------------------------------------------------------------
# the fallback's whole-batch path, its shared slots and its reader
def _epochs(shards, config, count: int = 2, **kw) -> list[list[tuple]]:
    loader = WdsLoader(shards, config, **{"workers": 0, **kw})
    return [[tuple(t.clone() for t in batch) for batch in loader] for _ in range(count)]


def _same(a: list[list[tuple]], b: list[list[tuple]]) -> bool:
    return [len(e) for e in a] == [len(e) for e in b] and all(
        u.dtype == v.dtype and u.equal(v) for ea, eb in zip(a, b, strict=True) for x, y in zip(ea, eb, strict=True)
        for u, v in zip(x, y, strict=True)
    )  # fmt: skip


def _per_sample_reference(monkeypatch, shards, config) -> list[list[tuple]]:
    """The same epochs built by the per-sample path (Pillow, one draw at a time)."""
    with monkeypatch.context() as m:
        m.setattr(fallback_batches, "per_sample", lambda cfg: True)
        return _epochs(shards, config)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_whole_batches_equal_the_per_sample_path(data, monkeypatch, dtype):
    shards = open_shards(data["masked"])
    config = _config(seed=11, masked_prob=0.3, flip_prob=0.5, dtype=dtype)
    whole_calls = []
    real = fallback_batches.fill_whole
    monkeypatch.setattr(fallback_batches, "fill_whole", lambda *a: whole_calls.append(1) or real(*a))
    whole = _epochs(shards, config)
    assert len(whole_calls) == 16  # every batch of both epochs took the whole-batch path
    assert _same(whole, _per_sample_reference(monkeypatch, shards, config))


def test_png_grayscale_and_cmyk_images_decode_as_pillow_decodes_them(data, tmp_path, monkeypatch):
    """torchvision decodes baseline colour and grayscale JPEGs; PNG and CMYK go to Pillow: pixels as before."""
    out, name = tmp_path / "shards", "shard-000002.tar"
    shutil.copytree(data["plain"], out)
    samples = read_samples(out / name)
    for victim, kind in ((3, "png"), (8, "L"), (13, "CMYK")):
        key, members = samples[victim]
        members = dict(members)
        image, buf = Image.open(io.BytesIO(members.pop(JPEG_EXT))), io.BytesIO()
        if kind == "png":
            image.save(buf, format="PNG")
        else:
            image.convert(kind).save(buf, format="JPEG")
        members[PNG_EXT if kind == "png" else JPEG_EXT] = buf.getvalue()
        samples[victim] = (key, list(members.items()))
    update_manifest_entry(out, name, *rewrite_shard(out / name, samples), len(samples))
    shards, config = open_shards(out), _config(seed=2, flip_prob=0.5)
    assert _same(_epochs(shards, config), _per_sample_reference(monkeypatch, shards, config))


def test_workers_reuse_their_slots_and_batches_kept_stay_intact(data):
    shards, config = open_shards(data["masked"]), _config(seed=4, masked_prob=0.3)
    runs = {}
    for keep in (False, True):
        loader = WdsLoader(shards, config, workers=2, start_method="fork")
        lo = loader.pool.images.ctypes.data
        kept, copies, pooled = [], [], 0
        for _ in range(2):
            for batch in loader:
                pooled += lo <= batch.images.untyped_storage().data_ptr() < lo + loader.pool.images.nbytes
                copies.append(tuple(t.clone() for t in batch))
                kept += [batch] if keep else []
        runs[keep] = copies
        if keep:  # the slots filled up, then workers built batches apart; none was overwritten while kept
            assert pooled == 2 * 4 and _same([kept], [copies])
        else:  # 3 full batches per worker per epoch came from the slots, the merged remainders did not
            assert pooled == 2 * 6
    assert _same([runs[False]], [runs[True]])


def test_an_abandoned_epoch_gives_its_slots_back(data):
    import gc

    loader = WdsLoader(open_shards(data["plain"]), _config(), workers=2, start_method="fork")
    next(iter(loader))  # the workers build batches ahead that are never handed out
    loader.epoch = 0
    assert len(list(loader)) == 8
    gc.collect()
    assert not loader.pool.state[:-1].any(), loader.pool.state


def test_a_worker_that_dies_is_one_line_and_leaves_no_process(data, monkeypatch):
    import signal

    from helpers import descendants, wait_gone
    from torch.utils.data import get_worker_info

    real = fallback_loader.fill_batch

    def dying(*args):
        info = get_worker_info()
        if info is not None and info.id == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args)

    monkeypatch.setattr(fallback_loader, "fill_batch", dying)
    before = set(descendants(os.getpid()))
    loader = WdsLoader(open_shards(data["plain"]), _config(), workers=2, start_method="fork")
    with pytest.raises(FacetoolError) as err:
        for _ in loader:
            pass
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{data['plain']}: a loader worker ended unexpectedly"), message
    started = [pid for pid in descendants(os.getpid()) if pid not in before]
    assert not wait_gone(started, within=20)


def _set_checksum(header: bytearray, field: bytes) -> None:
    header[148:156] = field


@pytest.mark.parametrize(
    "edit, error",
    [(lambda h: _set_checksum(h, b"%07o\0" % (sum(h[:148]) + 256 + sum(h[156:]))), None),  # another writer's form
     (lambda h: h.__setitem__(slice(148, 156), b"0000000\0"), r"cannot read sample 6 of the shard: .*checksum"),
     (lambda h: (h.__setitem__(0, ord("9")), _set_checksum(h, b"%06o\0 " % (sum(h[:148]) + 256 + sum(h[156:])))),
      r"sample 6 is 9.* in the tar but 0.* in its index .* do not belong together")],
)  # fmt: skip
def test_fallback_reader_checks_every_tar_header(damaged, edit, error):
    tar, index = damaged / "shard-000001.tar", damaged / "shard-000001.idx"
    member = read_index(index)[6][1]  # the label's header: sample 6 of the shard
    data = bytearray(tar.read_bytes())
    header = data[member.offset - 512 : member.offset]
    edit(header)
    data[member.offset - 512 : member.offset] = header
    tar.write_bytes(bytes(data))
    read = lambda: [s["__key__"] for s in fallback_read_samples(str(tar), str(index), 0, 50)]  # noqa: E731
    if error is None:
        assert read() == [line[0].key for line in read_index(index)]
    else:
        with pytest.raises(FacetoolError, match=error):
            read()

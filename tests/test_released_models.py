"""Released models as facetool reads them: bare state dicts with ``--arch`` (every registered IResNet and
MobileFaceNet) evaluate to the same accuracy as their ``import-model`` result and its ONNX export; ONNX models from
elsewhere (fixed batch, normalisation inside the graph, InsightFace's names); containers; one-line errors."""

from __future__ import annotations

import json
import sys

import numpy as np
import onnx
import pytest
import torch
from backbones import calibrated, images
from conftest import random_jpeg
from helpers import error_line, run_cli
from torch import nn

from facetool.bench.verification import load_model, run_verification
from facetool.bench.verification.onnx_model import OnnxBackbone
from facetool.pipeline.errors import FacetoolError
from facetool.pipeline.verification_bin import write_bin
from facetool.train.engine.config import load_config
from facetool.train.models import create_backbone, save_backbone
from facetool.train.models.checkpoint import load_init
from facetool.train.models.export import export_backbone, export_onnx
from facetool.train.models.layouts import import_model

RNG = np.random.default_rng(5)
IMAGES = [random_jpeg(RNG) for _ in range(20)]  # ten pairs: one per fold, enough to compare accuracies
ISSAME = [bool(i % 2) for i in range(10)]


@pytest.fixture(scope="module")
def small_bin(tmp_path_factory):
    path = tmp_path_factory.mktemp("bins") / "small.bin"
    write_bin(path, IMAGES, ISSAME)
    return path


def scores(checkpoint, small_bin, arch: str | None = None) -> dict:
    report = run_verification(checkpoint, arch=arch, bins=[small_bin], device="cpu")
    m = report.results["small"]
    return {"accuracy": m.accuracy, "folds": m.fold_accuracies, "thresholds": m.fold_thresholds, "auc": m.auc}


@pytest.mark.parametrize("name", ["ir18", "mobilefacenet"])
def test_bare_state_dict_its_import_and_its_onnx_export_score_alike(tmp_path, small_bin, name: str) -> None:
    model = calibrated(name)
    torch.save(model.state_dict(), tmp_path / "backbone.pth")  # arcface_torch's format
    bare = scores(tmp_path / "backbone.pth", small_bin, arch=name)
    done = import_model(tmp_path / "backbone.pth", tmp_path / "imported.pt", name)
    assert done["layout"] == ("facetool" if name == "mobilefacenet" else "arcface_torch")
    assert done["input_channels"] == "rgb"
    imported = scores(tmp_path / "imported.pt", small_bin)
    export_backbone(tmp_path / "imported.pt", tmp_path / "imported.onnx")
    exported = scores(tmp_path / "imported.onnx", small_bin)
    assert bare == imported == exported
    assert 0 <= bare["accuracy"] <= 1


@pytest.mark.parametrize("name", ["ir34", "ir50", "ir100", "ir200"])
def test_bare_state_dicts_of_the_larger_iresnets_load_and_import_bitwise(tmp_path, name: str) -> None:
    """The larger IResNets take the same path as ir18 above (the same class, other depths); here their files load
    strictly with the architecture named and import bitwise (embedding 40 faces with ir200 takes minutes on two
    CPU cores; tests/test_export.py runs each through ONNX)."""
    torch.manual_seed(0)
    state = create_backbone(name).state_dict()
    files = {k: tmp_path / k for k in ("backbone.pth", "imported.pt")}
    torch.save(state, files["backbone.pth"])
    try:
        model, got_name, _ = load_model(files["backbone.pth"], name)
        assert got_name == name and all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
        del model
        assert import_model(files["backbone.pth"], files["imported.pt"], name)["layout"] == "arcface_torch"
        payload = torch.load(files["imported.pt"], weights_only=True)
        assert payload["backbone"] == name and "input_channels" not in payload  # RGB: recorded by absence
        assert list(payload["state_dict"]) == list(state)
        assert all(torch.equal(v, state[k]) for k, v in payload["state_dict"].items())
    finally:  # hundreds of MB each
        for path in files.values():
            path.unlink(missing_ok=True)


def test_the_commands_take_a_bare_state_dict_and_an_onnx_model(tmp_path, small_bin) -> None:
    torch.save(calibrated("tinynet").state_dict(), tmp_path / "tiny.pth")
    line = error_line("bench", "verification", str(tmp_path / "tiny.pth"), "--bin", str(small_bin))
    assert "tiny.pth: not a facetool checkpoint but a bare state dict (" in line and "--arch NAME" in line
    proc = run_cli("export", str(tmp_path / "tiny.pth"), str(tmp_path / "tiny.onnx"), "--arch", "tinynet")
    assert proc.returncode == 0 and "inputs images" in proc.stdout, proc.stderr
    reports = {}
    for label, args in {"bare": ["tiny.pth", "--arch", "tinynet"], "onnx": ["tiny.onnx"]}.items():
        out = tmp_path / f"{label}.json"
        proc = run_cli("bench", "verification", str(tmp_path / args[0]), *args[1:], "--bin", str(small_bin),
                       "--json", str(out), "--quiet")  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        reports[label] = json.loads(out.read_text())
    assert reports["onnx"]["backbone"] == "onnx" and reports["bare"]["backbone"] == "tinynet"
    for key in ("accuracy", "fold_thresholds", "auc"):
        assert reports["bare"]["sets"]["small"][key] == reports["onnx"]["sets"]["small"][key], key


class ZooStyle(nn.Module):
    """A graph as old model-zoo files are: it takes 0..255 pixels and normalises them itself."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, data: torch.Tensor) -> torch.Tensor:
        return self.model((data - 127.5) * (1 / 127.5))


def export_fixed(module: nn.Module, path, batch: int, name: str) -> None:
    """Export with a fixed batch size and InsightFace's input/output names."""
    with torch.no_grad():
        torch.onnx.export(module.eval(), (torch.zeros(batch, 3, 112, 112),), str(path), input_names=[name],
                          output_names=["fc1"], opset_version=17, dynamo=False)  # fmt: skip


def test_onnx_with_a_fixed_batch_and_normalisation_inside(tmp_path, small_bin) -> None:
    model = calibrated("tinynet", width=8)
    save_backbone(tmp_path / "tiny.pt", model, "tinynet", {"width": 8})
    expected = scores(tmp_path / "tiny.pt", small_bin)
    export_fixed(model, tmp_path / "fixed.onnx", batch=3, name="input.1")  # 40 forwards: the last batch padded
    fixed = OnnxBackbone(tmp_path / "fixed.onnx")
    assert (fixed.batch, fixed.raw_pixels, fixed.images.name) == (3, False, "input.1")
    assert scores(tmp_path / "fixed.onnx", small_bin) == expected
    export_fixed(ZooStyle(model), tmp_path / "zoo.onnx", batch=1, name="data")
    graph = onnx.load(str(tmp_path / "zoo.onnx"))
    mxnet_names = {"Sub": "_minusscalar0", "Mul": "_mulscalar0"}  # what MXNet-converted zoo graphs call them
    renamed = [setattr(n, "name", mxnet_names[n.op_type]) for n in graph.graph.node[:8] if n.op_type in mxnet_names]
    assert len(renamed) == 2
    onnx.save(graph, str(tmp_path / "zoo.onnx"))
    assert OnnxBackbone(tmp_path / "zoo.onnx").raw_pixels
    assert scores(tmp_path / "zoo.onnx", small_bin) == expected


def test_onnx_of_facet_takes_the_mask_flag(tmp_path) -> None:
    model = calibrated("facet_tiny", prompt_layers=2)
    export_onnx(model, tmp_path / "facet.onnx")
    wrapped = OnnxBackbone(tmp_path / "facet.onnx")
    x, flags = images(3, seed=3), torch.tensor([True, False, True])
    assert wrapped.uses_masked
    with torch.no_grad():
        np.testing.assert_allclose(wrapped(x, flags).numpy(), model(x, flags).numpy(), rtol=0, atol=1e-4)


def _mbf_state() -> dict:
    torch.manual_seed(0)
    return create_backbone("mobilefacenet").state_dict()


@pytest.mark.parametrize(
    ("content", "arch", "needles"),
    [
        (lambda: _mbf_state(), None, ("not a facetool checkpoint but a bare state dict", "--arch NAME")),
        (lambda: _mbf_state(), "tinynet", ("does not fit backbone 'tinynet'", "missing", "unexpected")),
        (lambda: {k: v for k, v in _mbf_state().items() if k != "conv1.0.weight"}, "mobilefacenet",
         ("missing 1 (e.g. conv1.0.weight)",)),
        (lambda: {**_mbf_state(), "extra.weight": torch.zeros(1)}, "mobilefacenet",
         ("unexpected 1 (e.g. extra.weight)",)),
        (lambda: {**_mbf_state(), "linear.weight": torch.zeros(128, 512)}, "mobilefacenet",
         ("wrong shape 1 (e.g. linear.weight)",)),
        (lambda: _mbf_state(), "r50", ("unknown backbone 'r50'",)),
        (lambda: {"model": _mbf_state(), "state_dict": _mbf_state()}, "mobilefacenet", ("not a facetool checkpoint",)),
    ],
)  # fmt: skip
def test_bare_state_dict_errors_name_the_file_and_the_key(tmp_path, content, arch, needles) -> None:
    path = tmp_path / "backbone.pth"
    torch.save(content(), path)
    with pytest.raises(FacetoolError) as err:
        load_model(path, arch)
    message = str(err.value)
    assert message.startswith(str(path)) and "\n" not in message
    assert all(n in message for n in needles), message


@pytest.mark.parametrize(
    "wrap",
    [
        lambda s: {"model": s},  # FaceT's checkpoint-*.pth
        lambda s: {"state_dict_backbone": s, "epoch": 3, "global_step": 10},  # arcface_torch's checkpoint_gpu_0.pt
        lambda s: {f"module.{k}": v for k, v in s.items()},  # a DataParallel wrapper saved as such
    ],
)
def test_containers_and_wrapper_prefixes(tmp_path, wrap) -> None:
    state = _mbf_state()
    torch.save(wrap(state), tmp_path / "w.pth")
    model, name, options = load_model(tmp_path / "w.pth", "mobilefacenet")
    assert (name, options) == ("mobilefacenet", {})
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_arch_must_agree_with_a_facetool_file(tmp_path) -> None:
    save_backbone(tmp_path / "m.pt", create_backbone("mobilefacenet"), "mobilefacenet", {})
    assert load_model(tmp_path / "m.pt", "mobilefacenet")[1] == "mobilefacenet"
    with pytest.raises(FacetoolError, match=r"m.pt: holds a 'mobilefacenet' backbone, not the 'ir50' asked for"):
        load_model(tmp_path / "m.pt", "ir50")


@pytest.mark.parametrize(
    ("make", "arch", "match"),
    [
        (lambda p: p.write_bytes(b"not a protobuf at all" * 10), None, r"x.onnx: not an ONNX model"),
        (lambda p: export_onnx(create_backbone("tinynet", width=4), p), "tinynet", r"x.onnx: an ONNX model .*--arch"),
    ],
)
def test_onnx_errors(tmp_path, make, arch, match) -> None:
    make(tmp_path / "x.onnx")
    with pytest.raises(FacetoolError, match=match):
        load_model(tmp_path / "x.onnx", arch)


def test_onnx_without_onnxruntime_is_one_line(tmp_path, monkeypatch) -> None:
    export_onnx(create_backbone("tinynet", width=4), tmp_path / "x.onnx")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime raises ImportError
    with pytest.raises(FacetoolError, match=r"x.onnx: running an ONNX model needs onnxruntime") as err:
        load_model(tmp_path / "x.onnx")
    assert "pip install 'facetool[onnx]'" in str(err.value)


def test_init_from_a_bare_state_dict_needs_init_arch(tmp_path) -> None:
    state = _mbf_state()
    torch.save(state, tmp_path / "backbone.pth")
    model = create_backbone("mobilefacenet")
    with pytest.raises(FacetoolError, match="bare state dict .*run.init_arch"):
        load_init(model, "mobilefacenet", tmp_path / "backbone.pth")
    with pytest.raises(FacetoolError, match="holds a 'ir50' backbone, this run trains 'mobilefacenet'"):
        load_init(model, "mobilefacenet", tmp_path / "backbone.pth", arch="ir50")
    assert load_init(model, "mobilefacenet", tmp_path / "backbone.pth", arch="mobilefacenet") == []
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    config = tmp_path / "c.toml"
    config.write_text('[run]\ninit_arch = "mobilefacenet"\n[data]\nsource = "synthetic"\n')
    with pytest.raises(FacetoolError, match="run.init_arch names the architecture of run.init_from"):
        load_config(config)
    loaded = load_config(config, [f"run.init_from={tmp_path / 'backbone.pth'}"])
    assert loaded["run"]["init_arch"] == "mobilefacenet"

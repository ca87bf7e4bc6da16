"""``facetool import-model``: every upstream layout imports strictly from its listing of names and shapes
(tests/fixtures/layouts/, made by make_layout_listings.py from the upstream modules), bitwise, and wrong layouts
are one-line errors; weights for BGR images are recorded as such and every consumer honours that."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from helpers import error_line, run_cli

from facetool.bench.verification.embed import embed_batch
from facetool.pipeline.errors import FacetoolError
from facetool.train.models import create_backbone, load_backbone
from facetool.train.models.checkpoint import load_init
from facetool.train.models.export import export_onnx
from facetool.train.models.layouts import LAYOUTS, import_state, meta_backbone, rename

LISTINGS = Path(__file__).parent / "fixtures" / "layouts"


def listing(name: str) -> dict:
    return json.loads((LISTINGS / f"{name}.json").read_text())


def random_state(name: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict with the listing's names, shapes and dtypes, filled with random values."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape, dtype in listing(name)["keys"]:
        if dtype == "float32":
            state[key] = torch.randn(shape, generator=g)
        else:
            state[key] = torch.randint(0, 1000, shape, generator=g, dtype=getattr(torch, dtype))
    return state


# The names of these listings map 1:1 onto facetool's (only renamed), so the import is bitwise.
CASES = ["arcface_torch_ir18", "treb1en_irse50", "treb1en_mobilefacenet", "multiface_irse50",
         "multiface_mobilefacenet", "facet_facet_base", "facet_ir100"]  # fmt: skip


@pytest.mark.parametrize("name", CASES)
def test_each_layout_imports_strictly_and_bitwise(name: str) -> None:
    info = listing(name)
    src = info["source"]
    assert len(src["commit"]) == 40 and src["repository"] and src["path"]
    state = random_state(name)
    out, options, layout = import_state(state, info["arch"], info["layout"])
    assert layout.name == info["layout"]
    model = meta_backbone(info["arch"], options)  # names and shapes without weights
    own = model.state_dict()
    assert list(out) == list(own) and all(out[k].shape == own[k].shape for k in own)  # every key, every shape
    mapped = rename({k: k for k in state}, layout.renames_for(model))  # facetool name -> upstream name
    assert sorted(mapped) == sorted(own)
    for ours, theirs in mapped.items():
        assert out[ours].dtype == state[theirs].dtype and torch.equal(out[ours], state[theirs]), ours
    assert sum(p.numel() for p in model.parameters()) == info["parameters"]


def test_auto_finds_the_layout_and_the_channel_order() -> None:
    assert import_state(random_state("treb1en_mobilefacenet"), "mobilefacenet")[2].channels == "bgr"
    assert import_state(random_state("multiface_irse50"), "irse50")[2].name == "treb1en"  # the same names
    assert import_state(random_state("arcface_torch_ir18"), "ir18")[2].name == "arcface_torch"
    _, options, layout = import_state(random_state("facet_facet_base"), "facet_base")
    assert layout.name == "facet" and options == {"prompt_layers": 12, "prompt_tokens": 32}
    own = {k: v.clone() for k, v in create_backbone("mobilefacenet").state_dict().items()}
    assert import_state(own, "mobilefacenet")[2].name == "facetool"  # facetool's own names stay RGB
    assert {name: layout.channels for name, layout in LAYOUTS.items()} == {
        "arcface_torch": "rgb", "treb1en": "bgr", "multiface": "bgr", "facet": "rgb", "facetool": "rgb"}  # fmt: skip


def test_files_without_batchnorm_counters_import_with_zeros() -> None:
    """Files saved before PyTorch 0.4.1 have no num_batches_tracked; load_state_dict fills 0, and so does import."""
    state = {k: v for k, v in random_state("treb1en_mobilefacenet").items() if not k.endswith("num_batches_tracked")}
    out, _, _ = import_state(state, "mobilefacenet", "treb1en")
    counters = [k for k in out if k.endswith("num_batches_tracked")]
    assert len(counters) == 50 and all(out[k].item() == 0 and out[k].dtype == torch.long for k in counters)


def _facetool_names(_):
    return {k: v.clone() for k, v in create_backbone("mobilefacenet").state_dict().items()}


def _drop_first(name: str):
    def make(_):
        state = random_state(name)
        del state[next(iter(state))]
        return state

    return make


@pytest.mark.parametrize(
    ("make", "arch", "layout", "needles"),
    [
        (lambda _: random_state("treb1en_mobilefacenet"), "mobilefacenet", "arcface_torch",
         ("layout arcface_torch has no mobilefacenet", "ir18, ir200, ir34, ir50")),
        (lambda _: random_state("arcface_torch_ir18"), "irse50", "treb1en",
         ("not irse50 in the treb1en layout: missing input_layer.0.weight", "unexpected conv1.weight",
          "it fits --arch ir18 --layout arcface_torch|facet|facetool")),
        (lambda _: random_state("arcface_torch_ir18"), "ir34", "auto",
         ("fits no layout as ir34", "it fits --arch ir18")),
        (_facetool_names, "mobilefacenet", "treb1en", ("its names are facetool's own, not treb1en's",)),
        (_drop_first("treb1en_mobilefacenet"), "mobilefacenet", "treb1en", ("missing conv1.0.weight",)),
        (lambda _: {**random_state("arcface_torch_ir18"), "fc.weight": torch.zeros(128, 25088)}, "ir18",
         "arcface_torch", ("wrong shape fc.weight ((128, 25088), expected (512, 25088))",)),
        (lambda _: random_state("arcface_torch_ir18"), "ir18", "insightface", ("unknown layout 'insightface'",)),
    ],
)  # fmt: skip
def test_wrong_layouts_are_one_line_errors(make, arch, layout, needles) -> None:
    with pytest.raises(FacetoolError) as err:
        import_state(make(None), arch, layout, source="w.pth")
    message = str(err.value)
    assert message.startswith("w.pth: ") and "\n" not in message
    assert all(n in message for n in needles), message


@pytest.fixture(scope="module")
def treb1en_mbf(tmp_path_factory) -> Path:
    """A TreB1eN MobileFaceNet state dict as its trainer saves it, with plausible BatchNorm statistics."""
    state = random_state("treb1en_mobilefacenet", seed=1)
    for key in state:
        if key.endswith("running_var"):
            state[key] = state[key].abs() + 0.5
        elif key.endswith(".weight") and state[key].ndim > 1:
            state[key] = state[key] * 0.1
    path = tmp_path_factory.mktemp("treb1en") / "model_mobilefacenet.pth"
    torch.save(state, path)
    return path


def test_import_model_command_and_wrong_layout_through_the_command(tmp_path, treb1en_mbf) -> None:
    out = tmp_path / "mbf.pt"
    proc = run_cli("import-model", str(treb1en_mbf), str(out), "--arch", "mobilefacenet", "--layout", "treb1en")
    assert proc.returncode == 0, proc.stderr
    assert "treb1en layout, BGR input" in proc.stdout and "1,200,512 parameters" in proc.stdout
    payload = torch.load(out, weights_only=True)
    assert payload["backbone"] == "mobilefacenet" and payload["input_channels"] == "bgr"
    state = torch.load(treb1en_mbf, weights_only=True)
    assert torch.equal(payload["state_dict"]["conv_3.1.dw.0.weight"], state["conv_3.model.1.conv_dw.conv.weight"])
    line = error_line("import-model", str(treb1en_mbf), str(tmp_path / "x.pt"), "--arch", "mobilefacenet",
                      "--layout", "arcface_torch")  # fmt: skip
    assert "layout arcface_torch has no mobilefacenet" in line and not (tmp_path / "x.pt").exists()


def test_bgr_weights_are_honoured_by_every_consumer(tmp_path, treb1en_mbf) -> None:
    from facetool.train.models.layouts import import_model

    import_model(treb1en_mbf, tmp_path / "bgr.pt", "mobilefacenet", "treb1en")
    model, _, _ = load_backbone(tmp_path / "bgr.pt")
    assert model.input_channels == "bgr"
    rgb = np.random.default_rng(0).integers(0, 256, (3, 112, 112, 3), dtype=np.uint8)
    bgr_tensor = torch.from_numpy(rgb[..., ::-1].copy()).permute(0, 3, 1, 2).float().contiguous().sub(127.5).div(127.5)
    with torch.no_grad():
        expected = model(bgr_tensor).numpy()  # what the upstream network computes on BGR images
        got, _ = embed_batch(model, rgb, "cpu", flip=False)  # bench verification / bench ijb
    np.testing.assert_array_equal(got, expected)
    # embeddings of these random weights reach ~25: float rounding then shows at 1e-5 of the value
    export_onnx(model, tmp_path / "bgr.onnx")  # the graph takes RGB
    sess = ort.InferenceSession(str(tmp_path / "bgr.onnx"), providers=["CPUExecutionProvider"])
    rgb_tensor = torch.from_numpy(rgb).permute(0, 3, 1, 2).float().sub(127.5).div(127.5)
    np.testing.assert_allclose(sess.run(None, {"images": rgb_tensor.numpy()})[0], expected, rtol=1e-5, atol=1e-4)
    start = create_backbone("mobilefacenet")  # run.init_from: the RGB run starts with the stem turned to RGB
    assert load_init(start, "mobilefacenet", tmp_path / "bgr.pt") == []
    with torch.no_grad():
        np.testing.assert_allclose(start.eval()(rgb_tensor).numpy(), expected, rtol=1e-5, atol=1e-4)
    assert torch.equal(start.conv1[0].weight, model.conv1[0].weight.flip(1))

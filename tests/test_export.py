"""ONNX export: every backbone's graph, run by onnxruntime on the CPU, reproduces torch's embeddings within 1e-4."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from backbones import calibrated, images
from click.testing import CliRunner
from torch import nn

from facetool.cli import main
from facetool.train.models import create_backbone, list_backbones, save_backbone
from facetool.train.models.export import export_onnx


def session(path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_both(model: nn.Module, path, batch: int) -> tuple[np.ndarray, np.ndarray, ort.InferenceSession]:
    x = images(batch, seed=2)
    flags = torch.arange(batch) % 2 == 1
    sess = session(path)
    feed = {"images": x.numpy()}
    if "masked" in {i.name for i in sess.get_inputs()}:
        feed["masked"] = flags.numpy()
    with torch.no_grad():
        expected = model(x, flags).numpy()
    return sess.run(["embeddings"], feed)[0], expected, sess


def one_per_family() -> list[str]:
    """The smallest registered backbone of each model class: deeper members of a family (ir50...ir200 beside ir18,
    facet_base beside facet_tiny) repeat the same blocks, so their graphs hold the same operators."""
    smallest: dict[type, tuple[int, str]] = {}
    for name in list_backbones():
        with torch.device("meta"):
            model = create_backbone(name)
        size = sum(p.numel() for p in model.parameters())
        smallest[type(model)] = min(smallest.get(type(model), (size, name)), (size, name))
    return sorted(name for _, name in smallest.values())


@pytest.mark.parametrize("name", one_per_family())
def test_onnx_reproduces_torch(name: str, tmp_path) -> None:
    model = calibrated(name)
    path = tmp_path / f"{name}.onnx"
    inputs = export_onnx(model, path)
    assert inputs == (["images", "masked"] if name.startswith("facet") else ["images"])
    got, expected, sess = run_both(model, path, 3)
    assert [o.name for o in sess.get_outputs()] == ["embeddings"]
    assert got.shape == expected.shape == (3, 512)
    assert expected.std() > 0.3  # embeddings of order 1: the tolerance below is not trivially met
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)


def test_onnx_masked_input_picks_the_prompts(tmp_path) -> None:
    model = calibrated("facet_tiny", prompt_layers=2)
    path = tmp_path / "f.onnx"
    export_onnx(model, path)
    sess = session(path)
    x = images(2, seed=3).numpy()
    holistic = sess.run(None, {"images": x, "masked": np.array([False, False])})[0]
    masked = sess.run(None, {"images": x, "masked": np.array([True, True])})[0]
    mixed = sess.run(None, {"images": x, "masked": np.array([True, False])})[0]
    assert np.abs(holistic - masked).max() > 1e-2
    np.testing.assert_allclose(mixed, np.stack([masked[0], holistic[1]]), rtol=0, atol=1e-5)


def test_facet_without_prompts_exports_images_only(tmp_path) -> None:
    model = calibrated("facet_tiny", prompt_layers=0, norm="prenorm")
    assert export_onnx(model, tmp_path / "f.onnx") == ["images"]
    got, expected, sess = run_both(model, tmp_path / "f.onnx", 2)
    assert [i.name for i in sess.get_inputs()] == ["images"]
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)


def test_a_model_off_the_cpu_or_in_half_precision_exports_a_cpu_float_copy_and_stays(tmp_path) -> None:
    """The exporter traces with CPU float32 inputs: a bf16 model (like a GPU model, not where the inputs are) is
    exported from a float32 CPU copy and is itself left as it was (in eval mode, as export always leaves it)."""
    model = calibrated("mobilefacenet").to(torch.bfloat16).train()
    export_onnx(model, tmp_path / "m.onnx")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16} and not model.training
    got, expected, _ = run_both(model.float(), tmp_path / "m.onnx", 2)  # the bf16 weights, in float32
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)


def test_export_command(tmp_path) -> None:
    options = {"prompt_layers": 3, "norm": "deepnorm"}
    model = calibrated("facet_tiny", **options)
    ckpt = tmp_path / "backbone.pt"
    save_backbone(ckpt, model, "facet_tiny", options)
    out = tmp_path / "facet.onnx"
    result = CliRunner().invoke(main, ["export", str(ckpt), str(out)])
    assert result.exit_code == 0, result.output
    assert "inputs images, masked" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["backbone.pt", "facet.onnx"]
    got, expected, _ = run_both(model, out, 3)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)


def test_export_command_refuses_a_foreign_file(tmp_path) -> None:
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00not a checkpoint" * 8)
    result = CliRunner().invoke(main, ["export", str(junk), str(tmp_path / "out.onnx")])
    assert result.exit_code == 1
    assert "Traceback" not in result.output and str(junk) in result.output
    assert result.output.strip().count("\n") == 0
    assert not (tmp_path / "out.onnx").exists()


def test_export_reads_a_training_checkpoint_like_the_other_consumers(tmp_path) -> None:
    """One backbone-file resolver: ``export`` takes a training checkpoint (the backbone beside optimiser state),
    as ``bench verification`` and ``run.init_from`` do, and its graph gives the stored weights' embeddings."""
    from facetool.train.models.checkpoint import backbone_payload

    model = calibrated("tinynet")
    training = tmp_path / "rank-00000.pt"
    torch.save({"step": 7, "optimizer": {"state": {}}, "backbone": backbone_payload(model, "tinynet", {})}, training)
    result = CliRunner().invoke(main, ["export", str(training), str(tmp_path / "m.onnx")])
    assert result.exit_code == 0, result.output
    x = images(3, seed=2)
    got = session(tmp_path / "m.onnx").run(None, {"images": x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, model(x).numpy(), atol=1e-4)


def _edit_payload(tmp_path, edit) -> str:
    """A tinynet backbone file (width 4) changed by ``edit(payload)``."""
    from facetool.train.models.checkpoint import backbone_payload

    payload = backbone_payload(create_backbone("tinynet", width=4), "tinynet", {"width": 4})
    edit(payload)
    path = tmp_path / "edited.pt"
    torch.save(payload, path)
    return str(path)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda p: p["state_dict"].__setitem__("linear.weight", 5), "state_dict entry 'linear.weight' is not a tensor"),
        (lambda p: p["options"].__setitem__("embedding_size", 10**5), "state dict does not fit backbone 'tinynet'"),
        (lambda p: p["options"].__setitem__("embedding_size", 10**9), "option embedding_size = 1000000000 exceeds"),
        (lambda p: p["options"].__setitem__("width", -3), "negative dimension -3"),
        (lambda p: p["options"].__setitem__("width", 2**70), f"option width = {2**70} exceeds every tensor"),
        (lambda p: p["options"].__setitem__(7, 1), "backbone options must be named"),
    ],
    ids=[
        "int-in-state-dict",
        "embedding-size-1e5",
        "embedding-size-1e9",
        "negative-width",
        "width-2**70",
        "unnamed-option",
    ],
)
def test_export_of_a_damaged_backbone_file_is_one_line(tmp_path, edit, message) -> None:
    from helpers import error_line

    path = _edit_payload(tmp_path, edit)
    line = error_line("export", path, str(tmp_path / "out.onnx"))
    assert line.startswith(f"Error: {path}: ") and message in line
    assert not (tmp_path / "out.onnx").exists()


def test_sizes_in_a_backbone_file_are_checked_before_any_allocation(tmp_path, monkeypatch) -> None:
    """The options come from the file: the model is built on the "meta" device and compared with the stored
    tensors first, so ``embedding_size = 1e5`` (a 0.6 GB layer for this tinynet) never reaches a real allocation."""
    from facetool.pipeline.errors import FacetoolError
    from facetool.train.models import checkpoint

    built = []

    def spy(name, **options):
        model = create_backbone(name, **options)
        built.append(next(model.parameters()).device.type)
        return model

    monkeypatch.setattr(checkpoint, "create_backbone", spy)
    path = _edit_payload(tmp_path, lambda p: p["options"].__setitem__("embedding_size", 10**5))
    with pytest.raises(FacetoolError, match="does not fit backbone 'tinynet'"):
        checkpoint.load_backbone(path)
    assert built == ["meta"]
    model, _, _ = checkpoint.load_backbone(_edit_payload(tmp_path, lambda p: None))
    assert built == ["meta", "meta", "cpu"] and next(model.parameters()).device.type == "cpu"

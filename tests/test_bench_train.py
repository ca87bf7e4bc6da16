"""facetool bench train: the recipe timed with its loader and on synthetic images, each in a fresh process; and
the process helper the benchmarks share."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from facetool.bench.process import run_isolated
from facetool.cli import main
from facetool.pipeline.errors import FacetoolError
from facetool.pipeline.shards import ConvertOptions, convert
from facetool.pipeline.synth import write_synth
from facetool.train.engine import to_toml


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> Path:
    """12 synthetic identities x 6 images as shards, and a tiny recipe over them."""
    root = tmp_path_factory.mktemp("bench_train")
    write_synth(root / "src", identities=12, images_per_identity=6, pairs=10, seed=2, workers=1)
    convert(root / "src", root / "shards", ConvertOptions(samples_per_shard=40))
    cfg = {
        "run": {"seed": 1, "epochs": 50.0, "threads": 1},
        "data": {
            "shards": str(root / "shards"),
            "backend": "wds",
            "workers": 0,
            "batch_size": 8,
            "shuffle_buffer": 16,
            "synthetic_classes": 1000,
        },  # fmt: skip
        "model": {"name": "tinynet", "width": 4},
        "head": {"name": "cosface", "s": 32.0},
        "optim": {"name": "sgd", "lr": 0.05},
        "eval": {"bins": [str(root / "src" / "synth.bin")], "every": 1},
    }
    path = root / "recipe.toml"
    path.write_text(to_toml(cfg))
    return path


def test_bench_train_times_loader_and_model_only_runs(recipe, tmp_path):
    out = tmp_path / "train.json"
    args = ["bench", "train", str(recipe), "--steps", "3", "--warmup", "1", "--json", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "model-only rate" in result.output
    report = json.loads(out.read_text())
    rows = {r["source"]: r for r in report["results"]}
    assert set(rows) == {"shards", "synthetic"}
    assert rows["shards"]["loader"] == "wds" and rows["synthetic"]["loader"] == "synthetic"
    for row in rows.values():
        # 3 timed steps of 8, the recipe's model, and the shards' 12 classes for both (not synthetic_classes)
        assert row["images"] == 24 and row["global_batch"] == 8 and row["backbone"] == "tinynet"
        assert row["classes"] == 12 and row["threads"] == 1 and row["device"] == "cpu"
        assert row["images_per_s"] > 0 and row["seconds"] > 0 and row["peak_memory_bytes"] > 2**20
    share = rows["shards"]["images_per_s"] / rows["synthetic"]["images_per_s"]
    assert report["shards_to_model_only"] == pytest.approx(share)


def test_bench_train_errors_before_any_process(recipe, tmp_path):
    result = CliRunner().invoke(main, ["bench", "train", str(recipe), "--set", "data.shards=/nonexistent/shards"])
    assert result.exit_code != 0 and "/nonexistent/shards" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(main, ["bench", "train", str(recipe), "--set", "run.bogus=1"])
    assert result.exit_code != 0 and "run.bogus" in result.output and "measuring" not in result.output
    # the recipe's evaluation sets are not used by the benchmark: a missing one is no error
    args = ["bench", "train", str(recipe), "--set", 'eval.bins=["/nonexistent/lfw.bin"]', "--data", "synthetic"]
    result = CliRunner().invoke(main, [*args, "--steps", "1", "--warmup", "1"])
    assert result.exit_code == 0, result.output
    assert "synthetic" in result.output and "model-only rate" not in result.output  # one source: no ratio


def _dies() -> None:
    os._exit(3)


def _fails() -> None:
    raise ValueError("no good")


def test_isolated_run_reports_a_dead_or_failing_process():
    with pytest.raises(FacetoolError, match="exited with code 3"):
        run_isolated("probe", _dies)
    with pytest.raises(FacetoolError, match="probe: ValueError: no good"):
        run_isolated("probe", _fails)
    assert run_isolated("probe", max, 2, 5) == 5

"""Where training runs: batches and evaluation on the model's device, the local rank's GPU (GPUs faked here by
patching torch's CUDA queries; the "meta" device stands in for a GPU the loader does not deliver to), and a
machine without NVIDIA DALI (its import blocked): the portable loader, a note when "auto" falls back to it, and a
one-line error saying how to install DALI when it is asked for."""

from __future__ import annotations

import sys

import pytest
import torch
from train_setup import make_data, write_config

from facetool.bench.verification import load_sets, training_evaluation
from facetool.bench.verification.embed import evaluate_set
from facetool.bench.verification.protocol import PROTOCOLS
from facetool.pipeline.errors import FacetoolError
from facetool.train.data import FALLBACK_NOTE, DaliLoader, LoaderConfig, WdsLoader, create_loader, open_shards
from facetool.train.engine import Trainer, load_config
from facetool.train.engine.build import build_loader
from facetool.train.engine.config import CHOICES
from facetool.train.engine.context import Context, setup_distributed
from facetool.train.models import create_backbone

pytestmark = pytest.mark.portable
INSTALL = "pip install 'facetool[dali]'"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("devices_data"))


@pytest.fixture
def gpus(monkeypatch):
    """``gpus(n)``: torch sees ``n`` GPUs (``set_device`` recorded; nothing else of CUDA may be used)."""
    chosen: list[torch.device] = []
    threads = torch.get_num_threads()

    def fake(n: int) -> list[torch.device]:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
        monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
        return chosen

    yield fake
    torch.set_num_threads(threads)  # the engine's set-up sets run.threads


@pytest.fixture
def without_dali(monkeypatch):
    """``import nvidia.dali`` fails, as where the ``dali`` extra is not installed."""
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)


def one_line(err: pytest.ExceptionInfo) -> str:
    assert "\n" not in str(err.value)
    return str(err.value)


@pytest.mark.parametrize(
    "local_rank, local_ranks, count, expect",
    [
        ("1", "2", 2, 1),
        ("0", "1", 1, 0),
        ("2", "3", 2, "local rank 2 of 3 on this machine, but torch sees 2 GPU"),
        ("0", "3", 2, "local rank 0 of 3 on this machine, but torch sees 2 GPU"),
    ],  # fmt: skip
)
def test_the_engine_takes_the_local_rank_gpu_and_refuses_more_local_ranks_than_gpus(
    tmp_path, data, gpus, monkeypatch, local_rank, local_ranks, count, expect
) -> None:
    chosen = gpus(count)
    monkeypatch.setenv("RANK", "5")  # a global rank past the GPUs: never the device index
    monkeypatch.setenv("LOCAL_RANK", local_rank)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", local_ranks)
    monkeypatch.delenv("WORLD_SIZE", raising=False)  # no process group: only the device is chosen
    cfg = load_config(write_config(tmp_path / "c.toml", data, run={"device": "cuda"}))
    if isinstance(expect, int):
        gpu = torch.device("cuda", expect)
        assert setup_distributed(cfg).device == gpu and chosen == [gpu]
        return
    with pytest.raises(FacetoolError) as err:
        setup_distributed(cfg)
    assert one_line(err).startswith(f"{tmp_path / 'c.toml'}: run.device = 'cuda': {expect}") and not chosen


def test_the_loader_gpu_is_the_local_rank_not_the_global_rank(data, gpus, monkeypatch) -> None:
    gpus(2)
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    shards, config = open_shards(data / "shards"), LoaderConfig(batch_size=8, shuffle_buffer=16)
    loader = create_loader(shards, config, rank=2, world_size=4, device="gpu", backend="wds")
    assert loader.device == torch.device("cuda", 1)  # global rank 2 on 2 GPUs would have been GPU 0
    monkeypatch.setenv("LOCAL_RANK", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
    with pytest.raises(FacetoolError) as err:
        create_loader(shards, config, rank=2, world_size=4, device="gpu", backend="wds")
    assert "local rank 2 of 3 on this machine, but torch sees 2 GPU(s)" in one_line(err)
    with pytest.raises(FacetoolError, match=r"^GPU 2 requested, but torch sees 2 GPU\(s\) here$"):
        create_loader(shards, config, device="gpu", backend="wds", device_id=2)


def test_batches_reach_the_model_device_whatever_the_loader_delivers(tmp_path, data) -> None:
    cfg = load_config(write_config(tmp_path / "c.toml", data, data={"loader_device": "cpu"}))
    trainer = Trainer(cfg, tmp_path / "out", ctx=Context(device=torch.device("meta")))
    assert trainer.loader.device == torch.device("cpu") and next(trainer.backbone.parameters()).is_meta
    images, labels, masked = next(trainer.batches())
    assert images.is_meta and labels.is_meta and masked.is_meta and labels.dtype == torch.int64


def test_evaluation_runs_on_the_backbone_device_and_leaves_it_there(data, gpus) -> None:
    gpus(1)  # a GPU is there, the run is on the CPU: the live backbone must not be moved to the GPU
    torch.manual_seed(0)
    backbone = create_backbone("tinynet", width=4).train()
    result = training_evaluation([data / "src/synth.bin"])(backbone)
    assert result["synth"]["pairs"] == 20 and backbone.training
    assert {p.device.type for p in backbone.parameters()} == {"cpu"}
    assert len(result["synth"]["fold_accuracies"]) == 10


def test_training_evaluation_scores_under_eval_protocol(data) -> None:
    """``eval.protocol`` takes the verification protocols, and "facet" scores as FaceT does (5 folds, no flip)."""
    assert CHOICES[("eval", "protocol")] == tuple(PROTOCOLS)
    torch.manual_seed(0)
    backbone = create_backbone("tinynet", width=4)
    facet = training_evaluation([data / "src/synth.bin"], protocol="facet")(backbone)["synth"]
    assert len(facet["fold_accuracies"]) == 5
    unflipped = evaluate_set(backbone, load_sets(bins=[data / "src/synth.bin"])[0], protocol=PROTOCOLS["facet"])
    assert facet["accuracy"] == unflipped.accuracy


def test_auto_falls_back_to_the_portable_loader_without_dali_and_says_so_once(tmp_path, data, without_dali) -> None:
    said: list[str] = []
    cfg = load_config(write_config(tmp_path / "c.toml", data, data={"backend": "auto"}))
    trainer = Trainer(cfg, tmp_path / "out", notify=said.append)
    assert isinstance(trainer.loader, WdsLoader) and said.count(FALLBACK_NOTE) == 1
    assert INSTALL in FALLBACK_NOTE
    assert isinstance(create_loader(data / "shards", LoaderConfig(batch_size=8)), WdsLoader)  # no notify: silent


def test_asking_for_dali_without_it_is_one_line_saying_how_to_install_it(tmp_path, data, without_dali) -> None:
    shards, config = open_shards(data / "shards"), LoaderConfig(batch_size=8)
    for call in (lambda: create_loader(shards, config, backend="dali"), lambda: DaliLoader(shards, config)):
        with pytest.raises(FacetoolError) as err:
            call()
        assert "needs NVIDIA DALI, which is not installed here" in one_line(err) and INSTALL in str(err.value)
    cfg = load_config(write_config(tmp_path / "c.toml", data, data={"backend": "dali"}))
    with pytest.raises(FacetoolError) as err:
        build_loader(cfg, Context())
    assert one_line(err).startswith(f"{tmp_path / 'c.toml'}: data.backend = 'dali'") and INSTALL in str(err.value)


def test_bench_loader_without_dali_measures_the_others_and_says_so(data, without_dali, monkeypatch) -> None:
    from facetool.bench import loader as bench_loader

    shards = str(data / "shards")
    with pytest.raises(FacetoolError) as err:
        bench_loader.run_loader_benchmark(shards, loaders=("dali",))
    assert one_line(err).startswith("bench loader --loader dali needs NVIDIA DALI") and INSTALL in str(err.value)
    ran: list[str] = []
    monkeypatch.setattr(
        bench_loader, "run_isolated", lambda name, fn, *a: ran.append(name) or {"images": 8, "seconds": 1.0}
    )
    got = bench_loader.run_loader_benchmark(shards, loaders=("dali", "wds"), batch_size=8, batches=2, warmup=1)
    assert got["skipped"] == {"dali": "NVIDIA DALI is not installed"} and ran == ["bench loader, wds"]
    assert [r["loader"] for r in got["results"]] == ["wds"]

"""DDP ranks stay in lockstep: after steps with gradient clipping, or with fp16 and an overflow on one rank only,
every rank holds bitwise the same backbone; ``run.check_sync_every`` finds replicas that drifted apart. Two gloo
ranks on the CPU, each running the engine's Trainer on synthetic batches."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import free_port

from facetool.pipeline.errors import FacetoolError
from facetool.train.engine import Trainer, load_config, to_toml

WORLD = 2
BASE = {
    "run": {"seed": 2, "steps": 3, "threads": 1, "log_every": 1},
    "data": {"source": "synthetic", "synthetic_classes": 10, "synthetic_samples": 64, "batch_size": 4},
    "model": {"name": "tinynet", "width": 4, "frozen_bn": True},
    "head": {"name": "arcface", "s": 16.0, "sample_rate": 1.0},
    "optim": {"name": "sgd", "lr": 0.1},
}
# name -> [table.key=value overrides]; the fp16 runs start at loss scale 256 (tinynet's gradients overflow
# fp16 above 512) and those named "-overflow" have an inf forced into rank 1's head shard at step 2
SCENARIOS = {
    "plain": [],
    "fp16": ['run.amp="fp16"'],
    "clip-all": ["optim.clip_grad=0.05", 'optim.clip_scope="all"'],
    "clip-backbone": ["optim.clip_grad=0.05", 'optim.clip_scope="backbone"'],
    "fp16-overflow": ['run.amp="fp16"'],
    "fp16-overflow-clip": ['run.amp="fp16"', "optim.clip_grad=0.05", 'optim.clip_scope="all"'],
    "drift": ["run.check_sync_every=1"],  # rank 1's backbone is nudged after DDP's start-up broadcast
    "batchnorm": ["run.check_sync_every=1", "model.frozen_bn=false"],  # running statistics differ between ranks
    "seed-per-rank": ["run.seed_per_rank=true"],  # rank r seeds torch's generator with seed + r (FaceT)
}


def force_overflow(trainer: Trainer) -> None:
    """An inf in rank 1's class-weight gradient at step 2 (the backbone's gradient, all-reduced by DDP, is finite)."""
    weight = trainer.head.class_weights()[0]
    weight.register_hook(lambda g: g * float("inf") if trainer.step == 1 else g)


def worker(rank: int, port: int, folder: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
    torch.set_num_threads(1)
    results = {}
    try:
        for name, overrides in SCENARIOS.items():
            cfg = load_config(Path(folder) / "base.toml", overrides)
            trainer = Trainer(cfg, Path(folder) / name)
            if name.startswith("fp16"):
                scaler = trainer.scaler.state_dict()
                trainer.scaler.load_state_dict({**scaler, "scale": 256.0})
            if name.startswith("fp16-overflow") and rank == 1:
                force_overflow(trainer)
            if name == "drift" and rank == 1:
                with torch.no_grad():
                    next(trainer.backbone.parameters()).add_(1e-3)
            try:
                trainer.run()
                error = None
            except FacetoolError as err:
                error = str(err)
            results[name] = {
                "backbone": {k: v.clone() for k, v in trainer.backbone.state_dict().items()},
                "scale": float(trainer.scaler.get_scale()) if trainer.scaler.is_enabled() else None,
                "step": trainer.step,
                "error": error,
                "draw": torch.rand(4),  # the next draw of torch's generator (drop path and MAE masks use it)
            }
        torch.save(results, Path(folder) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    folder = tmp_path_factory.mktemp("sync")
    (folder / "base.toml").write_text(to_toml(BASE))
    mp.spawn(worker, args=(free_port(), str(folder)), nprocs=WORLD, join=True)
    return [torch.load(folder / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


@pytest.mark.parametrize(
    "name",
    ["plain", "clip-all", "clip-backbone", "fp16", "fp16-overflow", "fp16-overflow-clip", "batchnorm", "seed-per-rank"],
)
def test_ranks_hold_bitwise_the_same_backbone(ranks, name) -> None:
    a, b = ranks[0][name], ranks[1][name]
    assert a["error"] is None and b["error"] is None
    assert a["step"] == b["step"] == 3
    for key in a["backbone"]:
        if name == "batchnorm" and ("running_" in key or "num_batches" in key):
            continue  # each rank's batch statistics, until DDP broadcasts rank 0's at the next forward
        assert torch.equal(a["backbone"][key], b["backbone"][key]), f"{name}: {key} differs between the ranks"
    assert a["scale"] == b["scale"]
    if name.startswith("fp16"):  # no overflow keeps the scale; rank 1's skipped the step on both and halved it
        assert a["scale"] == (128.0 if "overflow" in name else 256.0)


def test_the_skipped_step_changes_the_weights(ranks) -> None:
    """The step the overflow skipped is missing from the weights (the fp16 runs do train)."""
    plain, skipped = ranks[0]["fp16"]["backbone"], ranks[0]["fp16-overflow"]["backbone"]
    assert any(not torch.equal(plain[k], skipped[k]) for k in plain)


def test_clip_scopes_differ(ranks) -> None:
    """The two scopes really clip differently (the test above would pass trivially otherwise)."""
    plain, every, backbone = (ranks[0][n]["backbone"] for n in ("plain", "clip-all", "clip-backbone"))
    assert any(not torch.equal(plain[k], every[k]) for k in plain)
    assert any(not torch.equal(every[k], backbone[k]) for k in plain)


def test_check_sync_finds_drifted_replicas(ranks) -> None:
    for rank in ranks:
        error = rank["drift"]["error"]
        assert error is not None and "\n" not in error
        assert error.startswith("step 1: the ranks hold different backbones (run.check_sync_every)")


def test_seed_per_rank_gives_each_rank_its_own_draws(ranks) -> None:
    """run.seed_per_rank: the ranks draw different random numbers (each its own drop-path and MAE masks) while
    holding the same backbone (above); rank 0 draws as without the option (seed + 0). By default all draw alike."""
    assert torch.equal(ranks[0]["plain"]["draw"], ranks[1]["plain"]["draw"])
    assert not torch.equal(ranks[0]["seed-per-rank"]["draw"], ranks[1]["seed-per-rank"]["draw"])
    assert torch.equal(ranks[0]["seed-per-rank"]["draw"], ranks[0]["plain"]["draw"])

"""Resuming on another number of ranks: the class shards of a head and their optimiser state, cut for 2 ranks (two
gloo processes) or 1, are cut again for the other layout with every class row and its optimiser state unchanged.
The heads cover one weight (ArcFace), one weight per sphere (MultiFace) and a per-class buffer beside the weight
(the layout of a head that keeps per-class rows as buffers)."""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import free_port, run_cli
from torch import nn
from train_setup import ENV, make_data, write_config

from facetool.pipeline.errors import FacetoolError
from facetool.train.data import DaliLoader, LoaderConfig, WdsLoader, batches_per_epoch, open_shards
from facetool.train.engine.checkpoint import rank_file, read_rank
from facetool.train.engine.clock import EpochClock
from facetool.train.engine.optim import create_optimizer, parameter_groups
from facetool.train.engine.reshard import per_class_keys, recut_head, recut_rows, recut_states
from facetool.train.engine.state import module_state, restore_loader
from facetool.train.heads import Head, create_head

E, C, B, WORLD = 8, 7, 6, 2  # 7 classes: ranks 0 and 1 of 2 hold 4 and 3
CASES = [("arcface", {}, "sgd"), ("multiface", {"spheres": 2}, "adamw"), ("rowbuffer", {}, "adamw")]
ADAM = ("exp_avg", "exp_avg_sq")
PER_CLASS = [  # every per-class tensor of each case's head and optimiser state
    {"weight", "head.weight/momentum_buffer"},
    {f"spheres.{i}.weight" for i in range(2)} | {f"head.spheres.{i}.weight/{f}" for i in range(2) for f in ADAM},
    {"weight", "rows"} | {f"head.weight/{f}" for f in ADAM},
]


class RowBuffer(Head):
    """ArcFace's weight and a per-class buffer (first dimension: the local class count), filled with class ids."""

    def __init__(self, embedding_size: int, num_classes: int, **options) -> None:
        super().__init__(embedding_size, num_classes, **options)
        ids = torch.arange(self.shard.start, self.shard.start + self.shard.size, dtype=torch.float32)
        self.register_buffer("rows", ids[:, None].repeat(1, 3))


def build(name: str, opts: dict, optim: str) -> tuple[Head, torch.optim.Optimizer]:
    """A head with partial_fc over the current process group, and an optimiser over it and a tiny backbone."""
    if name == "rowbuffer":
        head = RowBuffer(E, C, partial_fc=True, sample_rate=0.5, seed=3)
    else:
        head = create_head(name, E, C, partial_fc=True, sample_rate=0.5, seed=3, **opts)
    groups = parameter_groups(nn.Linear(2, 2), head, weight_decay=5e-4)
    return head, create_optimizer(optim, groups, lr=0.1)


def trained(name: str, opts: dict, optim: str, rank: int, world: int) -> dict:
    """Two optimiser steps on the head (this rank's rows of a fixed global batch): its state and the optimiser's."""
    head, optimizer = build(name, opts, optim)
    gen = torch.Generator().manual_seed(11)
    for _ in range(2):
        x, y = torch.randn(B, E, generator=gen), torch.randint(0, C, (B,), generator=gen)
        rows = slice(rank * B // world, (rank + 1) * B // world)
        optimizer.zero_grad()
        head(x[rows], y[rows]).backward()
        optimizer.step()
    return {"head": module_state(head), "optimizer": optimizer.state_dict()}


def loaded(name: str, opts: dict, optim: str, state: dict) -> dict:
    """A fresh head and optimiser after loading ``state``: what they hold."""
    head, optimizer = build(name, opts, optim)
    head.load_state_dict(state["head"])
    optimizer.load_state_dict(state["optimizer"])
    return {"head": module_state(head), "optimizer": optimizer.state_dict()}


def recut(states: list[dict], rank: int, world: int) -> dict:
    head, optim = recut_head([s["head"] for s in states], [s["optimizer"] for s in states], C, rank, world)
    return {"head": head, "optimizer": optim}


def worker(rank: int, port: int, folder: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        one = torch.load(f"{folder}/one.pt", weights_only=False)
        out = {}
        for i, (name, opts, optim) in enumerate(CASES):
            out[i] = {"trained": trained(name, opts, optim, rank, WORLD),
                      "from_one": loaded(name, opts, optim, recut([one[i]], rank, WORLD))}  # fmt: skip
        torch.save(out, f"{folder}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """One process's states (1 rank), two gloo ranks' states, and each cut for the other layout and loaded."""
    folder = tmp_path_factory.mktemp("reshard")
    one = {i: trained(name, opts, optim, 0, 1) for i, (name, opts, optim) in enumerate(CASES)}
    torch.save(one, folder / "one.pt")
    mp.spawn(worker, args=(free_port(), str(folder)), nprocs=WORLD, join=True)
    two = [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    return {"one": one, "two": two}


def per_class(state: dict, name: str, optim: str) -> dict[str, torch.Tensor]:
    """Every per-class tensor of a head state and of its optimiser state, by a readable name."""
    head = state["head"]
    local = next(v.shape[0] for k, v in head.items() if k.endswith("weight"))  # this state's local class count
    out = {k: head[k] for k in per_class_keys([head], local)}
    groups = state["optimizer"]["param_groups"]
    names = {i: n for g in groups for n, i in zip(g["names"], g["params"], strict=True)}
    for index, entry in state["optimizer"]["state"].items():
        if names[index].startswith("head."):
            for field in ("momentum_buffer", "exp_avg", "exp_avg_sq"):
                if field in entry:
                    out[f"{names[index]}/{field}"] = entry[field]
    return out


def joined(states: list[dict], name: str, optim: str) -> dict[str, torch.Tensor]:
    """The per-class tensors of the ranks' states, rows joined in rank order."""
    parts = [per_class(s, name, optim) for s in states]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


@pytest.mark.parametrize("case", range(len(CASES)), ids=[c[0] for c in CASES])
def test_two_ranks_to_one_keeps_every_class_row(runs, case) -> None:
    name, opts, optim = CASES[case]
    states = [runs["two"][r][case]["trained"] for r in range(WORLD)]
    after = loaded(name, opts, optim, recut(states, 0, 1))
    before = joined(states, name, optim)
    got = per_class(after, name, optim)
    assert set(got) == set(before) == PER_CLASS[case]
    for key, rows in before.items():
        assert rows.shape[0] == C
        assert torch.equal(got[key], rows), key
    if name == "rowbuffer":
        assert torch.equal(got["rows"][:, 0], torch.arange(C, dtype=torch.float32))
    step = [e["step"] for e in after["optimizer"]["state"].values() if "step" in e]
    assert all(float(s) == 2 for s in step)
    assert after["head"]["_extra_state"] == {}  # the class sampler starts again from the seed and the rank


@pytest.mark.parametrize("case", range(len(CASES)), ids=[c[0] for c in CASES])
def test_one_rank_to_two_keeps_every_class_row(runs, case) -> None:
    name, opts, optim = CASES[case]
    before = per_class(runs["one"][case], name, optim)
    after = joined([runs["two"][r][case]["from_one"] for r in range(WORLD)], name, optim)
    assert set(after) == set(before) == PER_CLASS[case]
    for key, rows in before.items():
        assert torch.equal(after[key], rows), key
    sizes = [per_class(runs["two"][r][case]["from_one"], name, optim) for r in range(WORLD)]
    assert [next(iter(s.values())).shape[0] for s in sizes] == [4, 3]


def test_a_new_rank_maps_the_old_files_and_copies_only_its_rows(runs, tmp_path) -> None:
    """The old ranks' files are read memory-mapped (nothing read until used) and the new rank's class rows are its
    own copies: 1 rank's file cut for rank 1 of 2 holds that rank's rows, none of them backed by the file."""
    state = {**runs["one"][0], "rng": torch.zeros(4), "backbone": {"state_dict": {"w": torch.ones(3)}}}
    path = rank_file(tmp_path, 0)
    torch.save(state, path)

    def in_file(t: torch.Tensor) -> bool:  # whether a tensor's memory is a mapping of the file (Linux)
        lines = [line.split() for line in Path("/proc/self/maps").read_text().splitlines()]
        spans = [[int(x, 16) for x in f[0].split("-")] for f in lines if len(f) > 5 and f[5] == str(path)]
        return any(lo <= t.data_ptr() < hi for lo, hi in spans)

    mapped = read_rank(tmp_path, 0, mmap=True)
    assert in_file(mapped["head"]["weight"]) and not in_file(read_rank(tmp_path, 0)["head"]["weight"])
    cut = recut_states(lambda r: read_rank(tmp_path, r, mmap=True), 1, C, 1, 2)
    assert torch.equal(cut["head"]["weight"], state["head"]["weight"][4:])
    assert not in_file(cut["head"]["weight"])


def test_recut_rows_over_uneven_layouts() -> None:
    rows = torch.arange(11)[:, None].float()
    parts = [rows[:4], rows[4:8], rows[8:]]  # 11 classes over 3 ranks: 4, 4, 3
    for world in (1, 2, 4, 5, 11):
        assert torch.equal(torch.cat([recut_rows(parts, 11, r, world) for r in range(world)]), rows)


# -- the loader: the rest of an interrupted epoch, on another layout ---------------------------------------------
@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """128 synthetic faces (16 identities) as 4 shards; every decoded image is distinct."""
    return make_data(tmp_path_factory.mktemp("reshard_data")) / "shards"


def seen(loaders: list, epoch: int, batches: int | None) -> list[bytes]:
    """The images (as bytes) of the first ``batches`` batches (all: None) of ``epoch`` on each loader."""
    out = []
    for loader in loaders:
        loader.epoch = epoch
        for batch in itertools.islice(loader, batches):
            out += [image.numpy().tobytes() for image in batch.images]
    return out


@pytest.mark.parametrize("last_batch", ["partial", "drop"])
def test_the_rest_of_an_epoch_on_other_layouts_reads_each_sample_once(shards, last_batch) -> None:
    """2 ranks x 2 workers read 2 batches, then 1 rank (in-process) 3 batches, then 2 ranks x 1 worker the rest."""
    set_ = open_shards(shards)
    cfg = LoaderConfig(batch_size=8, flip_prob=0.0, shuffle_buffer=16, last_batch=last_batch, seed=3)
    whole = seen([WdsLoader(set_, cfg, workers=0)], 1, None)
    assert len(set(whole)) == len(whole) == 128

    first = [WdsLoader(set_, cfg, r, 2, workers=2) for r in range(2)]
    got = seen(first, 1, 2)
    second = WdsLoader(set_, cfg, workers=0)
    assert second.resume_epoch(first[0].cut(1, 2)) == (1, 0)
    assert second.batches(1) == (128 - 32) // 8
    got += seen([second], 1, 3)
    third = [WdsLoader(set_, cfg, r, 2, workers=1) for r in range(2)]
    for loader in third:
        assert loader.resume_epoch(second.cut(1, 3)) == (1, 0)
    got += seen(third, 1, None)
    assert len(set(got)) == len(got)  # no sample twice
    if last_batch == "partial":
        assert sorted(got) == sorted(whole)  # and every sample of the epoch once
    else:
        assert len(got) == 32 + 24 + 2 * 8 * ((128 - 56) // 16)
    assert third[0].batches(1) == batches_per_epoch(128 - 56, 2, 8, last_batch)
    assert seen(third[:1], 2, 1) == seen([WdsLoader(set_, cfg, 0, 2, workers=0)], 2, 1)  # the next epoch is whole


@pytest.mark.dali
@pytest.mark.parametrize("last_batch", ["partial", "drop"])
def test_the_rest_of_a_dali_epoch_on_other_layouts_reads_each_sample_once(shards, last_batch) -> None:
    """DALI: 2 ranks read 2 batches from DALI's reader, then 1 rank 3 batches of the rest (its order replayed),
    then 2 ranks what is left; the fallback continues a DALI reader's cut the same way (the same samples)."""
    set_ = open_shards(shards)
    cfg = LoaderConfig(batch_size=8, flip_prob=0.0, shuffle_buffer=16, last_batch=last_batch, seed=3)
    whole = seen([DaliLoader(set_, cfg)], 1, None)
    assert len(set(whole)) == len(whole) == 128

    first = [DaliLoader(set_, cfg, r, 2) for r in range(2)]
    got = seen(first, 1, 2)
    second = DaliLoader(set_, cfg)
    assert second.resume_epoch(first[0].cut(1, 2)) == (1, 0)
    assert second.batches(1) == (128 - 32) // 8
    fallback = WdsLoader(set_, cfg, workers=0)  # reads the same samples as ``second``, decoded by torchvision
    assert fallback.resume_epoch(first[0].cut(1, 2)) == (1, 0)
    assert len(seen([fallback], 1, None)) == 128 - 32
    got += seen([second], 1, 3)
    assert second.cut(1, 3)["before"]["reader"] == "dali"
    third = [DaliLoader(set_, cfg, r, 2) for r in range(2)]
    for loader in third:
        assert loader.resume_epoch(second.cut(1, 3)) == (1, 0)
    got += seen(third, 1, None)
    assert len(set(got)) == len(got)  # no sample twice
    if last_batch == "partial":
        assert sorted(got) == sorted(whole)  # and every sample of the epoch once
    else:
        assert len(got) == 32 + 24 + 2 * 8 * ((128 - 56) // 16)
    again = DaliLoader(set_, cfg, 1, 2)  # the same layout continues its stream: batch 1 of the rest, then on
    assert again.resume_epoch(third[1].cut(1, 1)) == (1, 1)
    assert seen([again], 1, None) == seen(third[1:], 1, None)
    assert seen(third[:1], 2, 1) == seen([DaliLoader(set_, cfg, 0, 2)], 2, 1)  # the next epoch is whole


# -- end to end: `facetool train` on 2 ranks, resumed on 1, then on 2 again --------------------------------------
def torchrun(config: Path, output: Path, *args: str) -> subprocess.CompletedProcess:
    """``facetool train`` under torchrun on 2 CPU processes (gloo)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "facetool",
           "train", str(config), "--output", str(output), *args]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **ENV}, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_train_resumes_2_to_1_to_2_ranks_through_the_rest_of_the_epoch(tmp_path, shards) -> None:
    """128 samples, batch 8 per rank: 2 steps on 2 ranks (32 samples), 4 on 1 rank (32), then the 64 left of the
    epoch on 2 ranks: 4 steps, so that step 10 ends epoch 0 exactly (each rank's workers: its share of the cores)."""
    config = write_config(tmp_path / "c.toml", shards.parent, run={"steps": 2, "seed": 1, "threads": 1})
    out = tmp_path / "run"
    torchrun(config, out, "--quiet")
    one = run_cli("train", str(config), "--output", str(out), "--resume", "--set", "run.steps=6", env=ENV, timeout=300)
    assert one.returncode == 0, one.stderr
    note = "resuming a 2-rank checkpoint on 1 rank: the class shards and their optimiser state re-cut"
    assert note in one.stdout
    assert "epoch 0 continues with 12 batch(es) of 8 images over what it had not yet seen" in one.stdout
    two = torchrun(config, out, "--resume", "--set", "run.steps=10")
    assert "resuming a 1-rank checkpoint on 2 ranks" in two.stdout
    assert "epoch 0 continues with 4 batch(es) of 16 images" in two.stdout

    def state(step: int, rank: int = 0) -> dict:
        return torch.load(out / "checkpoints" / f"step-{step:08d}" / f"rank-{rank:05d}.pt", weights_only=True)

    cut = state(6)["loader"]
    assert (cut["epoch"], cut["batch"], cut["world_size"]) == (0, 4, 1)
    assert (cut["before"]["batch"], cut["before"]["world_size"], cut["before"]["before"]) == (2, 2, None)
    last = [state(10, r) for r in range(2)]
    assert [(s["loader"]["epoch"], s["loader"]["batch"], s["loader"]["before"]) for s in last] == [(1, 0, None)] * 2
    assert [s["head"]["weight"].shape[0] for s in last] == [8, 8]
    logged = [json.loads(x) for x in (out / "logs" / "scalars.jsonl").read_text().splitlines()]
    assert [x["step"] for x in logged if "train/loss" in x] == list(range(1, 11))


@pytest.mark.dali
def test_train_with_dali_resumes_2_to_1_rank_through_the_rest_of_the_epoch(tmp_path, shards) -> None:
    """The DALI loader: 2 steps on 2 ranks (32 samples of DALI's reader), then the 96 left of epoch 0 on 1 rank
    (12 steps), then epoch 1 whole."""
    data = {"backend": "dali", "masked_prob": 0.0}
    config = write_config(tmp_path / "c.toml", shards.parent, run={"steps": 2, "seed": 1, "threads": 1}, data=data)
    out = tmp_path / "run"
    torchrun(config, out, "--quiet")
    one = run_cli("train", str(config), "--output", str(out), "--resume", "--set", "run.steps=15", env=ENV, timeout=300)
    assert one.returncode == 0, one.stderr
    assert "resuming a 2-rank checkpoint on 1 rank" in one.stdout
    assert "epoch 0 continues with 12 batch(es) of 8 images over what it had not yet seen" in one.stdout
    cut = torch.load(out / "checkpoints" / f"step-{15:08d}" / "rank-00000.pt", weights_only=True)["loader"]
    assert (cut["backend"], cut["epoch"], cut["batch"], cut["before"], cut["reader"]) == ("dali", 1, 1, None, "dali")
    logged = [json.loads(x) for x in (out / "logs" / "scalars.jsonl").read_text().splitlines()]
    assert [x["step"] for x in logged if "train/loss" in x] == list(range(1, 16))


@pytest.mark.parametrize(
    "state",
    [
        {"loader": {"backend": "DaliLoader", "epoch": 1, "batch": 3, "world_size": 2}},
        {"epoch": 1, "batch_in_epoch": 3},  # written before checkpoints held the loader state
    ],
    ids=["dali", "no-loader-state"],
)
def test_other_loaders_refuse_the_middle_of_an_epoch_on_other_ranks(tmp_path, state) -> None:
    """A loader that cannot say which samples it read (no ``resume_epoch``), or a checkpoint without the loader's
    position, refuses the middle of an epoch on another number of ranks; an epoch's start is fine."""
    cfg = {"data": {"source": "shards"}, "run": {"steps": 0, "epochs": 2.0}}
    trainer = SimpleNamespace(steps_per_epoch=8, loader=object(), ctx=SimpleNamespace(world_size=1), cfg=cfg, total=16)
    with pytest.raises(FacetoolError, match=r"written in the middle of epoch 1 by 2 ranks, and this loader cannot"):
        restore_loader(trainer, {**state, "step": 11, "world_size": 2}, tmp_path)
    at_start = {"loader": {"backend": "DaliLoader", "epoch": 1, "batch": 0, "world_size": 2}, "epoch": 1}
    restore_loader(trainer, {**at_start, "step": 8, "world_size": 2}, tmp_path)
    assert trainer.clock.at(8) == (1, 0) and trainer.total == 16


def test_epoch_clock() -> None:
    whole = EpochClock(10)
    assert [whole.at(s) for s in (0, 9, 10, 23)] == [(0, 0), (0, 9), (1, 0), (2, 3)]
    for epochs in (0.05, 1.0, 2.3, 3.7):  # as before any resume on other ranks, at any epoch it resumes in
        assert whole.total(epochs) == EpochClock(10, 2, 20).total(epochs) == max(1, math.ceil(epochs * 10))
    short = EpochClock(10, 1, 13, 4)  # epoch 1 resumed at step 13 with 4 batches left, on another layout
    assert [short.at(s) for s in (13, 16, 17, 27)] == [(1, 0), (1, 3), (2, 0), (3, 0)]
    assert (short.total(1.5), short.total(2.0), short.total(3.5)) == (17, 17, 32)

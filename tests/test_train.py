"""facetool train: config checks, schedules and parameter groups, exact resume after SIGKILL, errors before
training, MAE, NaN stop; on shards written by our own synth + convert."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import error_line, kill_when, loader_params
from train_setup import ENV, make_data, train, weights, write_config

from facetool.cli import main
from facetool.pipeline.errors import FacetoolError
from facetool.train.data import LoaderConfig
from facetool.train.engine import MAE, Schedule, Trainer, load_config, parameter_groups, to_toml
from facetool.train.engine.config import defaults, loader_config
from facetool.train.engine.scalars import ScalarLog
from facetool.train.models import create_backbone, save_backbone

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_data(tmp_path_factory.mktemp("train_data"))


# -- config ------------------------------------------------------------------------------------------------------
def test_config_round_trip_and_overrides(tmp_path, data) -> None:
    path = write_config(tmp_path / "c.toml", data)
    cfg = load_config(path, ["optim.lr=0.2", "model.name=mobilefacenet", "eval.bins=[]", "run.amp=bf16"])
    assert cfg["optim"]["lr"] == 0.2 and cfg["model"]["name"] == "mobilefacenet" and cfg["run"]["amp"] == "bf16"
    assert cfg["schedule"]["kind"] == "cosine"  # default filled in
    again = tmp_path / "again.toml"
    again.write_text(to_toml(cfg))
    assert load_config(again) == cfg


@pytest.mark.parametrize(
    "patch, override, message",
    [
        ({"optim": {"lrr": 0.1}}, None, "unknown key optim.lrr (did you mean 'lr'?)"),
        ({"optimiser": {"lr": 0.1}}, None, "unknown table [optimiser] (did you mean 'optim'?)"),
        ({"optim": {"lr": "fast"}}, None, "optim.lr must be a number, got 'fast'"),
        ({"run": {"steps": 2.5}}, None, "run.steps must be an integer, got 2.5"),
        ({"run": {"amp": "fp8"}}, None, "run.amp must be one of none, bf16, fp16, got 'fp8'"),
        ({"optim": {"betas": [0.9, "x"]}}, None, "optim.betas must be a list of numbers"),
        ({}, "optim.momentun=0.8", "--set optim.momentun=0.8: unknown key optim.momentun (did you mean 'momentum'?)"),
        ({}, "data.batch_size=big", "--set data.batch_size=big: data.batch_size must be an integer, got 'big'"),
        ({"data": {"batch_size": 0}}, None, "data.batch_size must be an integer >= 1, got 0"),
        ({"data": {"masked_prob": 1.5}}, None, "data.masked_prob must be in [0, 1], got 1.5"),
        ({"data": {"crop_area": [0.9]}}, None, "data.crop_area must be a pair (low, high), got (0.9,)"),
        ({"data": {"brightness": "x"}}, None, "data.brightness must be a number, got 'x'"),
        ({"data": {"dtype": "float16"}}, None, "unknown key data.dtype"),
        ({"schedule": {"kind": "linear"}}, None, "schedule.kind must be one of cosine, poly, step, constant"),
        ({"mae": {"decoder_depth": 1.5}}, None, "mae.decoder_depth must be an integer, got 1.5"),
    ],
)
def test_config_errors_name_key_and_file(tmp_path, data, patch, override, message) -> None:
    path = write_config(tmp_path / "c.toml", data, **patch)
    with pytest.raises(FacetoolError) as err:
        load_config(path, [override] if override else [])
    assert message in str(err.value)
    if override is None:
        assert str(err.value).startswith(f"{path}: ")


def test_data_table_is_the_loader_config(tmp_path, data) -> None:
    """[data] takes LoaderConfig's options (but those the engine sets) with its defaults, and fills it."""
    engine_set = {"seed", "last_batch", "image_size", "dtype"}
    fields = {f.name: f.default for f in dataclasses.fields(LoaderConfig) if f.name not in engine_set}
    table = defaults()["data"]
    assert {k: tuple(v) if isinstance(v, list) else v for k, v in table.items() if k in fields} == fields
    assert engine_set.isdisjoint(table)
    path = write_config(tmp_path / "c.toml", data, data={"crop_area": [0.9, 1], "hue": 5})
    got = loader_config(load_config(path))
    assert got == LoaderConfig(seed=1, last_batch="drop", batch_size=8, masked_prob=0.25, shuffle_buffer=16,
                               crop_area=(0.9, 1.0), hue=5.0)  # fmt: skip


def test_missing_shards_and_bins_fail_before_training(tmp_path, data) -> None:
    path = write_config(tmp_path / "c.toml", data, data={"shards": str(tmp_path / "nowhere")})
    with pytest.raises(FacetoolError, match="data.shards: .*nowhere is not a folder"):
        load_config(path)
    path = write_config(tmp_path / "c.toml", data, eval={"bins": [str(tmp_path / "lfw.bin")]})
    with pytest.raises(FacetoolError, match="eval.bins: .*lfw.bin does not exist"):
        load_config(path)


FACET = {"name": "facet_tiny"}


@pytest.mark.parametrize(
    "model, overrides, message",
    [
        (None, [], "holds a 'facet_tiny' backbone, this run trains 'tinynet'"),
        (None, ["model.depth=3"], "[model] option not taken by tinynet: depth; it takes embedding_size, width"),
        (FACET, ["model.norm=postnorm"], "[model] norm must be one of prenorm, deepnorm"),
        (None, ["head.m=2.0"], "[head] an angular margin must be in [0, pi/2), got 2.0"),
        (None, ["head.name=nosuch"], "head.name 'nosuch' is not a head; known: arcface"),
        (None, ["run.task=mae"], "run.task = 'mae' needs a FaceT backbone, not 'tinynet'"),
        (FACET, ["run.task=mae", "mae.mask_ratio=0.001"], "[mae] mask_ratio 0.001 masks 0 of 196 patches"),
    ],
)
def test_cli_errors_are_one_line_before_any_step(tmp_path, data, model, overrides, message) -> None:
    other = tmp_path / "facet.pt"
    save_backbone(other, create_backbone("facet_tiny"), "facet_tiny", {})
    path = write_config(tmp_path / "c.toml", data, run={"init_from": "" if overrides else str(other)})
    if model is not None:
        path.write_text(to_toml({**tomllib.loads(path.read_text()), "model": model}))
    sets = [arg for o in overrides for arg in ("--set", o)]
    line = error_line("train", str(path), "--output", str(tmp_path / "out"), *sets, "--quiet", env=ENV)
    assert line.startswith(f"Error: {path}: ") or line.startswith("Error: run.init_from: ")
    assert message in line
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_mask_reuse_warning_is_a_run_message(tmp_path, data) -> None:
    """q = 0.25 on shards with a twin for about half the samples: the loader's warning reaches the run's messages
    (one line), not Python's warnings on stderr; q = 0.1 gives none."""
    import warnings

    from facetool.train.engine.build import build_loader
    from facetool.train.engine.context import Context

    for q, expected in ((0.25, 1), (0.1, 0)):
        cfg = load_config(write_config(tmp_path / "c.toml", data, data={"masked_prob": q}))
        notes: list[str] = []
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            build_loader(cfg, Context(), notify=notes.append)
        assert not caught and len(notes) == expected
        assert all(n.startswith("warning: ") and "q = 0.25" in n and "\n" not in n for n in notes)


def test_resume_with_another_backbone_is_refused(tmp_path, data) -> None:
    path = write_config(tmp_path / "c.toml", data, run={"steps": 2})
    out = tmp_path / "out"
    assert train(str(path), "--output", str(out)).returncode == 0
    result = CliRunner().invoke(main, ["train", str(path), "--output", str(out), "--resume", "--set",
                                       "model.width=8", "--set", "run.steps=4", "--quiet"])  # fmt: skip
    assert result.exit_code == 1
    assert "checkpoint of backbone 'tinynet' {'width': 4}, the config trains 'tinynet' {'width': 8}" in result.output


# -- optimiser and schedule ----------------------------------------------------------------------------------------
def test_schedule_warmup_cosine_poly_step() -> None:
    s = Schedule(peak=1.0, total=110, warmup=10, kind="cosine", min_lr=0.1)
    assert s(0) == pytest.approx(0.1) and s(9) == pytest.approx(1.0)
    assert s(10) == pytest.approx(1.0) and s(60) == pytest.approx(0.55) and s(110) == pytest.approx(0.1)
    p = Schedule(peak=1.0, total=110, warmup=10, kind="poly", power=2.0)
    assert p(60) == pytest.approx(0.25)
    st = Schedule(peak=1.0, total=100, warmup=0, kind="step", milestones=(40, 60), gamma=0.1)
    assert [st(39), st(40), st(59), st(60)] == pytest.approx([1.0, 0.1, 0.1, 0.01])


def test_parameter_groups_no_decay_and_layer_decay() -> None:
    model = create_backbone("facet_tiny")
    groups = parameter_groups(model, None, 0.05, ("norm", "bias", "model"), layer_decay=0.75)
    where = {n: g for g in groups for n in g["names"]}
    depth = model.depth  # 4: embedding id 0, block k id k + 1, the rest id 5
    assert where["pos_embed"]["weight_decay"] == 0 and where["pos_embed"]["lr_scale"] == pytest.approx(0.75**5)
    assert where["patch_embed.weight"]["weight_decay"] == 0.05
    assert where["blocks.0.attn.qkv.bias"]["weight_decay"] == 0
    assert where["blocks.0.norm1.weight"]["weight_decay"] == 0
    assert where["blocks.2.mlp.fc1.weight"]["lr_scale"] == pytest.approx(0.75 ** (depth - 2))
    assert where["head.0.weight"]["lr_scale"] == 1.0 and where["prompts"]["weight_decay"] == 0
    mfn = create_backbone("mobilefacenet")
    groups = parameter_groups(mfn, None, 4e-5, ("norm",), weight_decay_by_name={"linear.weight": 4e-4})
    where = {n: g for g in groups for n in g["names"]}
    assert where["conv1.2.weight"]["weight_decay"] == 4e-5  # PReLU decays (MultiFace's rule)
    assert where["conv1.1.weight"]["weight_decay"] == 0 and where["linear.weight"]["weight_decay"] == 4e-4
    with pytest.raises(FacetoolError, match="layer_decay"):
        parameter_groups(mfn, None, 0.0, layer_decay=0.5)


# -- MAE -----------------------------------------------------------------------------------------------------------
def test_mae_masks_three_quarters_and_learns() -> None:
    torch.manual_seed(0)
    encoder = create_backbone("facet_tiny", prompt_layers=0)
    mae = MAE(encoder, decoder_depth=2, decoder_dim=96, decoder_heads=12)
    assert mae.num_masked == 147 and mae.num_patches == 196
    assert not any(n.startswith("decoder_pos") for n, _ in mae.named_parameters())  # fixed positions
    masked, visible = mae.choose(3, torch.device("cpu"))
    for m, v in zip(masked, visible, strict=True):
        assert sorted(torch.cat([m, v]).tolist()) == list(range(196))
    x = torch.rand(4, 3, 112, 112) * 2 - 1
    opt = torch.optim.AdamW(mae.parameters(), lr=1e-3)
    losses = []
    for _ in range(8):
        torch.manual_seed(1)  # the same patches each time: the loss must fall
        loss = mae(x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


# -- runs ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", loader_params("wds", "dali"))
def test_sigkill_and_resume_give_bitwise_the_same_weights(tmp_path, data, backend) -> None:
    """30 steps over 2 epochs (16 steps each) with masks, flips, class sampling: killed after the checkpoint of step
    20 (and a step or two logged after it: epoch 1, batch 4) and resumed == uninterrupted, weights and logged
    losses; with either loader (each starts the resumed epoch directly)."""
    path = write_config(tmp_path / "c.toml", data, run={"steps": 30, "checkpoint_every": 5, "seed": 3},
                        data={"backend": backend, "threads": 1})  # fmt: skip
    full = tmp_path / "full"
    assert train(str(path), "--output", str(full)).returncode == 0, "uninterrupted run failed"

    killed = tmp_path / "killed"
    first = killed / "checkpoints" / "step-00000020" / "COMPLETE"
    scalars = killed / "logs" / "scalars.jsonl"

    def logged_past_checkpoint() -> bool:  # step 21 or 22 logged: the resumed run will log them again
        return first.exists() and scalars.exists() and any(f'"step": {n},' in scalars.read_text() for n in (21, 22))

    kill_when(["train", str(path), "--output", str(killed), "--quiet"], logged_past_checkpoint, env=ENV)
    assert not (killed / "backbone.pt").exists(), "the run finished before it was killed"
    steps = sorted(p.name for p in (killed / "checkpoints").iterdir() if (p / "COMPLETE").exists())
    assert steps and steps[-1] < "step-00000030"

    result = train(str(path), "--output", str(killed), "--resume")
    assert result.returncode == 0, result.stderr
    a, b = weights(full / "backbone.pt"), weights(killed / "backbone.pt")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ha = torch.load(full / "checkpoints/step-00000030/rank-00000.pt", weights_only=True)["head"]
    hb = torch.load(killed / "checkpoints/step-00000030/rank-00000.pt", weights_only=True)["head"]
    assert torch.equal(ha["weight"], hb["weight"])
    assert json.loads((killed / "summary.json").read_text())["steps"] == 30

    def losses(out: Path) -> list[tuple[int, float]]:
        rows = [json.loads(x) for x in (out / "logs" / "scalars.jsonl").read_text().splitlines()]
        return [(x["step"], x["train/loss"]) for x in rows if "train/loss" in x]

    # the steps logged between the last checkpoint and the kill were dropped on resume, then logged again
    assert losses(killed) == losses(full) and [s for s, _ in losses(full)] == list(range(1, 31))


def test_checkpoint_with_the_sampler_among_its_rng_states_resumes_it(tmp_path, data) -> None:
    """Checkpoints written before the head carried its class sampler (in its state_dict's extra state) kept the
    sampler's generator among the RNG states: they resume it all the same."""
    path = write_config(tmp_path / "c.toml", data, run={"steps": 2})
    out = tmp_path / "out"
    assert train(str(path), "--output", str(out)).returncode == 0
    rank0 = out / "checkpoints/step-00000002/rank-00000.pt"
    state = torch.load(rank0, weights_only=True)
    sampler = state["head"].pop("_extra_state")["sampler"]
    state["rng"]["head_sampler"] = sampler
    torch.save(state, rank0)
    trainer = Trainer(load_config(path, ["run.steps=4"]), out, resume=True)
    trainer.scalars.close()
    assert trainer.step == 2 and torch.equal(trainer.head.get_extra_state()["sampler"], sampler)


def test_resumed_scalar_log_drops_what_came_after_the_checkpoint(tmp_path) -> None:
    log = tmp_path / "logs"
    log.mkdir()
    rows = [json.dumps({"step": n, "train/loss": 1.0 / n}) for n in range(1, 6)]
    (log / "scalars.jsonl").write_text("\n".join(rows) + '\n{"step": 6, "train/lo')  # torn by the kill
    scalars = ScalarLog(log, True, purge_after=3)
    scalars.add(4, {"train/loss": 0.5})
    scalars.close()
    lines = [json.loads(x) for x in (log / "scalars.jsonl").read_text().splitlines()]
    assert [(x["step"], x["train/loss"]) for x in lines] == [(1, 1.0), (2, 0.5), (3, 1 / 3), (4, 0.5)]


def test_tensorboard_events_beside_the_jsonl_and_purged_on_resume(tmp_path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = tmp_path / "logs"
    first = ScalarLog(log, True)
    for n in range(1, 6):
        first.add(n, {"train/loss": 1.0 / n})
    first.close()  # interrupted after step 5, checkpoint at step 3
    resumed = ScalarLog(log, True, purge_after=3)
    for n in range(4, 7):
        resumed.add(n, {"train/loss": 10.0 * n})
    resumed.close()
    events = EventAccumulator(str(log))
    events.Reload()
    tensorboard = [(e.step, round(e.value, 6)) for e in events.Scalars("train/loss")]
    jsonl = [json.loads(x) for x in (log / "scalars.jsonl").read_text().splitlines()]
    expected = [(1, 1.0), (2, 0.5), (3, round(1 / 3, 6)), (4, 40.0), (5, 50.0), (6, 60.0)]
    assert tensorboard == expected
    assert [(x["step"], round(x["train/loss"], 6)) for x in jsonl] == expected


@pytest.mark.portable
def test_eval_summary_and_exported_backbone(tmp_path, data) -> None:
    path = write_config(tmp_path / "c.toml", data, run={"steps": 4}, eval={"bins": [str(data / "src/synth.bin")],
                        "every": 2})  # fmt: skip
    out = tmp_path / "out"
    result = train(str(path), "--output", str(out))
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["images_per_s"] > 0
    assert [h["step"] for h in summary["history"]] == [2, 4]
    synth = summary["verification"]["sets"]["synth"]
    assert synth["pairs"] == 20 and 0.0 <= synth["accuracy"] <= 1.0
    state = weights(out / "backbone.pt")  # weights_only load of the exported backbone
    assert "linear.weight" in state
    saved = load_config(out / "config.toml")
    assert saved["run"]["steps"] == 4 and saved["model"]["name"] == "tinynet"
    lines = [json.loads(x) for x in (out / "logs" / "scalars.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "train/loss" in x] == [1, 2, 3, 4]
    # bench verification reads the training checkpoint and the exported backbone, and finds the run's accuracy
    for weights_file in (out / "checkpoints/step-00000004/rank-00000.pt", out / "backbone.pt"):
        report = tmp_path / "verify.json"
        args = ["bench", "verification", str(weights_file), "--bin", str(data / "src/synth.bin"), "--json", str(report)]
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, result.output
        got = json.loads(report.read_text())["sets"]["synth"]
        assert got["accuracy"] == pytest.approx(synth["accuracy"]) and got["pairs"] == 20
    assert all(np.isfinite(x["train/loss"]) for x in lines if "train/loss" in x)


def test_nonfinite_loss_stops_naming_the_step(tmp_path, data) -> None:
    path = write_config(tmp_path / "c.toml", data, run={"steps": 6, "checkpoint_every": 1},
                        optim={"lr": 1e30}, schedule={"warmup_steps": 0})  # fmt: skip
    line = error_line("train", str(path), "--output", str(tmp_path / "out"), "--quiet", env=ENV)
    assert "the loss is nan (not finite); training stopped, the last good checkpoint is" in line
    assert line.startswith("Error: step ")


def test_defaults_cover_every_table() -> None:
    assert set(defaults()) == {"run", "data", "model", "head", "optim", "schedule", "eval", "mae"}


def test_two_gloo_ranks_follow_the_one_process_loss_curve(tmp_path, data) -> None:
    """torchrun, 2 CPU processes x batch 4 (DDP backbone, classifier sharded by Partial FC) == 1 process x batch 8.
    The synthetic source gives both the same global batches; BatchNorm is frozen so per-rank batch statistics do
    not enter (DDP without SyncBN normalises each rank's half on its own)."""
    common = {
        "run": {"steps": 6, "threads": 1, "log_every": 1, "seed": 4},
        "data": {"source": "synthetic", "synthetic_classes": 10, "synthetic_samples": 64},
        "model": {"name": "tinynet", "width": 4, "frozen_bn": True},
        "head": {"name": "arcface", "s": 16.0, "sample_rate": 1.0},
    }
    one = write_config(tmp_path / "one.toml", data, **{**common, "data": {**common["data"], "batch_size": 8}})
    two = write_config(tmp_path / "two.toml", data, **{**common, "data": {**common["data"], "batch_size": 4}})
    assert train(str(one), "--output", str(tmp_path / "one")).returncode == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "facetool",
           "train", str(two), "--output", str(tmp_path / "two"), "--quiet"]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]

    def curve(out: str) -> list[float]:
        lines = [json.loads(x) for x in (tmp_path / out / "logs" / "scalars.jsonl").read_text().splitlines()]
        return [x["train/loss"] for x in lines if "train/loss" in x]

    a, b = curve("one"), curve("two")
    assert len(a) == len(b) == 6
    assert a[0] != a[-1]  # it trains
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)
    wa, wb = weights(tmp_path / "one" / "backbone.pt"), weights(tmp_path / "two" / "backbone.pt")
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-3, atol=1e-5)
    ckpts = sorted((tmp_path / "two" / "checkpoints" / "step-00000006").glob("rank-*.pt"))
    assert len(ckpts) == 2  # one head shard per rank
    shards = [torch.load(p, weights_only=True)["head"]["weight"] for p in ckpts]
    assert [s.shape[0] for s in shards] == [5, 5]

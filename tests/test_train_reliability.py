"""facetool train against damaged inputs and reused folders: a fresh run never mixes with another run's outputs,
``--resume`` continues only a checkpoint of the same config, sizes and integers read from files are bounded before
anything is allocated, and every eval set is checked before the first step; all as one-line errors."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from helpers import error_line, run_cli
from train_setup import ENV, make_data, train, weights, write_config

from facetool.pipeline.errors import FacetoolError
from facetool.train.engine import Trainer, load_config

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_data(tmp_path_factory.mktemp("reliability_data"))


@pytest.fixture(scope="module")
def finished(tmp_path_factory, data) -> tuple[Path, Path]:
    """A finished 4-step run (checkpoints at 2 and 4): (its config, its output folder)."""
    root = tmp_path_factory.mktemp("finished")
    path = write_config(root / "c.toml", data, run={"steps": 4, "checkpoint_every": 2})
    trainer = Trainer(load_config(path), root / "out")
    trainer.run()
    return path, root / "out"


def copy_run(finished: tuple[Path, Path], tmp_path: Path) -> Path:
    shutil.copytree(finished[1], tmp_path / "out")
    return tmp_path / "out"


def resume(path: Path, out: Path, overrides: list[str], **options) -> Trainer:
    """A Trainer resuming ``out`` (built, not run); its scalar log closed."""
    trainer = Trainer(load_config(path, overrides), out, resume=True, **options)
    trainer.scalars.close()
    return trainer


def test_progress_and_notify_replace_the_bar(tmp_path, data) -> None:
    """The library reports through callables (the command draws the bar), and an evaluation's error names the
    step and the backbone."""
    seen: list[tuple[int, int]] = []
    notes: list[str] = []

    def evaluate(model):
        raise FacetoolError("x.bin: set 'x': embeddings contain NaN or infinite values")

    path = write_config(tmp_path / "c.toml", data, run={"steps": 3}, eval={"every": 2})
    trainer = Trainer(load_config(path), tmp_path / "out", evaluate=evaluate, progress=lambda d, t: seen.append((d, t)),
                      notify=notes.append)  # fmt: skip
    with pytest.raises(FacetoolError) as err:
        trainer.run()
    assert seen == [(0, 3), (1, 3), (2, 3)]
    warnings, notes = [n for n in notes if n.startswith("warning: ")], [n for n in notes if not n.startswith("warning")]
    assert all("masked_prob q = 0.25" in w for w in warnings)  # the shards hold few masks: said as a note too
    assert notes[0].startswith("training tinynet (classify) on 1 rank(s), cpu: 3 steps of 8 images")
    assert str(err.value) == "step 2: evaluating the tinynet backbone: x.bin: set 'x': embeddings contain NaN or " \
        "infinite values"  # fmt: skip


# -- a used output folder --------------------------------------------------------------------------------------
def test_fresh_run_into_a_used_folder_is_refused_and_overwrite_clears_it(tmp_path, data) -> None:
    """The old failure: a 6-step run, then a fresh 2-step run into its folder kept the old checkpoints (pruned its
    own), and --resume handed back the 6-step weights ("trained 0 steps", exit 0)."""
    path = write_config(tmp_path / "c.toml", data, run={"steps": 6, "checkpoint_every": 3})
    out = tmp_path / "out"
    assert train(str(path), "--output", str(out)).returncode == 0
    (out / "mine.txt").write_text("not the run's")
    line = error_line("train", str(path), "--output", str(out), "--set", "run.steps=2", "--quiet", env=ENV)
    assert line == (
        f"Error: {out}: holds a run (config.toml, checkpoints, logs, summary.json, backbone.pt); continue it with "
        "--resume, or delete it and start again with --overwrite"
    )
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000003", "step-00000006"]

    result = train(str(path), "--output", str(out), "--set", "run.steps=2", "--overwrite")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000002"]
    assert (out / "mine.txt").read_text() == "not the run's"  # only the run's outputs are deleted
    two = weights(out / "backbone.pt")
    assert train(str(path), "--output", str(out), "--set", "run.steps=2", "--resume").returncode == 0
    again = weights(out / "backbone.pt")
    assert all(torch.equal(two[k], again[k]) for k in two)
    assert json.loads((out / "summary.json").read_text())["steps"] == 2
    both = error_line("train", str(path), "--output", str(out), "--resume", "--overwrite", "--quiet", env=ENV)
    assert "resume continues the run in this folder and overwrite deletes it" in both


# -- resuming with another config ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "override, change",
    [
        ("run.seed=2", "run.seed 1 -> 2"),
        ("data.batch_size=4", "data.batch_size 8 -> 4"),
        ("optim.lr=0.1", "optim.lr 0.05 -> 0.1"),
        ("head.m=0.3", "head.m (unset) -> 0.3"),
        ("optim.name=adamw", "optim.name 'sgd' -> 'adamw'"),
        ("schedule.kind=constant", "schedule.kind 'cosine' -> 'constant'"),
        ("data.masked_prob=0.0", "data.masked_prob 0.25 -> 0.0"),
        ("optim.clip_grad=1.0", "optim.clip_grad 0.0 -> 1.0"),
    ],
)
def test_resume_refuses_a_changed_config_unless_allowed(finished, tmp_path, override, change) -> None:
    out = copy_run(finished, tmp_path)
    with pytest.raises(FacetoolError) as err:
        resume(finished[0], out, [override, "run.steps=6"])
    message = str(err.value)
    assert message.startswith(f"{out / 'checkpoints' / 'step-00000004'}: written with another config: {change}")
    assert "--allow-change" in message and "\n" not in message
    key = override.split("=")[0]
    trainer = resume(finished[0], out, [override, "run.steps=6"], allow_change=[key])
    assert trainer.step == 4


def test_resume_with_another_optimiser_is_one_line_or_a_fresh_state(finished, tmp_path) -> None:
    """sgd -> adamw crashed with KeyError: 'step' at the first step; now it is refused, or, allowed, starts the
    AdamW state afresh (and trains)."""
    path, out = finished[0], copy_run(finished, tmp_path)
    args = ["train", str(path), "--output", str(out), "--resume", "--set", "optim.name=adamw", "--set", "run.steps=5"]
    line = error_line(*args, "--quiet", env=ENV)
    assert "written with another config: optim.name 'sgd' -> 'adamw'" in line
    result = run_cli(*args, "--allow-change", "optim.name", env=ENV)
    assert result.returncode == 0, result.stderr
    assert "optim.name changed, so the optimiser state starts fresh" in result.stdout
    state = torch.load(out / "checkpoints/step-00000005/rank-00000.pt", weights_only=True)["optimizer"]
    assert {int(s["step"]) for s in state["state"].values()} == {1}  # one AdamW step since the resume


def test_resume_takes_an_allowed_hyperparameter(finished, tmp_path) -> None:
    """The optimiser's state comes from the checkpoint, its hyperparameters from the config."""
    trainer = resume(finished[0], copy_run(finished, tmp_path), ["optim.weight_decay=0.01"],
                     allow_change=["optim.*"])  # fmt: skip
    decays = {g["weight_decay"] for g in trainer.optimizer.param_groups}
    assert decays == {0.0, 0.01} and trainer.optimizer.state


def test_resume_lets_length_logging_and_evaluation_change(finished, tmp_path, data) -> None:
    notes: list[str] = []
    overrides = ["run.steps=8", "run.log_every=3", "run.checkpoint_every=5", f'eval.bins=["{data}/src/synth.bin"]']
    trainer = resume(finished[0], copy_run(finished, tmp_path), overrides, notify=notes.append)
    assert trainer.step == 4 and trainer.total == 8
    assert any(n.startswith("resuming with changed keys: eval.bins [] -> [") and "run.steps 4 -> 8" in n
               for n in notes)  # fmt: skip


def test_resume_past_the_end_of_a_shorter_run_is_refused(finished, tmp_path) -> None:
    with pytest.raises(FacetoolError, match=r"checkpoint of step 4, past this run's 2 steps \(run.steps or"):
        resume(finished[0], copy_run(finished, tmp_path), ["run.steps=2"])


def test_resume_without_a_checkpoint_checks_the_folders_config(finished, tmp_path) -> None:
    """A run stopped before its first checkpoint left its config.toml: --resume restarts it with the same config
    only, and drops the scalars it had logged."""
    out = copy_run(finished, tmp_path)
    shutil.rmtree(out / "checkpoints")
    with pytest.raises(FacetoolError, match=r"config.toml: written with another config: run.seed 1 -> 3"):
        resume(finished[0], out, ["run.seed=3"])
    trainer = resume(finished[0], out, [])
    assert trainer.step == 0 and (out / "logs" / "scalars.jsonl").read_text() == ""


@pytest.mark.parametrize(
    "pattern, message",
    [("optim", "expected table.key or table.*"), ("optim.lrr", "[optim] has no key 'lrr'"), ("nope.x", "expected")],
)
def test_allow_change_names_a_key(finished, tmp_path, pattern, message) -> None:
    with pytest.raises(FacetoolError, match=f"--allow-change {pattern}: .*{message}".replace("[", r"\[")):
        resume(finished[0], copy_run(finished, tmp_path), [], allow_change=[pattern])


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda s: s.pop("step"), "damaged training checkpoint (step is NoneType 'None', expected int)"),
        (lambda s: s.update(step="abc"), "damaged training checkpoint (step is str 'abc', expected int)"),
        (lambda s: s.update(history="x{"), "damaged training checkpoint (JSONDecodeError: Expecting value"),
        (lambda s: s.pop("rng"), "(rng is NoneType 'None', expected dict)"),
        (lambda s: s.update(head=5), "(head is int '5', expected dict)"),
        (lambda s: s.update(model=5), "(model is int '5', expected dict)"),
        (lambda s: s["rng"].update(torch=5), "damaged training checkpoint (TypeError: "),
        (lambda s: s["backbone"]["state_dict"].update({"linear.weight": torch.zeros(2)}), "(RuntimeError: "),
        (lambda s: s["loader"].update(batch=10**12), "(ValueError: a loader position of 1000000000000 batches"),
        (lambda s: s["loader"].update(world_size=10**12, batch=1), "batches on 1000000000000 ranks"),
        (lambda s: s["loader"].pop("before"), "(KeyError: "),
    ],
    ids=(
        "no-step step-str history no-rng head-int model-int rng-int backbone-shape loader-batch loader-ranks "
        "loader-keys"
    ).split(),
)
def test_a_damaged_training_checkpoint_is_one_line(finished, tmp_path, edit, message) -> None:
    out = copy_run(finished, tmp_path)
    rank0 = out / "checkpoints" / "step-00000004" / "rank-00000.pt"
    state = torch.load(rank0, weights_only=True)
    edit(state)
    torch.save(state, rank0)
    with pytest.raises(FacetoolError) as err:
        resume(finished[0], out, [])
    assert str(err.value).startswith(f"{rank0}: ") and message in str(err.value) and "\n" not in str(err.value)


def test_a_damaged_complete_marker_is_one_line(finished, tmp_path) -> None:
    out = copy_run(finished, tmp_path)
    (out / "checkpoints" / "step-00000004" / "COMPLETE").write_text("two\n")
    with pytest.raises(FacetoolError, match=r"COMPLETE: damaged \(expected the number of ranks, got 'two'\)"):
        resume(finished[0], out, [])


# -- sizes from files and huge integers ------------------------------------------------------------------------
def test_classes_of_a_manifest_are_bounded_by_its_samples(tmp_path, data) -> None:
    shards = tmp_path / "shards"
    shutil.copytree(data / "shards", shards)
    manifest = json.loads((shards / "manifest.json").read_text())
    manifest["source"]["classes"] = 10**12
    (shards / "manifest.json").write_text(json.dumps(manifest))
    path = write_config(tmp_path / "c.toml", data, data={"shards": str(shards)})
    line = error_line("train", str(path), "--output", str(tmp_path / "out"), "--quiet", env=ENV)
    assert str(shards / "manifest.json") in line and "1000000000000" in line and "classes" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data.source=synthetic", "data.synthetic_classes=1000000000000"], "for this rank's classifier"),
        (["model.embedding_size=1000000000"], "for the tinynet backbone"),
    ],
)
def test_sizes_out_of_reach_fail_before_any_allocation(tmp_path, data, overrides, message) -> None:
    path = write_config(tmp_path / "c.toml", data)
    with pytest.raises(FacetoolError, match=f"{path}: the parameters alone need .*{message}.*more than the"):
        Trainer(load_config(path, overrides), tmp_path / "out")


@pytest.mark.parametrize(
    "patch, message",
    [
        ({"run": {"seed": 2**70}}, f"run.seed is out of range (integers are 64-bit), got {2**70}"),
        ({"run": {"seed": -1}}, "run.seed must be in [0, 2**63), got -1"),
        ({"run": {"check_sync_every": -1}}, "run.check_sync_every must be >= 0"),
        ({"data": {"batch_size": 2**64}}, "data.batch_size is out of range"),
        ({"model": {"width": 2**70}}, "model.width is out of range"),
        ({"schedule": {"milestones": [1, 2**80]}}, "schedule.milestones is out of range"),
        ({"optim": {"clip_scope": "head"}}, "optim.clip_scope must be one of backbone, all, got 'head'"),
        ({"mae": {"decoder_heads": 0}}, "mae.decoder_dim and decoder_heads must be >= 1"),
        ({"mae": {"decoder_depth": 10**9}}, "mae.decoder_depth must be in 1..1000"),
        ({"mae": {"decoder_mlp_ratio": -1}}, "mae.decoder_mlp_ratio must be positive"),
    ],
)
def test_huge_and_negative_integers_are_config_errors(tmp_path, data, patch, message) -> None:
    path = write_config(tmp_path / "c.toml", data, **patch)
    with pytest.raises(FacetoolError) as err:
        load_config(path)
    assert str(err.value).startswith(f"{path}: ") and message in str(err.value)


def test_largest_seed_trains(tmp_path, data) -> None:
    """Every seed in [0, 2**63) seeds every generator (the class weights' and the sampler's wrap modulo 2**64)."""
    path = write_config(tmp_path / "c.toml", data, run={"seed": 2**63 - 1, "steps": 1})
    assert train(str(path), "--output", str(tmp_path / "out")).returncode == 0


@pytest.mark.parametrize(
    "text, message",
    [
        (b"[run]\nseed = 1\n\xff\xfe = 2\n", "not a UTF-8 text file (invalid start byte at byte 15)"),
        (b"[run]\nseed = 1 2\n", "not valid TOML (Expected newline or end of document after a statement"),
        (b"[run]\nseed = 1180591620717411303424\n", "run.seed is out of range"),
        (b'[model]\nname = "tinynet"\nwidth = -3\n', "[model] backbone 'tinynet': Trying to create tensor with"),
    ],
    ids=["not-utf8", "syntax", "seed-2**70", "negative-width"],
)
def test_damaged_config_files_are_one_line(tmp_path, data, text, message) -> None:
    path = tmp_path / "bad.toml"
    path.write_bytes(text)
    line = error_line("train", str(path), "--set", f"data.shards={data / 'shards'}", "--output",
                      str(tmp_path / "out"), "--quiet", env=ENV)  # fmt: skip
    assert line.startswith(f"Error: {path}: ") and message in line


# -- eval sets checked before the first step --------------------------------------------------------------------
def _bin(path: Path, images: list[bytes], issame: list[bool]) -> str:
    path.write_bytes(pickle.dumps((images, issame), protocol=2))
    return str(path)


@pytest.mark.parametrize("damage", ["undecodable", "one-pair"])
def test_a_bad_eval_set_fails_before_the_first_step(tmp_path, data, damage) -> None:
    from facetool.pipeline.verification_bin import load_bin

    good = load_bin(data / "src" / "synth.bin")
    if damage == "undecodable":
        images = list(good.images)
        images[7] = b"\xff\xd8 not a jpeg"
        bad = _bin(tmp_path / "bad.bin", images, list(good.issame))
        message = f"{bad}: set 'bad', image 7: cannot decode the image"
    else:
        bad = _bin(tmp_path / "bad.bin", list(good.images[:2]), [True])
        message = f"{bad}: set 'bad': 10-fold accuracy needs at least 10 pairs, got 1"
    path = write_config(tmp_path / "c.toml", data, eval={"bins": [str(data / "src" / "synth.bin"), bad]})
    line = error_line("train", str(path), "--output", str(tmp_path / "out"), "--quiet", env=ENV)
    assert line.startswith(f"Error: {message}")
    assert not (tmp_path / "out").exists()

"""A run's state in its checkpoints, and the exact resume from them: the backbone, the head's class-weight shard
(with its class sampler), the MAE decoder, optimiser, gradient scaler, step, RNG states and evaluation history.

The files themselves (one folder per step, one file per rank, committed atomically) are :mod:`.checkpoint`'s.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from facetool.pipeline.errors import FacetoolError
from facetool.train.data.remainder import normalise_cut
from facetool.train.engine import checkpoint as ckpt
from facetool.train.engine.clock import EpochClock
from facetool.train.engine.reshard import describe_ranks, recut_states
from facetool.train.engine.resume import check_resume_config
from facetool.train.engine.tomlwrite import to_toml
from facetool.train.models.checkpoint import backbone_payload

if TYPE_CHECKING:
    from facetool.train.engine.trainer import Trainer

TRAIN_FORMAT = "facetool-train"


def cpu_copy(value: Any) -> Any:
    """``value`` with every tensor in it (in dicts, at any depth) detached and copied to the CPU."""
    if torch.is_tensor(value):
        return value.detach().cpu().clone()
    if isinstance(value, dict):
        return {k: cpu_copy(v) for k, v in value.items()}
    return value


def module_state(module: nn.Module, skip: str | None = None) -> dict[str, Any]:
    """``module``'s state dict on the CPU (its extra state included), without the keys starting with ``skip``."""
    return {k: cpu_copy(v) for k, v in module.state_dict().items() if skip is None or not k.startswith(skip)}


def rng_states(device: torch.device) -> dict[str, Any]:
    """torch's, numpy's and Python's global RNG states, and the device's on a GPU."""
    rng: dict[str, Any] = {"torch": ckpt.rng_state(), **ckpt.numpy_state()}
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device).clone()
    return rng


def set_rng_states(rng: dict[str, Any], device: torch.device) -> None:
    """Put back what :func:`rng_states` saved."""
    torch.set_rng_state(rng["torch"])
    ckpt.set_numpy_state(rng)
    if "cuda" in rng and device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"], device)


def training_state(trainer: Trainer) -> dict[str, Any]:
    """What this rank writes into a checkpoint: everything an exact resume needs (rank 0's file also holds the
    backbone as ``save_backbone`` writes it; the other ranks keep only its state, the same on every rank)."""
    ctx = trainer.ctx
    epoch, batch = trainer.clock.at(trainer.step)
    state: dict[str, Any] = {
        "format": TRAIN_FORMAT,
        "version": 1,
        "step": trainer.step,
        "epoch": epoch,
        "batch_in_epoch": batch,
        "world_size": ctx.world_size,
        "rank": ctx.rank,
        "task": trainer.task,
        "model": {"name": trainer.name, "options": dict(trainer.options)},
        "optimizer": trainer.optimizer.state_dict(),
        "scaler": trainer.scaler.state_dict(),
        "rng": rng_states(ctx.device),
        "history": json.dumps(trainer.history),
        "config": to_toml(trainer.cfg),
        "loader": loader_cut(trainer.loader, epoch, batch, ctx.world_size),
    }
    if trainer.head is not None:
        state["head"] = module_state(trainer.head)  # its extra state holds the class sampler's generator
    if trainer.mae is not None:
        state["mae"] = module_state(trainer.mae, skip="encoder.")
    if ctx.main:
        state["backbone"] = backbone_payload(trainer.backbone, trainer.name, trainer.options)
    else:
        state["backbone_state"] = module_state(trainer.backbone)
    return state


def save_checkpoint(trainer: Trainer) -> Path:
    """Every rank writes its file, then rank 0 commits the step's folder (atomic rename) and prunes old ones."""
    ctx, root = trainer.ctx, trainer.ckpt_root
    ckpt.write_rank(root, trainer.step, ctx.rank, training_state(trainer))
    ctx.barrier()
    if ctx.main:
        ckpt.commit(root, trainer.step, ctx.world_size, trainer.cfg["run"]["keep_checkpoints"])
    ctx.barrier()
    return ckpt.step_dir(root, trainer.step)


def check_resume_backbone(state: dict[str, Any], name: str, options: dict[str, Any], path: Path) -> None:
    """A checkpoint resumes only the backbone (name and options) it was written for."""
    saved = state.get("model", {})
    if saved.get("name") != name or saved.get("options") != options:
        raise FacetoolError(
            f"{path}: checkpoint of backbone {saved.get('name')!r} {saved.get('options')}, the config trains "
            f"{name!r} {options}; resume with the config it was trained with"
        )


_STATE_TYPES: dict[str, type] = {"step": int, "task": str, "model": dict, "config": str, "optimizer": dict,
                                 "scaler": dict, "rng": dict, "history": str}  # fmt: skip


def check_state(state: Any, path: Path, task: str, main: bool) -> None:
    """The entries of a training checkpoint's ``state`` are of the types :func:`training_state` writes."""
    kinds = {**_STATE_TYPES, "head" if task == "classify" else "mae": dict}
    kinds["backbone" if main else "backbone_state"] = dict
    if not isinstance(state, dict):
        raise FacetoolError(f"{path}: damaged training checkpoint (not a dict)")
    for key, kind in kinds.items():
        value = state.get(key)
        if not isinstance(value, kind) or isinstance(value, bool) or (kind is int and value < 0):
            raise FacetoolError(f"{path}: damaged training checkpoint ({key} is {type(value).__name__} "
                                f"{str(value)[:40]!r}, expected {kind.__name__})")  # fmt: skip


def loader_cut(loader: Any, epoch: int, batch: int, world_size: int) -> dict[str, Any]:
    """Where the loader stands after ``batch`` batches of ``epoch``: what it says (the webdataset loader, which can
    continue on another layout), else the epoch, batch and number of ranks."""
    if hasattr(loader, "cut"):
        return loader.cut(epoch, batch)
    return {"backend": type(loader).__name__, "epoch": epoch, "batch": batch, "world_size": world_size}


def read_state(trainer: Trainer, folder: Path) -> tuple[dict[str, Any], int]:
    """This rank's state in the checkpoint ``folder`` (each file checked), and how many ranks wrote it: from
    another number of ranks, the state this rank would have written (:func:`.reshard.recut_states`)."""
    ctx = trainer.ctx

    def load(rank: int, mmap: bool = False) -> dict[str, Any]:
        state = ckpt.read_rank(folder, rank, mmap)
        check_state(state, ckpt.rank_file(folder, rank), trainer.task, rank == 0)
        return state

    written = ckpt.written_ranks(folder)
    if written == ctx.world_size:
        return load(ctx.rank), written
    classes = trainer.head.num_classes if trainer.head is not None else None
    try:
        # every old rank's file at once, mapped: only this rank's class rows are read and copied
        return recut_states(functools.partial(load, mmap=True), written, classes, ctx.rank, ctx.world_size), written
    except (KeyError, TypeError, ValueError) as err:
        raise FacetoolError(f"{folder}: the class shards of {written} ranks cannot be cut for {ctx.world_size} "
                            f"({type(err).__name__}: {str(err)[:200]})") from None  # fmt: skip


def restore(trainer: Trainer, folder: Path) -> None:
    """Load this rank's file of the checkpoint ``folder`` into ``trainer``: the run continues bitwise as if it
    had not stopped (on the same number of ranks; on another, the class shards are cut again and the loader
    reads the rest of the interrupted epoch). A damaged file is a one-line error naming it."""
    ctx = trainer.ctx
    state, written = read_state(trainer, folder)
    path = ckpt.rank_file(folder, ctx.rank if written == ctx.world_size else 0)
    try:
        restore_state(trainer, state, folder)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, RuntimeError) as err:
        reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
        raise FacetoolError(f"{path}: damaged training checkpoint ({type(err).__name__}: {reason})") from None
    if written != ctx.world_size:
        trainer.log(reshard_note(trainer, written))


def reshard_note(trainer: Trainer, written: int) -> str:
    """The log line of a resume on another number of ranks: what changed."""
    epoch, batch = trainer.clock.at(trainer.step)
    clock = trainer.clock
    left = (clock.length if clock.epoch == epoch and clock.length is not None else trainer.steps_per_epoch) - batch
    head = ""
    if trainer.head is not None:
        head = ("the class shards and their optimiser state re-cut to the new ranges, each rank's class sampler "
                "seeded again from the seed and its rank; ")  # fmt: skip
    return (f"resuming a {written}-rank checkpoint on "
            f"{describe_ranks(trainer.ctx.world_size)}: {head}epoch {epoch} continues with {left} batch(es) of "
            f"{trainer.global_batch} images over what it had not yet seen")  # fmt: skip


def restore_loader(trainer: Trainer, state: dict[str, Any], folder: Path) -> None:
    """Where the loader goes on: the checkpoint's loader state, given to a loader that can continue it (the
    webdataset and DALI loaders, on any layout); another loader continues on the same number of ranks, or at an
    epoch's start (the synthetic source: from the step)."""
    cut, step, written = normalise_cut(state.get("loader")), int(state["step"]), int(state["world_size"])
    clock = EpochClock(trainer.steps_per_epoch)
    if isinstance(cut, dict) and cut.get("backend") in ("wds", "dali") and hasattr(trainer.loader, "resume_epoch"):
        epoch, skip = trainer.loader.resume_epoch(cut)
        clock = EpochClock(trainer.steps_per_epoch, epoch, step - skip, trainer.loader.batches(epoch))
    elif written != trainer.ctx.world_size and trainer.cfg["data"]["source"] != "synthetic":
        epoch, batch = (cut["epoch"], cut["batch"] or cut.get("before")) if isinstance(cut, dict) else (
            state.get("epoch"), state.get("batch_in_epoch"))  # fmt: skip
        if batch:
            raise FacetoolError(
                f"{folder}: written in the middle of epoch {epoch} by {written} ranks, and this loader cannot tell "
                f"which of its samples were read: resume on {written} ranks"
            )
    trainer.clock = clock
    if not trainer.cfg["run"]["steps"]:
        trainer.total = clock.total(trainer.cfg["run"]["epochs"])


def restore_state(trainer: Trainer, state: dict[str, Any], folder: Path) -> None:
    """Put a checkpoint's ``state`` (this rank's) into ``trainer``, after checking its backbone and config."""
    ctx = trainer.ctx
    check_resume_backbone(state, trainer.name, trainer.options, folder)
    if state.get("task") != trainer.task:
        raise FacetoolError(f"{folder}: a {state.get('task')!r} checkpoint, the config's run.task is {trainer.task!r}")
    changes = check_resume_config(state.get("config"), trainer.cfg, trainer.allow_change, folder)
    trainer.note_changes(changes)
    restore_modules(trainer, state, folder)
    restore_optimizer(trainer, state["optimizer"], {key for key, _, _ in changes}, folder)
    if state["scaler"]:
        trainer.scaler.load_state_dict(state["scaler"])
    set_rng_states(state["rng"], ctx.device)
    trainer.step = int(state["step"])
    restore_loader(trainer, state, folder)
    trainer.history = json.loads(state["history"])
    if trainer.history and "sets" in trainer.history[-1]:
        trainer.verification = trainer.history[-1]["sets"]


def restore_optimizer(trainer: Trainer, saved: Any, changed: set[str], folder: Path) -> None:
    """The optimiser's state from a checkpoint, with the hyperparameters of the config (an allowed change of
    ``[optim]`` takes effect). Another optimiser (``optim.name`` changed), or groups that no longer match after
    an allowed ``[optim]`` change, start a fresh state, with a note; without such a change a state that does not
    fit is an error."""
    optimizer = trainer.optimizer
    if "optim.name" in changed:
        trainer.log(f"{folder}: optim.name changed, so the optimiser state starts fresh")
        return
    fresh = [{k: v for k, v in g.items() if k not in ("params", "lr")} for g in optimizer.param_groups]
    try:
        names = [g.get("names") for g in saved["param_groups"]]
        if names != [g.get("names") for g in optimizer.param_groups]:
            raise ValueError("its parameter groups hold other parameters")
        optimizer.load_state_dict(saved)
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        if not any(key.startswith("optim.") for key in changed):
            raise FacetoolError(f"{folder}: optimizer state does not fit [optim] of the config ({err})") from None
        trainer.log(f"{folder}: the optimiser state does not fit the changed [optim] ({err}); it starts fresh")
    for group, own in zip(optimizer.param_groups, fresh, strict=True):
        group.update(own)


def restore_modules(trainer: Trainer, state: dict[str, Any], folder: Path) -> None:
    """The backbone, the head (class weights and sampler) and the MAE decoder from a checkpoint's ``state``."""
    backbone = state["backbone"]["state_dict"] if "backbone" in state else state["backbone_state"]
    trainer.backbone.load_state_dict(backbone)
    if trainer.head is not None:
        head = dict(state["head"])
        if "_extra_state" not in head:  # written before the head carried its sampler: it was in the RNG states
            sampler = state["rng"].get("head_sampler")
            head["_extra_state"] = {} if sampler is None else {"sampler": sampler}
        try:
            trainer.head.load_state_dict(head)
        except (RuntimeError, KeyError) as err:
            raise FacetoolError(f"{folder}: head state does not fit [head] of the config ({err})") from None
    if trainer.mae is not None:
        trainer.mae.load_state_dict({**state["mae"], **{f"encoder.{k}": v for k, v in backbone.items()}})

"""Training configs: TOML recipes read with ``tomllib``, every key checked against one schema, ``--set`` overrides.

A config is a set of tables (``run``, ``data``, ``model``, ``head``, ``optim``, ``schedule``, ``eval``, ``mae``).
Each key has a type and a default; a key not in the schema, or a value of the wrong type, is an error naming the
key and the file. Tables that fill an object take their keys, types and defaults from it: ``[data]`` from
:class:`~facetool.train.data.LoaderConfig`'s fields, ``[schedule]`` from :class:`.optim.Schedule`'s and ``[mae]``
from :class:`.mae.MAE`'s options, beside the keys only the table has. ``model`` and ``head`` also take the options
of the chosen backbone or head (checked against its constructor when the run is built). The resolved config
(defaults filled in, overrides applied) is written beside the checkpoints as ``config.toml`` so a run can be
repeated from its output folder alone.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import math
import os
import tomllib
import typing
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from facetool.pipeline.errors import FacetoolError
from facetool.pipeline.shards.format import MANIFEST
from facetool.train.data import BACKENDS, DEVICES, LoaderConfig
from facetool.train.engine.mae import MAE
from facetool.train.engine.optim import NO_DECAY_KINDS, OPTIMIZERS, SCHEDULE_KINDS, Schedule
from facetool.train.engine.sync import CLIP_SCOPES

# Schema kinds of the annotated types an object's options may have (tuples are TOML arrays).
_KIND_OF_TYPE: dict[Any, Any] = {int: int, float: float, str: str, bool: bool, tuple[float, float]: "list[float]"}


def keys_of(source: type, skip: Iterable[str] = ()) -> dict[str, tuple[Any, Any]]:
    """Schema entries (kind, default) for the options of ``source``, a dataclass (its fields) or a class (its
    constructor's keyword parameters with defaults), but ``skip``: the object is the one source of the table's
    keys, types and defaults."""
    if dataclasses.is_dataclass(source):
        hints = typing.get_type_hints(source)
        found = [(f.name, f.default) for f in dataclasses.fields(source) if f.default is not dataclasses.MISSING]
    else:
        hints = typing.get_type_hints(source.__init__)
        params = inspect.signature(source).parameters.values()
        found = [(p.name, p.default) for p in params if p.default is not inspect.Parameter.empty]
    out = {}
    for name, default in found:
        if name not in skip:
            out[name] = (_KIND_OF_TYPE[hints[name]], list(default) if isinstance(default, tuple) else default)
    return out


# What the engine sets in the loader itself: the run's seed, full batches only (equal on every rank), and the
# 112x112 float32 images every backbone takes.
_LOADER = keys_of(LoaderConfig, skip=("seed", "last_batch", "image_size", "dtype"))
# Schedule fields the engine computes from the run: the peak lr, the length, warm-up and milestones in steps.
_SCHEDULE = keys_of(Schedule, skip=("peak", "total", "warmup", "milestones"))
LOADER_KEYS, SCHEDULE_KEYS = tuple(_LOADER), tuple(_SCHEDULE)

# key -> (type(s), default). Types: int, float (ints accepted), str, bool, "list[int]", "list[float]", "list[str]",
# "table" (a free table checked elsewhere). Open tables (model, head) accept further keys: the options of the
# backbone or head they name, checked against its signature when the run is built.
SCHEMA: dict[str, dict[str, tuple[Any, Any]]] = {
    "run": {
        "task": (str, "classify"),  # "classify" (margin head) or "mae" (FaceT masked-autoencoder pre-training)
        "seed": (int, 0),
        "seed_per_rank": (bool, False),  # true: rank r seeds torch with seed + r (drop path, MAE masks), as FaceT
        "epochs": (float, 1.0),  # training length in epochs of the shards (may be fractional) ...
        "steps": (int, 0),  # ... or in optimiser steps (> 0 wins over epochs)
        "device": (str, "auto"),  # auto | cpu | cuda
        "amp": (str, "none"),  # none | bf16 | fp16 (fp16 with a gradient scaler)
        "threads": (int, 0),  # torch intra-op threads per rank on the CPU; 0: the cores divided by the local ranks
        "log_every": (int, 10),  # steps between scalar logs
        "checkpoint_every": (int, 0),  # steps between checkpoints (0: only at the end)
        "keep_checkpoints": (int, 2),  # newest complete checkpoints kept (older ones are deleted)
        "init_from": (str, ""),  # a backbone, training or MAE checkpoint whose backbone weights start the run
        "init_arch": (str, ""),  # init_from is a bare state dict of this backbone (the run's model.name)
        "dist_backend": (str, "auto"),  # auto (nccl on GPUs, gloo on CPUs) | nccl | gloo
        "output": (str, ""),  # default output folder (the command's --output wins)
        "stop_on_nonfinite": (bool, True),  # a NaN or inf loss stops the run naming the step
        "check_sync_every": (int, 0),  # steps between checks that every rank holds the same backbone (0: off)
    },
    "data": {
        "shards": (str, ""),  # shard folder written by `facetool convert` (relative paths: to the config file)
        "source": (str, "shards"),  # shards | synthetic (random images, for the model-only step rate)
        "backend": (str, "auto"),  # auto | dali | wds
        "loader_device": (str, "auto"),  # auto | cpu | gpu (where DALI decodes)
        **_LOADER,  # batch_size (per rank), masked_prob (q), augmentations, threads...
        "synthetic_classes": (int, 1000),  # data.source = "synthetic": classes of the random labels
        "synthetic_samples": (int, 100000),  # ... and samples per epoch
    },
    "model": {
        "name": (str, "mobilefacenet"),
        "frozen_bn": (bool, False),  # BatchNorm layers use their running statistics (no batch statistics)
    },
    "head": {
        "name": (str, "arcface"),
    },
    "optim": {
        "name": (str, "sgd"),  # sgd | adamw
        "lr": (float, 0.1),  # base learning rate ...
        "lr_batch": (int, 0),  # ... scaled by global batch / lr_batch when > 0 (lr 1e-3 x batch/256: lr_batch 256)
        "momentum": (float, 0.9),
        "nesterov": (bool, False),
        "betas": ("list[float]", [0.9, 0.999]),
        "eps": (float, 1e-8),
        "weight_decay": (float, 5e-4),
        "head_weight_decay": (float, -1.0),  # the class weights' decay; < 0: weight_decay
        "no_decay": ("list[str]", ["norm", "bias", "model"]),  # groups without decay: optim.NO_DECAY_KINDS
        "weight_decay_by_name": ("table", {}),  # {"linear.weight" = 4e-4}: decay of backbone parameters by name
        "layer_decay": (float, 1.0),  # FaceT layer-wise lr decay: scale decay^(depth + 1 - layer id)
        "clip_grad": (float, 0.0),  # max gradient norm (0: no clipping) ...
        "clip_scope": (str, "backbone"),  # ... of the backbone (as upstream), or of all: backbone and head
    },
    "schedule": {
        **_SCHEDULE,  # kind, warmup_start, min_lr, power, gamma
        "warmup_epochs": (float, 0.0),
        "warmup_steps": (int, 0),  # > 0 wins over warmup_epochs
        "milestones": ("list[float]", []),  # step schedule: epochs at which lr is multiplied by gamma
    },
    "eval": {
        "bins": ("list[str]", []),  # verification .bin files (relative paths: to the config file)
        "every": (int, 0),  # steps between evaluations (0: only at the end)
        "batch_size": (int, 64),
        "protocol": (str, "insightface"),  # how the sets are scored: "insightface" (10 folds, flip) or "facet"
    },
    "mae": keys_of(MAE),  # mask_ratio, decoder_depth, decoder_dim, decoder_heads, decoder_mlp_ratio
}
OPEN_TABLES = ("model", "head")  # tables that take the backbone's or head's own options too
CHOICES = {
    ("run", "task"): ("classify", "mae"),
    ("eval", "protocol"): ("insightface", "facet"),  # the verification protocols (a test keeps them in step)
    ("run", "device"): ("auto", "cpu", "cuda"),
    ("run", "amp"): ("none", "bf16", "fp16"),
    ("run", "dist_backend"): ("auto", "nccl", "gloo"),
    ("data", "source"): ("shards", "synthetic"),
    ("data", "backend"): BACKENDS,
    ("data", "loader_device"): DEVICES,
    ("optim", "name"): OPTIMIZERS,
    ("optim", "clip_scope"): CLIP_SCOPES,
    ("schedule", "kind"): SCHEDULE_KINDS,
}
PATH_KEYS = (("data", "shards"), ("run", "init_from"))


class Config(dict):
    """The resolved config: ``cfg["optim"]["lr"]``; ``source`` is the file it came from (for error messages)."""

    source: str = "<config>"

    def section(self, name: str) -> dict[str, Any]:
        return self[name]


def defaults() -> dict[str, dict[str, Any]]:
    """Every table with its default values."""
    return {table: {k: copy.deepcopy(v[1]) for k, v in keys.items()} for table, keys in SCHEMA.items()}


_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false", "table": "a table",
               "list[int]": "a list of integers", "list[float]": "a list of numbers",
               "list[str]": "a list of strings"}  # fmt: skip
_BAD = object()  # what _convert returns for a value that is not of the kind
INT_RANGE = (-(2**63), 2**63 - 1)  # integers of a config are 64-bit


def _convert(kind: Any, value: Any, finite: bool = True) -> Any:
    """``value`` as a value of the schema ``kind`` (floats take ints; ``finite``: no inf or nan), or ``_BAD``."""
    if kind == "table":
        return value if isinstance(value, dict) else _BAD
    if isinstance(kind, str):  # "list[int]", "list[float]", "list[str]"
        inner = {"list[int]": int, "list[float]": float, "list[str]": str}[kind]
        items = [_convert(inner, v, finite=False) for v in value] if isinstance(value, list) else [_BAD]
        return _BAD if any(v is _BAD for v in items) else items
    if kind is bool or isinstance(value, bool):
        return value if kind is bool and isinstance(value, bool) else _BAD
    if kind is float and isinstance(value, int | float) and (math.isfinite(value) or not finite):
        return float(value)
    return value if kind in (int, str) and isinstance(value, kind) else _BAD


def check_int_range(table: str, key: str, value: Any, where: str) -> None:
    """Integers (alone or in a list) must be 64-bit: TOML's own limit, which ``tomllib`` does not enforce."""
    ints = [v for v in (value if isinstance(value, list) else [value]) if type(v) is int]
    if any(not INT_RANGE[0] <= v <= INT_RANGE[1] for v in ints):
        raise FacetoolError(f"{where}: {table}.{key} is out of range (integers are 64-bit), got {value!r}")


def check_value(table: str, key: str, value: Any, where: str) -> Any:
    """``value`` converted to the schema's type for ``table.key``; a FacetoolError naming both and ``where``."""
    kind = SCHEMA[table][key][0]
    check_int_range(table, key, value, where)
    converted = _convert(kind, value)
    if converted is _BAD:
        raise FacetoolError(f"{where}: {table}.{key} must be {_TYPE_NAMES[kind]}, got {value!r}")
    choices = CHOICES.get((table, key))
    if choices is not None and converted not in choices:
        raise FacetoolError(f"{where}: {table}.{key} must be one of {', '.join(choices)}, got {value!r}")
    return converted


def _close_keys(key: str, known: Iterable[str]) -> str:
    import difflib

    close = difflib.get_close_matches(key, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def merge(cfg: dict[str, dict[str, Any]], data: dict[str, Any], where: str) -> None:
    """Apply the tables of a parsed TOML document to ``cfg``, checking every key and value."""
    for table, body in data.items():
        if table not in SCHEMA:
            raise FacetoolError(
                f"{where}: unknown table [{table}]{_close_keys(table, SCHEMA)}; known: {', '.join(SCHEMA)}"
            )
        if not isinstance(body, dict):
            raise FacetoolError(f"{where}: {table} must be a table ([{table}]), got {body!r}")
        for key, value in body.items():
            if key in SCHEMA[table]:
                cfg[table][key] = check_value(table, key, value, where)
            elif table in OPEN_TABLES:
                if isinstance(value, dict):
                    raise FacetoolError(f"{where}: {table}.{key} must be a plain value, got a table")
                check_int_range(table, key, value, where)
                cfg[table][key] = value  # a backbone/head option: checked when the run is built
            else:
                raise FacetoolError(
                    f"{where}: unknown key {table}.{key}{_close_keys(key, SCHEMA[table])}; "
                    f"[{table}] takes {', '.join(SCHEMA[table])}"
                )


def parse_override(text: str) -> tuple[str, str, Any]:
    """``table.key=value`` -> (table, key, value); the value is read as TOML (``lr=0.1``, ``name="ir100"``), or
    as a bare string when it is not TOML (``model.name=ir100``)."""
    if "=" not in text:
        raise FacetoolError(f"--set {text!r}: expected table.key=value")
    name, raw = text.split("=", 1)
    name = name.strip()
    if name.count(".") != 1:
        raise FacetoolError(f"--set {text!r}: the key must be table.key, e.g. optim.lr=0.01")
    table, key = name.split(".")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return table, key, value


def load_config(path: str | os.PathLike, overrides: Iterable[str] = ()) -> Config:
    """Read ``path`` (TOML), check it against the schema, apply ``table.key=value`` overrides (checked the same
    way) and resolve relative paths against the config file's folder."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as err:
        raise FacetoolError(f"{path}: cannot read ({err.strerror or err})") from None
    except UnicodeDecodeError as err:
        raise FacetoolError(f"{path}: not a UTF-8 text file ({err.reason} at byte {err.start})") from None
    except tomllib.TOMLDecodeError as err:
        raise FacetoolError(f"{path}: not valid TOML ({err})") from None
    cfg = defaults()
    merge(cfg, data, str(path))
    _resolve_paths(cfg, path.resolve().parent)  # paths in the file: relative to the file
    for text in overrides:
        table, key, value = parse_override(text)
        merge(cfg, {table: {key: value}}, f"--set {text}")
        if (table, key) in PATH_KEYS or (table, key) == ("eval", "bins"):
            _resolve_paths(cfg, Path.cwd(), only=(table, key))  # paths on the command line: relative to here
    out = Config(cfg)
    out.source = str(path)
    validate(out)
    return out


def _resolve_paths(cfg: dict[str, dict[str, Any]], base: Path, only: tuple[str, str] | None = None) -> None:
    for table, key in (*PATH_KEYS, ("eval", "bins")):
        if only is not None and (table, key) != only:
            continue
        value = cfg[table][key]
        if isinstance(value, list):
            cfg[table][key] = [os.path.normpath(base / v) if not os.path.isabs(v) else v for v in value]
        elif value and not os.path.isabs(value):
            cfg[table][key] = os.path.normpath(base / value)


def validate(cfg: Config) -> None:
    """Checks across keys and ranges (types are checked on reading)."""
    where = cfg.source
    run, data, optim, sched = cfg["run"], cfg["data"], cfg["optim"], cfg["schedule"]

    def need(ok: bool, message: str) -> None:
        if not ok:
            raise FacetoolError(f"{where}: {message}")

    need(0 <= run["seed"] <= INT_RANGE[1], f"run.seed must be in [0, 2**63), got {run['seed']}")
    need(run["epochs"] > 0 or run["steps"] > 0, "run.epochs or run.steps must be positive")
    need(run["steps"] >= 0, "run.steps must be >= 0")
    need(run["log_every"] >= 1, "run.log_every must be >= 1")
    need(run["checkpoint_every"] >= 0, "run.checkpoint_every must be >= 0")
    need(run["keep_checkpoints"] >= 1, "run.keep_checkpoints must be >= 1")
    need(run["threads"] >= 0, "run.threads must be >= 0")
    need(run["check_sync_every"] >= 0, "run.check_sync_every must be >= 0")
    loader_config(cfg)  # the loader's own checks of its options, as data.KEY errors
    need(
        data["source"] == "synthetic" or bool(data["shards"]),
        "data.shards is required (a folder from `facetool convert`)",
    )
    need(data["synthetic_classes"] >= 1 and data["synthetic_samples"] >= 1, "data.synthetic_* must be >= 1")
    need(optim["lr"] > 0, "optim.lr must be positive")
    need(optim["lr_batch"] >= 0, "optim.lr_batch must be >= 0")
    need(
        len(optim["betas"]) == 2 and all(0 <= b < 1 for b in optim["betas"]),
        "optim.betas must be two numbers in [0, 1)",
    )
    need(optim["weight_decay"] >= 0, "optim.weight_decay must be >= 0")
    need(0 < optim["layer_decay"] <= 1, "optim.layer_decay must be in (0, 1]")
    need(optim["clip_grad"] >= 0, "optim.clip_grad must be >= 0")
    for kind in optim["no_decay"]:
        need(kind in NO_DECAY_KINDS, f"optim.no_decay: unknown kind {kind!r}; known: {', '.join(NO_DECAY_KINDS)}")
    for name, value in optim["weight_decay_by_name"].items():
        need(
            isinstance(value, int | float) and not isinstance(value, bool) and value >= 0,
            f"optim.weight_decay_by_name.{name} must be a number >= 0, got {value!r}",
        )
    need(sched["warmup_epochs"] >= 0 and sched["warmup_steps"] >= 0, "schedule warm-up must be >= 0")
    need(0 <= sched["warmup_start"] <= 1, "schedule.warmup_start must be in [0, 1]")
    need(sched["min_lr"] >= 0, "schedule.min_lr must be >= 0")
    need(sched["milestones"] == sorted(sched["milestones"]), "schedule.milestones must be increasing")
    need(sched["kind"] != "step" or bool(sched["milestones"]), "schedule.kind = 'step' needs schedule.milestones")
    _validate_eval_mae_paths(cfg, need)


def _validate_eval_mae_paths(cfg: Config, need: Callable[[bool, str], None]) -> None:
    """:func:`validate`'s checks of ``[eval]``, ``[mae]`` and of the files the config names."""
    run, data = cfg["run"], cfg["data"]
    need(cfg["eval"]["every"] >= 0 and cfg["eval"]["batch_size"] >= 1, "eval.every >= 0 and eval.batch_size >= 1")
    mae = cfg["mae"]
    need(0 < mae["mask_ratio"] < 1, "mae.mask_ratio must be in (0, 1)")
    need(1 <= mae["decoder_depth"] <= 1000, "mae.decoder_depth must be in 1..1000")  # FaceT-B's encoder: 12
    need(mae["decoder_dim"] >= 1 and mae["decoder_heads"] >= 1, "mae.decoder_dim and decoder_heads must be >= 1")
    need(mae["decoder_mlp_ratio"] > 0, "mae.decoder_mlp_ratio must be positive")
    need(mae["decoder_dim"] % mae["decoder_heads"] == 0, "mae.decoder_dim must be a multiple of mae.decoder_heads")
    for path in cfg["eval"]["bins"]:
        need(Path(path).is_file(), f"eval.bins: {path} does not exist")
    if data["source"] == "shards":
        need(Path(data["shards"]).is_dir(), f"data.shards: {data['shards']} is not a folder")
        need((Path(data["shards"]) / MANIFEST).is_file(), f"data.shards: {data['shards']} has no {MANIFEST}")
    if run["init_from"]:
        need(Path(run["init_from"]).is_file(), f"run.init_from: {run['init_from']} does not exist")
    need(not run["init_arch"] or bool(run["init_from"]), "run.init_arch names the architecture of run.init_from")


def loader_config(cfg: Config) -> LoaderConfig:
    """The loader options of the ``[data]`` table (with the run's seed; training drops the last partial batch); an
    option out of range is an error naming the key and the file."""
    data = cfg["data"]
    values = {k: tuple(data[k]) if isinstance(data[k], list) else data[k] for k in LOADER_KEYS}
    try:
        return LoaderConfig(seed=cfg["run"]["seed"], last_batch="drop", **values)
    except FacetoolError as err:  # "loader KEY must ...": the same option is data.KEY here
        message = str(err)
        message = "data." + message.removeprefix("loader ") if message.startswith("loader ") else message
        raise FacetoolError(f"{cfg.source}: {message}") from None


def backbone_options(cfg: Config) -> dict[str, Any]:
    """The ``[model]`` keys that go to the backbone constructor."""
    return {k: v for k, v in cfg["model"].items() if k not in SCHEMA["model"]}


def head_options(cfg: Config) -> dict[str, Any]:
    """The ``[head]`` keys that go to ``create_head``."""
    return {k: v for k, v in cfg["head"].items() if k not in SCHEMA["head"]}

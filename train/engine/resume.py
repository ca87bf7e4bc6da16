"""Reusing an output folder safely: a fresh run never mixes with the outputs of another, and ``--resume``
continues only a checkpoint written with this run's config.

A fresh run into a folder that holds a run's outputs (:data:`RUN_OUTPUTS`) is refused, unless ``overwrite`` asks
to delete them first. A resumed run compares its resolved config with the one stored in the checkpoint (every
checkpoint holds the resolved config it was written with: its fingerprint), key by key: a changed key that
changes what the run computes is refused with the list of changes, unless ``allow_change`` names it (``table.key``
or ``table.*``). The keys of :data:`UNCHECKED` may change freely: they govern the run's length (the schedule
follows the new length from the checkpoint on), its logs, checkpoints and evaluation, or resources that leave the
computation as it is.
"""

from __future__ import annotations

import shutil
import tomllib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from facetool.pipeline.errors import FacetoolError
from facetool.train.engine import checkpoint as ckpt
from facetool.train.engine.config import OPEN_TABLES, SCHEMA, Config

#: What a run writes into its output folder.
RUN_OUTPUTS = ("config.toml", "checkpoints", "logs", "summary.json", "backbone.pt")

#: Keys a resumed run may change without ``allow_change``.
UNCHECKED = (
    "run.steps",  # the length: extending a run (the schedule follows the new length from the checkpoint on)
    "run.epochs",
    "run.log_every",
    "run.checkpoint_every",
    "run.keep_checkpoints",
    "run.output",
    "run.threads",  # torch threads: a resource (0 already means "this machine's cores")
    "run.stop_on_nonfinite",
    "run.check_sync_every",
    "data.prefetch",  # DALI's buffering: the same batches
    "data.reader_prefetch",
    "data.tensor_init_bytes",
    "eval.*",
)


class _Unset:
    """A key a config does not set (an open table's option, say)."""

    def __repr__(self) -> str:
        return "(unset)"


_UNSET = _Unset()


def found_outputs(folder: Path) -> list[str]:
    """The names of :data:`RUN_OUTPUTS` present in ``folder``."""
    return [name for name in RUN_OUTPUTS if (folder / name).exists()]


def check_fresh_folder(folder: Path, overwrite: bool) -> None:
    """A fresh run may start in ``folder`` only when it holds no run, or when ``overwrite`` will clear it."""
    found = found_outputs(folder)
    if found and not overwrite:
        raise FacetoolError(
            f"{folder}: holds a run ({', '.join(found)}); continue it with --resume, or delete it and start again "
            "with --overwrite"
        )


def clear_run(folder: Path) -> None:
    """Delete the run's outputs in ``folder`` (:data:`RUN_OUTPUTS`), nothing else."""
    for name in RUN_OUTPUTS:
        path = folder / name
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()
        except OSError as err:
            raise FacetoolError(f"{path}: cannot delete ({err.strerror or err})") from None


def check_allow(patterns: Iterable[str]) -> tuple[str, ...]:
    """``allow_change`` patterns checked: ``table.key`` (a key of the schema, or any key of an open table) or
    ``table.*``."""
    out = []
    for pattern in patterns:
        table, _, key = pattern.partition(".")
        if table not in SCHEMA or not key:
            raise FacetoolError(f"--allow-change {pattern}: expected table.key or table.*, e.g. optim.lr")
        if key != "*" and key not in SCHEMA[table] and table not in OPEN_TABLES:
            raise FacetoolError(f"--allow-change {pattern}: [{table}] has no key {key!r}")
        out.append(pattern)
    return tuple(out)


def allowed(key: str, patterns: Sequence[str]) -> bool:
    """Whether ``key`` (``table.key``) matches one of ``patterns``."""
    table = key.split(".", 1)[0]
    return any(p == key or p == f"{table}.*" for p in patterns)


def config_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(table.key, saved value, current value)`` of every key whose value differs; a key on one side only (a key
    added to the schema since) counts as its default, or as unset where it has none."""
    changes = []
    for table in sorted(set(saved) | set(current)):
        old, new = saved.get(table, {}), current.get(table, {})
        if not isinstance(old, dict) or not isinstance(new, dict):
            changes.append((table, old, new))
            continue
        for key in sorted(set(old) | set(new)):
            default = SCHEMA.get(table, {}).get(key, (None, _UNSET))[1]
            a, b = old.get(key, default), new.get(key, default)
            if a != b or isinstance(a, bool) != isinstance(b, bool):
                changes.append((f"{table}.{key}", a, b))
    return changes


def describe(changes: Sequence[tuple[str, Any, Any]], limit: int = 8) -> str:
    """``optim.name 'sgd' -> 'adamw', optim.lr 0.1 -> 0.05`` (at most ``limit``, then how many more)."""
    shown = [f"{key} {old!r} -> {new!r}" for key, old, new in changes[:limit]]
    more = len(changes) - limit
    return ", ".join(shown) + (f" and {more} more" if more > 0 else "")


def check_resume_config(
    saved_toml: Any, cfg: Config, patterns: Sequence[str], where: Path
) -> list[tuple[str, Any, Any]]:
    """Compare the config a checkpoint (or the output folder's ``config.toml``) was written with, ``saved_toml``,
    with ``cfg``; refuse changed keys outside :data:`UNCHECKED` and ``patterns``. Returns every change."""
    if not isinstance(saved_toml, str):
        raise FacetoolError(f"{where}: holds no config to check the resumed run against")
    try:
        saved = tomllib.loads(saved_toml)
    except tomllib.TOMLDecodeError as err:
        raise FacetoolError(f"{where}: its config is not valid TOML ({err})") from None
    changes = config_changes(saved, cfg)
    refused = [c for c in changes if not allowed(c[0], UNCHECKED) and not allowed(c[0], patterns)]
    if refused:
        raise FacetoolError(
            f"{where}: written with another config: {describe(refused)}; resume with the config it was written "
            "with, or allow each change with --allow-change KEY"
        )
    return changes


def resume_point(
    output: Path, cfg: Config, resume: bool, overwrite: bool, patterns: Sequence[str]
) -> tuple[tuple[int, Path] | None, list[tuple[str, Any, Any]]]:
    """Whether ``output`` may take this run, and the checkpoint it continues: with ``resume`` the newest complete
    one (None: none, start from the beginning). Without a checkpoint, a resumed folder's ``config.toml`` (a run
    stopped before its first checkpoint) must match as a checkpoint's config would. Returns (checkpoint, the
    changes allowed against ``config.toml``); a checkpoint's own config is checked when it is restored."""
    if resume and overwrite:
        raise FacetoolError(f"{output}: resume continues the run in this folder and overwrite deletes it; give one")
    if not resume:
        check_fresh_folder(output, overwrite)
        return None, []
    found = ckpt.latest(output / "checkpoints")
    saved = output / "config.toml"
    if found is not None or not saved.exists():
        return found, []
    return None, check_resume_config(read_saved_config(saved), cfg, patterns, saved)


def read_saved_config(path: Path) -> str | None:
    """The text of an output folder's ``config.toml``, None when there is none."""
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as err:
        reason = err.strerror if isinstance(err, OSError) else "not UTF-8"
        raise FacetoolError(f"{path}: cannot read ({reason or err})") from None

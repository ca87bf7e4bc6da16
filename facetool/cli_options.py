"""Click options and output helpers shared by the commands."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click


def json_option(what: str = "result"):
    """``--json FILE``: the command's machine-readable output, written atomically."""
    return click.option(
        "--json",
        "json_path",
        type=click.Path(dir_okay=False, path_type=Path),
        help=f"Write the {what} as JSON.",
    )


def write_json(path: Path | None, obj: Any) -> None:
    """Write ``obj`` to ``path`` as JSON (temporary file, then rename) when a path was given."""
    if path is not None:
        from facetool.pipeline.atomic import write_json_atomic

        write_json_atomic(path, obj)


def progress_bar(desc: str, unit: str = "rec") -> tuple[Callable[[int, int], None], Callable[[], None]]:
    """A tqdm bar driven by the library's ``progress(done, total)``; returns (callback, close)."""
    from tqdm import tqdm

    bar = tqdm(desc=desc, unit=unit, unit_scale=True, dynamic_ncols=True, disable=None, smoothing=0.1)

    def update(done: int, total: int) -> None:
        if bar.total != total:
            bar.total = total
            bar.refresh()
        bar.update(done - bar.n)

    return update, bar.close


@contextlib.contextmanager
def progress_or_quiet(desc: str, unit: str, quiet: bool) -> Iterator[Callable[[int, int], None] | None]:
    """:func:`progress_bar` as a context manager that closes the bar; yields None (no bar) when ``quiet``."""
    if quiet:
        yield None
        return
    update, close = progress_bar(desc, unit)
    try:
        yield update
    finally:
        close()

"""Click options and output helpers shared by the commands."""

from __future__ import annotations

import contextlib
import io
import os
import re
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click

# nvImageCodec (DALI's decoder) logs straight to file descriptor 2, e.g. "[ERROR] [jpeg_parser] Invalid marker"
# (coloured on any stream), before DALI raises; the loader then reports the sample at fault in one line
CODEC_LOG = re.compile(rb"^(\x1b\[[0-9;]*m)?\[(FATAL|ERROR|WARNING|INFO|DEBUG|TRACE)\] (\x1b\[0m)?\[[A-Za-z0-9_]+\] ")


def convert_bench_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """The options every convert benchmark takes: ``--workers``, ``--samples-per-shard`` and ``--tmp-dir``."""
    from facetool.pipeline import DEFAULT_SAMPLES_PER_SHARD

    for option in reversed(
        [
            click.option("--workers", type=click.IntRange(min=1), default=2, show_default=True,
                         help="Convert processes."),
            click.option("--samples-per-shard", type=click.IntRange(min=1), default=DEFAULT_SAMPLES_PER_SHARD,
                         show_default=True, help="Samples per shard."),
            click.option("--tmp-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
                         help="Where to write (default: a temporary folder beside SRC, on the same disk)."),
        ]
    ):  # fmt: skip
        command = option(command)
    return command


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


@contextlib.contextmanager
def native_stderr_filter(drop: re.Pattern[bytes] = CODEC_LOG) -> Iterator[None]:
    """For the block, lines that native libraries write straight to file descriptor 2 pass through a thread that
    drops those matching ``drop``; Python's ``sys.stderr`` writes to the real stderr meanwhile (progress bars,
    errors). Where ``sys.stderr`` is not file descriptor 2 (a test runner's capture), nothing changes."""
    try:
        sys.stderr.flush()
        if sys.stderr.fileno() != 2:
            raise ValueError("sys.stderr is not file descriptor 2")
        real = os.dup(2)
    except (OSError, ValueError, AttributeError):
        yield
        return
    read, write = os.pipe()
    os.dup2(write, 2)
    os.close(write)
    python_stderr = sys.stderr
    sys.stderr = io.TextIOWrapper(
        os.fdopen(os.dup(real), "wb"), encoding="utf-8", errors="replace", line_buffering=True
    )
    forward = threading.Thread(target=_forward, args=(read, real, drop), name="stderr-filter", daemon=True)
    forward.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        sys.stderr.close()
        sys.stderr = python_stderr
        os.dup2(real, 2)  # closes the pipe's last writer here; forked workers may hold one a little longer
        forward.join(timeout=2.0)
        os.close(real)


def _forward(read: int, real: int, drop: re.Pattern[bytes]) -> None:
    with os.fdopen(read, "rb") as pipe:
        for line in pipe:
            if not drop.match(line):
                with contextlib.suppress(OSError):
                    os.write(real, line)

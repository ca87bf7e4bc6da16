"""Click options and output helpers shared by the commands."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click


def json_option(what: str = "result"):
    """``--json FILE``: the command's machine-readable output (DESIGN.md), written atomically."""
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

"""Pairs lists: one verification pair per line, ``path1 path2 label [mask1 mask2]`` (label 1 same, 0 different),
paths relative to a root folder. ``bench verification --pairs`` evaluates one (RMFVD's ``masked_pairs.txt``);
``facetool make-bin`` turns one into an InsightFace ``.bin``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from facetool.pipeline.errors import FacetoolError


@dataclass
class PairsList:
    """A parsed pairs list: the distinct images (paths relative to the root, each with its masked flag and the line
    that first names it), the pairs as indices into them, and the same/different labels."""

    names: list[str]
    flags: list[bool]
    lines: list[int]
    pairs: list[tuple[int, int]]
    issame: list[bool]


def read_text(path: str | os.PathLike) -> str:
    """A UTF-8 text file; an unreadable or non-UTF-8 file is a one-line error naming it."""
    try:
        return Path(path).read_bytes().decode("utf-8")
    except OSError as err:
        raise FacetoolError(f"{path}: cannot read ({err.strerror or err})") from None
    except UnicodeDecodeError as err:
        raise FacetoolError(f"{path}: not a UTF-8 text file ({err.reason} at byte {err.start})") from None


def parse_pairs_list(text: str, pairs_file: str | os.PathLike, root: str | os.PathLike | None = None) -> PairsList:
    """The lines ``path1 path2 label [mask1 mask2]`` of ``pairs_file`` (``text``); blank lines and ``#`` comments
    are skipped. Each image must be a file inside ``root`` (default: the list's folder) and is listed once, however
    many pairs use it. Without mask columns, RMFVD's naming decides the flag: a path containing ``unmasked`` is
    holistic, every other masked. Errors name the file and line."""
    pairs_file = Path(pairs_file)
    root = Path(root) if root is not None else pairs_file.parent
    root_resolved = root.resolve()
    index: dict[str, int] = {}
    out = PairsList([], [], [], [], [])
    for lineno, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        where = f"{pairs_file} line {lineno}"
        if len(fields) not in (3, 5):
            raise FacetoolError(f"{where}: expected 'path1 path2 label [mask1 mask2]', got {len(fields)} fields")
        if fields[2] not in ("0", "1") or any(f not in ("0", "1") for f in fields[3:]):
            raise FacetoolError(f"{where}: label and mask flags must be 0 or 1")
        ids = []
        for j, rel in enumerate(fields[:2]):
            flag = fields[3 + j] == "1" if len(fields) == 5 else "unmasked" not in rel.lower()
            if rel not in index:
                full = (root / rel).resolve()
                if not full.is_relative_to(root_resolved):
                    raise FacetoolError(f"{where}: image {rel!r} lies outside {root}")
                if not full.is_file():
                    raise FacetoolError(f"{where}: image {rel!r} not found in {root}")
                index[rel] = len(out.names)
                out.names.append(rel)
                out.flags.append(flag)
                out.lines.append(lineno)
            elif out.flags[index[rel]] != flag:
                raise FacetoolError(f"{where}: image {rel!r} is marked both masked and holistic")
            ids.append(index[rel])
        out.pairs.append((ids[0], ids[1]))
        out.issame.append(fields[2] == "1")
    if not out.pairs:
        raise FacetoolError(f"{pairs_file}: no pairs")
    return out


__all__ = ["PairsList", "parse_pairs_list", "read_text"]

"""The one-way import rule, read from the source with ``ast``: pipeline <- train <- bench <- the CLI.

``pipeline`` imports neither ``train`` nor ``bench``; ``train`` may import ``pipeline``; ``bench`` may import both;
none of them imports the command line (``facetool.cli*``), which may import everything. Imports inside functions
count too: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LIBRARY = {"pipeline": "facetool.pipeline", "train": "facetool.train", "bench": "facetool.bench"}
ALLOWED = {"pipeline": {"pipeline"}, "train": {"pipeline", "train"}, "bench": {"pipeline", "train", "bench"}}
MAX_LINES = 500
MAX_FUNCTION_LINES = 80


def module_name(path: Path) -> str:
    """The dotted name a file under pipeline/, train/, bench/ or facetool/ installs as."""
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    top = LIBRARY.get(parts[0], parts[0])
    return ".".join([top, *parts[1:]])


def imported_names(path: Path) -> list[tuple[int, str]]:
    """Every module ``path`` imports (absolute, relative imports resolved), with its line number."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.append((node.lineno, base))
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return found


def layer_of(module: str) -> str | None:
    """Which of pipeline / train / bench / cli a facetool module belongs to (None: not facetool's)."""
    parts = module.split(".")
    if parts[0] != "facetool" or len(parts) == 1:
        return None
    if parts[1] in LIBRARY:
        return parts[1]
    if parts[1].startswith("cli") or parts[1] == "__main__":
        return "cli"
    return None


def library_files() -> list[Path]:
    return sorted(p for folder in LIBRARY for p in (ROOT / folder).rglob("*.py"))


@pytest.mark.parametrize("path", library_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_run_one_way(path: Path) -> None:
    layer = path.relative_to(ROOT).parts[0]
    for line, module in imported_names(path):
        target = layer_of(module)
        if target is None:
            continue
        assert target in ALLOWED[layer], f"{path.relative_to(ROOT)}:{line}: {layer} must not import {module}"


@pytest.mark.parametrize(
    "source, layer",
    [
        ("def f():\n    from facetool.bench.verification import load_sets\n", "bench"),  # lazy import
        ("from ..cli import main\n", "cli"),  # a relative climb out of train/
        ("from .. import bench\n", "bench"),
        ("import facetool.cli_train\n", "cli"),
    ],
)
def test_the_checker_finds_violations(source: str, layer: str) -> None:
    probe = ROOT / "train" / "_probe_for_import_rule.py"
    try:
        probe.write_text(source)
        assert layer in {layer_of(m) for _, m in imported_names(probe)}
    finally:
        probe.unlink(missing_ok=True)


@pytest.mark.parametrize("folder", ["pipeline", "train", "bench", "facetool"])
def test_modules_stay_small(folder: str) -> None:
    sizes = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in (ROOT / folder).rglob("*.py")}
    assert not {k: n for k, n in sizes.items() if n > MAX_LINES}, f"modules over {MAX_LINES} lines"


@pytest.mark.parametrize("folder", ["pipeline", "train", "bench", "facetool"])
def test_functions_stay_short(folder: str) -> None:
    long = []
    for path in (ROOT / folder).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"

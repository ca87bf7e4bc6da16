"""The package layout: every folder of code is listed in setup.cfg, so `pip install .` ships all of it."""

import configparser
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOP = {"facetool": "facetool", "pipeline": "facetool.pipeline", "train": "facetool.train", "bench": "facetool.bench"}


def test_every_package_is_listed_in_setup_cfg():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    listed = {p.strip() for p in cfg["options"]["packages"].split() if p.strip()}
    found = set()
    for folder, name in TOP.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            found.add(".".join([name, *rel.parts]))
    assert found == listed


def test_cli_help_lists_commands():
    from click.testing import CliRunner

    from facetool.cli import main

    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    for command in ("synth", "convert", "merge-parts", "bench"):
        assert command in result.output


def test_tqdm_only_in_the_command_line():
    """The library reports progress through ``progress(done, total)`` callables; the bars are the CLI's."""
    import ast

    for folder in ("pipeline", "train", "bench"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
                names += [node.module or ""] if isinstance(node, ast.ImportFrom) else []
                assert not any(n.split(".")[0] == "tqdm" for n in names), f"{path} imports tqdm"


def _imports_run_at_import(tree):
    """The modules a file imports when it is imported: every import outside a function body."""
    import ast

    todo = list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            continue
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            yield node.module or ""
        todo.extend(ast.iter_child_nodes(node))


def test_dali_is_an_optional_extra_imported_only_where_it_is_used():
    """NVIDIA DALI has wheels for Linux x86_64 only: it is the `dali` extra, and no module imports it at import
    time, so that everything but the DALI loader works without it."""
    import ast

    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    assert "nvidia-dali" not in cfg["options"]["install_requires"]
    assert "nvidia-dali-cuda130" in cfg["options.extras_require"]["dali"]
    assert "nvidia-dali" not in cfg["options.extras_require"]["test"]  # the venv without DALI installs [test]
    for folder in TOP:
        for path in (ROOT / folder).rglob("*.py"):
            eager = [m for m in _imports_run_at_import(ast.parse(path.read_text())) if m.startswith("nvidia")]
            assert not eager, f"{path} imports {eager[0]} when it is imported"

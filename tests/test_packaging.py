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

"""The ``facetool`` command: parses options and calls the library; no logic of its own."""

import click

from facetool import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="facetool")
def main() -> None:
    """facetool: face-recognition training at scale."""


@main.group()
def bench() -> None:
    """Benchmarks: convert throughput (more arrive with each capability)."""

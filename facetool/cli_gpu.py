"""``facetool bench gpu``: every GPU figure in one run (``make gpu-check``). Heavy imports stay inside the command."""

from __future__ import annotations

from pathlib import Path

import click

from facetool.cli_options import json_option, write_json


@click.command("gpu")
@click.option(
    "--smoke",
    is_flag=True,
    help="The same code on the CPU at toy sizes, the parts that need CUDA skipped (what CI runs; a minute or two).",
)
@click.option(
    "--minutes",
    type=click.FloatRange(min=0.5),
    default=8.0,
    show_default=True,
    help="Time budget of the whole run; each part has its share, so a slow part cannot starve the others.",
)
@click.option(
    "--work-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where the shards (about 1.6 GB on a GPU run) and other files go, in a temporary folder removed at the "
    "end (default: the system's temporary folder).",
)
@json_option("report (every figure, each part's status and timings; rewritten after each part)")
def bench_gpu_command(smoke: bool, minutes: float, work_dir: Path | None, json_path: Path | None) -> None:
    """Measure every GPU figure in one run, each beside its reference from the same run: the DALI loader (mixed and
    CPU, with masks and without) against decode-only; bf16 training images/s of ir100, ir50, mobilefacenet and
    facet_base with the loader and model-only, channels-last, torch.compile and MFU; Partial FC over 2M classes at
    r = 0.1 and 1.0; verification embedding images/s; a one-rank NCCL group; and device-handling checks.

    \b
      facetool bench gpu --json gpu-report.json       # on one GPU, under 8 minutes
      facetool bench gpu --smoke --json smoke.json    # on the CPU, toy sizes

    A part that fails is reported and the run goes on; each job runs in a fresh process within its time share.
    """
    from facetool.bench.gpu import run_gpu_bench, summary_lines

    result = run_gpu_bench(
        smoke=smoke,
        minutes=minutes,
        work_dir=work_dir,
        notify=click.echo,
        on_part=lambda report: write_json(json_path, report),
    )
    click.echo("")
    for line in summary_lines(result):
        click.echo(line)
    write_json(json_path, result)

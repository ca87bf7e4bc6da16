"""``facetool bench loader``: training-loader throughput (DALI GPU/CPU, webdataset fallback, .rec baseline, decode
limit), one table with ratios. Heavy imports stay inside the command."""

from __future__ import annotations

from pathlib import Path

import click

from facetool.cli_options import json_option, write_json


def _fmt_ratio(value: float | None) -> str:
    return f"{value:.2f}x" if value is not None else "-"


def _name(row: dict) -> str:
    return row["loader"] + (f" ({row['decoder']})" if "decoder" in row else "")


def _cpu(row: dict) -> str:
    return f"{row['cpu_us_per_image']:.0f}" if row.get("cpu_us_per_image") is not None else "-"


@click.command("loader")
@click.argument("shards", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--loader",
    "which",
    type=click.Choice(["dali", "wds", "rec", "decode", "all"]),
    default="all",
    show_default=True,
    help="Contender: dali (the DALI loader, and its pipeline cut after the decoder: the decode stage), wds (the "
    "webdataset fallback), rec (the InsightFace baseline: a torch DataLoader over the source .rec), decode (the "
    "decode-only limit), or all of them.",
)
@click.option(
    "--device",
    type=click.Choice(["auto", "cpu", "gpu"]),
    default="auto",
    show_default=True,
    help="Where DALI decodes and where every loader delivers its batches; auto: DALI on the GPU when torch sees "
    "one, and on the CPU too.",
)
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True, help="Images per batch.")
@click.option(
    "--batches", type=click.IntRange(min=1), default=100, show_default=True, help="Timed batches per contender."
)
@click.option(
    "--warmup",
    type=click.IntRange(min=0),
    default=10,
    show_default=True,
    help="Batches drawn before the clock starts (pipeline start-up, shuffle buffer fill, worker start).",
)
@click.option(
    "--rec",
    type=click.Path(exists=True, path_type=Path),
    default=None,
    help="Source of the rec baseline: a folder with train.rec/train.idx or a .rec (default: the manifest's source).",
)
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=None,
    help="DALI threads, DataLoader workers and decode processes (default: DALI as the loader chooses, i.e. the "
    "cores plus one on the CPU; all cores for the others).",
)
@click.option(
    "--repeats",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Runs of each contender, interleaved; the fastest is reported (all are in the JSON).",
)
@json_option()
def bench_loader_command(
    shards: Path,
    which: str,
    device: str,
    batch_size: int,
    batches: int,
    warmup: int,
    rec: Path | None,
    threads: int | None,
    repeats: int,
    json_path: Path | None,
) -> None:
    """Images/s of the training loaders over the shard folder SHARDS, after warm-up, over a fixed number of
    batches; every contender runs in its own process, in the same run, and the table gives each one's ratio to the
    InsightFace .rec baseline and to the decode-only limit. All loaders flip (p=0.5), normalise to float32 NCHW
    and batch; the decode limit only decodes the same JPEGs, on all cores."""
    import torch

    from facetool.bench.loader import LOADERS, run_loader_benchmark

    has_gpu = torch.cuda.is_available()
    if device == "gpu" and not has_gpu:
        raise click.ClickException("--device gpu: torch sees no CUDA device here")
    devices = ("gpu", "cpu") if device == "auto" and has_gpu else ("cpu",) if device == "auto" else (device,)
    loaders = LOADERS if which == "all" else (which,)

    click.echo(f"measuring: {batches} batches of {batch_size} after {warmup} warm-up, each loader in its own process")
    click.echo(f"{'loader':28}{'device':8}{'images/s':>12}{'CPU us/image':>14}")

    def show(row: dict) -> None:
        click.echo(f"{_name(row):28}{row['device']:8}{row['images_per_s']:>12,.0f}{_cpu(row):>14}")

    result = run_loader_benchmark(
        shards,
        loaders=loaders,
        devices=devices,
        batch_size=batch_size,
        batches=batches,
        warmup=warmup,
        threads=threads,
        rec=rec,
        repeats=repeats,
        report=show,
    )
    click.echo("")
    click.echo(
        f"{'loader':28}{'device':8}{'images/s':>12}{'CPU us/image':>14}{'x rec baseline':>16}{'x decode limit':>16}"
    )
    for row in result["results"]:
        click.echo(
            f"{_name(row):28}{row['device']:8}{row['images_per_s']:>12,.0f}{_cpu(row):>14}"
            f"{_fmt_ratio(row['ratio_to_rec']):>16}{_fmt_ratio(row['ratio_to_decode_limit']):>16}"
        )
    click.echo(f"({result['samples']:,} samples, {result['cores']} cores, best of {repeats})")
    for name, why in result.get("skipped", {}).items():
        click.echo(f"not measured: {name} ({why})")
    write_json(json_path, result)

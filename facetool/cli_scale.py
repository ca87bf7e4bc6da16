"""``facetool bench make-rec`` and ``facetool bench convert-memory``: convert at scale (millions of records)."""

from __future__ import annotations

from pathlib import Path

import click

from facetool.cli_options import convert_bench_options, json_option, progress_or_quiet, write_json


@click.command("make-rec")
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--records", type=click.IntRange(min=1), required=True, help="Image records.")
@click.option("--identities", type=click.IntRange(min=1), required=True, help="Classes (at most --records).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def make_rec_command(out: Path, records: int, identities: int, quiet: bool) -> None:
    """Write a layout-A dataset (train.rec, train.idx, property) of one tiny JPEG repeated, in seconds.

    \b
      facetool bench make-rec /tmp/rec5m --records 5000000 --identities 1000000   # ~2 GB, ~15 s
    """
    from facetool.bench.make_rec import make_rec

    with progress_or_quiet("make-rec", "rec", quiet) as progress:
        result = make_rec(out, records, identities, progress=progress)
    click.echo(f"make-rec: {result['records']} images, {result['identities']} identities, {result['rec_bytes']} bytes")


@click.command("convert-memory")
@click.argument("src", type=click.Path(exists=True, path_type=Path))
@convert_bench_options
@json_option()
def bench_convert_memory_command(
    src: Path, workers: int, samples_per_shard: int, tmp_dir: Path | None, json_path: Path | None
) -> None:
    """One `facetool convert` of SRC: seconds, records/s and the peak anonymous memory of each process."""
    from facetool.bench.convert import run_convert_memory

    r = run_convert_memory(src, workers=workers, samples_per_shard=samples_per_shard, tmp_dir=tmp_dir)
    mb = 1e6
    click.echo(
        f"convert: {r['records']:,} records in {r['seconds']:.2f} s, {r['records_per_s']:,.0f} records/s; "
        f"{r['cpu_seconds']:.2f} CPU s, {r['records_per_cpu_s']:,.0f} records per CPU second"
    )
    workers_mb = ", ".join(f"{v / mb:.0f}" for v in r["worker_rss_anon"]) or "none"
    click.echo(
        f"peak RssAnon MB: parent {r['parent_rss_anon'] / mb:.0f} (before {r['parent_rss_anon_before'] / mb:.0f}),"
        f" workers {workers_mb}; peak Pss_Anon of all: {r['tree_pss_anon'] / mb:.0f} MB "
        f"({r['tree_pss_anon_per_record']:.1f} bytes a record)"
    )
    write_json(json_path, r)

"""The ``facetool`` command: parses options and calls the library; no logic of its own.

Library errors (:class:`FacetoolError`, and OS errors such as a full disk) become a one-line message and exit
status 1, never a traceback. Heavy imports happen inside the commands, so ``facetool --help`` stays fast.
"""

from __future__ import annotations

import os
from pathlib import Path

import click

from facetool import __version__
from facetool.cli_gpu import bench_gpu_command
from facetool.cli_ijb import align_command, bench_ijb_command, synth_ijb_command
from facetool.cli_loader import bench_loader_command
from facetool.cli_masks import WEIGHTS_HELP, bench_masks_command, masks_group, parse_weights_option
from facetool.cli_models import bench_models_command, export_command, import_model_command
from facetool.cli_options import convert_bench_options, json_option, progress_bar, write_json
from facetool.cli_scale import bench_convert_memory_command, make_rec_command
from facetool.cli_train import bench_train_command, train_command
from facetool.cli_verification import bench_verification_command, make_bin_command
from facetool.pipeline import DEFAULT_SAMPLES_PER_SHARD
from facetool.pipeline.errors import FacetoolError


class _Group(click.Group):
    """A click group that turns library errors into one clean line."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except FacetoolError as err:
            raise click.ClickException(str(err)) from None
        except OSError as err:
            where = f"{err.filename}: " if err.filename else ""
            raise click.ClickException(f"{where}{err.strerror or err}") from None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="facetool")
def main() -> None:
    """facetool: face-recognition training at scale.

    \b
    Typical flow:
      facetool synth data/                  # or use an InsightFace dataset folder
      facetool convert data/ shards/        # RecordIO -> WebDataset shards
      facetool bench convert data/          # convert speed against a plain copy
      facetool masks preview masks.png      # what the synthetic masks look like
    """


def _parse_part(value: str) -> tuple[int, int]:
    try:
        i, n = (int(v) for v in value.split("/"))
    except ValueError:
        raise click.BadParameter(f"expected I/N such as 0/8, got {value!r}") from None
    if not (n >= 1 and 0 <= i < n):
        raise click.BadParameter(f"need 0 <= I < N, got {value!r}")
    return i, n


# ---------------------------------------------------------------------------------------------------------------
@main.command()
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--identities", type=click.IntRange(min=1), default=200, show_default=True, help="Training identities (classes)."
)
@click.option(
    "--images-per-identity",
    type=click.IntRange(min=1),
    default=40,
    show_default=True,
    help="Images drawn per training identity.",
)
@click.option(
    "--pairs",
    type=click.IntRange(min=2),
    default=1000,
    show_default=True,
    help="Pairs in the held-out verification set synth.bin.",
)
@click.option("--seed", default=0, show_default=True, help="Seed: the same seed gives byte-identical files.")
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=os.cpu_count() or 1,
    show_default="all cores",
    help="Drawing processes.",
)
@click.option("--quiet", is_flag=True, help="No progress bar.")
def synth(
    out: Path, identities: int, images_per_identity: int, pairs: int, seed: int, workers: int, quiet: bool
) -> None:
    """Draw a synthetic face dataset into OUT: train.rec/train.idx/property (InsightFace layout A) plus a
    verification set synth.bin of held-out identities. It is the built-in dataset of `make demo` and the tests."""
    from facetool.pipeline.synth import write_synth

    progress, close = progress_bar("synth", unit="img") if not quiet else (None, lambda: None)
    try:
        summary = write_synth(
            out,
            identities=identities,
            images_per_identity=images_per_identity,
            pairs=pairs,
            seed=seed,
            workers=workers,
            progress=progress,
        )
    finally:
        close()
    click.echo(
        f"synth: {summary['records']} images of {summary['identities']} identities and {summary['pairs']} "
        f"verification pairs in {out} ({summary['seconds']:.1f} s)"
    )


# ---------------------------------------------------------------------------------------------------------------
@main.command()
@click.argument("src", type=click.Path(exists=True, path_type=Path))
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--samples-per-shard",
    type=click.IntRange(min=1),
    default=DEFAULT_SAMPLES_PER_SHARD,
    show_default=True,
    help="Samples per tar shard; the default gives ~250 MB shards of 112x112 JPEGs.",
)
@click.option(
    "--workers", type=click.IntRange(min=1), default=1, show_default=True, help="Processes writing shards in parallel."
)
@click.option("--seed", default=0, show_default=True, help="Seed of the global shuffle (and of the masked twins).")
@click.option(
    "--no-shuffle", is_flag=True, help="Keep the source's record order (InsightFace files are sorted by identity)."
)
@click.option(
    "--part",
    default="0/1",
    show_default=True,
    help="Write only job I of N (contiguous blocks of shards), for a cluster job array; "
    "then `facetool merge-parts OUT`.",
)
@click.option(
    "--on-error",
    type=click.Choice(["fail", "skip"]),
    default="fail",
    show_default=True,
    help="On a corrupt record or image file: stop with an error naming it, or skip it and list it in the manifest.",
)
@click.option("--no-index", is_flag=True, help="No train.idx: scan train.rec sequentially to find the records.")
@click.option(
    "--image-size",
    type=click.IntRange(min=1),
    default=None,
    help="Image folders and lists: the faces' width and height (default 112); another size is an error.",
)
@click.option(
    "--root",
    type=click.Path(exists=True, file_okay=False),
    default=None,
    help="List files: the folder the listed paths are relative to (default: the list's folder).",
)
@click.option(
    "--mask-fraction",
    type=click.FloatRange(0.0, 1.0),
    default=0.0,
    show_default=True,
    help="Share of samples that also get a masked twin (member mask.jpg, same size as the image), chosen per "
    "record by a hash of (--seed, key); rendered on the workers' CPUs.",
)
@click.option("--mask-weights", default=None, help=WEIGHTS_HELP)
@click.option("--quiet", is_flag=True, help="No progress bar.")
def convert(
    src: Path,
    out: Path,
    samples_per_shard: int,
    workers: int,
    seed: int,
    no_shuffle: bool,
    part: str,
    on_error: str,
    no_index: bool,
    image_size: int | None,
    root: str | None,
    mask_fraction: float,
    mask_weights: str | None,
    quiet: bool,
) -> None:
    """Convert a dataset SRC into WebDataset tar shards in OUT, each with a DALI index, plus manifest.json (format:
    docs/FORMAT.md). SRC is an InsightFace RecordIO set (a folder with train.rec, train.idx, property; or a .rec
    file), an image folder SRC/<identity>/<image>.jpg|png, or a list file of 'relative/path label' lines; for
    the last two, labels.json beside the manifest maps each identity to its label.

    Image bytes pass through untouched; labels are stored as 4-byte int32; --mask-fraction adds masked twins.
    Interrupted? Run the same command again: finished shards are kept and the result is byte-identical to an
    uninterrupted run."""
    from facetool.pipeline.shards import ConvertOptions
    from facetool.pipeline.shards import convert as run_convert

    options = ConvertOptions(
        samples_per_shard=samples_per_shard,
        seed=seed,
        shuffle=not no_shuffle,
        on_error=on_error,
        part=_parse_part(part),
        workers=workers,
        use_index=not no_index,
        mask_fraction=mask_fraction,
        mask_weights=parse_weights_option(mask_weights),
        image_size=image_size,
        root=root,
    )
    update, close = progress_bar("convert") if not quiet else (None, lambda: None)
    try:
        manifest = run_convert(src, out, options, progress=update)
    finally:
        close()
    name = "manifest.json" if options.part == (0, 1) else f"part {options.part[0]}/{options.part[1]} manifest"
    click.echo(
        f"convert: {manifest['samples']} samples ({manifest['masked']} with a masked twin) in "
        f"{len(manifest['shards'])} shards, {manifest['skipped']} skipped; {name} in {out}"
    )
    if manifest["skipped"]:
        for s in manifest["skipped_records"][:10]:
            click.echo(f"  skipped: {s['error']}", err=True)


@main.command("merge-parts")
@click.argument("out", type=click.Path(exists=True, file_okay=False, path_type=Path))
def merge_parts(out: Path) -> None:
    """Merge the part manifests that `facetool convert --part I/N` jobs wrote into OUT into one manifest.json."""
    from facetool.pipeline.shards import merge_parts as run_merge

    manifest = run_merge(out)
    click.echo(f"merge-parts: {manifest['samples']} samples in {len(manifest['shards'])} shards -> {out}/manifest.json")


@main.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
def inspect(paths: tuple[Path, ...]) -> None:
    """Describe datasets: a verification .bin (pairs, positives, image format), an InsightFace folder or .rec
    (layout, images, classes) or a shard folder (samples, shards, masked). Reads .bin files with the safe loader."""
    from facetool.pipeline.recordio import RecordFile, image_extension
    from facetool.pipeline.shards import Source, read_manifest
    from facetool.pipeline.verification_bin import load_bin

    for path in paths:
        if path.suffix == ".bin":
            vs = load_bin(path)
            kinds = sorted({image_extension(b) or "unknown" for b in vs.images})
            click.echo(
                f"{path}: verification set {vs.name!r}: {vs.num_pairs} pairs ({int(vs.issame.sum())} same), "
                f"{len(vs.images)} images ({', '.join(kinds)})"
            )
        elif (path / "manifest.json").is_file():
            m = read_manifest(path)
            click.echo(
                f"{path}: shards v{m['format_version']}: {m['samples']} samples in {len(m['shards'])} shards, "
                f"{m['masked']} masked, {m['skipped']} skipped; source layout {m['source']['layout']}, "
                f"{m['source']['classes']} classes"
            )
        else:
            source = Source.locate(path, use_index=(path / "train.idx").is_file() or path.suffix == ".rec")
            with RecordFile(source.rec, source.idx) as rf:
                click.echo(
                    f"{source.rec}: RecordIO layout {rf.layout}: {len(rf)} image records"
                    + (f", {rf.num_identities} identity records" if rf.num_identities is not None else "")
                )


# ---------------------------------------------------------------------------------------------------------------
@main.group(cls=_Group)
def bench() -> None:
    """Benchmarks; each prints a table and can write JSON (--json F)."""


@bench.command("convert")
@click.argument("src", type=click.Path(exists=True, path_type=Path))
@convert_bench_options
@click.option(
    "--repeats",
    type=click.IntRange(min=1),
    default=3,
    show_default=True,
    help="Runs of each contender; the fastest is reported.",
)
@json_option()
def bench_convert(
    src: Path, workers: int, samples_per_shard: int, tmp_dir: Path | None, repeats: int, json_path: Path | None
) -> None:
    """Records/s of `facetool convert` on SRC against, in the same run, a plain copy of the same bytes."""
    from facetool.bench.convert import run_convert_benchmark

    result = run_convert_benchmark(
        src, workers=workers, samples_per_shard=samples_per_shard, tmp_dir=tmp_dir, repeats=repeats
    )
    click.echo(f"{'':24}{'seconds':>10}{'records/s':>14}{'MB/s':>10}")
    click.echo(
        f"{'plain copy':24}{result['copy_seconds']:>10.2f}{result['copy_records_per_s']:>14,.0f}"
        f"{result['copy_mb_per_s']:>10.0f}"
    )
    click.echo(
        f"{'convert (' + str(workers) + ' workers)':24}{result['seconds']:>10.2f}{result['records_per_s']:>14,.0f}"
        f"{result['mb_per_s']:>10.0f}"
    )
    click.echo(
        f"ratio convert / copy: {result['ratio_to_copy']:.2f} (fastest runs), {result['median_ratio_to_copy']:.2f} "
        f"(medians of {repeats})  ({result['records']:,} records)"
    )
    write_json(json_path, result)


main.add_command(export_command)
main.add_command(import_model_command)
main.add_command(make_bin_command)
main.add_command(train_command)
main.add_command(masks_group)
bench.add_command(bench_models_command)
bench.add_command(bench_masks_command)
bench.add_command(bench_loader_command)
bench.add_command(bench_verification_command)
bench.add_command(bench_train_command)
bench.add_command(bench_ijb_command)
bench.add_command(bench_gpu_command)
bench.add_command(make_rec_command)
bench.add_command(bench_convert_memory_command)
main.add_command(align_command)
main.add_command(synth_ijb_command)

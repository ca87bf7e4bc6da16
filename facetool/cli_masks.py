"""Commands about synthetic masks: ``facetool masks bin|preview`` and ``facetool bench masks``."""

from __future__ import annotations

from pathlib import Path

import click

from facetool.cli_options import json_option, write_json

WEIGHTS_HELP = (
    "Share of each mask kind, KIND=WEIGHT pairs separated by commas (kinds: surgical, kn95, n95, cloth; "
    "missing kinds get 0; normalised). Default: surgical=0.5,kn95=0.2,n95=0.15,cloth=0.15."
)


def parse_weights_option(value: str | None) -> tuple[tuple[str, float], ...] | None:
    """``--mask-weights`` as (kind, probability) pairs, or None for the defaults; a bad value is the library's
    one-line error."""
    if value is None:
        return None
    from facetool.pipeline.masks import parse_weights

    return tuple(parse_weights(value).items())


@click.group("masks")
def masks_group() -> None:
    """Synthetic face masks (no landmark detector, no downloaded weights): masked verification sets and a
    preview sheet. `facetool convert --mask-fraction P` puts masked twins into shards."""


@masks_group.command("bin")
@click.argument("src", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--mode",
    type=click.Choice(["one", "both"]),
    default="one",
    show_default=True,
    help="one: mask the second image of every pair (SMFRD-style masked vs holistic); both: mask every image.",
)
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Same seed, same bytes.")
@click.option("--mask-weights", "weights", default=None, help=WEIGHTS_HELP)
@click.option("--quiet", is_flag=True, help="No progress bar.")
def masks_bin(src: Path, out: Path, mode: str, seed: int, weights: str | None, quiet: bool) -> None:
    """Write a masked copy of the InsightFace verification set SRC (.bin) to OUT (.bin), pairs and labels
    unchanged. SRC is read with the restricted unpickler: a .bin that would run code is refused."""
    from tqdm import tqdm

    from facetool.pipeline.masks import mask_bin

    pairs = parse_weights_option(weights)
    bar = tqdm(desc="masks", unit="img", disable=quiet or None)

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    try:
        summary = mask_bin(src, out, mode, seed, weights=dict(pairs) if pairs else None, progress=progress)
    finally:
        bar.close()
    click.echo(
        f"masks bin: {summary['masked']} of {summary['images']} images masked ({summary['pairs']} pairs, "
        f"mode {mode}) -> {out}"
    )


@masks_group.command("preview")
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--src",
    type=click.Path(exists=True, path_type=Path),
    default=None,
    help="An InsightFace dataset folder (train.rec, train.idx) or .rec to take faces from (evenly spaced records). "
    "Default: synthetic faces.",
)
@click.option("--count", type=click.IntRange(min=1, max=256), default=6, show_default=True, help="Faces (rows).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Seed of masks (and faces).")
def masks_preview(out: Path, src: Path | None, count: int, seed: int) -> None:
    """Write a PNG contact sheet to OUT: one row per face, the original then one masked twin per kind."""
    from facetool.pipeline.masks.preview import write_preview

    sheet = write_preview(out, src, count, seed)
    click.echo(f"masks preview: {count} faces x {sheet.width // 112 - 1} kinds -> {out} ({sheet.width}x{sheet.height})")


@click.command("masks")
@click.option("--count", type=click.IntRange(min=1), default=4096, show_default=True, help="Masked faces per run.")
@click.option(
    "--src",
    type=click.Path(exists=True, path_type=Path),
    default=None,
    help="Take faces from this InsightFace dataset instead of synthetic ones.",
)
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True, help="Runs; the fastest counts.")
@json_option()
def bench_masks_command(count: int, src: Path | None, repeats: int, json_path: Path | None) -> None:
    """Masked faces per second per core, end to end (JPEG decode, render, JPEG encode), in one process, against
    decode+encode alone in the same run."""
    from facetool.bench.masks import run_masks_benchmark

    r = run_masks_benchmark(count=count, src=src, repeats=repeats)
    click.echo(f"{'':28}{'images/s':>12}{'images/s/core':>16}")
    click.echo(f"{'decode + encode only':28}{r['decode_encode_images_per_s']:>12,.0f}"
               f"{r['decode_encode_images_per_s_per_core']:>16,.0f}")  # fmt: skip
    click.echo(f"{'masked (decode+render+enc)':28}{r['images_per_s']:>12,.0f}{r['images_per_s_per_core']:>16,.0f}")
    click.echo(
        f"{r['images']:,} faces ({r['distinct_faces']} distinct, {r['source']}), fastest of {repeats} runs; "
        f"render = {r['render_share']:.0%} of the CPU time; sprite bank built in {r['setup_seconds']:.2f} s"
    )
    write_json(json_path, r)

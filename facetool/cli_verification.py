"""``facetool bench verification``: InsightFace- or FaceT-protocol verification of a checkpoint (or of given
embeddings) on ``.bin`` sets and image-folder pair lists; ``facetool make-bin``: a ``.bin`` from a pairs list. Heavy
imports stay inside the commands."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import click

from facetool.cli_models import ARCH_HELP
from facetool.cli_options import json_option, progress_bar, progress_or_quiet, write_json

_PATH = click.Path(exists=True, dir_okay=False, path_type=Path)


@click.command("verification")
@click.argument("checkpoint", required=False, type=_PATH)
@click.option("--arch", help=ARCH_HELP)
@click.option(
    "--bin",
    "bins",
    multiple=True,
    type=_PATH,
    help="A verification .bin (InsightFace pickle of images and same/different flags; repeatable). Well-known "
    "names (lfw, cfp_fp, cfp_ff, agedb_30, calfw, cplfw, vgg2_fp) are recognised from the file name.",
)
@click.option(
    "--bin-dir",
    "bin_dirs",
    multiple=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Evaluate every .bin in this folder (repeatable); well-known sets first.",
)
@click.option(
    "--pairs",
    "pairs_dirs",
    multiple=True,
    type=click.Path(exists=True, path_type=Path),
    help="A folder of images with a pairs list masked_pairs.txt (RMFVD layout: lines 'path1 path2 label', label 1 "
    "same / 0 different, paths relative to the folder), or the list itself; repeatable; the set is named after "
    "the folder. Masked flag per image (used by FaceT): optional columns 4-5 'mask1 mask2' (0/1); without them an "
    "image whose path contains 'unmasked' is holistic and every other image masked.",
)
@click.option(
    "--masked",
    type=click.Choice(["one", "both"]),
    help="Also evaluate SMFRD-style masked versions of the .bin sets, rendered on the fly by facetool's mask "
    "renderer exactly as `facetool masks bin --mode MODE` writes them: 'one' masks the second image of every pair, "
    "'both' every image. Each gets its own row, <set>_masked_<mode>, beside the holistic one.",
)
@click.option(
    "--mask-seed",
    type=int,
    default=0,
    show_default=True,
    help="With --masked: the renderer's seed (the same as `facetool masks bin --seed`).",
)
@click.option(
    "--features",
    type=_PATH,
    help="Embeddings computed elsewhere instead of a CHECKPOINT: a .npy (images, D), row i = image i of the one "
    "--bin set, in its order.",
)
@click.option(
    "--flip-features",
    type=_PATH,
    help="With --features: embeddings of the horizontally flipped images, same shape; summed with --features "
    "before normalising, as the protocol does.",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=None,
    help="Images per forward pass (each goes with its flip, so the model sees twice as many). Default: 16 on a "
    "CPU (larger batches run slower there), 256 on a GPU.",
)
@click.option(
    "--device",
    type=click.Choice(["auto", "cpu", "cuda"]),
    default="auto",
    show_default=True,
    help="Where to embed: auto picks the GPU when torch sees one.",
)
@click.option(
    "--protocol",
    type=click.Choice(["insightface", "facet"]),
    default="insightface",
    show_default=True,
    help="insightface: 10 folds, each image with its flip. facet: FaceT's evaluation code: 5 folds, no flip, the "
    "masked sets (--masked, --pairs) normalised (x - 127.5) / 128 with every image flagged masked, the .bin sets "
    "(x - 127.5) / 127.5 unflagged.",
)
@json_option("report")
@click.option(
    "--plot",
    "plot_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the ROC curves of all sets (TAR against log FAR) to this PNG.",
)
@click.option("--quiet", is_flag=True, help="No progress bars.")
def bench_verification_command(
    checkpoint: Path | None,
    arch: str | None,
    bins: tuple[Path, ...],
    bin_dirs: tuple[Path, ...],
    pairs_dirs: tuple[Path, ...],
    masked: str | None,
    mask_seed: int,
    features: Path | None,
    flip_features: Path | None,
    batch_size: int | None,
    device: str,
    protocol: str,
    json_path: Path | None,
    plot_path: Path | None,
    quiet: bool,
) -> None:
    """Verification accuracy of the backbone in CHECKPOINT with InsightFace's protocol (flip fusion, squared L2 on
    normalised embeddings, 10 folds, thresholds 0..4 step 0.01; or FaceT's with --protocol facet): accuracy mean
    +- std and threshold, TAR at FAR 1e-1..1e-4 where the impostor pairs suffice, ROC AUC and EER, one row per set.

    CHECKPOINT is a backbone saved by facetool (import-model, training) or a training checkpoint holding one, or
    with --arch a bare state dict; it is loaded with torch.load(weights_only=True). A CHECKPOINT ending in .onnx
    is run by onnxruntime with InsightFace's model-zoo conventions (112x112 RGB, (x - 127.5) / 127.5). Or give
    --features (and --flip-features) with one --bin instead.

    \b
    Examples:
      facetool bench verification model.pt --bin-dir /data/faces_emore --json report.json --plot roc.png
      facetool bench verification model.pt --bin lfw.bin --masked one --pairs /data/rmfvd
      facetool bench verification backbone.pth --arch ir100 --bin-dir /data/faces_emore
      facetool bench verification w600k_r50.onnx --bin-dir /data/faces_emore
      facetool bench verification --features feats.npy --flip-features flipped.npy --bin lfw.bin
    """
    from facetool.bench.verification import format_table, plot_roc, protocol_line, run_verification, timing_line

    _check_options(checkpoint, arch, bins, bin_dirs, pairs_dirs, masked, features, flip_features)
    show_progress = not quiet and features is None
    update, close = progress_bar("verification", unit="img") if show_progress else (None, lambda: None)
    try:
        report = run_verification(
            checkpoint, arch=arch, bins=bins, bin_dirs=bin_dirs, pairs=pairs_dirs, masked=masked, mask_seed=mask_seed,
            features=features, flip_features=flip_features, batch_size=batch_size, device=device,
            retain_memory=True, protocol=protocol, progress=update, notify=_notify(show_progress),
        )  # fmt: skip
    finally:
        close()
    for line in format_table(report.results):
        click.echo(line)
    click.echo(protocol_line(report))
    click.echo(timing_line(report))
    write_json(json_path, report.json)
    if plot_path:
        plot_roc(report.results, plot_path, title=report.title)


def _check_options(
    checkpoint: Path | None,
    arch: str | None,
    bins: tuple[Path, ...],
    bin_dirs: tuple[Path, ...],
    pairs_dirs: tuple[Path, ...],
    masked: str | None,
    features: Path | None,
    flip_features: Path | None,
) -> None:
    """Combinations of options that cannot work, as usage errors before anything is read."""
    if features is None and flip_features is not None:
        raise click.UsageError("--flip-features goes with --features")
    if features is not None and checkpoint is not None:
        raise click.UsageError("give a CHECKPOINT or --features, not both")
    if arch is not None and checkpoint is None:
        raise click.UsageError("--arch names the architecture of a CHECKPOINT")
    if features is None and checkpoint is None:
        raise click.UsageError("give a CHECKPOINT to embed with, or --features with embeddings computed elsewhere")
    if features is not None and (len(bins) + len(bin_dirs) != 1 or pairs_dirs):
        raise click.UsageError("--features goes with exactly one --bin set (its rows are that set's images)")
    if features is not None and masked is not None:
        raise click.UsageError("--masked renders new images; --features holds embeddings of the original ones")
    if masked is not None and not (bins or bin_dirs):
        raise click.UsageError("--masked masks .bin sets: give --bin or --bin-dir")
    if not (bins or bin_dirs or pairs_dirs):
        raise click.UsageError("no sets: give --bin, --bin-dir or --pairs")


def _notify(under_bar: bool) -> Callable[[str], None]:
    """Notes go to stderr; above the progress bar when there is one."""
    if not under_bar:
        return lambda message: click.echo(message, err=True)
    from tqdm import tqdm

    return lambda message: tqdm.write(message, file=sys.stderr)


@click.command("make-bin")
@click.argument("pairs", type=_PATH)
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--root", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="The folder the list's paths are relative to (default: the list's folder); paths outside it are "
              "refused.")  # fmt: skip
@click.option("--quiet", is_flag=True, help="No progress bar.")
def make_bin_command(pairs: Path, out: Path, root: Path | None, quiet: bool) -> None:
    """Make an InsightFace verification .bin OUT from the pairs list PAIRS: one pair per line, 'path1 path2
    label' with label 1 (same person) or 0 (different); blank lines and # comments are skipped.

    OUT is a pickle of (list of image bytes, list of bools), images 2k and 2k+1 being pair k, as InsightFace's
    verification sets are: plain pickle.load(f, encoding="bytes") and facetool's restricted loader both read it.
    JPEG and PNG files go in unchanged; other formats are re-encoded as PNG. A missing or undecodable image is an
    error naming its line."""
    from facetool.pipeline.verification_bin import make_bin

    with progress_or_quiet("make-bin", "img", quiet) as progress:
        done = make_bin(pairs, out, root=root, progress=progress)
    click.echo(f"make-bin: {done['pairs']} pairs ({done['same']} same) of {done['images']} images -> {out}"
               + (f"; {done['reencoded']} re-encoded as PNG" if done["reencoded"] else ""))  # fmt: skip

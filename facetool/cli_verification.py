"""``facetool bench verification``: InsightFace-protocol verification of a checkpoint (or of given embeddings) on
``.bin`` sets and image-folder pair lists. Heavy imports stay inside the command."""

from __future__ import annotations

from pathlib import Path

import click

from facetool.cli_options import json_option

_PATH = click.Path(exists=True, dir_okay=False, path_type=Path)


@click.command("verification")
@click.argument("checkpoint", required=False, type=_PATH)
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
    bins: tuple[Path, ...],
    bin_dirs: tuple[Path, ...],
    pairs_dirs: tuple[Path, ...],
    masked: str | None,
    mask_seed: int,
    features: Path | None,
    flip_features: Path | None,
    batch_size: int | None,
    device: str,
    json_path: Path | None,
    plot_path: Path | None,
    quiet: bool,
) -> None:
    """Verification accuracy of the backbone in CHECKPOINT with InsightFace's protocol (flip fusion, squared L2 on
    normalised embeddings, 10 folds, thresholds 0..4 step 0.01): accuracy mean +- std and threshold, TAR at FAR
    1e-1..1e-4 where the impostor pairs suffice, ROC AUC and EER, one row per set.

    CHECKPOINT is a backbone saved by facetool (export) or a training checkpoint holding one; it is loaded with
    torch.load(weights_only=True). Or give --features (and --flip-features) with one --bin instead.

    \b
    Examples:
      facetool bench verification model.pt --bin-dir /data/faces_emore --json report.json --plot roc.png
      facetool bench verification model.pt --bin lfw.bin --masked one --pairs /data/rmfvd
      facetool bench verification --features feats.npy --flip-features flipped.npy --bin lfw.bin
    """
    from facetool.bench import verification as v
    from facetool.pipeline.atomic import write_json_atomic

    if features is None and flip_features is not None:
        raise click.UsageError("--flip-features goes with --features")
    if features is not None and checkpoint is not None:
        raise click.UsageError("give a CHECKPOINT or --features, not both")
    if features is None and checkpoint is None:
        raise click.UsageError("give a CHECKPOINT to embed with, or --features with embeddings computed elsewhere")
    paths = list(bins) + [p for d in bin_dirs for p in v.bin_dir_paths(d)]
    if features is not None and (len(paths) != 1 or pairs_dirs):
        raise click.UsageError("--features goes with exactly one --bin set (its rows are that set's images)")
    if features is not None and masked is not None:
        raise click.UsageError("--masked renders new images; --features holds embeddings of the original ones")
    if masked is not None and not paths:
        raise click.UsageError("--masked masks .bin sets: give --bin or --bin-dir")
    if not paths and not pairs_dirs:
        raise click.UsageError("no sets: give --bin, --bin-dir or --pairs")

    # Sets first (untrusted pickles are refused before any model is built), then the model.
    sets = []
    for s in (v.read_bin_set(p) for p in paths):
        sets.append(s)
        if masked is not None:
            sets.append(_masked_set(v, s, masked, mask_seed, quiet))
    sets += [v.read_pairs_dir(p) for p in pairs_dirs]
    v.check_unique_names(sets)
    for note in v.known_set_warnings(sets):
        click.echo(note, err=True)

    results: dict[str, v.SetMetrics] = {}
    meta: dict[str, object] = {}
    if features is not None:
        feats = v.load_features(features)
        flips = v.load_features(flip_features) if flip_features is not None else None
        results[sets[0].name] = v.evaluate_features(sets[0], feats, flips)
        meta = {"features": str(features), "flip_features": None if flip_features is None else str(flip_features)}
        title = f"ROC: {features.name}"
    else:
        model, name, options = v.load_model(checkpoint)
        v.retain_freed_memory()  # CPU forwards reuse their buffers instead of faulting them in every batch
        dev = v.resolve_device(None if device == "auto" else device)
        shown = ", ".join(f"{k}={val}" for k, val in sorted(options.items()))
        click.echo(f"{checkpoint}: {name}({shown}) on {dev}", err=True)
        meta = {"checkpoint": str(checkpoint), "backbone": name, "options": options, "device": dev}
        if masked is not None:
            meta["masked"] = {"mode": masked, "seed": mask_seed}
        batch_size = batch_size or v.default_batch_size(dev)
        meta["batch_size"] = batch_size
        title = f"ROC: {checkpoint.name} ({name})"
        for s in sets:
            bar = None
            if not quiet:
                from tqdm import tqdm

                bar = tqdm(total=len(s.images), desc=s.name, unit="img", dynamic_ncols=True, disable=None)
            try:
                progress = None if bar is None else (lambda done, b=bar: b.update(done - b.n))
                results[s.name] = v.evaluate_set(model, s, batch_size=batch_size, device=dev, progress=progress)
            finally:
                if bar is not None:
                    bar.close()

    for line in v.format_table(results):
        click.echo(line)
    embed_s = sum(m.extra["embed_seconds"] or 0.0 for m in results.values())
    metric_s = sum(m.extra["metric_seconds"] for m in results.values())
    images = sum(m.extra["images"] for m in results.values())
    if features is None:
        click.echo(
            f"embedding: {images:,} images (+ flips) in {embed_s:.2f} s ({images / max(embed_s, 1e-9):,.1f} images/s);"
            f" metrics: {metric_s:.4f} s"
        )
    else:
        click.echo(f"metrics: {metric_s:.4f} s")
    meta["embed_seconds"] = round(embed_s, 4)
    meta["metric_seconds"] = round(metric_s, 6)
    if json_path:
        write_json_atomic(json_path, v.report_json(results, **meta))
    if plot_path:
        v.plot_roc(results, plot_path, title=title)


def _masked_set(v, pair_set, mode: str, seed: int, quiet: bool):
    """The masked version of one ``.bin`` set, with a progress bar while it renders."""
    if quiet:
        return v.masked_bin_set(pair_set, mode, seed)
    from tqdm import tqdm

    with tqdm(desc=f"masking {pair_set.name}", unit="img", dynamic_ncols=True, disable=None) as bar:

        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        return v.masked_bin_set(pair_set, mode, seed, progress=progress)

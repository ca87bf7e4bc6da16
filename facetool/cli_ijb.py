"""``facetool bench ijb`` (IJB-B / IJB-C with InsightFace's protocol), ``facetool align`` (faces from five points)
and ``facetool synth-ijb`` (a small IJB-layout folder of synthetic faces). Heavy imports stay inside the commands."""

from __future__ import annotations

from pathlib import Path

import click

from facetool.cli_models import ARCH_HELP
from facetool.cli_options import json_option, progress_or_quiet, write_json

_FILE = click.Path(exists=True, dir_okay=False, path_type=Path)
_OUT_FILE = click.Path(dir_okay=False, path_type=Path)


def _check_usage(ijb_dir, model, arch, features, flip_features, masked, synthetic) -> None:
    if arch is not None and model is None:
        raise click.UsageError("--arch names the architecture of a MODEL")
    if synthetic is not None:
        if ijb_dir is not None or model is not None or features is not None or masked:
            raise click.UsageError("--synthetic makes its own meta set and features: no IJB_DIR, MODEL, --features")
        return
    if ijb_dir is None:
        raise click.UsageError("give IJB_DIR (or --synthetic N)")
    if flip_features is not None and features is None:
        raise click.UsageError("--flip-features goes with --features")
    if (features is None) == (model is None):
        raise click.UsageError("give a MODEL to embed with, or --features with embeddings computed elsewhere")
    if masked and features is not None:
        raise click.UsageError("--masked renders new images; --features holds embeddings of the original ones")


@click.command("ijb")
@click.argument("ijb_dir", required=False, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("model", required=False, type=_FILE)
@click.option("--arch", help=ARCH_HELP)
@click.option("--target", type=click.Choice(["IJBC", "IJBB"]), default="IJBC", show_default=True)
@click.option("--features", type=_FILE, help="Embeddings computed elsewhere, instead of MODEL: a (images, D) .npy, "
              "one row per line of the 5-point file, in its order; then no image is read.")  # fmt: skip
@click.option("--flip-features", type=_FILE, help="With --features: embeddings of the flipped images, same shape.")
@click.option("--no-flip", is_flag=True, help="Use the image embedding alone, not plus its flip's.")
@click.option("--normalize-images", is_flag=True, help="L2-normalise each image feature before pooling.")
@click.option("--no-detector-score", is_flag=True, help="Do not weight image features by the detector score.")
@click.option("--masked", type=click.Choice(["all"]), help="Mask every aligned image with facetool's renderer "
              "(key = image index; FaceT backbones get the masked flag).")  # fmt: skip
@click.option("--mask-seed", type=int, default=0, show_default=True, help="With --masked: the renderer's seed.")
@json_option("report")
@click.option("--plot", "plot_path", type=_OUT_FILE, help="Write the ROC (TAR against log FAR) to this PNG.")
@click.option("--scores", "scores_path", type=_OUT_FILE, help="Write the pair scores (.npy, pair-file order).")
@click.option("--save-features", type=click.Path(file_okay=False, path_type=Path),
              help="Keep the embeddings in this folder (features.npy, flip_features.npy, memory-mapped).")  # fmt: skip
@click.option("--batch-size", type=click.IntRange(min=1), help="Images per forward (each with its flip). "
              "Default: 16 on a CPU, 256 on a GPU.")  # fmt: skip
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--synthetic", metavar="N|full", help="No dataset: an IJB-C-shaped meta set with random features, "
              "'full' (IJB-C size) or N images; for timing the metrics.")  # fmt: skip
@click.option("--seed", type=int, default=0, show_default=True, help="With --synthetic: its seed.")
@click.option("--reference", is_flag=True, help="Also run the eval_ijbc.py-style loop on the same features and "
              "report its time and agreement.")  # fmt: skip
@click.option("--quiet", is_flag=True, help="No progress bar.")
def bench_ijb_command(ijb_dir, model, arch, target, features, flip_features, no_flip, normalize_images,
                      no_detector_score, masked, mask_seed, json_path, plot_path, scores_path, save_features,
                      batch_size, device, synthetic, seed, reference, quiet) -> None:  # fmt: skip
    """IJB-B / IJB-C 1:1 verification (TAR at FAR 1e-6..1e-1, AUC) and, when the 1:N lists are there, 1:N
    identification (rank-1/5/10, TPIR at FPIR 1e-2, 1e-1), with arcface_torch's eval_ijbc.py protocol.

    IJB_DIR is InsightFace's layout (meta/<target>_face_tid_mid.txt, _template_pair_label.txt,
    _name_5pts_score.txt, loose_crop/); MODEL a backbone saved by facetool or a training checkpoint, a bare state
    dict with --arch, or an ONNX model (.onnx, InsightFace's model-zoo conventions).

    \b
    Examples:
      facetool bench ijb /data/IJB_release/IJBC model.pt --json ijbc.json --plot roc.png
      facetool bench ijb /data/IJB_release/IJBB --target IJBB --features f.npy --flip-features g.npy
      facetool bench ijb --synthetic full --reference
    """
    from facetool.bench.ijb import ProtocolOptions, format_report, plot_report, run_ijb, save_scores
    from facetool.bench.verification import retain_freed_memory

    _check_usage(ijb_dir, model, arch, features, flip_features, masked, synthetic)
    retain_freed_memory()  # large transient arrays are reused instead of faulted in again
    options = ProtocolOptions(flip=not no_flip, normalize_images=normalize_images, detector_score=not no_detector_score)
    with progress_or_quiet("embed", "img", quiet) as progress:
        report = run_ijb(
            ijb_dir, model, arch=arch, target=target, features=features, flip_features=flip_features, options=options,
            reference=reference, progress=progress, masked=masked == "all", mask_seed=mask_seed,
            batch_size=batch_size, device=None if device == "auto" else device, save_features=save_features,
            synthetic=synthetic, seed=seed,
        )  # fmt: skip
    for line in format_report(report):
        click.echo(line)
    write_json(json_path, report.to_json())
    if plot_path is not None:
        plot_report(report, plot_path)
    if scores_path is not None:
        save_scores(scores_path, report.scores)


@click.command("align")
@click.argument("list_path", metavar="LIST", type=_FILE)
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--root", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="The folder the list's image paths are relative to (default: the list's folder).")  # fmt: skip
@click.option("--size", type=click.IntRange(min=1), default=112, show_default=True,
              help="Side of the aligned crops: a multiple of 112 (or of 128, as InsightFace's norm_crop).")  # fmt: skip
@click.option("--png", is_flag=True, help="Write lossless PNGs (the name's suffix becomes .png).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def align_command(list_path: Path, out_dir: Path, root: Path | None, size: int, png: bool, quiet: bool) -> None:
    """Align the faces of LIST onto the ArcFace template and write them to OUT_DIR under the same relative names.

    LIST lines are 'path x1 y1 ... x5 y5 [score]' (IJB's *_name_5pts_score.txt): left eye, right eye, nose tip,
    left and right mouth corner, in pixels of the image; 68-point lines work too. Each face is warped by the
    least-squares similarity onto the template (bilinear, border 0)."""
    from facetool.pipeline.align import align_list

    with progress_or_quiet("align", "img", quiet) as progress:
        summary = align_list(list_path, out_dir, root=root, size=size, png=png, progress=progress)
    click.echo(f"align: {summary['images']} faces, {size}x{size}, in {out_dir}")


@click.command("synth-ijb")
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--subjects", type=click.IntRange(min=2), default=6, show_default=True)
@click.option("--probes-per-subject", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--target", type=click.Choice(["IJBC", "IJBB"]), default="IJBC", show_default=True)
@click.option("--no-one-to-n", is_flag=True, help="Leave out the 1:N gallery and probe lists.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--quiet", is_flag=True, help="No progress bar.")
def synth_ijb_command(out: Path, subjects: int, probes_per_subject: int, target: str, no_one_to_n: bool, seed: int,
                      quiet: bool) -> None:  # fmt: skip
    """Write a small IJB-layout folder into OUT: synthetic faces in loose crops with known five points, the 1:1
    meta files (sparse template ids, media of several frames, detector scores) and the 1:N lists."""
    from facetool.bench.ijb import write_ijb_fixture

    with progress_or_quiet("synth-ijb", "img", quiet) as progress:
        s = write_ijb_fixture(out, subjects=subjects, probes_per_subject=probes_per_subject, seed=seed,
                              target=target, one_to_n=not no_one_to_n, progress=progress)  # fmt: skip
    click.echo(
        f"synth-ijb: {s['images']} images, {s['templates']} templates, {s['pairs']} pairs ({s['genuine']} genuine) "
        f"of {s['subjects']} subjects in {out}"
    )

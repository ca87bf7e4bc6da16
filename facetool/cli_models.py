"""Commands about backbones: ``facetool export`` and ``facetool bench models``. Heavy imports stay inside them."""

from __future__ import annotations

from pathlib import Path

import click

from facetool.cli_options import json_option, write_json


@click.command("export")
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
def export_command(checkpoint: Path, out: Path) -> None:
    """Export the backbone in CHECKPOINT (saved by facetool) to OUT.onnx for onnxruntime and friends.

    \b
    Inputs:  images   float32 (N, 3, 112, 112), RGB in [-1, 1]
             masked   bool (N,): only for FaceT with prompts (True picks the masked-face prompts)
    Output:  embeddings float32 (N, D), not normalised. N is a dynamic axis."""
    from facetool.train.models import load_backbone
    from facetool.train.models.export import export_onnx

    model, name, options = load_backbone(checkpoint)
    inputs = export_onnx(model, out)  # written atomically (a temporary name, then a rename)
    shown = ", ".join(f"{k}={v}" for k, v in sorted(options.items()))
    click.echo(f"export: {name}({shown}) -> {out}; inputs {', '.join(inputs)}, output embeddings")


@click.command("models")
@json_option()
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1), help="Images per forward.")
@click.option("--iters", default=5, show_default=True, type=click.IntRange(min=1), help="Timed forwards (median).")
@click.option("--backbone", "backbones", multiple=True, help="Only this backbone (repeatable; default: all).")
def bench_models_command(json_path: Path | None, batch_size: int, iters: int, backbones: tuple[str, ...]) -> None:
    """Parameters, GMACs of one 112x112 image and CPU forward images/s of every registered backbone."""
    from facetool.bench.models import bench_models
    from facetool.train.models import list_backbones

    unknown = sorted(set(backbones) - set(list_backbones()))
    if unknown:
        raise click.BadParameter(f"unknown {', '.join(unknown)}; known: {', '.join(list_backbones())}")
    header = f"{'backbone':16}{'params':>14}{'GMACs (multiply-adds)':>24}{f'images/s (CPU, batch {batch_size})':>28}"
    click.echo(header)

    def show(row: dict) -> None:
        click.echo(f"{row['backbone']:16}{row['params']:>14,}{row['gmacs']:>24.3f}{row['images_per_s']:>28.1f}")

    result = bench_models(backbones or None, batch_size=batch_size, iters=iters, progress=show)
    click.echo(f"(torch {result['torch']}, {result['threads']} threads)")
    write_json(json_path, result)

"""Commands about backbones: ``facetool export``, ``facetool import-model`` and ``facetool bench models``. Heavy
imports stay inside them."""

from __future__ import annotations

from pathlib import Path

import click

from facetool.cli_options import json_option, write_json

ARCH_HELP = (
    "The architecture of a bare state dict (torch.save(model.state_dict()), e.g. arcface_torch's backbone.pth with "
    "--arch ir100); its keys must be facetool's (for other code bases' names: facetool import-model)."
)


@click.command("export")
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--arch", help=ARCH_HELP)
def export_command(checkpoint: Path, out: Path, arch: str | None) -> None:
    """Export the backbone in CHECKPOINT (saved by facetool, or with --arch a bare state dict) to OUT.onnx for
    onnxruntime and friends.

    \b
    Inputs:  images   float32 (N, 3, 112, 112), RGB in [-1, 1] (weights for BGR images reverse the
                      channels inside the graph)
             masked   bool (N,): only for FaceT with prompts (True picks the masked-face prompts)
    Output:  embeddings float32 (N, D), not normalised. N is a dynamic axis."""
    from facetool.train.models.export import export_backbone

    done = export_backbone(checkpoint, out, arch)
    shown = ", ".join(f"{k}={v}" for k, v in sorted(done["options"].items()))
    flip = " (BGR weights: channels reversed in the graph)" if done["input_channels"] == "bgr" else ""
    click.echo(f"export: {done['backbone']}({shown}) -> {out}; inputs {', '.join(done['inputs'])}, output "
               f"embeddings{flip}")  # fmt: skip


@click.command("import-model")
@click.argument("src", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--arch", required=True, help="The facetool backbone the weights are for (ir18..ir200, irse50, "
              "irse100, mobilefacenet, facet_base, ...).")  # fmt: skip
@click.option("--layout", default="auto", show_default=True, help="Whose key names SRC has (see above); auto: the "
              "first layout that fits.")  # fmt: skip
@click.option("--input-channels", metavar="rgb|bgr", help="The channel order the weights expect (default: the "
              "layout's: BGR for treb1en and multiface, RGB otherwise).")  # fmt: skip
def import_model_command(src: Path, out: Path, arch: str, layout: str, input_channels: str | None) -> None:
    """Turn released weights SRC (a state dict, or a checkpoint holding one) into a facetool backbone file OUT.

    \b
    Layouts (whose names the keys of SRC are):
      arcface_torch  InsightFace's arcface_torch backbone.pth: ir18, ir34, ir50, ir100, ir200 (RGB)
      treb1en        InsightFace_Pytorch (TreB1eN): irse50, irse100, mobilefacenet (BGR)
      multiface      MultiFace: the same names as treb1en (BGR)
      facet          FaceT's checkpoint-*.pth: facet_base, and its ir100 (RGB)
      facetool       facetool's own names, e.g. torch.save(model.state_dict()) of a facetool backbone (RGB)

    Every key and shape must fit, strictly; OUT records the architecture, its options and the channel order, which
    bench verification, bench ijb, export and run.init_from honour."""
    from facetool.train.models.layouts import import_model

    done = import_model(src, out, arch, layout, input_channels)
    click.echo(f"import-model: {src} ({done['layout']} layout, {done['input_channels'].upper()} input) -> {out}: "
               f"{arch}, {done['tensors']} tensors, {done['parameters']:,} parameters")  # fmt: skip


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

"""``facetool train``: read a TOML recipe, build the evaluation from ``bench.verification`` and run the engine.
Heavy imports stay inside the command."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("train")
@click.argument("config", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="TABLE.KEY=VALUE",
    help="Override one config key (repeatable), checked like the file's keys; the value is TOML "
    '(optim.lr=0.05, model.name="ir50", eval.bins=["a.bin"]) or a bare string (model.name=ir50).',
)
@click.option(
    "--output",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Output folder: config.toml (resolved), checkpoints/, logs/, summary.json, backbone.pt. Default: "
    "run.output of the config, else runs/<config name>.",
)
@click.option(
    "--resume",
    is_flag=True,
    help="Continue from the newest complete checkpoint in the output folder (model, head shards, optimiser, "
    "scaler, step, loader position, RNG states); without one, start from the beginning.",
)
@click.option("--quiet", is_flag=True, help="No progress bar or messages (errors still go to stderr).")
def train_command(config: Path, overrides: tuple[str, ...], output: Path | None, resume: bool, quiet: bool) -> None:
    """Train a backbone as CONFIG.toml describes (see configs/README.md for every key).

    Runs in one process, or in many under torchrun (gloo on CPUs, NCCL on GPUs; one process per GPU):

    \b
      facetool train configs/demo.toml --output runs/demo
      facetool train configs/ir100_ms1mv2.toml --set data.shards=/data/ms1mv2-shards --set run.amp=bf16
      torchrun --nproc-per-node 8 -m facetool train configs/facet_base_arcface.toml --output runs/ft
      facetool train configs/demo.toml --output runs/demo --resume      # after an interruption

    Every key is checked before anything starts (unknown keys, wrong types, missing shards or .bin files, a
    checkpoint of another backbone). Verification accuracy on eval.bins is computed every eval.every steps and
    at the end, and written to OUTPUT/summary.json with the image rate.
    """
    import functools

    from facetool.bench import verification as v
    from facetool.train.engine import load_config, train

    cfg = load_config(config, overrides)
    out = output or (Path(cfg["run"]["output"]) if cfg["run"]["output"] else Path("runs") / config.stem)
    evaluate = None
    if cfg["eval"]["bins"]:
        sets = [v.read_bin_set(p) for p in cfg["eval"]["bins"]]  # untrusted pickles refused before training
        v.check_unique_names(sets)
        evaluate = functools.partial(v.evaluate_model, sets=sets, batch_size=cfg["eval"]["batch_size"])
    summary = train(cfg, out, resume=resume, evaluate=evaluate, quiet=quiet)
    if summary and not quiet:
        sets = summary["verification"]["sets"]
        shown = ", ".join(f"{name} {100 * m['accuracy']:.2f}%" for name, m in sets.items())
        click.echo(
            f"{summary['steps']} steps, {summary['images_per_s']:,.1f} images/s"
            + (f"; verification: {shown}" if shown else "")
        )

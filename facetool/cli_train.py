"""``facetool train``: read a TOML recipe, build the evaluation from ``bench.verification`` and run the engine.
Heavy imports stay inside the command."""

from __future__ import annotations

import contextlib
from pathlib import Path

import click

from facetool.cli_options import json_option, native_stderr_filter, write_json

_set_option = click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="TABLE.KEY=VALUE",
    help="Override one config key (repeatable), checked like the file's keys; the value is TOML "
    '(optim.lr=0.05, model.name="ir50", eval.bins=["a.bin"]) or a bare string (model.name=ir50).',
)


@click.command("train")
@click.argument("config", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@_set_option
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
@click.option(
    "--overwrite",
    is_flag=True,
    help="Start afresh in an output folder that holds a run: its config.toml, checkpoints/, logs/, summary.json "
    "and backbone.pt are deleted (once the new run is built). Without it such a folder is refused.",
)
@click.option(
    "--allow-change",
    "allow_change",
    multiple=True,
    metavar="TABLE.KEY",
    help="With --resume: continue although this key differs from the checkpoint's config (repeatable; "
    "TABLE.* for a whole table). Changes that alter the training (seed, batch, lr, margin, optimiser, "
    "schedule, model, head, data...) are refused without it; run.steps/epochs, logging, checkpoint and eval.* "
    "keys may always change. A changed optim.name starts a fresh optimiser state.",
)
@click.option("--quiet", is_flag=True, help="No progress bar or messages (errors still go to stderr).")
def train_command(
    config: Path,
    overrides: tuple[str, ...],
    output: Path | None,
    resume: bool,
    overwrite: bool,
    allow_change: tuple[str, ...],
    quiet: bool,
) -> None:
    """Train a backbone as CONFIG.toml describes (see configs/README.md for every key).

    Runs in one process, or in many under torchrun (gloo on CPUs, NCCL on GPUs; one process per GPU):

    \b
      facetool train configs/demo.toml --output runs/demo
      facetool train configs/ir100_ms1mv2.toml --set data.shards=/data/ms1mv2-shards --set run.amp=bf16
      torchrun --nproc-per-node 8 -m facetool train configs/facet_base_arcface.toml --output runs/ft
      facetool train configs/demo.toml --output runs/demo --resume      # after an interruption
      facetool train configs/demo.toml --output runs/demo --resume --set run.epochs=5   # a longer run
      facetool train configs/demo.toml --output runs/demo --overwrite   # start again in a used folder

    Every key is checked before anything starts (unknown keys, wrong types, missing shards or .bin files, every
    eval.bins image decoded once, a checkpoint of another backbone or config). Verification accuracy on eval.bins
    is computed every eval.every steps and at the end, and written to OUTPUT/summary.json with the image rate.
    Gradient clipping (optim.clip_grad, optim.clip_scope) and fp16's loss scaler decide for all ranks at once;
    run.check_sync_every = N checks every N steps that the ranks hold the same backbone (a debug aid).
    """
    from facetool.cli_options import progress_or_quiet
    from facetool.train.engine import load_config, train
    from facetool.train.engine.context import launched_rank

    cfg = load_config(config, overrides)
    out = output or (Path(cfg["run"]["output"]) if cfg["run"]["output"] else Path("runs") / config.stem)
    quiet = quiet or launched_rank() != 0  # one bar and one voice: rank 0's
    evaluate = None
    if cfg["eval"]["bins"]:
        from facetool.bench.verification import training_evaluation

        with progress_or_quiet("eval sets", "img", quiet) as progress:  # every image decoded before training
            ev = cfg["eval"]
            evaluate = training_evaluation(ev["bins"], ev["batch_size"], progress=progress, protocol=ev["protocol"])
    # DALI's image codec logs a line of its own before the loader's one-line error (the fallback's forked workers
    # would hold the filter's pipe open: it is only for DALI)
    dali = cfg["data"]["source"] != "synthetic" and cfg["data"]["backend"] != "wds"
    with (
        native_stderr_filter() if dali else contextlib.nullcontext(),
        progress_or_quiet("train", "step", quiet) as progress,
    ):
        from tqdm import tqdm

        summary = train(cfg, out, resume=resume, evaluate=evaluate, overwrite=overwrite, allow_change=allow_change,
                        progress=progress, notify=None if quiet else tqdm.write)  # fmt: skip
    if summary and not quiet:
        sets = summary["verification"]["sets"]
        shown = ", ".join(f"{name} {100 * m['accuracy']:.2f}%" for name, m in sets.items())
        click.echo(
            f"{summary['steps']} steps, {summary['images_per_s']:,.1f} images/s"
            + (f"; verification: {shown}" if shown else "")
        )


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


@click.command("train")
@click.argument("config", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@_set_option
@click.option(
    "--data",
    "which",
    type=click.Choice(["both", "shards", "synthetic"]),
    default="both",
    show_default=True,
    help="shards: the recipe's loader over data.shards; synthetic: random images already on the training device "
    "(the model-only rate; its classifier gets the shards' class count when they are readable); both, to see the "
    "loader's cost.",
)
@click.option(
    "--steps", type=click.IntRange(min=1), default=20, show_default=True, help="Timed optimiser steps per run."
)
@click.option(
    "--warmup",
    type=click.IntRange(min=1),
    default=3,
    show_default=True,
    help="Steps before the clock starts (first allocations, loader start-up and shuffle buffer, autotuning).",
)
@click.option(
    "--repeats",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Runs of each data source, interleaved; the fastest is reported (all are in the JSON).",
)
@json_option()
def bench_train_command(
    config: Path, overrides: tuple[str, ...], which: str, steps: int, warmup: int, repeats: int, json_path: Path | None
) -> None:
    """Training images/s of CONFIG.toml on one process (the GPU when there is one): with its data loader and with
    synthetic in-memory images (the model-only step rate), each in a fresh process, plus peak memory (torch's CUDA
    allocator peak on a GPU, without DALI's own buffers; the process's peak resident memory on the CPU). No
    evaluation, no checkpoint until the last step; the run's other settings (batch size, AMP, threads, loader
    backend) are the recipe's:

    \b
      facetool bench train configs/demo.toml
      facetool bench train configs/ir100_magface_ms1mv2.toml --set data.shards=/data/ms1mv2 --set run.amp=bf16
    """
    from facetool.bench.train import SOURCES, check_recipe, run_train_benchmark

    sources = SOURCES if which == "both" else (which,)
    check_recipe(config, overrides, sources)  # a recipe's errors before the table starts
    click.echo(f"measuring: {steps} steps after {warmup} warm-up, each data source in its own process")
    header = f"{'data':11}{'loader':11}{'device':9}{'images/s':>11}{'CPU us/image':>14}{'peak memory':>13}"
    click.echo(header)

    def show(row: dict) -> None:
        cpu = f"{row['cpu_us_per_image']:,.0f}" if row.get("cpu_us_per_image") is not None else "-"
        click.echo(
            f"{row['source']:11}{row['loader']:11}{row['device']:9}{row['images_per_s']:>11,.1f}{cpu:>14}"
            f"{_size(row['peak_memory_bytes']):>13}"
        )

    result = run_train_benchmark(config, overrides, sources, steps, warmup, repeats, report=show)
    if repeats > 1:
        click.echo(f"best of {repeats}:")
        for row in result["results"]:
            show(row)
    first = result["results"][0]
    click.echo(f"({first['backbone']}, global batch {first['global_batch']}, {first['threads']} torch threads)")
    if result["shards_to_model_only"] is not None:
        share = result["shards_to_model_only"]
        click.echo(f"with its loader the run reaches {share:.2f}x the model-only rate")
    write_json(json_path, result)

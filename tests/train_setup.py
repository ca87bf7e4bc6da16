"""Shared by the training tests: the fixture shards, a small config on them, ``facetool train`` in a subprocess."""

from __future__ import annotations

import subprocess
from pathlib import Path

import torch
from helpers import run_cli

from facetool.pipeline.shards import ConvertOptions, convert
from facetool.pipeline.synth import write_synth
from facetool.train.engine import to_toml

ENV = {"OMP_NUM_THREADS": "1"}


def make_data(root: Path) -> Path:
    """16 synthetic identities x 8 images as 4 shards, half with a masked twin, and a 20-pair verification set."""
    write_synth(root / "src", identities=16, images_per_identity=8, pairs=20, seed=5, workers=1)
    convert(root / "src", root / "shards", ConvertOptions(samples_per_shard=32, mask_fraction=0.5))
    return root


def write_config(path: Path, root: Path, **tables: dict) -> Path:
    """A small run on the fixture shards: tinynet, batch 8, in-process loader, one thread."""
    cfg = {
        "run": {"seed": 1, "steps": 6, "threads": 1, "log_every": 1},
        "data": {
            "shards": str(root / "shards"),
            "backend": "wds",
            "workers": 0,
            "batch_size": 8,
            "masked_prob": 0.25,
            "shuffle_buffer": 16,
        },  # fmt: skip
        "model": {"name": "tinynet", "width": 4},
        "head": {"name": "arcface", "s": 32.0, "sample_rate": 0.5},
        "optim": {"name": "sgd", "lr": 0.05, "nesterov": True},
        "schedule": {"warmup_steps": 2},
    }
    for table, body in tables.items():
        cfg.setdefault(table, {}).update(body)
    path.write_text(to_toml(cfg))
    return path


def train(*args: str) -> subprocess.CompletedProcess:
    """``facetool train ARGS --quiet`` in a fresh process, one torch thread (no traceback, whatever the exit)."""
    return run_cli("train", *args, "--quiet", env=ENV, timeout=300)


def weights(path: Path) -> dict[str, torch.Tensor]:
    """The backbone weights in a backbone file."""
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]

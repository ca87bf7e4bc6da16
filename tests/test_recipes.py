"""Every recipe in configs/ loads, validates and runs a few steps on synthetic shards with its backbone scaled down.

The test-only scale-down (documented in configs/README.md): ``model.name`` is replaced per SCALE_DOWN (FaceT-B by
FaceT-tiny, the IR/IR-SE ResNets by tinynet; MobileFaceNet is small already), the MAE decoder is cut to one block
of width 96, and the run is two steps of 8 images on the fixture shards with the in-process loader. Everything else
(optimiser, groups, layer decay, schedule, head, Partial FC rate, AMP, q) is the recipe's own.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from facetool.pipeline.shards import ConvertOptions, convert
from facetool.pipeline.synth import write_synth
from facetool.train.engine import load_config
from facetool.train.engine.trainer import Trainer

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
RECIPES = sorted(p.name for p in CONFIGS.glob("*.toml"))
SCALE_DOWN = {"facet_base": "facet_tiny", "ir100": "tinynet", "irse100": "tinynet", "mobilefacenet": "mobilefacenet",
              "tinynet": "tinynet"}  # fmt: skip


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("recipes")
    write_synth(root / "src", identities=12, images_per_identity=4, pairs=4, seed=2, workers=1)
    convert(root / "src", root / "shards", ConvertOptions(samples_per_shard=24, mask_fraction=0.5))
    return root


def scaled_down(name: str, root: Path, out: Path, extra: tuple[str, ...] = ()):
    import tomllib

    model = tomllib.loads((CONFIGS / name).read_text())["model"]["name"]
    overrides = [
        f"model.name={SCALE_DOWN[model]}",
        f"data.shards={root / 'shards'}",
        "data.backend=wds",
        "data.workers=0",
        "data.batch_size=8",
        "data.shuffle_buffer=8",
        "eval.bins=[]",
        "run.steps=2",
        "run.threads=1",
        "run.checkpoint_every=0",
        "mae.decoder_depth=1",
        "mae.decoder_dim=96",
        *extra,
    ]
    return load_config(CONFIGS / name, overrides)


@pytest.fixture(scope="module")
def mae_backbone(shards, tmp_path_factory) -> Path:
    """The MAE recipe, scaled down, run for two steps: its exported encoder starts the fine-tuning recipes."""
    out = tmp_path_factory.mktemp("mae_run")
    cfg = scaled_down("facet_base_mae_ms1mv2.toml", shards, out)
    summary = Trainer(cfg, out).run()
    assert summary["steps"] == 2 and summary["task"] == "mae"
    return out / "backbone.pt"


def test_every_recipe_is_listed() -> None:
    assert "demo.toml" in RECIPES and len(RECIPES) >= 12


UPSTREAM = re.compile(r"Upstream: (?P<repo>[\w.-]+/[\w.-]+)\s[^@]*@\s+(?P<commit>[0-9a-f]{7,40})\b")


@pytest.mark.parametrize("name", [name for name in RECIPES if name != "demo.toml"])
def test_every_recipe_cites_its_upstream_source_at_a_commit(name: str) -> None:
    """Each recipe's header (the comment lines before the first table) names the upstream repository, file and the
    commit whose code produced the numbers it reproduces, and is listed in the fidelity table."""
    text = (CONFIGS / name).read_text()
    header = " ".join(line.lstrip("# ") for line in text.split("\n[", 1)[0].splitlines() if line.startswith("#"))
    match = UPSTREAM.search(header)
    assert match, f"{name}: no 'Upstream: owner/repo path @ commit' in its header"
    table = (CONFIGS / "README.md").read_text().split("## Fidelity", 1)[-1]
    listed = set()
    for entry in re.findall(r"^\| `([^`]+\.toml)`", table, flags=re.M):
        head, _, rest = entry.partition("{")
        alternatives, _, tail = rest.partition("}")
        listed |= {head + alt + tail for alt in alternatives.split(",")} if rest else {entry}
    assert name in listed, f"{name} is not in the fidelity table of configs/README.md"


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_runs_scaled_down(name: str, shards: Path, mae_backbone: Path, tmp_path: Path) -> None:
    overrides = [f"data.shards={shards / 'shards'}", "eval.bins=[]"]
    if "init_from" in (CONFIGS / name).read_text():  # fine-tuning recipes name the MAE run's output
        overrides.append(f"run.init_from={mae_backbone}")
    full = load_config(CONFIGS / name, overrides)  # the recipe at full size: loaded and validated
    assert full["run"]["task"] in ("classify", "mae")
    extra = (f"run.init_from={mae_backbone}",) if full["run"]["init_from"] else ()
    cfg = scaled_down(name, shards, tmp_path, extra)
    trainer = Trainer(cfg, tmp_path)
    if full["run"]["init_from"]:
        assert trainer.missing_init  # the prompts are new; the encoder came from the MAE run
        enc = torch.load(mae_backbone, weights_only=True)["state_dict"]
        assert set(enc) - set(trainer.missing_init) <= set(trainer.backbone.state_dict())
    if full["optim"]["layer_decay"] < 1:
        assert len({g["lr_scale"] for g in trainer.optimizer.param_groups}) > 2
    summary = trainer.run()
    assert summary["steps"] == 2
    assert (tmp_path / "backbone.pt").is_file() and (tmp_path / "config.toml").is_file()

"""Options that reproduce upstream training code: FaceT's initialisation (``model.init = "facet"``), MultiFace's
unit-norm class centres (``head.init = "unit"``), the weight-decay groups of FaceT and arcface_torch
(``optim.no_decay``) and FaceT's per-rank seeds (``run.seed_per_rank``)."""

from __future__ import annotations

import math

import pytest
import torch

from facetool.pipeline.errors import FacetoolError
from facetool.train.engine import parameter_groups
from facetool.train.engine.build import init_class_weights
from facetool.train.engine.trainer import torch_seed
from facetool.train.heads import create_head
from facetool.train.models import create_backbone


def _xavier_bound(weight: torch.Tensor, gain: float) -> float:
    fan_out, fan_in = weight.shape
    return gain * math.sqrt(6.0 / (fan_in + fan_out))


def _assert_xavier_uniform(weight: torch.Tensor, gain: float, name: str) -> None:
    """Uniform in [-a, a] with a = gain * sqrt(6 / (fan_in + fan_out)): its max near a, its std near a / sqrt(3)."""
    a = _xavier_bound(weight, gain)
    w = weight.detach().double()
    assert w.abs().max() <= a * (1 + 1e-6), name
    assert w.abs().max() > 0.99 * a, name  # a normal of the same std would exceed the bound
    assert w.std().item() == pytest.approx(a / math.sqrt(3), rel=0.03), name


@pytest.fixture(scope="module")
def facet_base() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return dict(create_backbone("facet_base", init="facet").named_parameters())


def test_facet_init_is_facets(facet_base) -> None:
    """FaceT-B as FaceT builds it: zero position embedding; Xavier-uniform with DeepNorm's beta = 96^(-1/4) on every
    Linear (the whole fused qkv, the patch embedding, the pooling's key Linear), gain 1 on the head; zero biases;
    N(0, 1) prompts and pooling queries."""
    p = facet_base
    beta = (8 * 12) ** -0.25
    assert torch.count_nonzero(p["pos_embed"]) == 0
    for name in ("blocks.0.attn.qkv.weight", "blocks.5.attn.proj.weight", "blocks.11.mlp.fc1.weight",
                 "blocks.3.mlp.fc2.weight", "patch_embed.weight", "pool.fc.weight"):  # fmt: skip
        _assert_xavier_uniform(p[name], beta, name)
    _assert_xavier_uniform(p["head.0.weight"], 1.0, "head.0.weight")
    assert p["blocks.0.attn.qkv.weight"].std().item() == pytest.approx(0.00815, rel=0.01)  # FaceT's own, measured
    for name in ("blocks.0.attn.qkv.bias", "patch_embed.bias", "pool.fc.bias", "head.0.bias", "blocks.1.norm1.bias"):
        assert torch.count_nonzero(p[name]) == 0, name
    assert torch.equal(p["blocks.1.norm2.weight"], torch.ones(768))
    for name in ("prompts", "pool.queries"):
        assert p[name].std().item() == pytest.approx(1.0, rel=0.02) and abs(p[name].mean().item()) < 0.01


def test_facetool_init_stays_the_default() -> None:
    """Without the option: facetool's own init (truncated-normal position embedding, q and k at gain 1)."""
    torch.manual_seed(0)
    p = dict(create_backbone("facet_tiny").named_parameters())
    assert torch.count_nonzero(p["pos_embed"]) > 0 and p["pos_embed"].std().item() == pytest.approx(0.02, rel=0.05)
    qk = p["blocks.0.attn.qkv.weight"][: 2 * 192]
    assert qk.std().item() == pytest.approx(math.sqrt(2 / (2 * 192)), rel=0.03)  # Xavier-normal, gain 1


def test_facet_init_prenorm_has_gain_one_and_bad_names_are_refused() -> None:
    torch.manual_seed(0)
    p = dict(create_backbone("facet_tiny", init="facet", norm="prenorm").named_parameters())
    _assert_xavier_uniform(p["blocks.0.attn.qkv.weight"], 1.0, "qkv")  # FaceT: init_scale 1 under pre-norm
    assert torch.count_nonzero(p["pos_embed"]) == 0
    with pytest.raises(FacetoolError, match="init must be one of facetool, facet"):
        create_backbone("facet_tiny", init="xavier")


def test_multiface_unit_init_draws_unit_centres() -> None:
    """head.init = "unit": every class centre uniform in [-1, 1]^d scaled to norm 1, as MultiFace; the engine's
    rank-independent drawing keeps it; "normal" stays N(0, 0.01)."""
    torch.manual_seed(0)
    unit = create_head("multiface", 64, 300, spheres=4, init="unit")
    normal = create_head("multiface", 64, 300, spheres=4)
    init_class_weights(unit, seed=5)
    init_class_weights(normal, seed=5)
    for w in unit.class_weights():
        assert w.shape == (300, 16)
        torch.testing.assert_close(w.norm(dim=1), torch.ones(300), atol=1e-6, rtol=0)
        # before the scaling each coordinate is uniform in [-1, 1]: the largest |coordinate| of a row over its norm
        # is then well above the 1/sqrt(16) of a flat row, and no coordinate exceeds the norm
        assert (w.abs().max(dim=1).values > 0.3).float().mean() > 0.9
    for w in normal.class_weights():
        assert w.std().item() == pytest.approx(0.01, rel=0.05)
    fresh = create_head("multiface", 64, 300, spheres=4, init="unit")  # built outside the engine: unit norms too
    torch.testing.assert_close(fresh.class_weights()[0].norm(dim=1), torch.ones(300), atol=1e-6, rtol=0)
    with pytest.raises(FacetoolError, match="init must be one of normal, unit"):
        create_head("multiface", 64, 300, init="xavier")


def _groups(model: torch.nn.Module, no_decay: tuple[str, ...]) -> dict[str, float]:
    return {n: g["weight_decay"] for g in parameter_groups(model, None, 0.05, no_decay) for n in g["names"]}


def test_facet_decay_groups() -> None:
    """FaceT's rule, no_decay = ["1d", "bias", "pos_embed"]: prompts, pooling queries and Linear weights decay;
    biases, LayerNorms and the position embedding do not. facetool's default exempts prompts and queries too."""
    with torch.device("meta"):
        model = create_backbone("facet_base")
    wd = _groups(model, ("1d", "bias", "pos_embed"))
    decayed = {n for n, d in wd.items() if d == 0.05}
    assert {"prompts", "pool.queries", "patch_embed.weight", "pool.fc.weight", "head.0.weight"} <= decayed
    assert {n for n in wd if n.endswith(".weight") and "norm" not in n} <= decayed
    assert set(wd) - decayed == {"pos_embed"} | {n for n in wd if n.endswith(".bias") or "norm" in n}
    default = _groups(model, ("norm", "bias", "model"))
    assert default["prompts"] == default["pool.queries"] == default["pos_embed"] == 0.0


def test_arcface_torch_decays_every_parameter_and_facet_exempts_prelu() -> None:
    """arcface_torch, no_decay = []: every IResNet parameter decays (BatchNorm, PReLU and biases too); FaceT's
    ["1d", "bias"] on an IResNet leaves only the conv and fc weights decayed."""
    with torch.device("meta"):
        model = create_backbone("ir18")
    everything = _groups(model, ())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(everything) == trainable and set(everything.values()) == {0.05}
    facet = _groups(model, ("1d", "bias"))
    decayed = {n for n, d in facet.items() if d}
    assert decayed == {n for n, p in model.named_parameters() if p.requires_grad and p.ndim > 1}
    assert any("prelu" in n for n in facet) and all(facet[n] == 0 for n in facet if "prelu" in n)


def test_seed_per_rank() -> None:
    assert [torch_seed(7, r, False) for r in range(3)] == [7, 7, 7]
    assert [torch_seed(7, r, True) for r in range(3)] == [7, 8, 9]

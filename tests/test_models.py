"""Backbone registry, architectures (parameter counts, shapes), FaceT's options and backbone checkpoints."""

from __future__ import annotations

import math
import os

import pytest
import torch
from timm.layers import DropPath
from timm.models.vision_transformer import Block
from torch import nn

from facetool.pipeline.errors import FacetoolError
from facetool.train.models import create_backbone, list_backbones, load_backbone, register_backbone, save_backbone
from facetool.train.models.facet import DeepNormBlock, FaceT

PARAMS = {
    # arcface_torch's iresnet (stem conv-BN-PReLU, conv1x1-BN shortcut opening every stage, frozen-weight BN1d),
    # as its own modules count them (iresnet18 .. iresnet200 instantiated at deepinsight/insightface 7fadd420).
    "ir18": 24_025_600,
    "ir34": 34_139_328,
    "ir50": 43_590_848,
    "ir100": 65_156_160,
    "ir200": 118_833_920,
    # InsightFace_Pytorch's IR-SE.
    "irse50": 43_797_696,
    "irse100": 65_502_016,
    # InsightFace_Pytorch's MobileFaceNet with the 512-d Linear + BN1d head.
    "mobilefacenet": 1_200_512,
    # FaceT-B with 12 prompt layers of 2 x 32 tokens and prompt pooling (86,976,512 by FaceT's arithmetic).
    "facet_base": 86_976_512,
}


def images(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 112, 112, generator=g) * 2 - 1


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_registry_lists_every_backbone() -> None:
    assert set(list_backbones()) == {
        "ir18",
        "ir34",
        "ir50",
        "ir100",
        "ir200",
        "irse50",
        "irse100",
        "mobilefacenet",
        "facet_base",
        "facet_small",
        "facet_tiny",
        "tinynet",
    }
    assert list_backbones() == sorted(list_backbones())


def test_unknown_backbone_lists_known_names() -> None:
    with pytest.raises(FacetoolError, match="unknown backbone 'resnet9'") as err:
        create_backbone("resnet9")
    assert "ir100" in str(err.value) and "facet_base" in str(err.value)


def test_register_twice_is_an_error() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_backbone("ir50")(lambda: nn.Identity())


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_parameter_count(name: str) -> None:
    torch.manual_seed(0)
    assert count(create_backbone(name)) == PARAMS[name]


# Blocks per stage of arcface_torch's iresnet18 .. iresnet200 (recognition/arcface_torch/backbones/iresnet.py).
IRESNET_BLOCKS = {"ir18": (2, 2, 2, 2), "ir34": (3, 4, 6, 3), "ir50": (3, 4, 14, 3), "ir100": (3, 13, 30, 3),
                  "ir200": (6, 26, 60, 6)}  # fmt: skip


def iresnet_params(blocks: tuple[int, ...], embedding: int = 512) -> int:
    """Parameters of arcface_torch's IResNet from its structure: a 3x3 stem conv (3 -> 64), BN and PReLU; per block
    BN(in), conv3x3(in -> out), BN, PReLU, conv3x3(out -> out), BN, and on the first block of each stage (stride 2)
    a conv1x1 + BN shortcut; then BN2d(512), Linear(512*7*7 -> D) with bias and BN1d(D)."""
    n = 3 * 64 * 9 + 2 * 64 + 64
    cin = 64
    for cout, count in zip((64, 128, 256, 512), blocks, strict=True):
        for i in range(count):
            c = cin if i == 0 else cout
            n += 2 * c + 9 * c * cout + 2 * cout + cout + 9 * cout * cout + 2 * cout
            n += c * cout + 2 * cout if i == 0 else 0
        cin = cout
    return n + 2 * 512 + 512 * 49 * embedding + embedding + 2 * embedding


@pytest.mark.parametrize("name", sorted(IRESNET_BLOCKS))
def test_iresnet_counts_follow_arcface_torch_structure(name: str) -> None:
    with torch.device("meta"):  # shapes only
        model = create_backbone(name)
    assert iresnet_params(IRESNET_BLOCKS[name]) == PARAMS[name] == count(model)
    stages = [len(getattr(model, f"layer{i}")) for i in range(1, 5)]
    assert tuple(stages) == IRESNET_BLOCKS[name]
    assert all(getattr(model, f"layer{i}")[0].downsample is not None for i in range(1, 5))  # stride 2 everywhere


def test_facet_prompt_parameters_add_up() -> None:
    with_prompts = count(create_backbone("facet_base"))
    without = count(create_backbone("facet_base", prompt_layers=0))
    # 12 x 2 x 32 x 768 prompts, 2 x 32 x 768 pooling queries, the pooling key Linear 768 -> 768.
    assert with_prompts - without == 12 * 2 * 32 * 768 + 2 * 32 * 768 + 768 * 768 + 768


@pytest.mark.parametrize("name", ["mobilefacenet", "irse50", "ir50", "facet_tiny", "facet_small"])
def test_output_shape_and_masked_argument(name: str) -> None:
    torch.manual_seed(0)
    model = create_backbone(name).train()  # batch statistics: a fresh IResNet's running stats overflow
    x = images(2)
    out = model(x, masked=torch.tensor([False, True]))
    assert out.shape == (2, 512) and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert model(x).shape == (2, 512)


def test_cnns_ignore_the_masked_flag() -> None:
    torch.manual_seed(0)
    model = create_backbone("mobilefacenet").eval()
    x = images(2)
    with torch.no_grad():
        assert torch.equal(model(x, torch.tensor([True, True])), model(x, torch.tensor([False, False])))


def test_embedding_size_option() -> None:
    assert create_backbone("mobilefacenet", embedding_size=128).train()(images(2)).shape == (2, 128)
    assert create_backbone("facet_tiny", embedding_size=256).eval()(images(1)).shape == (1, 256)


def test_iresnet_final_bn_weight_is_frozen_at_one() -> None:
    model = create_backbone("ir50")
    assert not model.features.weight.requires_grad
    assert torch.equal(model.features.weight, torch.ones(512))
    assert all(p.requires_grad for n, p in model.named_parameters() if n != "features.weight")


def test_irse_shortcuts_follow_insightface_pytorch() -> None:
    body = create_backbone("irse50").body
    assert isinstance(body[0].shortcut, nn.MaxPool2d)  # 64 -> 64 at stride 2: subsampling only
    assert isinstance(body[3].shortcut, nn.Sequential)  # 64 -> 128: conv1x1 + BN
    assert len(body) == 24 and len(create_backbone("irse100").body) == 49


def test_facet_base_forward_on_cpu() -> None:
    torch.manual_seed(0)
    model = create_backbone("facet_base").eval()
    with torch.no_grad():
        out = model(images(2), torch.tensor([False, True]))
        tokens = model.forward_tokens(images(1))
    assert out.shape == (2, 512) and torch.isfinite(out).all()
    assert tokens.shape == (1, 196, 768)  # the 32 prompt tokens are dropped after each block


def test_prompts_follow_the_masked_flag_per_sample() -> None:
    torch.manual_seed(0)
    model = create_backbone("facet_tiny").eval()
    x = images(3)
    with torch.no_grad():
        holistic = model(x, torch.zeros(3, dtype=torch.bool))
        masked = model(x, torch.ones(3, dtype=torch.bool))
        mixed = model(x, torch.tensor([True, False, True]))
        default = model(x)
    assert (holistic - masked).abs().amax(dim=1).min() > 1e-3
    torch.testing.assert_close(mixed[[0, 2]], masked[[0, 2]])
    torch.testing.assert_close(mixed[1], holistic[1])
    assert torch.equal(default, holistic)


@pytest.mark.parametrize("norm", ["prenorm", "deepnorm"])
def test_without_prompts_the_flag_changes_nothing(norm: str) -> None:
    torch.manual_seed(0)
    model = create_backbone("facet_tiny", prompt_layers=0, norm=norm).eval()
    assert model.prompts is None and model.pool is None and not model.uses_masked
    x = images(2)
    with torch.no_grad():
        a = model(x, torch.tensor([False, False]))
        b = model(x, torch.tensor([True, True]))
        pooled = model.head(model.forward_tokens(x).mean(dim=1))
    assert torch.equal(a, b)
    torch.testing.assert_close(a, pooled)


def test_prompts_only_in_the_first_layers() -> None:
    torch.manual_seed(0)
    model = create_backbone("facet_tiny", prompt_layers=2)
    assert model.prompts.shape == (2, 2, 8, 192)
    x = images(2)
    with torch.no_grad():
        model.prompts[1].add_(1.0)  # layer 1 is prompted: changes the tokens
        t1 = model.forward_tokens(x)
        model.prompts[1].sub_(1.0)
        t0 = model.forward_tokens(x)
    assert (t1 - t0).abs().max() > 1e-3


@pytest.mark.parametrize(
    "name, options, match",
    [
        ("facet_tiny", {"norm": "postnorm"}, "norm must be one of"),
        ("facet_tiny", {"prompt_layers": 5}, "prompt_layers must be in 0..4"),
        ("tinynet", {"depth": 3}, "option not taken by tinynet: depth; it takes embedding_size, width"),
        ("ir50", {"width": 2, "norm": "x"}, "option not taken by ir50: norm, width"),
    ],
)
def test_option_errors(name: str, options: dict, match: str) -> None:
    with pytest.raises(FacetoolError, match=match) as err:
        create_backbone(name, **options)
    assert "\n" not in str(err.value)


def test_deepnorm_and_prenorm_build() -> None:
    torch.manual_seed(0)
    deep = create_backbone("facet_small", norm="deepnorm")
    pre = create_backbone("facet_small", norm="prenorm")
    assert all(isinstance(b, DeepNormBlock) for b in deep.blocks)
    assert all(isinstance(b, Block) and not isinstance(b, DeepNormBlock) for b in pre.blocks)
    assert deep.state_dict().keys() == pre.state_dict().keys()
    alpha, beta = 12**0.25, 48**-0.25  # N = 6 blocks
    assert deep.blocks[0].alpha == pytest.approx(alpha)
    # Xavier-normal std = gain * sqrt(2 / (fan_in + fan_out)): beta on v, out-proj and MLP; 1 on q and k.
    d = 384
    qkv = deep.blocks[2].attn.qkv.weight
    assert qkv[:d].std().item() == pytest.approx(math.sqrt(2 / (2 * d)), rel=0.03)
    assert qkv[2 * d :].std().item() == pytest.approx(beta * math.sqrt(2 / (2 * d)), rel=0.03)
    assert deep.blocks[2].attn.proj.weight.std().item() == pytest.approx(beta * math.sqrt(1 / d), rel=0.03)
    assert deep.blocks[2].mlp.fc1.weight.std().item() == pytest.approx(beta * math.sqrt(2 / (5 * d)), rel=0.03)
    assert pre.blocks[2].mlp.fc1.weight.std().item() == pytest.approx(0.02, rel=0.05)


def test_deepnorm_block_computes_post_norm_with_alpha() -> None:
    torch.manual_seed(0)
    block = DeepNormBlock(64, 4, 4.0, 0.0, alpha=2.5).eval()
    x = torch.randn(2, 10, 64)
    h = nn.functional.layer_norm(2.5 * x + block.attn(x), (64,), block.norm1.weight, block.norm1.bias)
    expected = nn.functional.layer_norm(2.5 * h + block.mlp(h), (64,), block.norm2.weight, block.norm2.bias)
    torch.testing.assert_close(block(x), expected)


def test_drop_path_rises_linearly() -> None:
    model = create_backbone("facet_tiny", drop_path=0.3)
    rates = [b.drop_path1.drop_prob if isinstance(b.drop_path1, DropPath) else 0.0 for b in model.blocks]
    assert rates == pytest.approx([0.0, 0.1, 0.2, 0.3])
    assert [b.drop_path2.drop_prob for b in model.blocks[1:]] == pytest.approx([0.1, 0.2, 0.3])
    x = images(4)
    torch.manual_seed(0)
    model.train()
    a, b = model(x), model(x)
    assert not torch.allclose(a, b)  # stochastic depth is active when training
    model.eval()
    assert torch.equal(model(x), model(x))


def test_patchify_order() -> None:
    model: FaceT = create_backbone("facet_tiny")
    x = images(1)
    patches = model.patchify(x)
    assert patches.shape == (1, 196, 192)
    r, c, p1, p2, ch = 3, 11, 5, 2, 1  # patch (3, 11), pixel (5, 2) in it, green channel
    assert patches[0, r * 14 + c, (p1 * 8 + p2) * 3 + ch] == x[0, ch, r * 8 + p1, c * 8 + p2]


def test_forward_tokens_keeps_selected_patches() -> None:
    torch.manual_seed(0)
    model = create_backbone("facet_tiny", prompt_layers=0).eval()
    keep = torch.tensor([[0, 5, 17], [3, 4, 195]])
    assert model.forward_tokens(images(2), keep=keep).shape == (2, 3, 192)


def test_layer_ids_and_no_weight_decay() -> None:
    model = create_backbone("facet_tiny")
    names = dict(model.named_parameters())
    assert model.layer_id("pos_embed") == 0 and model.layer_id("patch_embed.weight") == 0
    assert model.layer_id("blocks.0.attn.qkv.weight") == 1
    assert model.layer_id("blocks.3.mlp.fc2.bias") == 4
    assert model.layer_id("head.0.weight") == 5 and model.layer_id("prompts") == 5
    assert {model.layer_id(n) for n in names} == set(range(6))
    assert model.no_weight_decay() == {"pos_embed", "prompts", "pool.queries"}
    assert model.no_weight_decay() <= names.keys()
    assert create_backbone("facet_tiny", prompt_layers=0).no_weight_decay() == {"pos_embed"}


def test_checkpoint_round_trip(tmp_path) -> None:
    torch.manual_seed(0)
    options = {"norm": "prenorm", "prompt_layers": 2, "drop_path": 0.1}
    model = create_backbone("facet_tiny", **options).eval()
    with torch.no_grad():
        model.head[1].running_mean.add_(0.5)  # buffers travel too
    path = tmp_path / "backbone.pt"
    save_backbone(path, model, "facet_tiny", options)
    assert os.listdir(tmp_path) == ["backbone.pt"]  # no temporary file left behind
    loaded, name, opts = load_backbone(path)
    assert name == "facet_tiny" and opts == options and not loaded.training
    flags = torch.tensor([True, False])
    with torch.no_grad():
        torch.testing.assert_close(loaded(images(2), flags), model(images(2), flags), rtol=0, atol=0)


def test_checkpoint_of_a_cnn_round_trips(tmp_path) -> None:
    torch.manual_seed(0)
    model = create_backbone("mobilefacenet").train()
    model(images(4))  # move the BN running statistics away from their defaults
    model.eval()
    save_backbone(tmp_path / "m.pt", model, "mobilefacenet", {})
    loaded, _, _ = load_backbone(tmp_path / "m.pt")
    with torch.no_grad():
        assert torch.equal(loaded(images(2)), model(images(2)))


def _one_line_error(path, match: str) -> str:
    with pytest.raises(FacetoolError, match=match) as err:
        load_backbone(path)
    message = str(err.value)
    assert str(path) in message and "\n" not in message
    return message


def test_checkpoint_errors(tmp_path) -> None:
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"this is not a checkpoint" * 10)
    _one_line_error(junk, "not a facetool checkpoint")

    plain = tmp_path / "plain.pt"
    torch.save({"weight": torch.zeros(3)}, plain)
    _one_line_error(plain, "not a facetool checkpoint")

    model = create_backbone("facet_tiny", prompt_layers=0)
    other = tmp_path / "other.pt"
    save_backbone(other, model, "mobilefacenet", {})  # weights of one architecture under another's name
    msg = _one_line_error(other, "does not fit backbone 'mobilefacenet'")
    assert "missing" in msg and "unexpected" in msg

    shapes = tmp_path / "shapes.pt"
    save_backbone(shapes, model, "facet_tiny", {"prompt_layers": 0, "embedding_size": 128})
    assert "wrong shape" in _one_line_error(shapes, "does not fit backbone 'facet_tiny'")

    unknown = tmp_path / "unknown.pt"
    save_backbone(unknown, model, "vit_huge", {})
    _one_line_error(unknown, "unknown backbone 'vit_huge'")


def _vit_macs(tokens: int, dim: int, depth: int, prompt_tokens: int = 0, prompt_layers: int = 0) -> int:
    def block(t: int) -> int:
        return t * dim * dim * 12 + 2 * t * t * dim  # qkv, proj, MLP x4; q.k and attn.v

    macs = 196 * 192 * dim + dim * 512  # patch embedding, head
    macs += sum(block(tokens + (prompt_tokens if i < prompt_layers else 0)) for i in range(depth))
    if prompt_layers:
        macs += tokens * dim * dim + 2 * prompt_tokens * tokens * dim  # pooling keys; q.k and attn.v
    return macs


def test_bench_counts_multiply_adds() -> None:
    from facetool.bench.models import count_macs

    assert count_macs(create_backbone("facet_tiny", prompt_layers=0)) == _vit_macs(196, 192, 4)
    assert count_macs(create_backbone("facet_tiny", prompt_layers=3)) == _vit_macs(196, 192, 4, 8, 3)
    # arcface_torch quotes IResNet-50 at 6.3 GFLOPs, which are multiply-adds.
    assert count_macs(create_backbone("ir50")) / 1e9 == pytest.approx(6.31, abs=0.005)


def test_bench_models_command(tmp_path) -> None:
    import json

    from click.testing import CliRunner

    from facetool.cli import main

    out = tmp_path / "models.json"
    args = ["bench", "models", "--backbone", "facet_tiny", "--iters", "1", "--batch-size", "2", "--json", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "GMACs (multiply-adds)" in result.output and "facet_tiny" in result.output
    report = json.loads(out.read_text())
    assert report["batch_size"] == 2 and report["iters"] == 1
    (row,) = report["results"]
    assert row["backbone"] == "facet_tiny" and row["params"] == 2_005_376
    assert row["gmacs"] == pytest.approx(_vit_macs(196, 192, 4, 8, 4) / 1e9)
    assert row["images_per_s"] > 0
    bad = CliRunner().invoke(main, ["bench", "models", "--backbone", "resnet9"])
    assert bad.exit_code == 2 and "unknown resnet9" in bad.output

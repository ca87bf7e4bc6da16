"""Margin heads against a direct float64 implementation of their formulas, values and gradients."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from facetool.pipeline.errors import FacetoolError
from facetool.train.heads import HEADS, Head, create_head, list_heads, register_head

torch.set_num_threads(1)


# ---- float64 reference, written from the formulas (arccos form, not the head's code) ------------------------------
def ref_margin(kind: str, c: torch.Tensor, y: torch.Tensor, m, t=None) -> torch.Tensor:
    """Unscaled logits of one sphere; ``m`` a float or one value per row."""
    rows = torch.arange(c.shape[0])
    cy = c[rows, y]
    m = torch.as_tensor(m, dtype=torch.float64).expand(c.shape[0])
    out = c.clone()
    if kind == "softmax":
        return out
    if kind == "cosface":
        out[rows, y] = cy - m
        return out
    theta = torch.arccos(cy)
    arc = torch.where(theta + m < math.pi, torch.cos(theta + m), cy - m * torch.sin(math.pi - m))
    if kind == "curricularface":
        limit = torch.cos(theta + m).detach()
        for i in range(c.shape[0]):
            for j in range(c.shape[1]):
                if j != y[i] and c[i, j] > limit[i]:
                    out[i, j] = c[i, j] * (t + c[i, j])
    out[rows, y] = arc
    return out


def ref_head(name, x, weights, y, *, s=64.0, m=None, t=0.0, spheres=1, base=None, mag=None):
    """(list of logits, loss, new t) of head ``name`` computed in float64."""
    xn = x / x.norm(dim=1, keepdim=True)
    chunks = xn.chunk(spheres, dim=1)
    kind = base or name
    extra = 0.0
    if name == "magface":
        a = x.norm(dim=1).clamp(mag["l_a"], mag["u_a"])
        m = (mag["u_m"] - mag["l_m"]) / (mag["u_a"] - mag["l_a"]) * (a - mag["l_a"]) + mag["l_m"]
        kind = "arcface"
        extra = mag["lambda_g"] * (a / mag["u_a"] ** 2 + 1 / a).mean()
    logits, loss = [], 0.0
    for chunk, w in zip(chunks, weights, strict=True):
        c = chunk @ (w / w.norm(dim=1, keepdim=True)).T
        if name == "curricularface":
            t = 0.99 * t + 0.01 * c[torch.arange(len(y)), y].mean().item()
        z = s * ref_margin(kind, c, y, m, t)
        logits.append(z)
        loss = loss + F.cross_entropy(z, y)
    return logits, loss + extra, t


MAG = {"l_a": 10.0, "u_a": 110.0, "l_m": 0.45, "u_m": 0.8, "lambda_g": 35.0}
CASES = [
    ("softmax", {}, {"m": 0.0}),
    ("cosface", {}, {"m": 0.35}),
    ("cosface", {"m": 0.2, "s": 30.0}, {"m": 0.2, "s": 30.0}),
    ("arcface", {}, {"m": 0.5}),
    ("curricularface", {}, {"m": 0.5}),
    ("magface", {}, {"mag": MAG}),
    ("magface", {"l_m": 0.3, "lambda_g": 10.0}, {"mag": {**MAG, "l_m": 0.3, "lambda_g": 10.0}}),
]
for _base, _m in (("softmax", 0.0), ("cosface", 0.35), ("arcface", 0.3)):
    for _n in (2, 4):
        CASES.append(("multiface", {"spheres": _n, "base": _base}, {"spheres": _n, "base": _base, "m": _m}))


def inputs(name: str, n: int = 9, e: int = 16, c: int = 7, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, e, generator=gen, dtype=torch.float64)
    y = torch.randint(0, c, (n,), generator=gen)
    y[:3] = torch.tensor([0, 1, 2])
    if name == "magface":  # magnitudes below l_a, inside, and above u_a
        x = x / x.norm(dim=1, keepdim=True) * torch.linspace(4.0, 130.0, n, dtype=torch.float64)[:, None]
    return x, y


def head_and_ref_weights(head: Head) -> list[torch.Tensor]:
    return [w.detach().double().clone().requires_grad_() for w in head.class_weights()]


@pytest.mark.parametrize(("name", "options", "ref"), CASES, ids=lambda v: str(v))
def test_logits_loss_and_gradients_match_float64(name, options, ref):
    torch.manual_seed(1)
    head = create_head(name, 16, 7, **options)
    x, y = inputs(name)
    x32 = x.float().requires_grad_()
    weights = head_and_ref_weights(head)
    xr = x.clone().requires_grad_()
    want_logits, want_loss, _ = ref_head(name, xr, weights, y, **ref)
    got = head.logits(x32, y)
    got = got if isinstance(got, list) else [got]
    assert len(got) == len(want_logits)
    for g, w in zip(got, want_logits, strict=True):
        torch.testing.assert_close(g.double(), w.detach(), rtol=1e-5, atol=2e-4)
    loss = head(x32, y)
    torch.testing.assert_close(loss.double(), want_loss.detach(), rtol=1e-5, atol=1e-4)
    loss.backward()
    want_loss.backward()
    torch.testing.assert_close(x32.grad.double(), xr.grad, rtol=1e-4, atol=1e-5)
    for p, w in zip(head.class_weights(), weights, strict=True):
        torch.testing.assert_close(p.grad.double(), w.grad, rtol=1e-4, atol=1e-4)


def test_arcface_fallback_branch_and_gradient():
    torch.manual_seed(0)  # the head's weights: the test must not depend on what ran before it
    m = 0.5
    head = create_head("arcface", 8, 5, m=m)
    w = head.weight.detach().double()
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(6, 8, generator=gen, dtype=torch.float64)
    x[:3] = -w[y[:3]] + 0.002 * torch.randn(3, 8, generator=gen, dtype=torch.float64)  # theta near pi
    c = (x / x.norm(dim=1, keepdim=True)) @ (w / w.norm(dim=1, keepdim=True)).T
    cy = c[torch.arange(6), y]
    assert (cy[:3] <= math.cos(math.pi - m)).all() and (cy[3:] > math.cos(math.pi - m)).all()
    x32 = x.float().requires_grad_()
    logits = head.logits(x32, y)
    fallback = 64 * (cy[:3] - m * math.sin(math.pi - m))
    torch.testing.assert_close(logits[torch.arange(3), y[:3]].double(), fallback, rtol=1e-5, atol=2e-4)
    # the gradient goes through the margin: d target / d cos is cos m + sin m cot theta off the fallback, 1 on it
    weights = [w.clone().requires_grad_()]
    xr = x.clone().requires_grad_()
    _, want, _ = ref_head("arcface", xr, weights, y, m=m)
    want.backward()
    head(x32, y).backward()
    torch.testing.assert_close(x32.grad.double(), xr.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(head.weight.grad.double(), weights[0].grad, rtol=1e-4, atol=1e-4)


def test_arcface_gradient_is_not_the_no_grad_shortcut():
    head = create_head("arcface", 8, 5)
    x = torch.randn(4, 8, requires_grad=True)
    y = torch.tensor([0, 1, 2, 3])
    head(x, y).backward()
    shortcut = x.grad.clone()
    x.grad = None
    # the shortcut: margin values computed without gradient, the gradient as if there were no margin
    with torch.no_grad():
        z = head.logits(x, y)
    c = F.normalize(x, dim=1) @ F.normalize(head.weight, dim=1).T
    (F.cross_entropy(64 * c + (z - 64 * c).detach(), y)).backward()
    assert not torch.allclose(shortcut, x.grad, rtol=1e-3, atol=1e-6)


def test_curricularface_t_update_and_hard_negatives():
    torch.manual_seed(2)
    head = create_head("curricularface", 16, 7)
    weights = head_and_ref_weights(head)
    t = 0.0
    for step in range(3):
        x, y = inputs("curricularface", n=12, seed=10 + step)
        want_logits, want_loss, t_new = ref_head("curricularface", x, weights, y, m=0.5, t=t)
        # the reference's hard negatives exist, so the rule is exercised
        c = (x / x.norm(dim=1, keepdim=True)) @ (weights[0] / weights[0].norm(dim=1, keepdim=True)).T.detach()
        cy = c[torch.arange(12), y]
        hard = c > torch.cos(torch.arccos(cy) + 0.5)[:, None]
        hard[torch.arange(12), y] = False
        assert hard.any()
        torch.testing.assert_close(head.logits(x.float(), y).double(), want_logits[0].detach(), rtol=1e-5, atol=2e-4)
        assert head.t.item() == pytest.approx(t, abs=1e-7)  # logits does not store t
        loss = head(x.float(), y)
        torch.testing.assert_close(loss.double(), want_loss.detach(), rtol=1e-5, atol=1e-4)
        assert head.t.item() == pytest.approx(t_new, abs=1e-6)
        t = t_new
    head.eval()
    head(x.float(), y)
    assert head.t.item() == pytest.approx(t, abs=1e-6)  # no update in eval mode


def test_magface_margin_and_regulariser():
    head = create_head("magface", 8, 5)
    a = torch.tensor([1.0, 10.0, 60.0, 110.0, 500.0])
    torch.testing.assert_close(head.magnitude(torch.eye(5, 8) * a[:, None]), torch.tensor([10.0, 10, 60, 110, 110]))
    torch.testing.assert_close(head.margin_of(torch.tensor([10.0, 60.0, 110.0])), torch.tensor([0.45, 0.625, 0.8]))
    x = torch.eye(5, 8) * a[:, None]
    y = torch.arange(5)
    ce_only = F.cross_entropy(head.logits(x, y), y)
    clamped = a.clamp(10, 110)
    g = 35.0 * (clamped / 110**2 + 1 / clamped).mean()
    torch.testing.assert_close(head(x, y), ce_only + g)


def test_multiface_chunks_are_not_renormalised():
    head = create_head("multiface", 8, 3, spheres=2, base="softmax", s=1.0)
    x = torch.tensor([[3.0, 4.0, 0, 0, 0, 0, 0, 0]])  # all its norm in sphere 0
    for sphere in head.spheres:
        sphere.weight.data = torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 1.0, 0]])
    z0, z1 = head.logits(x, torch.tensor([0]))
    torch.testing.assert_close(z0, torch.tensor([[0.6, 0.8, 0.0]]))
    torch.testing.assert_close(z1, torch.zeros(1, 3))
    assert [name for name, _ in head.named_parameters()] == ["spheres.0.weight", "spheres.1.weight"]


@pytest.mark.parametrize(
    "name, options, match",
    [
        ("nosuch", {}, "unknown head 'nosuch'"),
        ("arcface", {"margin2": 0.1}, "margin2"),
        ("cosface", {"l_a": 3}, "l_a"),
        ("arcface", {"spheres": 2}, "spheres"),
        ("multiface", {"spheres": 3}, "3 equal spheres"),
        ("multiface", {"base": "magface"}, "magface"),
        ("softmax", {"m": 0.2}, "no margin"),
        ("arcface", {"m": 2.0}, "angular margin"),
        ("magface", {"l_a": 120.0}, "l_a < u_a"),
        ("cosface", {"s": -1.0}, "s must be positive"),
        ("cosface", {"sample_rate": 1.5}, "sample_rate must be in"),
        ("cosface", {"s": "big"}, "head 'cosface'"),
    ],
)
def test_bad_head_options_are_one_line_errors(name, options, match):
    with pytest.raises(FacetoolError, match=match) as err:
        create_head(name, 8, 5, **options)
    assert "\n" not in str(err.value)


def test_registry_and_options():
    assert {"softmax", "cosface", "arcface", "curricularface", "magface", "multiface"} <= set(list_heads())
    head = create_head("multiface", 512, 11, spheres=2, base="arcface", m=0.3)
    assert head.m == 0.3 and [tuple(w.shape) for w in head.class_weights()] == [(11, 256), (11, 256)]
    assert create_head("multiface", 8, 5, base="cosface").m == 0.35
    assert create_head("arcface", 8, 5).m == 0.5 and create_head("cosface", 8, 5).s == 64.0
    assert tuple(create_head("magface", 8, 5).weight.shape) == (5, 8)

    @register_head("test-plain")
    class Plain(Head):
        """A normalised softmax registered from outside."""

    try:
        assert "test-plain" in list_heads()
        assert isinstance(create_head("test-plain", 4, 3), Plain)
        with pytest.raises(ValueError, match="already registered"):
            register_head("test-plain")(Plain)
    finally:
        HEADS.pop("test-plain")


@pytest.mark.parametrize("name", ["arcface", "curricularface", "magface"])
def test_gradients_finite_where_cos_is_plus_or_minus_one(name):
    head = create_head(name, 8, 4)
    y = torch.tensor([0, 1, 2, 3])
    x = head.weight.detach().clone() * torch.tensor([20.0, -20.0, 20.0, -20.0])[:, None]
    x.requires_grad_()
    head(x, y).backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(head.weight.grad).all()


def test_bfloat16_autocast_and_inputs():
    torch.manual_seed(4)
    head = create_head("multiface", 16, 9, spheres=2, base="arcface")
    x, y = torch.randn(6, 16), torch.randint(0, 9, (6,))
    full = head(x, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = head(x, y)
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, full, rtol=2e-2, atol=0.5)
    xb = x.bfloat16().requires_grad_()
    head(xb, y).backward()
    assert xb.grad.dtype == torch.bfloat16 and torch.isfinite(xb.grad.float()).all()


# ---- fidelity options ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "options"), [("arcface", {}), ("multiface", {"spheres": 2, "base": "cosface"})])
def test_logits_and_loss_are_float32_under_bf16_autocast(name, options):
    """The classifier leaves autocast: bf16 cosines would be off by up to ~0.25 at s = 64."""
    torch.manual_seed(6)
    head = create_head(name, 8, 50, **options)
    x, y = torch.randn(16, 8), torch.randint(0, 50, (16,))
    want, want_loss = head.logits(x, y), head(x, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, loss = head.logits(x, y), head(x, y)
    for g, w in zip(got if isinstance(got, list) else [got], want if isinstance(want, list) else [want], strict=True):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, w, rtol=0, atol=1e-5)
    torch.testing.assert_close(loss, want_loss, rtol=0, atol=1e-5)


def arc_rows(head, n: int = 6):
    """Embeddings whose first row sits opposite its class centre (theta + m past pi), and their labels."""
    w = head.class_weights()[0].detach()
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(n, head.embedding_size, generator=gen)
    y = torch.arange(n) % w.shape[0]
    x[0, : w.shape[1]] = -w[y[0]] * 50 + 0.01 * torch.randn(w.shape[1], generator=gen)
    return x, y


@pytest.mark.parametrize(
    ("name", "options"),
    [("arcface", {}), ("curricularface", {}), ("multiface", {"spheres": 2, "base": "arcface", "m": 0.3})],
)
def test_straight_margin_is_cos_theta_plus_m_with_the_identity_gradient(name, options):
    """margin_grad = "straight": target value cos(arccos(c) + m) without fallback, gradient of the plain cosine."""
    torch.manual_seed(7)
    through = create_head(name, 8, 5, **options)
    straight = create_head(name, 8, 5, margin_grad="straight", **options)
    straight.load_state_dict(through.state_dict())
    x, y = arc_rows(through)
    rows, m, s = torch.arange(len(y)), straight.m, straight.s

    def grads(head, straight_through):
        xx = x.clone().requires_grad_()
        zs = head.logits(xx, y)
        zs = zs if isinstance(zs, list) else [zs]
        loss = 0.0
        for chunk, w, z in zip(F.normalize(xx, dim=1).chunk(len(zs), dim=1), head.class_weights(), zs, strict=True):
            c = (chunk @ F.normalize(w, dim=1).T)[rows, y]
            if straight_through is not None:  # the identity form: s * c plus a constant that carries the value
                value = s * torch.cos(torch.arccos(c.detach()) + m)
                torch.testing.assert_close(straight_through.pop(0)[rows, y], value, rtol=1e-5, atol=1e-4)
                z = z.index_put((rows, y), s * c + (value - s * c).detach())
            loss = loss + F.cross_entropy(z, y)
        return torch.autograd.grad(loss, [xx, *head.class_weights()])

    with torch.no_grad():
        values = straight.logits(x, y)
        values = values if isinstance(values, list) else [values]
    assert values[0][0, y[0]] > s * (math.cos(math.pi - m) - 0.01)  # no fallback: cos(theta + m) turns back up
    got = grads(straight, None)
    want = grads(through, [v.clone() for v in values])
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-3, atol=1e-5)
    other = grads(through, None)[0]
    assert (got[0] - other).abs().max() > 0.05 * other.abs().max()


@pytest.mark.parametrize("fallback", ["arcface", "easy", "plain"])
def test_magface_fallbacks(fallback):
    head = create_head("magface", 8, 5, fallback=fallback)
    w = F.normalize(head.weight.detach().double(), dim=1)
    cy = torch.tensor([0.9, 0.2, -0.3, -0.8, -0.99], dtype=torch.float64)  # last two past theta + m = pi
    a = torch.tensor([20.0, 50.0, 80.0, 100.0, 110.0], dtype=torch.float64)
    y = torch.arange(5)
    # a row with target cosine cy and norm a: cy along its class centre plus an orthogonal part
    other = torch.randn(5, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    other = F.normalize(other - (other * w).sum(1, keepdim=True) * w, dim=1)
    x = (cy[:, None] * w + (1 - cy[:, None] ** 2).sqrt() * other) * a[:, None]
    m = head.margin_of(a)
    arc = torch.cos(torch.arccos(cy) + m)
    want = {
        "arcface": torch.where(cy > -torch.cos(m), arc, cy - m * torch.sin(math.pi - m)),
        "easy": torch.where(cy > 0, arc, cy),
        "plain": torch.where(cy > -torch.cos(m), arc, cy),
    }[fallback]
    assert (cy <= -torch.cos(m)).sum() == 2
    got = head.logits(x.float(), y)[y, y].double() / head.s
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "name, options, match",
    [
        ("arcface", {"margin_grad": "none"}, "margin_grad must be one of through, straight"),
        ("multiface", {"base": "cosface", "margin_grad": "straight"}, "needs base = 'arcface'"),
        ("magface", {"fallback": "easy_margin"}, "fallback must be one of arcface, easy, plain"),
        ("cosface", {"margin_grad": "straight"}, "margin_grad"),
        ("cosface", {"update": "sparse"}, "update must be one of dense, swap"),
        ("cosface", {"swap_step": "fresh"}, "swap_step must be one of counter, reset"),
        ("cosface", {"swap_step": "reset"}, "needs update = 'swap'"),
    ],
)
def test_bad_fidelity_options_are_one_line_errors(name, options, match):
    with pytest.raises(FacetoolError, match=match) as err:
        create_head(name, 8, 5, **options)
    assert "\n" not in str(err.value)

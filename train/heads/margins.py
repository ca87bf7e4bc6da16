"""Margin functions on a block of cosines, shared by whole and sharded (Partial FC) classifiers.

Each takes ``cos`` (rows x local classes) and ``target``: for every row the local column of its class, or -1 where
the class is held by another rank (or, for a whole classifier, never). They return new unscaled logits; the
target column of a row is changed only on the rank that holds it. Everything is differentiable, margin included
(the ArcFace paper's gradient), unless ``straight=True`` asks for arcface_torch's straight-through margin.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

#: ``margin_grad`` of the angular heads: differentiate through cos(theta + m) ("through", FaceT, MultiFace, the ArcFace
#: paper and arcface_torch before 2022-12) or arcface_torch's straight-through margin ("straight").
MARGIN_GRADS = ("through", "straight")
#: MagFace's ``fallback`` where theta + m(a) would pass pi (see :func:`angular_target`).
FALLBACKS = ("arcface", "easy", "plain")

# Floor of sin^2(theta) in ArcFace's cos(theta + m): keeps d/dcos finite at cos = +-1 (it diverges there).
SIN2_FLOOR = 1e-6


def owned_rows(target: Tensor) -> Tensor:
    """Indices of the rows whose target column is held here."""
    return torch.nonzero(target >= 0).squeeze(1)


def target_cos(cos: Tensor, target: Tensor) -> Tensor:
    """Each row's target cosine where held here, 0 elsewhere (differentiable)."""
    rows = owned_rows(target)
    out = cos.new_zeros(cos.shape[0])
    return out.index_put((rows,), cos[rows, target[rows]])


def replace_target(cos: Tensor, target: Tensor, values: Tensor) -> Tensor:
    """``cos`` with each held target entry replaced by ``values[row]``; gradients reach both."""
    rows = owned_rows(target)
    return cos.index_put((rows, target[rows]), values[rows])


def cos_plus_margin(c: Tensor, m: float | Tensor) -> Tensor:
    """cos(theta + m) = c cos m - sin(theta) sin m for c = cos(theta), without arccos so that it is differentiable."""
    sin_theta = torch.sqrt(torch.clamp(1.0 - c * c, min=SIN2_FLOOR))
    if isinstance(m, Tensor):
        return c * torch.cos(m) - sin_theta * torch.sin(m)
    return c * math.cos(m) - sin_theta * math.sin(m)


def arcface_target(c: Tensor, m: float | Tensor) -> Tensor:
    """ArcFace's target: cos(theta + m) where theta + m < pi (c > cos(pi - m)), else c - m sin(pi - m).

    The fallback keeps the target logit monotonic in theta where theta + m would pass pi.
    """
    if isinstance(m, Tensor):
        threshold, drop = -torch.cos(m), m * torch.sin(m)
    else:
        threshold, drop = -math.cos(m), m * math.sin(m)
    return torch.where(c > threshold, cos_plus_margin(c, m), c - drop)


def angular_target(c: Tensor, m: float | Tensor, fallback: str = "arcface") -> Tensor:
    """cos(theta + m) with one of three rules where the margin would not help (differentiable throughout).

    ``"arcface"``: :func:`arcface_target` (past theta + m = pi, c - m sin(pi - m)). ``"easy"``: the original
    MagFace's ``easy_margin``, c itself wherever c <= 0 (IrvingMeng/MagFace models/magface.py @ 99bae614ac L98-99,
    ``MagLinear(easy_margin=True)`` L75). ``"plain"``: FaceT's MagFace, c itself past theta + m = pi, i.e.
    ``where(cos > cos(pi - m), cos(theta + m), cos - 0)`` (zyainfal/Joint-Holistic-and-Masked-Face-Recognition
    code/loss/face_losses.py @ 3126602be5 L15, L36-37).
    """
    if fallback == "arcface":
        return arcface_target(c, m)
    if fallback == "easy":
        return torch.where(c > 0, cos_plus_margin(c, m), c)
    if fallback == "plain":
        threshold = -torch.cos(m) if isinstance(m, Tensor) else -math.cos(m)
        return torch.where(c > threshold, cos_plus_margin(c, m), c)
    raise ValueError(f"fallback must be one of {', '.join(FALLBACKS)}, got {fallback!r}")


class _StraightThrough(torch.autograd.Function):
    """Forward: cos(arccos(c) + m), computed without gradient; backward: the identity (d out / d c = 1)."""

    @staticmethod
    def forward(ctx, c: Tensor, m: float) -> Tensor:  # type: ignore[override]
        return torch.cos(torch.arccos(c.clamp(-1.0, 1.0)) + m)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return grad, None


def straight_target(c: Tensor, m: float) -> Tensor:
    """arcface_torch's current ArcFace target: the value cos(theta + m) with no fallback (theta from arccos, so it
    turns back up past theta + m = pi), the gradient passed straight through as if there were no margin.

    As ``CombinedMarginLoss`` does under ``torch.no_grad()`` since deepinsight/insightface 657ae30e41 ("fixed
    arcface impl"; recognition/arcface_torch/losses.py @ 7fadd420c2 L42-49). Unlike it, the other logits are not
    passed through arccos and cos (a round-off difference only).
    """
    return _StraightThrough.apply(c, m)


def softmax_margin(cos: Tensor, target: Tensor, m: float = 0.0) -> Tensor:
    """Normalised softmax: no margin."""
    return cos


def cosface_margin(cos: Tensor, target: Tensor, m: float) -> Tensor:
    """CosFace: the target cosine minus m."""
    return replace_target(cos, target, target_cos(cos, target) - m)


def arcface_margin(cos: Tensor, target: Tensor, m: float | Tensor, straight: bool = False) -> Tensor:
    """ArcFace: the target cosine becomes cos(theta + m) (with the fallback); ``m`` may be one value per row.
    ``straight``: :func:`straight_target` instead (``m`` one value)."""
    c = target_cos(cos, target)
    return replace_target(cos, target, straight_target(c, m) if straight else arcface_target(c, m))


def curricular_margin(
    cos: Tensor, target: Tensor, all_target_cos: Tensor, t: Tensor | float, m: float, straight: bool = False
) -> Tensor:
    """CurricularFace: ArcFace's target; a negative with cos_j > cos(theta_y + m) becomes cos_j (t + cos_j).

    ``all_target_cos`` is every row's target cosine (from whichever rank holds it): the hard-negative threshold
    of a row is needed on every rank, also where its target column is not. ``straight``: the target as
    :func:`straight_target`.
    """
    threshold = cos_plus_margin(all_target_cos.detach(), m)
    hard = cos > threshold[:, None]
    rows = owned_rows(target)
    hard[rows, target[rows]] = False  # the target is no negative
    out = torch.where(hard, cos * (t + cos), cos)
    c = target_cos(cos, target)
    return replace_target(out, target, straight_target(c, m) if straight else arcface_target(c, m))


MARGINS = {"softmax": softmax_margin, "cosface": cosface_margin, "arcface": arcface_margin}
"""Margins a MultiFace sphere can wrap, by head name."""

"""Margin heads (softmax, CosFace, ArcFace, CurricularFace, MagFace, MultiFace), each usable with Partial FC.

Every head is a :class:`~.base.Head` that supplies its margin on a block of cosines (:mod:`.margins`); the class
weight, the gathering of the global batch, the class sampling and the sharded cross-entropy are the base's.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from facetool.pipeline.errors import FacetoolError

from .base import Batch, Head, check_choice, register_head
from .distributed import all_reduce, world
from .margins import (
    FALLBACKS,
    MARGIN_GRADS,
    MARGINS,
    angular_target,
    arcface_margin,
    cosface_margin,
    curricular_margin,
    replace_target,
    target_cos,
)


@register_head("softmax")
class Softmax(Head):
    """Normalised softmax (NormFace): s * cos, no margin; ``m`` is accepted only as 0."""

    def __init__(self, embedding_size: int, num_classes: int, *, m: float = 0.0, **options: Any) -> None:
        if m != 0:
            raise FacetoolError(f"softmax has no margin (m={m}); use cosface or arcface")
        super().__init__(embedding_size, num_classes, **options)
        self.m = 0.0


@register_head("cosface")
class CosFace(Head):
    """CosFace: target logit s * (cos - m)."""

    def __init__(self, embedding_size: int, num_classes: int, *, m: float = 0.35, **options: Any) -> None:
        super().__init__(embedding_size, num_classes, **options)
        self.m = float(m)

    def margin(self, cos: Tensor, batch: Batch) -> Tensor:
        return cosface_margin(cos, batch.target, self.m)


def _check_angle_margin(m: float) -> float:
    if not 0.0 <= m < math.pi / 2:
        raise FacetoolError(f"an angular margin must be in [0, pi/2), got {m}")
    return float(m)


@register_head("arcface")
class ArcFace(Head):
    """ArcFace: target logit s * cos(theta + m), falling back to s * (cos - m sin(pi - m)) where theta + m >= pi.

    ``margin_grad``: ``"through"`` differentiates through cos(theta + m) with that fallback (FaceT, MultiFace,
    arcface_torch 2022-01 to 2022-12); ``"straight"`` is arcface_torch's current form: the value cos(theta + m)
    without fallback, the gradient of the plain cosine (:func:`~.margins.straight_target`).
    """

    def __init__(
        self, embedding_size: int, num_classes: int, *, m: float = 0.5, margin_grad: str = "through", **options: Any
    ) -> None:
        super().__init__(embedding_size, num_classes, **options)
        self.m = _check_angle_margin(m)
        self.margin_grad = check_choice("margin_grad", margin_grad, MARGIN_GRADS)

    def margin(self, cos: Tensor, batch: Batch) -> Tensor:
        return arcface_margin(cos, batch.target, self.m, straight=self.margin_grad == "straight")


@register_head("curricularface")
class CurricularFace(Head):
    """CurricularFace: ArcFace's target; negatives with cos_j > cos(theta_y + m) become cos_j (t + cos_j).

    ``t`` (buffer) is an EMA of the global batch's mean target cosine, momentum 0.01 from 0, updated before it is
    used in each training step and the same on every rank (gathered batch under Partial FC, an all-reduced mean in
    data-parallel training). ``logits`` shows the step's t without storing it; ``forward`` stores it.
    ``margin_grad`` as ArcFace's (FaceT and CurricularFace's own code differentiate through: "through").
    """

    momentum: ClassVar[float] = 0.01

    def __init__(
        self, embedding_size: int, num_classes: int, *, m: float = 0.5, margin_grad: str = "through", **options: Any
    ) -> None:
        super().__init__(embedding_size, num_classes, **options)
        self.m = _check_angle_margin(m)
        self.margin_grad = check_choice("margin_grad", margin_grad, MARGIN_GRADS)
        self.register_buffer("t", torch.zeros(()))

    def _all_target_cos(self, cos: Tensor, batch: Batch) -> Tensor:
        values = target_cos(cos.detach(), batch.target)
        return all_reduce(values, self.shard)  # each row's target is held by exactly one rank

    def _step_t(self, all_target_cos: Tensor) -> Tensor:
        if not self.training:
            return self.t
        mean = all_target_cos.mean()
        world_size = world()[1]
        if not self.shard.distributed and world_size > 1:  # data parallel: each rank saw its own batch
            dist.all_reduce(mean)
            mean = mean / world_size
        return (1.0 - self.momentum) * self.t + self.momentum * mean

    def margin(self, cos: Tensor, batch: Batch) -> Tensor:
        all_cos = self._all_target_cos(cos, batch)
        t = self._step_t(all_cos)
        batch.state["t"] = t
        return curricular_margin(cos, batch.target, all_cos, t, self.m, straight=self.margin_grad == "straight")

    def commit(self, batch: Batch) -> None:
        self.t.copy_(batch.state["t"])


@register_head("magface")
class MagFace(Head):
    """MagFace: ArcFace's target with m(a), a = clamp(|x|, l_a, u_a) of the unnormalised embedding.

    m(a) rises linearly from l_m at l_a to u_m at u_a; loss = CE + lambda_g * mean(a / u_a^2 + 1 / a). Gradients
    flow through a into both m(a) and the regulariser. ``fallback`` where the margin would not help
    (:func:`~.margins.angular_target`): ``"arcface"`` (ArcFace's), ``"easy"`` (the original MagFace's easy_margin)
    or ``"plain"`` (FaceT's: the plain cosine past theta + m = pi). The g-term's mean is over the global batch and
    its gradient does not depend on the number of ranks; FaceT's grows with its GPUs (configs/README.md).
    """

    def __init__(
        self,
        embedding_size: int,
        num_classes: int,
        *,
        l_a: float = 10.0,
        u_a: float = 110.0,
        l_m: float = 0.45,
        u_m: float = 0.8,
        lambda_g: float = 35.0,
        fallback: str = "arcface",
        **options: Any,
    ) -> None:
        super().__init__(embedding_size, num_classes, **options)
        self.fallback = check_choice("fallback", fallback, FALLBACKS)
        if not 0 < l_a < u_a:
            raise FacetoolError(f"need 0 < l_a < u_a, got l_a={l_a}, u_a={u_a}")
        _check_angle_margin(l_m)
        _check_angle_margin(u_m)
        self.l_a, self.u_a, self.l_m, self.u_m, self.lambda_g = (
            float(l_a),
            float(u_a),
            float(l_m),
            float(u_m),
            float(lambda_g),
        )

    def magnitude(self, embeddings: Tensor) -> Tensor:
        """a = clamp(|x|, l_a, u_a)."""
        return embeddings.float().norm(dim=1).clamp(self.l_a, self.u_a)

    def margin_of(self, a: Tensor) -> Tensor:
        """m(a), linear from l_m at l_a to u_m at u_a."""
        return (self.u_m - self.l_m) / (self.u_a - self.l_a) * (a - self.l_a) + self.l_m

    def margin(self, cos: Tensor, batch: Batch) -> Tensor:
        m = self.margin_of(self.magnitude(batch.embeddings))
        if self.fallback == "arcface":
            return arcface_margin(cos, batch.target, m)
        return replace_target(cos, batch.target, angular_target(target_cos(cos, batch.target), m, self.fallback))

    def extra_loss(self, embeddings: Tensor, batch: Batch) -> Tensor:
        """lambda_g * mean over the global batch of g(a) = a / u_a^2 + 1 / a, each rank differentiating its rows."""
        a = self.magnitude(embeddings)
        local = (a / self.u_a**2 + 1.0 / a).sum()
        total = all_reduce(local.detach().clone(), self.shard)
        return self.lambda_g * (local + (total - local.detach())) / batch.embeddings.shape[0]


class _Sphere(nn.Module):
    """One MultiFace sphere's class weight."""

    def __init__(self, rows: int, width: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(rows, width).normal_(0.0, 0.01))


@register_head("multiface")
class MultiFace(Head):
    """MultiFace: the L2-normalised embedding cut into ``spheres`` equal chunks, each with its own class weight.

    As in MultiFace: the chunks are NOT re-normalised, so a sphere's cosine is |x_i| cos(theta_i) and its effective
    scale s |x_i| (about s / sqrt(N)); only the class weights are normalised. Each sphere applies the ``base``
    margin (softmax, cosface, arcface; default m 0, 0.35, 0.3) at scale ``s``, and the N cross-entropies are
    summed (not averaged). Weights: ``spheres.{i}.weight``, each (num_classes, embedding_size / N).
    ``margin_grad`` as ArcFace's, for ``base = "arcface"`` only (MultiFace's ``ArcfaceMultiSphere`` differentiates
    through: "through").

    ``init``: "normal" draws the class centres N(0, 0.01) as every head does; "unit" as MultiFace does,
    ``uniform_(-1, 1).renorm_(2, 1, 1e-5).mul_(1e5)`` on its (d x C) kernels, i.e. each class centre uniform in
    [-1, 1]^d and scaled to unit L2 norm (KikimorMay/MultiFace model.py L444-448 @
    4df7206ec7dbbbf095fd6dcd6f98e91ab0547c72).
    """

    _fixed_options: ClassVar[frozenset[str]] = frozenset()
    returns_list: ClassVar[bool] = True
    _default_m: ClassVar[dict[str, float]] = {"softmax": 0.0, "cosface": 0.35, "arcface": 0.3}
    inits: ClassVar[tuple[str, ...]] = ("normal", "unit")

    def __init__(
        self,
        embedding_size: int,
        num_classes: int,
        *,
        spheres: int = 2,
        base: str = "arcface",
        m: float | None = None,
        margin_grad: str = "through",
        init: str = "normal",
        **options: Any,
    ) -> None:
        check_choice("margin_grad", margin_grad, MARGIN_GRADS)
        if margin_grad == "straight" and base != "arcface":
            raise FacetoolError(f"margin_grad = 'straight' needs base = 'arcface' (an angular margin), not {base!r}")
        if init not in self.inits:
            raise FacetoolError(f"multiface init must be one of {', '.join(self.inits)}, not {init!r}")
        if base not in MARGINS:
            raise FacetoolError(f"multiface wraps one of {', '.join(sorted(MARGINS))}, not {base!r}")
        m = self._default_m[base] if m is None else float(m)
        if base == "softmax" and m != 0:
            raise FacetoolError(f"softmax has no margin (m={m})")
        if base == "arcface":
            _check_angle_margin(m)
        super().__init__(embedding_size, num_classes, spheres=spheres, **options)
        self.base, self.m, self.margin_grad, self.init = base, m, margin_grad, init
        self._base_margin = partial(arcface_margin, straight=True) if margin_grad == "straight" else MARGINS[base]
        if init == "unit":
            with torch.no_grad():
                for weight in self.class_weights():
                    weight.copy_(self.draw_class_rows(weight.shape[0], weight.shape[1]))

    def draw_class_rows(self, rows: int, width: int, generator: torch.Generator | None = None) -> Tensor:
        """``rows`` fresh class centres of ``width`` as ``init`` says (the engine draws every head's rows through
        this method when the head has it); each row is drawn on its own, so chunks of rows draw the same."""
        if self.init == "normal":
            return torch.empty(rows, width).normal_(0.0, 0.01, generator=generator)
        centres = torch.empty(rows, width).uniform_(-1.0, 1.0, generator=generator)
        return centres / centres.norm(dim=1, keepdim=True).clamp_min(1e-12)

    def _make_weights(self, width: int) -> None:
        self.spheres = nn.ModuleList(_Sphere(self.shard.size, width) for _ in range(self.num_spheres))

    def class_weights(self) -> list[nn.Parameter]:
        return [sphere.weight for sphere in self.spheres]

    def margin(self, cos: Tensor, batch: Batch) -> Tensor:
        return self._base_margin(cos, batch.target, self.m)

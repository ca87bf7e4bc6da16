"""Margin heads (softmax, CosFace, ArcFace, CurricularFace, MagFace, MultiFace), each usable with Partial FC.

One mechanism serves every head: :class:`Head` holds the class weight (whole, or this rank's rows under Partial
FC), gathers the global batch, samples classes, computes cosines per sphere and the sharded cross-entropy; a head
only supplies its margin on a block of cosines (:mod:`.margins`).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from .distributed import Shard, all_gather_rows, all_reduce, class_shard, sharded_cross_entropy, world
from .margins import MARGINS, arcface_margin, cosface_margin, curricular_margin, softmax_margin, target_cos

_HEADS: dict[str, type[Head]] = {}


def register_head(name: str) -> Callable[[type[Head]], type[Head]]:
    """Class decorator adding a :class:`Head` subclass to the registry under ``name``."""

    def add(cls: type[Head]) -> type[Head]:
        if name in _HEADS:
            raise ValueError(f"head {name!r} is already registered")
        cls.name = name
        _HEADS[name] = cls
        return cls

    return add


def list_heads() -> list[str]:
    """Names of the registered heads."""
    return sorted(_HEADS)


def create_head(name: str, embedding_size: int, num_classes: int, **options: Any) -> Head:
    """Build the head ``name`` for ``num_classes`` classes; unknown names or options raise ``ValueError``."""
    if name not in _HEADS:
        raise ValueError(f"unknown head {name!r}; known heads: {', '.join(list_heads())}")
    cls = _HEADS[name]
    allowed = cls.option_names()
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ValueError(
            f"unknown option(s) for head {name!r}: {', '.join(unknown)}; it takes {', '.join(sorted(allowed))}"
        )
    return cls(embedding_size, num_classes, **options)


@dataclass
class Batch:
    """One step's global batch as a head sees it."""

    embeddings: Tensor  # all ranks' embeddings, unnormalised (gathered under Partial FC)
    labels: Tensor  # their class ids
    target: Tensor  # each row's column in this rank's logits, -1 where another rank holds the class
    index: Tensor | None  # sampled local classes (sorted), None when all local classes are used
    state: dict[str, Tensor] = field(default_factory=dict)  # per-step values a head commits after the loss


class Head(nn.Module):
    """Normalised-softmax classifier over a class weight that may be sharded by rows over ranks (Partial FC).

    Options shared by all heads: ``s`` (scale), ``partial_fc`` (shard the classes over the ranks of the default
    process group and all-gather the embeddings; one rank when torch.distributed is not initialised),
    ``sample_rate`` (fraction of each rank's classes used per training step, positives always kept; 1 = exact,
    0 = positives only) and ``seed`` (of that sampling). Class weights are N(0, 0.01)-initialised rows.
    """

    name: ClassVar[str] = ""
    returns_list: ClassVar[bool] = False  # whether ``logits`` returns one tensor per sphere

    def __init__(
        self,
        embedding_size: int,
        num_classes: int,
        *,
        s: float = 64.0,
        partial_fc: bool = False,
        sample_rate: float = 1.0,
        seed: int = 0,
        spheres: int = 1,
    ) -> None:
        super().__init__()
        if embedding_size < 1 or num_classes < 1:
            raise ValueError(f"embedding_size and num_classes must be positive, got {embedding_size}, {num_classes}")
        if not s > 0:
            raise ValueError(f"s must be positive, got {s}")
        if not 0.0 <= sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in [0, 1], got {sample_rate}")
        if spheres < 1 or embedding_size % spheres:
            raise ValueError(f"embedding_size {embedding_size} cannot be cut into {spheres} equal spheres")
        self.embedding_size, self.num_classes, self.s = embedding_size, num_classes, float(s)
        self.partial_fc, self.sample_rate, self.seed = bool(partial_fc), float(sample_rate), int(seed)
        rank, world_size = world() if partial_fc else (0, 1)
        self.shard: Shard = class_shard(num_classes, rank, world_size)
        self.num_spheres = spheres
        self._generators: dict[torch.device, torch.Generator] = {}
        self.last_index: Tensor | None = None
        self._make_weights(embedding_size // spheres)

    @classmethod
    def option_names(cls) -> set[str]:
        """Keyword options ``create_head`` accepts for this head."""
        names: set[str] = set()
        for klass in cls.__mro__:
            if "__init__" in vars(klass) and issubclass(klass, Head):
                params = inspect.signature(klass.__init__).parameters.values()
                names |= {p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}
        return names - cls._fixed_options

    _fixed_options: ClassVar[frozenset[str]] = frozenset({"spheres"})

    def _make_weights(self, width: int) -> None:
        self.weight = nn.Parameter(torch.empty(self.shard.size, width).normal_(0.0, 0.01))

    def class_weights(self) -> list[nn.Parameter]:
        """This rank's class-weight rows, one ``(num_local_classes, width)`` parameter per sphere."""
        return [self.weight]

    def extra_repr(self) -> str:
        shard = self.shard
        return (
            f"embedding_size={self.embedding_size}, num_classes={self.num_classes}, s={self.s}, "
            f"classes=[{shard.start}, {shard.start + shard.size}) of rank {shard.rank}/{shard.world_size}, "
            f"sample_rate={self.sample_rate}"
        )

    # -- the margin each head supplies -------------------------------------------------------------------------
    def margin(self, cos: Tensor, batch: Batch) -> Tensor:
        """Unscaled logits from the cosines of one sphere (rows x this rank's used classes)."""
        return softmax_margin(cos, batch.target)

    def extra_loss(self, embeddings: Tensor, batch: Batch) -> Tensor | None:
        """A term added to the cross-entropy (none by default)."""
        return None

    def commit(self, batch: Batch) -> None:
        """Store per-step state after a training step's loss (none by default)."""

    # -- the shared mechanism ----------------------------------------------------------------------------------
    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            gen = torch.Generator(device=device)
            gen.manual_seed(self.seed * 1_000_003 + self.shard.rank)
            self._generators[device] = gen
        return self._generators[device]

    def sample_classes(self, labels: Tensor) -> Tensor:
        """Sorted local class indices to use this step: every class of ``labels`` held here, plus random others.

        ``floor(sample_rate * num_local)`` classes in all, or just the positives if they are at least that many.
        Deterministic for a seed (the generator is seeded with ``seed`` and the rank).
        """
        shard = self.shard
        local = labels - shard.start
        positives = torch.unique(local[(local >= 0) & (local < shard.size)])
        keep = int(self.sample_rate * shard.size)
        if positives.numel() >= keep:
            return positives
        device = self.class_weights()[0].device
        scores = torch.rand(shard.size, generator=self._generator(device), device=device)
        scores[positives.to(device)] = 2.0
        return torch.topk(scores, keep, sorted=False).indices.sort().values

    def _batch(self, embeddings: Tensor, labels: Tensor) -> Batch:
        if embeddings.dim() != 2 or embeddings.shape[1] != self.embedding_size:
            raise ValueError(f"embeddings must be (N, {self.embedding_size}), got {tuple(embeddings.shape)}")
        if labels.shape != embeddings.shape[:1]:
            raise ValueError(f"labels must be ({embeddings.shape[0]},), got {tuple(labels.shape)}")
        labels = labels.long()
        if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(f"labels must be class ids in [0, {self.num_classes})")
        embeddings = all_gather_rows(embeddings, self.shard)
        labels = all_gather_rows(labels, self.shard)
        index = self.sample_classes(labels) if self.training and self.sample_rate < 1.0 else None
        local = labels - self.shard.start
        owned = (local >= 0) & (local < self.shard.size)
        if index is not None:
            local = torch.searchsorted(index, local.clamp(0, self.shard.size - 1))
        target = torch.where(owned, local, torch.full_like(local, -1))
        return Batch(embeddings=embeddings, labels=labels, target=target, index=index)

    def _logits(self, embeddings: Tensor, labels: Tensor) -> tuple[list[Tensor], Batch]:
        batch = self._batch(embeddings, labels)
        self.last_index = batch.index
        x = F.normalize(batch.embeddings.float(), dim=1)
        chunks = x.chunk(self.num_spheres, dim=1)
        out = []
        for chunk, weight in zip(chunks, self.class_weights(), strict=True):
            w = weight if batch.index is None else weight[batch.index]
            cos = F.linear(chunk, F.normalize(w, dim=1)).float()
            out.append(self.s * self.margin(cos, batch))
        return out, batch

    def logits(self, embeddings: Tensor, labels: Tensor) -> Tensor | list[Tensor]:
        """Scaled, margin-adjusted logits that go into cross-entropy: global rows x this rank's (sampled) classes.

        Side-effect free apart from drawing the step's class sample; a list (one per sphere) for MultiFace.
        """
        out, _ = self._logits(embeddings, labels)
        return out if self.returns_list else out[0]

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """Training loss: the cross-entropy of every sphere summed, each a mean over the global batch."""
        out, batch = self._logits(embeddings, labels)
        loss = sharded_cross_entropy(out[0], batch.target, self.shard)
        for logits in out[1:]:
            loss = loss + sharded_cross_entropy(logits, batch.target, self.shard)
        extra = self.extra_loss(embeddings, batch)
        if extra is not None:
            loss = loss + extra
        if self.training:
            self.commit(batch)
        return loss


@register_head("softmax")
class Softmax(Head):
    """Normalised softmax (NormFace): s * cos, no margin; ``m`` is accepted only as 0."""

    def __init__(self, embedding_size: int, num_classes: int, *, m: float = 0.0, **options: Any) -> None:
        if m != 0:
            raise ValueError(f"softmax has no margin (m={m}); use cosface or arcface")
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
        raise ValueError(f"an angular margin must be in [0, pi/2), got {m}")
    return float(m)


@register_head("arcface")
class ArcFace(Head):
    """ArcFace: target logit s * cos(theta + m), falling back to s * (cos - m sin(pi - m)) where theta + m >= pi."""

    def __init__(self, embedding_size: int, num_classes: int, *, m: float = 0.5, **options: Any) -> None:
        super().__init__(embedding_size, num_classes, **options)
        self.m = _check_angle_margin(m)

    def margin(self, cos: Tensor, batch: Batch) -> Tensor:
        return arcface_margin(cos, batch.target, self.m)


@register_head("curricularface")
class CurricularFace(Head):
    """CurricularFace: ArcFace's target; negatives with cos_j > cos(theta_y + m) become cos_j (t + cos_j).

    ``t`` (buffer) is an EMA of the global batch's mean target cosine, momentum 0.01 from 0, updated before it is
    used in each training step and the same on every rank (gathered batch under Partial FC, an all-reduced mean in
    data-parallel training). ``logits`` shows the step's t without storing it; ``forward`` stores it.
    """

    momentum: ClassVar[float] = 0.01

    def __init__(self, embedding_size: int, num_classes: int, *, m: float = 0.5, **options: Any) -> None:
        super().__init__(embedding_size, num_classes, **options)
        self.m = _check_angle_margin(m)
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
        return curricular_margin(cos, batch.target, all_cos, t, self.m)

    def commit(self, batch: Batch) -> None:
        self.t.copy_(batch.state["t"])


@register_head("magface")
class MagFace(Head):
    """MagFace: ArcFace's target with m(a), a = clamp(|x|, l_a, u_a) of the unnormalised embedding.

    m(a) rises linearly from l_m at l_a to u_m at u_a; loss = CE + lambda_g * mean(a / u_a^2 + 1 / a). Gradients
    flow through a into both m(a) and the regulariser.
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
        **options: Any,
    ) -> None:
        super().__init__(embedding_size, num_classes, **options)
        if not 0 < l_a < u_a:
            raise ValueError(f"need 0 < l_a < u_a, got l_a={l_a}, u_a={u_a}")
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
        return arcface_margin(cos, batch.target, self.margin_of(self.magnitude(batch.embeddings)))

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
    """

    _fixed_options: ClassVar[frozenset[str]] = frozenset()
    returns_list: ClassVar[bool] = True
    _default_m: ClassVar[dict[str, float]] = {"softmax": 0.0, "cosface": 0.35, "arcface": 0.3}

    def __init__(
        self,
        embedding_size: int,
        num_classes: int,
        *,
        spheres: int = 2,
        base: str = "arcface",
        m: float | None = None,
        **options: Any,
    ) -> None:
        if base not in MARGINS:
            raise ValueError(f"multiface wraps one of {', '.join(sorted(MARGINS))}, not {base!r}")
        m = self._default_m[base] if m is None else float(m)
        if base == "softmax" and m != 0:
            raise ValueError(f"softmax has no margin (m={m})")
        if base == "arcface":
            _check_angle_margin(m)
        super().__init__(embedding_size, num_classes, spheres=spheres, **options)
        self.base, self.m = base, m
        self._base_margin = MARGINS[base]

    def _make_weights(self, width: int) -> None:
        self.spheres = nn.ModuleList(_Sphere(self.shard.size, width) for _ in range(self.num_spheres))

    def class_weights(self) -> list[nn.Parameter]:
        return [sphere.weight for sphere in self.spheres]

    def margin(self, cos: Tensor, batch: Batch) -> Tensor:
        return self._base_margin(cos, batch.target, self.m)

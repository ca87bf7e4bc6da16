"""The head registry and the mechanism every margin head shares (:class:`Head`).

:class:`Head` holds the class weight (whole, or this rank's rows under Partial FC), gathers the global batch,
samples classes, computes cosines per sphere and the sharded cross-entropy; a head (:mod:`.heads`) only supplies
its margin on a block of cosines (:mod:`.margins`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from facetool.pipeline.errors import FacetoolError

from .distributed import Shard, all_gather_rows, class_shard, sharded_cross_entropy, world
from .margins import softmax_margin
from .swap import SWAP_STEPS, UPDATES, SwapUpdate


def generator_seed(value: int) -> int:
    """A torch generator's seed from any integer: ``value`` modulo 2**64 (torch's own range; the same seed for
    every value torch takes, negative ones included)."""
    return value % 2**64


def check_choice(option: str, value: str, choices: tuple[str, ...]) -> str:
    """``value`` if it is one of ``choices``, else a one-line error naming the option."""
    if value not in choices:
        raise FacetoolError(f"{option} must be one of {', '.join(choices)}, got {value!r}")
    return value


#: name -> head class; :func:`register_head` adds to it.
HEADS: dict[str, type[Head]] = {}


def register_head(name: str) -> Callable[[type[Head]], type[Head]]:
    """Class decorator adding a :class:`Head` subclass to the registry under ``name``."""

    def add(cls: type[Head]) -> type[Head]:
        if name in HEADS:
            raise ValueError(f"head {name!r} is already registered")
        cls.name = name
        HEADS[name] = cls
        return cls

    return add


def list_heads() -> list[str]:
    """Names of the registered heads."""
    return sorted(HEADS)


def create_head(name: str, embedding_size: int, num_classes: int, **options: Any) -> Head:
    """Build the head ``name`` for ``num_classes`` classes; an unknown name, an option the head does not take or a
    value out of range is a one-line :class:`FacetoolError`."""
    if name not in HEADS:
        raise FacetoolError(f"unknown head {name!r}; known heads: {', '.join(list_heads())}")
    cls = HEADS[name]
    allowed = cls.option_names()
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise FacetoolError(
            f"unknown option(s) for head {name!r}: {', '.join(unknown)}; it takes {', '.join(sorted(allowed))}"
        )
    try:
        return cls(embedding_size, num_classes, **options)
    except TypeError as err:  # an option of the wrong type (s = "big")
        raise FacetoolError(f"head {name!r}: {err}") from None


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
    0 = positives only), ``seed`` (of that sampling), ``update`` (``"dense"``: the class weight is one parameter in
    the optimiser, as arcface_torch's Partial FC v2; ``"swap"``: only the sampled rows and their optimiser state
    are in it each step, as FaceT's Partial FC, see :mod:`.swap`) and ``swap_step`` (AdamW's step count under the
    swap update: ``"counter"``, the head's swap steps, or ``"reset"``, 0 for each step as FaceT). Class weights
    are N(0, 0.01)-initialised rows.

    The cosines, margins and cross-entropy run in float32 with autocast off, also when the backbone runs under
    AMP, as arcface_torch computes its logits (deepinsight/insightface recognition/arcface_torch/partial_fc_v2.py
    @ 7fadd420c2 L157-166, built with fp16 False in train_v2.py L116-128).
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
        update: str = "dense",
        swap_step: str = "counter",
        spheres: int = 1,
    ) -> None:
        super().__init__()
        if embedding_size < 1 or num_classes < 1:
            raise FacetoolError(f"embedding_size and num_classes must be positive, got {embedding_size}, {num_classes}")
        if not s > 0:
            raise FacetoolError(f"s must be positive, got {s}")
        if not 0.0 <= sample_rate <= 1.0:
            raise FacetoolError(f"sample_rate must be in [0, 1], got {sample_rate}")
        if spheres < 1 or embedding_size % spheres:
            raise FacetoolError(f"embedding_size {embedding_size} cannot be cut into {spheres} equal spheres")
        check_choice("update", update, UPDATES)
        check_choice("swap_step", swap_step, SWAP_STEPS)
        if swap_step != "counter" and update != "swap":
            raise FacetoolError(f"swap_step = {swap_step!r} needs update = 'swap'")
        self.embedding_size, self.num_classes, self.s = embedding_size, num_classes, float(s)
        self.partial_fc, self.sample_rate, self.seed = bool(partial_fc), float(sample_rate), int(seed)
        rank, world_size = world() if partial_fc else (0, 1)
        self.shard: Shard = class_shard(num_classes, rank, world_size)
        self.num_spheres = spheres
        self._generators: dict[torch.device, torch.Generator] = {}
        self._sampler_state: Tensor | None = None  # a loaded generator state, taken by the next generator made
        self.last_index: Tensor | None = None
        self._make_weights(embedding_size // spheres)
        self.update, self.swap_step = update, swap_step
        self.swap: SwapUpdate | None = None
        if update == "swap":
            ids = {id(w) for w in self.class_weights()}
            names = [name for name, p in self.named_parameters() if id(p) in ids]
            self.swap = SwapUpdate(self, names, swap_step)

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

    def bind_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Tell the head which optimiser steps it: the swap update (``update = "swap"``) hooks its steps and
        makes its optimiser-state buffers; nothing to do for the dense update. Call before loading a state."""
        if self.swap is not None:
            self.swap.bind(optimizer)

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

    # -- the class sampler's state, part of the head's state_dict -----------------------------------------------
    def get_extra_state(self) -> dict[str, Tensor]:
        """The class sampler's generator state (``{"sampler": uint8 tensor}``), so that a head loaded from this
        state draws the classes this one would draw next; empty before the first draw (the seed then decides)."""
        gen = self._generators.get(self.class_weights()[0].device)
        if gen is not None:
            return {"sampler": gen.get_state().clone()}
        return {} if self._sampler_state is None else {"sampler": self._sampler_state.clone()}

    def set_extra_state(self, state: dict[str, Tensor]) -> None:
        """Continue the class sampling from ``state`` (what :meth:`get_extra_state` returned)."""
        self._generators.clear()
        sampler = state.get("sampler")
        self._sampler_state = None if sampler is None else sampler.clone()

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            gen = torch.Generator(device=device)
            if self._sampler_state is not None:
                gen.set_state(self._sampler_state)
                self._sampler_state = None
            else:
                gen.manual_seed(generator_seed(self.seed * 1_000_003 + self.shard.rank))
            self._generators[device] = gen
        return self._generators[device]

    # -- the shared mechanism ----------------------------------------------------------------------------------
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

    def _logits(self, embeddings: Tensor, labels: Tensor, step: bool = False) -> tuple[list[Tensor], Batch]:
        batch = self._batch(embeddings, labels)
        self.last_index = batch.index
        x = F.normalize(batch.embeddings.float(), dim=1)
        chunks = x.chunk(self.num_spheres, dim=1)
        swap = self.swap if step and self.training and torch.is_grad_enabled() else None
        out = []
        for i, (chunk, weight) in enumerate(zip(chunks, self.class_weights(), strict=True)):
            if swap is not None:
                w = swap.gather(i, batch.index)
            else:
                w = weight if batch.index is None else weight[batch.index]
            cos = F.linear(chunk, F.normalize(w, dim=1)).float()
            out.append(self.s * self.margin(cos, batch))
        return out, batch

    def logits(self, embeddings: Tensor, labels: Tensor) -> Tensor | list[Tensor]:
        """Scaled, margin-adjusted logits that go into cross-entropy: global rows x this rank's (sampled) classes.

        Side-effect free apart from drawing the step's class sample; a list (one per sphere) for MultiFace.
        """
        with torch.autocast(embeddings.device.type, enabled=False):
            out, _ = self._logits(embeddings, labels)
        return out if self.returns_list else out[0]

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """Training loss: the cross-entropy of every sphere summed, each a mean over the global batch. Under the
        swap update one forward pass per optimiser step (it gathers the step's rows)."""
        with torch.autocast(embeddings.device.type, enabled=False):
            return self._loss(embeddings, labels)

    def _loss(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        out, batch = self._logits(embeddings, labels, step=True)
        loss = sharded_cross_entropy(out[0], batch.target, self.shard)
        for logits in out[1:]:
            loss = loss + sharded_cross_entropy(logits, batch.target, self.shard)
        extra = self.extra_loss(embeddings, batch)
        if extra is not None:
            loss = loss + extra
        if self.training:
            self.commit(batch)
        return loss

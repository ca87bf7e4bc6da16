"""Optimiser and learning-rate schedule: parameter groups (no-decay rules, per-name decay, FaceT layer-wise lr
decay), SGD or AdamW, and a per-iteration schedule (linear warm-up, then cosine, polynomial, step or constant)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from facetool.pipeline.errors import FacetoolError

_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)
# What ``no_decay`` may name. Upstream rules: FaceT exempts 1-D parameters, biases and ``pos_embed`` only, so its
# prompts and pooling queries are decayed (zyainfal/Joint-Holistic-and-Masked-Face-Recognition code/optim_factory.py
# L66-107 @ 3126602be561ffe114ca9a8244cfef348db13c6b): no_decay = ["1d", "bias", "pos_embed"]; arcface_torch decays
# every parameter (deepinsight/insightface recognition/arcface_torch/train_v2.py L121-132 @
# 7fadd420c2351d0ffa8cac403421c1a3ed733365): no_decay = [].
NO_DECAY_KINDS = ("norm", "bias", "1d", "model", "prelu", "pos_embed")
OPTIMIZERS = ("sgd", "adamw")
SCHEDULE_KINDS = ("cosine", "poly", "step", "constant")


def _param_kinds(model: nn.Module) -> dict[str, set[str]]:
    """For each parameter name of ``model``, the no-decay kinds it belongs to (norm, bias, 1d, prelu, model,
    pos_embed: a parameter named ``pos_embed``, FaceT's learned position embedding)."""
    kinds: dict[str, set[str]] = {}
    model_skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    for mod_name, module in model.named_modules():
        for p_name, p in module.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            k = kinds.setdefault(full, set())
            if isinstance(module, _NORMS):
                k.add("norm")
            if isinstance(module, nn.PReLU):
                k.add("prelu")
            if p_name == "bias":
                k.add("bias")
            if p_name == "pos_embed":
                k.add("pos_embed")
            if p.ndim <= 1:
                k.add("1d")
            if full in model_skip:
                k.add("model")
    return kinds


def parameter_groups(
    backbone: nn.Module,
    head: nn.Module | None,
    weight_decay: float,
    no_decay: Iterable[str] = ("norm", "bias", "model"),
    head_weight_decay: float | None = None,
    weight_decay_by_name: dict[str, float] | None = None,
    layer_decay: float = 1.0,
    extra: nn.Module | None = None,
) -> list[dict[str, Any]]:
    """Optimiser groups, each with ``lr_scale`` (multiplied into the scheduled lr) and ``weight_decay``.

    Backbone parameters in a ``no_decay`` kind get no decay; ``weight_decay_by_name`` sets a parameter's decay by
    exact name; ``layer_decay`` < 1 scales FaceT's lr by decay^(depth + 1 - layer_id) (embedding 0, block k k+1,
    the rest depth + 1). Head parameters (class weights) take ``head_weight_decay`` (default ``weight_decay``),
    and ``extra`` (the MAE decoder) the backbone's rules with lr scale 1.
    """
    no_decay = set(no_decay)
    by_name = dict(weight_decay_by_name or {})
    if layer_decay != 1.0 and not hasattr(backbone, "layer_id"):
        raise FacetoolError(f"optim.layer_decay {layer_decay} needs a backbone with layers (FaceT); use 1.0")
    depth = getattr(backbone, "depth", 0)
    groups: dict[tuple[float, float], dict[str, Any]] = {}

    def add(name: str, p: nn.Parameter, wd: float, scale: float) -> None:
        g = groups.setdefault((wd, scale), {"params": [], "names": [], "weight_decay": wd, "lr_scale": scale})
        g["params"].append(p)
        g["names"].append(name)

    for module, prefix, layered in ((backbone, "", True), (extra, "mae.", False)):
        if module is None:
            continue
        kinds = _param_kinds(module)
        named = dict(module.named_parameters())
        unknown = sorted(set(by_name) - set(named)) if module is backbone else []
        if unknown:
            raise FacetoolError(f"optim.weight_decay_by_name: no backbone parameter {unknown[0]!r}")
        for name, p in named.items():
            if not p.requires_grad:
                continue
            wd = 0.0 if kinds.get(name, set()) & no_decay else weight_decay
            if module is backbone and name in by_name:
                wd = float(by_name[name])
            scale = 1.0
            if layered and layer_decay != 1.0:
                scale = layer_decay ** (depth + 1 - backbone.layer_id(name))
            add(prefix + name, p, wd, scale)
    if head is not None:
        hwd = weight_decay if head_weight_decay is None or head_weight_decay < 0 else head_weight_decay
        for name, p in head.named_parameters():
            if p.requires_grad:
                add("head." + name, p, hwd, 1.0)
    return [groups[k] for k in sorted(groups, key=lambda k: (-k[1], -k[0]))]


def create_optimizer(name: str, groups: list[dict[str, Any]], lr: float, **options: Any) -> torch.optim.Optimizer:
    """SGD (``momentum``, ``nesterov``) or AdamW (``betas``, ``eps``) over ``groups`` (``names`` are kept as a
    group key, so checkpoints say which parameters a group holds)."""
    if name == "sgd":
        momentum, nesterov = float(options.get("momentum", 0.9)), bool(options.get("nesterov", False))
        if nesterov and momentum <= 0:
            raise FacetoolError("optim.nesterov needs optim.momentum > 0")
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov)
    if name == "adamw":
        betas = tuple(options.get("betas", (0.9, 0.999)))
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=float(options.get("eps", 1e-8)))
    raise FacetoolError(f"optim.name must be sgd or adamw, got {name!r}")


@dataclass(frozen=True)
class Schedule:
    """The learning rate of each iteration: linear warm-up from ``warmup_start`` x peak over ``warmup`` steps, then
    ``kind`` over the remaining steps (cosine or poly down to ``min_lr``; step: x ``gamma`` at each milestone step;
    constant). A pure function of the step, so resuming needs only the step."""

    peak: float
    total: int
    warmup: int = 0
    kind: str = "cosine"
    warmup_start: float = 0.0
    min_lr: float = 0.0
    power: float = 2.0
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1

    def __call__(self, step: int) -> float:
        """Learning rate for iteration ``step`` (0-based: the lr used by the step-th optimiser update)."""
        if step < self.warmup:
            start = self.warmup_start * self.peak
            return start + (self.peak - start) * (step + 1) / self.warmup
        if self.kind == "step":
            return self.peak * self.gamma ** sum(step >= m for m in self.milestones)
        if self.kind == "constant":
            return self.peak
        span = max(1, self.total - self.warmup)
        t = min(1.0, (step - self.warmup) / span)
        if self.kind == "cosine":
            return self.min_lr + (self.peak - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))
        if self.kind == "poly":
            return self.min_lr + (self.peak - self.min_lr) * (1.0 - t) ** self.power
        raise FacetoolError(f"schedule.kind must be cosine, poly, step or constant, got {self.kind!r}")


def apply_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's lr to ``lr`` times its ``lr_scale``."""
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)

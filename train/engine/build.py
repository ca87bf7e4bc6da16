"""Building a run from its config: the loader, the backbone, the margin head (Partial FC) or the MAE decoder, the
optimiser and the learning-rate schedule. Every option is checked here, before the first step, and a bad one is a
one-line error naming the config file."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from facetool.pipeline.errors import FacetoolError
from facetool.pipeline.shards.format import MANIFEST
from facetool.train.data import DaliLoader, MaskReuseWarning, WdsLoader, create_loader, open_shards, require_dali
from facetool.train.engine.config import SCHEDULE_KEYS, Config, backbone_options, head_options, loader_config
from facetool.train.engine.context import Context
from facetool.train.engine.data import SyntheticLoader
from facetool.train.engine.optim import Schedule, create_optimizer, parameter_groups


def build_loader(
    cfg: Config, ctx: Context, notify: Callable[[str], None] | None = None
) -> DaliLoader | WdsLoader | SyntheticLoader:
    """This rank's loader: the shard loader ``[data]`` describes, or the synthetic source (model-only rate). The
    loader's :class:`MaskReuseWarning` (q large against the shards' mask fraction) goes to ``notify`` (the run's
    messages) instead of Python's warnings, where there is one; so does the note that ``data.backend = "auto"`` fell
    back to the portable loader for want of DALI."""
    if notify is None:
        return _build_loader(cfg, ctx, notify)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", MaskReuseWarning)
        loader = _build_loader(cfg, ctx, notify)
    for w in caught:
        if issubclass(w.category, MaskReuseWarning):
            notify(f"warning: {w.message}")
        else:  # any other warning as it would have been shown
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)
    return loader


def _build_loader(
    cfg: Config, ctx: Context, notify: Callable[[str], None] | None
) -> DaliLoader | WdsLoader | SyntheticLoader:
    data = cfg["data"]
    if data["backend"] == "dali" and data["source"] != "synthetic":
        require_dali(f"{cfg.source}: data.backend = 'dali'")  # 'auto' takes the portable loader
    if data["source"] == "synthetic":
        return SyntheticLoader(data["synthetic_samples"], data["synthetic_classes"], data["batch_size"], ctx.rank,
                               ctx.world_size, cfg["run"]["seed"], ctx.device)  # fmt: skip
    shards = open_shards(data["shards"])
    config = loader_config(cfg)
    if data["batch_size"] * ctx.world_size > shards.samples:
        raise FacetoolError(
            f"{data['shards']}: {shards.samples} samples, fewer than one global batch "
            f"({data['batch_size']} x {ctx.world_size} ranks)"
        )
    device = data["loader_device"]
    if device == "auto":
        device = "gpu" if ctx.device.type == "cuda" else "cpu"
    return create_loader(
        shards,
        config,
        ctx.rank,
        ctx.world_size,
        device=device,
        backend=data["backend"],
        device_id=ctx.device.index if ctx.device.type == "cuda" else None,
        notify=notify,
    )


def build_backbone(cfg: Config) -> tuple[nn.Module, str, dict[str, Any]]:
    """The configured backbone, its name and options; a name or option it does not take is an error naming the
    config file."""
    from facetool.train.models import create_backbone, list_backbones

    name, options = cfg["model"]["name"], backbone_options(cfg)
    if name not in list_backbones():
        raise FacetoolError(
            f"{cfg.source}: model.name {name!r} is not a backbone; known: {', '.join(list_backbones())}"
        )
    try:
        model = create_backbone(name, **options)
    except FacetoolError as err:
        raise FacetoolError(f"{cfg.source}: [model] {err}") from None
    if cfg["model"]["frozen_bn"]:
        freeze_batchnorm(model)
    return model, name, options


def freeze_batchnorm(model: nn.Module) -> None:
    """BatchNorm layers normalise with their running statistics and never update them (batch-independent)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
            m.train = lambda mode=True, _m=m: _m  # type: ignore[method-assign]


def embedding_size(model: nn.Module) -> int:
    """The width of ``model``'s embeddings, from one forward pass of two blank images."""
    with torch.no_grad():
        was = model.training
        model.eval()
        try:
            out = model(torch.zeros(2, 3, 112, 112))
        finally:
            model.train(was)
    return int(out.shape[1])


def head_classes(cfg: Config, loader: Any) -> int:
    """The classes the classifier holds: ``data.synthetic_classes``, or the shards' manifest's ``classes``, which
    a class without a sample may exceed, but not the manifest's sample count (``classes = 1e12`` would otherwise
    size a classifier no machine holds)."""
    if cfg["data"]["source"] == "synthetic":
        return cfg["data"]["synthetic_classes"]
    shards = loader.shards
    if shards.classes > shards.samples:
        raise FacetoolError(
            f"{shards.root / MANIFEST}: {shards.classes} classes for {shards.samples} samples; the classifier is "
            "sized by the classes, so they must not outnumber the samples"
        )
    return shards.classes


def device_memory(device: torch.device) -> int | None:
    """The memory of ``device`` in bytes (the machine's RAM for the CPU), None where it is unknown."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(cfg: Config, ctx: Context, classes: int | None) -> None:
    """The run's parameters, built first on the "meta" device (shapes, no memory), must fit this rank's device:
    a size out of reach (``model.embedding_size``, a head for ``classes`` classes, the MAE decoder) is a one-line
    error before anything is allocated. ``classes`` None: MAE pre-training (no head)."""
    with torch.device("meta"):
        backbone, name, _ = build_backbone(cfg)
        if classes is None:
            other, what = build_mae(cfg, backbone, name), "the MAE decoder"
        else:
            try:
                width = embedding_size(backbone)
            except RuntimeError as err:  # width = 0, say
                reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                raise FacetoolError(f"{cfg.source}: [model] {name} fails on a 112x112 image ({reason})") from None
            other = build_head(cfg, width, classes, init=False)
            what = f"this rank's classifier ({classes:,} classes over {ctx.world_size} rank(s))"
    sizes = [sum(t.numel() * t.element_size() for t in m.state_dict().values() if torch.is_tensor(t))
             for m in (backbone, other)]  # fmt: skip
    have = device_memory(ctx.device)
    if have is not None and sum(sizes) > have:
        gib = [f"{n / 2**30:,.1f} GiB" for n in (*sizes, have)]
        raise FacetoolError(
            f"{cfg.source}: the parameters alone need {gib[0]} for the {name} backbone and {gib[1]} for {what}, "
            f"more than the {gib[2]} of this {ctx.device.type} device; check [model], [head] and the classes"
        )


def build_head(cfg: Config, width: int, classes: int, init: bool = True) -> nn.Module:
    """The margin head with Partial FC (the classifier always sharded over the ranks; ``sample_rate`` 1 is exact),
    its class weight drawn by :func:`init_class_weights` (unless not ``init``)."""
    from facetool.train.heads import create_head, list_heads

    name, options = cfg["head"]["name"], head_options(cfg)
    if name not in list_heads():
        raise FacetoolError(f"{cfg.source}: head.name {name!r} is not a head; known: {', '.join(list_heads())}")
    if options.get("partial_fc", True) is not True:
        raise FacetoolError(
            f"{cfg.source}: head.partial_fc: the engine always shards the classifier over the ranks (Partial FC); "
            "set head.sample_rate = 1.0 for the exact softmax"
        )
    options = {**options, "partial_fc": True}
    options.setdefault("seed", cfg["run"]["seed"])
    try:
        head = create_head(name, width, classes, **options)
    except FacetoolError as err:
        raise FacetoolError(f"{cfg.source}: [head] {err}") from None
    if init:
        init_class_weights(head, cfg["run"]["seed"])
    return head


def init_class_weights(head: nn.Module, seed: int) -> None:
    """Class weights drawn from ``seed`` for all classes in order, in chunks, keeping this rank's rows: the weights
    do not depend on the number of ranks. N(0, 0.01) rows, or those of the head's ``draw_class_rows`` where it has
    one (MultiFace's unit-norm centres)."""
    from facetool.train.heads.base import generator_seed

    def normal_rows(n: int, width: int, generator: torch.Generator) -> torch.Tensor:
        return torch.empty(n, width).normal_(0.0, 0.01, generator=generator)

    draw = getattr(head, "draw_class_rows", normal_rows)
    shard = head.shard
    gen = torch.Generator().manual_seed(generator_seed(seed * 7919 + 17))
    end = shard.start + shard.size
    with torch.no_grad():
        for weight in head.class_weights():
            done, chunk = 0, 65536
            while done < end:
                n = min(chunk, end - done)
                rows = draw(n, weight.shape[1], gen)
                lo, hi = max(done, shard.start), min(done + n, end)
                if lo < hi:
                    weight[lo - shard.start : hi - shard.start].copy_(rows[lo - done : hi - done])
                done += n


def build_mae(cfg: Config, backbone: nn.Module, name: str) -> nn.Module:
    """The MAE pre-trainer (``run.task = "mae"``) around a FaceT backbone, with the ``[mae]`` decoder."""
    from facetool.train.engine.mae import MAE
    from facetool.train.models.facet import FaceT

    if not isinstance(backbone, FaceT):
        raise FacetoolError(f"{cfg.source}: run.task = 'mae' needs a FaceT backbone, not {name!r}")
    try:
        return MAE(backbone, **cfg["mae"])
    except FacetoolError as err:
        raise FacetoolError(f"{cfg.source}: [mae] {err}") from None


def mae_extra(mae: nn.Module | None) -> nn.Module | None:
    """The MAE parts outside the encoder (decoder, mask token) as one module, for the optimiser's groups."""
    if mae is None:
        return None
    extra = nn.Module()
    for n, m in mae.named_children():
        if n != "encoder":
            extra.add_module(n, m)
    extra.register_parameter("mask_token", mae.mask_token)
    return extra


def build_optimizer(
    cfg: Config, backbone: nn.Module, head: nn.Module | None, mae: nn.Module | None, global_batch: int
) -> tuple[torch.optim.Optimizer, float]:
    """The ``[optim]`` optimiser over the parameter groups, and its peak learning rate (scaled by the global
    batch over ``lr_batch`` when that is set)."""
    optim = cfg["optim"]
    groups = parameter_groups(
        backbone,
        head,
        optim["weight_decay"],
        optim["no_decay"],
        optim["head_weight_decay"],
        optim["weight_decay_by_name"],
        optim["layer_decay"],
        extra=mae_extra(mae),
    )
    peak = optim["lr"] * (global_batch / optim["lr_batch"] if optim["lr_batch"] else 1.0)
    optimizer = create_optimizer(optim["name"], groups, peak, momentum=optim["momentum"],
                                 nesterov=optim["nesterov"], betas=optim["betas"], eps=optim["eps"])  # fmt: skip
    if head is not None:
        head.bind_optimizer(optimizer)  # the swap update of Partial FC hooks the steps (before any state loads)
    return optimizer, peak


def build_schedule(cfg: Config, peak: float, total: int, steps_per_epoch: int) -> Schedule:
    """The ``[schedule]`` learning rate per step (warm-up and milestones given in epochs become steps)."""
    sched = cfg["schedule"]
    return Schedule(
        peak=peak,
        total=total,
        warmup=sched["warmup_steps"] or round(sched["warmup_epochs"] * steps_per_epoch),
        milestones=tuple(round(m * steps_per_epoch) for m in sched["milestones"]),
        **{k: sched[k] for k in SCHEDULE_KEYS},
    )


def distributed(trained: nn.Module, ctx: Context, find_unused: bool) -> nn.Module:
    """``trained`` wrapped in DDP when there are several ranks (the Partial FC head is never wrapped)."""
    if ctx.world_size == 1:
        return trained
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DDP(trained, device_ids=ids, find_unused_parameters=find_unused)

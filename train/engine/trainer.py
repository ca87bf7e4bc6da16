"""The training loop: one process or many under torchrun (gloo on CPUs, NCCL on GPUs), DDP for the backbone,
Partial FC for the head, AMP, per-iteration schedule, atomic checkpoints with everything an exact resume needs,
verification every N steps, TensorBoard (or JSONL) scalars and a ``summary.json``.

The evaluation is handed in as a callable (``evaluate(backbone) -> {set name: metrics}``), built by the command
from :mod:`facetool.bench.verification`, so this package never imports ``bench``.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from facetool.pipeline.atomic import write_json_atomic
from facetool.pipeline.errors import FacetoolError
from facetool.train.engine import checkpoint as ckpt
from facetool.train.engine.config import Config, backbone_options, head_options, to_toml
from facetool.train.engine.optim import Schedule, apply_lr, create_optimizer, parameter_groups
from facetool.train.models.checkpoint import backbone_payload, load_init

Evaluate = Callable[[nn.Module], dict[str, dict[str, Any]]]
TRAIN_FORMAT = "facetool-train"


@dataclass
class Context:
    """Where this process runs: rank, world size, local rank, device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def setup_distributed(cfg: Config) -> Context:
    """Join torchrun's process group when it launched us (WORLD_SIZE > 1), pick the device and the threads."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    want = cfg["run"]["device"]
    if want == "cuda" and not torch.cuda.is_available():
        raise FacetoolError(f"{cfg.source}: run.device = 'cuda' but torch sees no GPU")
    use_cuda = want == "cuda" or (want == "auto" and torch.cuda.is_available())
    device = torch.device("cuda", local_rank % max(1, torch.cuda.device_count())) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    threads = cfg["run"]["threads"]
    if not threads and not use_cuda:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        threads = max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    if threads:
        torch.set_num_threads(threads)
    if world_size > 1 and not dist.is_initialized():
        backend = cfg["run"]["dist_backend"]
        if backend == "auto":
            backend = "nccl" if use_cuda else "gloo"
        dist.init_process_group(backend=backend, device_id=device if backend == "nccl" else None)
    return Context(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


# ---------------------------------------------------------------------------------------------------------------
# Building the run


def build_backbone(cfg: Config) -> tuple[nn.Module, str, dict[str, Any]]:
    """The configured backbone, its name and options; options it does not take are an error naming the file."""
    from facetool.train.models import create_backbone, list_backbones

    name, options = cfg["model"]["name"], backbone_options(cfg)
    if name not in list_backbones():
        raise FacetoolError(
            f"{cfg.source}: model.name {name!r} is not a backbone; known: {', '.join(list_backbones())}"
        )
    try:
        model = create_backbone(name, **options)
    except TypeError as err:
        raise FacetoolError(f"{cfg.source}: [model] option not taken by {name}: {err}") from None
    except ValueError as err:
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
    with torch.no_grad():
        was = model.training
        model.eval()
        try:
            out = model(torch.zeros(2, 3, 112, 112))
        finally:
            model.train(was)
    return int(out.shape[1])


def build_head(cfg: Config, width: int, classes: int) -> nn.Module:
    """The margin head with Partial FC (the classifier always sharded over the ranks; ``sample_rate`` 1 is exact).
    Its class weight is drawn from the seed for all classes and sliced, so it does not depend on the ranks."""
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
    except (TypeError, ValueError) as err:
        raise FacetoolError(f"{cfg.source}: [head] {err}") from None
    shard = head.shard
    gen = torch.Generator().manual_seed(cfg["run"]["seed"] * 7919 + 17)
    with torch.no_grad():
        for weight in head.class_weights():
            # rows drawn in order for all classes, in chunks; only this rank's rows are kept
            done, chunk = 0, 65536
            while done < shard.start + shard.size:
                n = min(chunk, shard.start + shard.size - done)
                rows = torch.empty(n, weight.shape[1]).normal_(0.0, 0.01, generator=gen)
                lo, hi = max(done, shard.start), min(done + n, shard.start + shard.size)
                if lo < hi:
                    weight[lo - shard.start : hi - shard.start].copy_(rows[lo - done : hi - done])
                done += n
    return head


def check_resume_backbone(state: dict[str, Any], name: str, options: dict[str, Any], path: Path) -> None:
    saved = state.get("model", {})
    if saved.get("name") != name or saved.get("options") != options:
        raise FacetoolError(
            f"{path}: checkpoint of backbone {saved.get('name')!r} {saved.get('options')}, the config trains "
            f"{name!r} {options}; resume with the config it was trained with"
        )


class ScalarLog:
    """Scalars, one JSON object per line in ``scalars.jsonl`` (always: it is what scripts and tests read), and the
    same tags as TensorBoard events beside it when ``tensorboard`` is installed. ``purge_after`` (a resumed run's
    step): what an interrupted run logged after that step is dropped from both, since the resumed run logs those
    steps again."""

    def __init__(self, folder: Path, enabled: bool, purge_after: int | None = None) -> None:
        self.writer = None
        self.file = None
        self.kind = "off"
        if not enabled:
            return
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "scalars.jsonl"
        if purge_after is not None and path.exists():
            _truncate_jsonl(path, purge_after)
        self.file = open(path, "a")
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            self.kind = f"{path} (tensorboard is not installed)"
            return
        purge = None if purge_after is None else purge_after + 1
        self.writer = SummaryWriter(str(folder), purge_step=purge)
        self.kind = f"{path} and TensorBoard in {folder}"

    def add(self, step: int, values: dict[str, float]) -> None:
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(k, v, step)
        if self.file is not None:
            self.file.write(json.dumps({"step": step, **values}) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.file is not None:
            self.file.close()


def _truncate_jsonl(path: Path, last_step: int) -> None:
    """Keep the lines of ``path`` up to ``last_step`` (and drop a torn last line), atomically."""
    kept = []
    for line in path.read_text().splitlines():
        try:
            if int(json.loads(line)["step"]) <= last_step:
                kept.append(line + "\n")
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by the interruption
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------------------
# The run


class Trainer:
    """Builds everything from a config (errors before any step), then :meth:`run` trains."""

    def __init__(
        self,
        cfg: Config,
        output: Path,
        resume: bool = False,
        evaluate: Evaluate | None = None,
        quiet: bool = False,
        ctx: Context | None = None,
    ) -> None:
        self.cfg, self.output, self.evaluate, self.quiet = cfg, Path(output), evaluate, quiet
        self.ctx = ctx or setup_distributed(cfg)
        run, data = cfg["run"], cfg["data"]
        self.task = run["task"]
        self.ckpt_root = self.output / "checkpoints"
        resume_from = ckpt.latest(self.ckpt_root) if resume else None
        if resume and resume_from is None:
            self.log(f"--resume: no complete checkpoint in {self.ckpt_root}; starting from the beginning")
        torch.manual_seed(run["seed"])

        # data first: a missing or damaged shard folder fails before any model is built
        self.loader = self._build_loader()
        self.steps_per_epoch = len(self.loader)
        if self.steps_per_epoch < 1:
            raise FacetoolError(
                f"{cfg.source}: data.batch_size {data['batch_size']} x {self.ctx.world_size} ranks exceeds the "
                "samples of the shards; lower it"
            )
        self.total = run["steps"] or max(1, math.ceil(run["epochs"] * self.steps_per_epoch))
        self.global_batch = data["batch_size"] * self.ctx.world_size

        self.backbone, self.name, self.options = build_backbone(cfg)
        self.missing_init: list[str] = []
        if run["init_from"] and resume_from is None:
            self.missing_init = load_init(self.backbone, self.name, run["init_from"])
        self.head: nn.Module | None = None
        self.mae: nn.Module | None = None
        if self.task == "mae":
            from facetool.train.engine.mae import MAE
            from facetool.train.models.facet import FaceT

            if not isinstance(self.backbone, FaceT):
                raise FacetoolError(f"{cfg.source}: run.task = 'mae' needs a FaceT backbone, not {self.name!r}")
            try:
                self.mae = MAE(self.backbone, **cfg["mae"])
            except ValueError as err:
                raise FacetoolError(f"{cfg.source}: [mae] {err}") from None
        else:
            classes = data["synthetic_classes"] if data["source"] == "synthetic" else self.loader.shards.classes
            self.head = build_head(cfg, embedding_size(self.backbone), classes)
        device = self.ctx.device
        self.backbone.to(device)
        if self.head is not None:
            self.head.to(device)
        if self.mae is not None:
            self.mae.to(device)

        optim = cfg["optim"]
        groups = parameter_groups(
            self.backbone,
            self.head,
            optim["weight_decay"],
            optim["no_decay"],
            optim["head_weight_decay"],
            optim["weight_decay_by_name"],
            optim["layer_decay"],
            extra=self._mae_extra(),
        )
        self.peak_lr = optim["lr"] * (self.global_batch / optim["lr_batch"] if optim["lr_batch"] else 1.0)
        self.optimizer = create_optimizer(
            optim["name"],
            groups,
            self.peak_lr,
            momentum=optim["momentum"],
            nesterov=optim["nesterov"],
            betas=optim["betas"],
            eps=optim["eps"],
        )
        sched = cfg["schedule"]
        spe = self.steps_per_epoch
        self.schedule = Schedule(
            peak=self.peak_lr,
            total=self.total,
            warmup=sched["warmup_steps"] or round(sched["warmup_epochs"] * spe),
            kind=sched["kind"],
            warmup_start=sched["warmup_start"],
            min_lr=sched["min_lr"],
            power=sched["power"],
            milestones=tuple(round(m * spe) for m in sched["milestones"]),
            gamma=sched["gamma"],
        )
        amp = run["amp"]
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")

        # DDP over the backbone (the MAE module in pre-training); the Partial FC head is not wrapped
        trained: nn.Module = self.mae if self.mae is not None else self.backbone
        self.model = trained
        if self.ctx.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [device.index] if device.type == "cuda" else None
            self.model = DDP(trained, device_ids=ids, find_unused_parameters=self.mae is not None)

        self.step = 0
        self.eval_seconds = 0.0  # left out of the training image rate
        self.history: list[dict[str, Any]] = []
        self.verification: dict[str, Any] = {}
        if resume_from is not None:
            self._restore(*resume_from)
        if self.ctx.main:
            self.output.mkdir(parents=True, exist_ok=True)
            (self.output / "config.toml").write_text(to_toml(self.cfg))
        self.scalars = ScalarLog(self.output / "logs", self.ctx.main, purge_after=self.step if resume_from else None)

    # -- helpers ---------------------------------------------------------------------------------------------------
    def log(self, message: str) -> None:
        if self.ctx.main and not self.quiet:
            from tqdm import tqdm

            tqdm.write(message)

    def _mae_extra(self) -> nn.Module | None:
        if self.mae is None:
            return None
        extra = nn.Module()
        for n, m in self.mae.named_children():
            if n != "encoder":
                extra.add_module(n, m)
        extra.register_parameter("mask_token", self.mae.mask_token)
        return extra

    def _build_loader(self):
        cfg, data, ctx = self.cfg, self.cfg["data"], self.ctx
        if data["source"] == "synthetic":
            from facetool.train.engine.data import SyntheticLoader

            return SyntheticLoader(
                data["synthetic_samples"],
                data["synthetic_classes"],
                data["batch_size"],
                ctx.rank,
                ctx.world_size,
                cfg["run"]["seed"],
                ctx.device,
            )
        from facetool.train.data import LoaderConfig, create_loader, open_shards

        shards = open_shards(data["shards"])
        keys = ("batch_size", "masked_prob", "flip_prob", "crop_prob", "color_prob", "gray_prob", "blur_prob",
                "downup_prob", "shuffle_buffer", "workers", "threads")  # fmt: skip
        config = LoaderConfig(seed=cfg["run"]["seed"], last_batch="drop", **{k: data[k] for k in keys})
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
        )

    # -- checkpoints -----------------------------------------------------------------------------------------------
    def _state(self) -> dict[str, Any]:
        rng: dict[str, Any] = {"torch": ckpt.rng_state(), **ckpt.numpy_state()}
        if self.ctx.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.ctx.device).clone()
        if self.head is not None and self.ctx.device in self.head._generators:
            rng["head_sampler"] = self.head._generators[self.ctx.device].get_state().clone()
        epoch, batch = divmod(self.step, self.steps_per_epoch)
        state: dict[str, Any] = {
            "format": TRAIN_FORMAT,
            "version": 1,
            "step": self.step,
            "epoch": epoch,
            "batch_in_epoch": batch,
            "world_size": self.ctx.world_size,
            "rank": self.ctx.rank,
            "task": self.task,
            "model": {"name": self.name, "options": dict(self.options)},
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng,
            "history": json.dumps(self.history),
            "config": to_toml(self.cfg),
        }
        if self.head is not None:
            state["head"] = {k: v.detach().cpu().clone() for k, v in self.head.state_dict().items()}
        if self.mae is not None:
            state["mae"] = {
                k: v.detach().cpu().clone() for k, v in self.mae.state_dict().items() if not k.startswith("encoder.")
            }
        if self.ctx.main:
            state["backbone"] = backbone_payload(self.backbone, self.name, self.options)
        else:  # every rank holds the same backbone (DDP); the others keep only its state for their resume
            state["backbone_state"] = {k: v.detach().cpu().clone() for k, v in self.backbone.state_dict().items()}
        return state

    def save_checkpoint(self) -> Path:
        """Every rank writes its file, then rank 0 commits the folder (atomic rename) and prunes old ones."""
        ckpt.write_rank(self.ckpt_root, self.step, self.ctx.rank, self._state())
        self.ctx.barrier()
        folder = ckpt.step_dir(self.ckpt_root, self.step)
        if self.ctx.main:
            ckpt.commit(self.ckpt_root, self.step, self.ctx.world_size, self.cfg["run"]["keep_checkpoints"])
        self.ctx.barrier()
        return folder

    def _restore(self, step: int, folder: Path) -> None:
        state = ckpt.read_rank(folder, self.ctx.rank, self.ctx.world_size)
        check_resume_backbone(state, self.name, self.options, folder)
        if state.get("task") != self.task:
            raise FacetoolError(f"{folder}: a {state.get('task')!r} checkpoint, the config's run.task is {self.task!r}")
        backbone = state["backbone"]["state_dict"] if "backbone" in state else state["backbone_state"]
        self.backbone.load_state_dict(backbone)
        if self.head is not None:
            try:
                self.head.load_state_dict(state["head"])
            except (RuntimeError, KeyError) as err:
                raise FacetoolError(f"{folder}: head state does not fit [head] of the config ({err})") from None
        if self.mae is not None:
            self.mae.load_state_dict({**state["mae"], **{f"encoder.{k}": v for k, v in backbone.items()}})
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except ValueError as err:
            raise FacetoolError(f"{folder}: optimizer state does not fit [optim] of the config ({err})") from None
        if state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        ckpt.set_numpy_state(rng)
        if "cuda" in rng and self.ctx.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.ctx.device)
        if "head_sampler" in rng and self.head is not None:
            self.head._generator(self.ctx.device).set_state(rng["head_sampler"])
        self.step = int(state["step"])
        self.history = json.loads(state["history"])
        if self.history and "sets" in self.history[-1]:
            self.verification = self.history[-1]["sets"]
        self.log(f"resumed from {folder} at step {self.step}")

    # -- evaluation ------------------------------------------------------------------------------------------------
    def run_evaluation(self) -> dict[str, Any]:
        """Rank 0 evaluates the backbone with the callable it was given; the others wait."""
        result: dict[str, Any] = {}
        t_eval = time.perf_counter()
        if self.evaluate is not None and self.ctx.main:
            t0 = time.perf_counter()
            result = self.evaluate(self.backbone)
            self.backbone.train()
            accs = {name: m["accuracy"] for name, m in result.items()}
            self.history.append({"step": self.step, "accuracy": accs, "seconds": round(time.perf_counter() - t0, 2)})
            self.history[-1]["sets"] = result
            self.verification = result
            self.scalars.add(self.step, {f"verification/{k}": v for k, v in accs.items()})
            shown = ", ".join(f"{k} {100 * v:.2f}%" for k, v in accs.items())
            self.log(f"step {self.step}: verification {shown}")
        self.ctx.barrier()
        self.eval_seconds += time.perf_counter() - t_eval
        return result

    # -- the loop --------------------------------------------------------------------------------------------------
    def _loss(self, batch) -> torch.Tensor:
        images, labels, masked = batch
        if self.mae is not None:
            return self.model(images)
        emb = self.model(images, masked) if getattr(self.backbone, "uses_masked", False) else self.model(images)
        if self.ctx.world_size > 1:
            # DDP averages the backbone's gradients over the ranks, but each rank's embedding gradient is already
            # its full share of the global loss (Partial FC): scale it back up (docs/PARTIAL_FC.md)
            emb.register_hook(lambda g, w=self.ctx.world_size: g * w)
        return self.head(emb.float(), labels)

    def _batches(self):
        """The loader's batches from the current step on: the loader starts the step's epoch directly (every
        loader derives an epoch from the seed and its number alone), and the batches before the position in that
        epoch are drawn and dropped (the loader draws the same ones again, so the position is exact)."""
        epoch, skip = divmod(self.step, self.steps_per_epoch)
        self.loader.epoch = epoch
        while True:
            for i, batch in enumerate(self.loader):
                if i < skip:
                    continue
                yield batch
            skip = 0

    def run(self, on_step: Callable[[int], None] | None = None) -> dict[str, Any]:
        """Train to the configured length; returns the summary (also written to ``summary.json``). ``on_step``,
        when given, is called with the step number after each optimiser step, before any logging, checkpoint or
        evaluation of that step (`bench train` times steps with it)."""
        ctx, run = self.ctx, self.cfg["run"]
        if self.missing_init:
            self.log(f"init_from {run['init_from']}: {len(self.missing_init)} tensors not in the file keep their "
                     f"fresh values (e.g. {self.missing_init[0]})")  # fmt: skip
        self.log(
            f"training {self.name} ({self.task}) on {ctx.world_size} rank(s), {ctx.device}: {self.total} steps of "
            f"{self.global_batch} images ({self.steps_per_epoch} per epoch), peak lr {self.peak_lr:g}; scalars: "
            f"{self.scalars.kind}"
        )
        self.model.train()
        if self.head is not None:
            self.head.train()
        bar = None
        if ctx.main and not self.quiet:
            from tqdm import tqdm

            bar = tqdm(total=self.total, initial=self.step, desc="train", unit="step", dynamic_ncols=True,
                       disable=None, smoothing=0.05)  # fmt: skip
        last_good: Path | None = None
        found = ckpt.latest(self.ckpt_root)
        if found is not None:
            last_good = found[1]
        start_step, t_start, images_done = self.step, time.perf_counter(), 0
        ckpt_every, eval_every = run["checkpoint_every"], self.cfg["eval"]["every"]
        clip = self.cfg["optim"]["clip_grad"]
        device_type = ctx.device.type
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        batches = self._batches() if self.step < self.total else iter(())
        loss_sum, loss_n = 0.0, 0
        try:
            while self.step < self.total:
                batch = next(batches)
                lr = self.schedule(self.step)
                apply_lr(self.optimizer, lr)
                with torch.autocast(
                    device_type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None
                ):
                    loss = self._loss(batch)
                value = loss.detach().float()
                if self.task == "mae" and ctx.world_size > 1:
                    dist.all_reduce(value)
                    value /= ctx.world_size
                value = float(value)
                if run["stop_on_nonfinite"] and not math.isfinite(value):
                    where = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was written yet"
                    raise FacetoolError(
                        f"step {self.step + 1}: the loss is {value} (not finite); training stopped, {where}. "
                        "Lower optim.lr, raise the warm-up or set optim.clip_grad."
                    )
                self.optimizer.zero_grad(set_to_none=True)
                self.scaler.scale(loss).backward()
                if clip > 0:
                    self.scaler.unscale_(self.optimizer)
                    torch.nn.utils.clip_grad_norm_(params, clip)
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.step += 1
                images_done += self.global_batch
                if on_step is not None:
                    on_step(self.step)
                loss_sum, loss_n = loss_sum + value, loss_n + 1
                if self.step % run["log_every"] == 0 or self.step == self.total:
                    rate = images_done / max(1e-9, time.perf_counter() - t_start - self.eval_seconds)
                    self.scalars.add(self.step, {"train/loss": loss_sum / loss_n, "train/lr": lr,
                                                 "train/images_per_s": rate})  # fmt: skip
                    if bar is not None:
                        bar.set_postfix(loss=f"{loss_sum / loss_n:.4f}", lr=f"{lr:.3g}", img_s=f"{rate:,.0f}")
                    loss_sum, loss_n = 0.0, 0
                if bar is not None:
                    bar.update(1)
                if (ckpt_every and self.step % ckpt_every == 0) or self.step == self.total:
                    last_good = self.save_checkpoint()
                if (eval_every and self.step % eval_every == 0) or self.step == self.total:
                    self.run_evaluation()
                    if ctx.main:
                        self.write_summary(images_done, t_start)
        finally:
            if bar is not None:
                bar.close()
            self.scalars.close()
        summary = self.write_summary(images_done, t_start) if ctx.main else {}
        if ctx.main:
            from facetool.train.models import save_backbone

            save_backbone(self.output / "backbone.pt", self.backbone, self.name, self.options)
            self.log(f"trained {self.step - start_step} steps; backbone in {self.output / 'backbone.pt'}, summary in "
                     f"{self.output / 'summary.json'}")  # fmt: skip
        ctx.barrier()
        return summary

    def write_summary(self, images_done: int, t_start: float) -> dict[str, Any]:
        seconds = time.perf_counter() - t_start
        training = seconds - self.eval_seconds
        summary = {
            "steps": self.step,
            "images_per_s": round(images_done / max(training, 1e-9), 2),  # this session's steps, evaluation left out
            "seconds": round(seconds, 2),
            "evaluation_seconds": round(self.eval_seconds, 2),
            "world_size": self.ctx.world_size,
            "global_batch": self.global_batch,
            "backbone": self.name,
            "task": self.task,
            "verification": {"sets": self.verification},
            "history": [{k: v for k, v in h.items() if k != "sets"} for h in self.history],
        }
        if self.ctx.device.type == "cuda":
            summary["peak_memory_bytes"] = int(torch.cuda.max_memory_allocated(self.ctx.device))
        write_json_atomic(self.output / "summary.json", summary)
        return summary


def train(
    cfg: Config, output: str | os.PathLike, resume: bool = False, evaluate: Evaluate | None = None, quiet: bool = False
) -> dict[str, Any]:
    """Build and run a training from a resolved config; returns the summary."""
    trainer = Trainer(cfg, Path(output), resume=resume, evaluate=evaluate, quiet=quiet)
    try:
        return trainer.run()
    finally:
        if trainer.ctx.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()

"""The training loop: one process or many under torchrun (gloo on CPUs, NCCL on GPUs), DDP for the backbone,
Partial FC for the head, AMP, per-iteration schedule, atomic checkpoints with everything an exact resume needs,
verification every N steps, TensorBoard (or JSONL) scalars and a ``summary.json``.

Each iteration is one optimiser step (:meth:`Trainer.train_step`), then what follows it (:meth:`Trainer.after_step`:
scalars, checkpoint, evaluation). The evaluation is handed in as a callable (``evaluate(backbone) -> {set name:
metrics}``), built by the command from :mod:`facetool.bench.verification`, so this package never imports ``bench``.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from facetool.pipeline.atomic import Progress, write_bytes_atomic, write_json_atomic
from facetool.pipeline.errors import FacetoolError
from facetool.train.data import Batch, move_batch
from facetool.train.engine import checkpoint as ckpt
from facetool.train.engine.build import (
    build_backbone,
    build_head,
    build_loader,
    build_mae,
    build_optimizer,
    build_schedule,
    check_memory,
    distributed,
    embedding_size,
    head_classes,
)
from facetool.train.engine.clock import EpochClock
from facetool.train.engine.config import Config
from facetool.train.engine.context import Context, setup_distributed
from facetool.train.engine.optim import apply_lr
from facetool.train.engine.resume import check_allow, clear_run, describe, resume_point
from facetool.train.engine.scalars import ScalarLog
from facetool.train.engine.state import restore, save_checkpoint
from facetool.train.engine.sync import check_replicas, clip_gradients, grad_scaler
from facetool.train.engine.tomlwrite import to_toml
from facetool.train.models.checkpoint import load_init

Evaluate = Callable[[nn.Module], dict[str, dict[str, Any]]]
Notify = Callable[[str], None]


def torch_seed(seed: int, rank: int, per_rank: bool) -> int:
    """The seed of torch's global generator on ``rank``: ``seed`` on every rank (the same drop-path and MAE-mask
    draws everywhere), or with ``per_rank`` ``seed + rank`` as FaceT seeds (zyainfal/Joint-Holistic-and-Masked-
    Face-Recognition code/trainer.py L228-232 @ 3126602be561ffe114ca9a8244cfef348db13c6b). The models agree on
    every rank either way: DDP broadcasts rank 0's weights and the class weights are drawn from ``seed`` alone."""
    return seed + rank if per_rank else seed


@dataclass
class Session:
    """This process's part of the run (a resumed run starts a new one): its clock, images and pending losses."""

    start_step: int
    last_good: Path | None  # the newest complete checkpoint, named when the loss turns non-finite
    t_start: float = 0.0
    images: int = 0
    loss_sum: float = 0.0
    loss_n: int = 0


class Trainer:
    """Builds everything from a config (errors before any step), then :meth:`run` trains.

    A fresh run refuses an ``output`` folder that holds a run, unless ``overwrite`` (its outputs are deleted once
    the run is built); ``resume`` continues the newest checkpoint when it was written with this config, or with
    changes that ``allow_change`` names (``table.key`` or ``table.*``; see :mod:`.resume`). ``progress(step,
    total)`` follows the steps and ``notify`` receives the messages (rank 0 only).
    """

    def __init__(
        self,
        cfg: Config,
        output: Path,
        resume: bool = False,
        evaluate: Evaluate | None = None,
        ctx: Context | None = None,
        *,
        overwrite: bool = False,
        allow_change: Sequence[str] = (),
        progress: Progress | None = None,
        notify: Notify | None = None,
    ) -> None:
        self.cfg, self.output, self.evaluate = cfg, Path(output), evaluate
        self.progress, self.notify = progress, notify
        self.ctx = ctx or setup_distributed(cfg)
        self.allow_change = check_allow(allow_change)
        run, data = cfg["run"], cfg["data"]
        self.task = run["task"]
        self.ckpt_root = self.output / "checkpoints"
        resume_from, changes = resume_point(self.output, cfg, resume, overwrite, self.allow_change)
        self.note_changes(changes)
        if resume and resume_from is None:
            self.log(f"--resume: no complete checkpoint in {self.ckpt_root}; starting from the beginning")
        torch.manual_seed(torch_seed(run["seed"], self.ctx.rank, run["seed_per_rank"]))

        # data first: a missing or damaged shard folder fails before any model is built
        self.loader = build_loader(cfg, self.ctx, notify=self.log)  # its warning is one of the run's messages
        self.steps_per_epoch = len(self.loader)
        if self.steps_per_epoch < 1:
            raise FacetoolError(
                f"{cfg.source}: data.batch_size {data['batch_size']} x {self.ctx.world_size} ranks exceeds the "
                "samples of the shards; lower it"
            )
        self.total = run["steps"] or max(1, math.ceil(run["epochs"] * self.steps_per_epoch))
        self.global_batch = data["batch_size"] * self.ctx.world_size
        self.build_models(init=resume_from is None)
        self.optimizer, self.peak_lr = build_optimizer(cfg, self.backbone, self.head, self.mae, self.global_batch)
        self.schedule = build_schedule(cfg, self.peak_lr, self.total, self.steps_per_epoch)
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(run["amp"])
        self.scaler = grad_scaler(self.ctx.device.type, run["amp"] == "fp16", self.ctx.world_size)
        # DDP over the backbone (the MAE module in pre-training); the Partial FC head is not wrapped
        self.replicated = self.mae if self.mae is not None else self.backbone
        self.model = distributed(self.replicated, self.ctx, find_unused=self.mae is not None)

        self.step = 0
        self.clock = EpochClock(self.steps_per_epoch)
        self.eval_seconds = 0.0  # left out of the training image rate
        self.history: list[dict[str, Any]] = []
        self.verification: dict[str, Any] = {}
        if resume_from is not None:
            restore(self, resume_from[1])
            self.schedule = build_schedule(cfg, self.peak_lr, self.total, self.steps_per_epoch)
            if self.step > self.total:
                raise FacetoolError(
                    f"{resume_from[1]}: checkpoint of step {self.step}, past this run's {self.total} steps "
                    "(run.steps or run.epochs); raise them to go on"
                )
            self.log(f"resumed from {resume_from[1]} at step {self.step}")
        self.open_output(overwrite, purge_after=self.step if resume else None)

    def note_changes(self, changes: list[tuple[str, Any, Any]]) -> None:
        """Say which keys a resumed run changed (all of them allowed)."""
        if changes:
            self.log(f"resuming with changed keys: {describe(changes, limit=len(changes))}")

    def open_output(self, overwrite: bool, purge_after: int | None) -> None:
        """Rank 0 clears the folder (``overwrite``) and writes the resolved config; the scalar log opens, without
        what an interrupted run logged after ``purge_after``."""
        if self.ctx.main:
            if overwrite:
                clear_run(self.output)
            self.output.mkdir(parents=True, exist_ok=True)
            write_bytes_atomic(self.output / "config.toml", to_toml(self.cfg))
        if overwrite:
            self.ctx.barrier()  # no rank writes before the old outputs are gone
        self.scalars = ScalarLog(self.output / "logs", self.ctx.main, purge_after=purge_after)

    def build_models(self, init: bool) -> None:
        """The backbone (started from ``run.init_from`` when ``init``), the head or MAE decoder, on the device."""
        cfg = self.cfg
        classes = None if self.task == "mae" else head_classes(cfg, self.loader)
        check_memory(cfg, self.ctx, classes)  # sizes checked on the "meta" device before any allocation
        self.backbone, self.name, self.options = build_backbone(cfg)
        self.missing_init: list[str] = []
        if cfg["run"]["init_from"] and init:
            self.missing_init = load_init(
                self.backbone, self.name, cfg["run"]["init_from"], cfg["run"]["init_arch"] or None
            )
        self.head: nn.Module | None = None
        self.mae: nn.Module | None = None
        if self.task == "mae":
            self.mae = build_mae(cfg, self.backbone, self.name)
        else:
            self.head = build_head(cfg, embedding_size(self.backbone), classes)
        for module in (self.backbone, self.head, self.mae):
            if module is not None:
                module.to(self.ctx.device)

    def log(self, message: str) -> None:
        """A message for the user (rank 0, when there is a ``notify``)."""
        if self.ctx.main and self.notify is not None:
            self.notify(message)

    def report_progress(self) -> None:
        """``progress(step, total)`` on rank 0."""
        if self.ctx.main and self.progress is not None:
            self.progress(self.step, self.total)

    def save_checkpoint(self) -> Path:
        """Write a checkpoint of this step (every rank its file, rank 0 commits); returns its folder."""
        return save_checkpoint(self)

    # -- evaluation ------------------------------------------------------------------------------------------------
    def run_evaluation(self) -> dict[str, Any]:
        """Rank 0 evaluates the backbone with the callable it was given; the others wait."""
        result: dict[str, Any] = {}
        t_eval = time.perf_counter()
        if self.evaluate is not None and self.ctx.main:
            t0 = time.perf_counter()
            try:
                result = self.evaluate(self.backbone)
            except FacetoolError as err:
                raise FacetoolError(f"step {self.step}: evaluating the {self.name} backbone: {err}") from None
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
    def _loss(self, batch: Batch) -> torch.Tensor:
        images, labels, masked = batch
        if self.mae is not None:
            return self.model(images)
        emb = self.model(images, masked) if getattr(self.backbone, "uses_masked", False) else self.model(images)
        if self.ctx.world_size > 1:
            # DDP averages the backbone's gradients over the ranks, but each rank's embedding gradient is already
            # its full share of the global loss (Partial FC): scale it back up (docs/PARTIAL_FC.md)
            emb.register_hook(lambda g, w=self.ctx.world_size: g * w)
        return self.head(emb.float(), labels)

    def batches(self) -> Iterator[Batch]:
        """The loader's batches from the current step on, on the training device (a loader may deliver elsewhere:
        ``data.loader_device``): the loader starts the step's epoch directly (every loader derives an epoch from
        the seed and its number alone), and the batches before the position in that epoch are drawn and dropped
        (the loader draws the same ones again, so the position is exact)."""
        epoch, skip = self.clock.at(self.step)
        self.loader.epoch = epoch
        while True:
            for i, batch in enumerate(self.loader):
                if i < skip:
                    continue
                yield move_batch(batch, self.ctx.device)
            skip = 0

    def train_step(self, batch: Batch, session: Session) -> tuple[float, float]:
        """One optimiser step on ``batch`` at the scheduled learning rate; returns (lr, loss)."""
        ctx, run = self.ctx, self.cfg["run"]
        lr = self.schedule(self.step)
        apply_lr(self.optimizer, lr)
        with torch.autocast(ctx.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None):
            loss = self._loss(batch)
        value = loss.detach().float()
        if self.task == "mae" and ctx.world_size > 1:
            dist.all_reduce(value)
            value /= ctx.world_size
        value = float(value)
        if run["stop_on_nonfinite"] and not math.isfinite(value):
            last = session.last_good
            where = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
            raise FacetoolError(
                f"step {self.step + 1}: the loss is {value} (not finite); training stopped, {where}. "
                "Lower optim.lr, raise the warm-up or set optim.clip_grad."
            )
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        optim = self.cfg["optim"]
        if optim["clip_grad"] > 0:
            self.scaler.unscale_(self.optimizer)
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            sharded = list(self.head.parameters()) if self.head is not None else []
            clip_gradients(params, sharded, optim["clip_grad"], optim["clip_scope"], ctx.world_size)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.step += 1
        session.images += self.global_batch
        return lr, value

    def after_step(self, lr: float, loss: float, session: Session) -> None:
        """What follows a step: the replicas' check every ``run.check_sync_every`` steps, the scalars every
        ``run.log_every``, a checkpoint every ``run.checkpoint_every``, an evaluation (and the summary) every
        ``eval.every``, and the last three at the end."""
        run, last = self.cfg["run"], self.step == self.total
        if run["check_sync_every"] and self.step % run["check_sync_every"] == 0:
            check_replicas(self.replicated, self.step, self.ctx.world_size, self.ctx.device)
        session.loss_sum, session.loss_n = session.loss_sum + loss, session.loss_n + 1
        if self.step % run["log_every"] == 0 or last:
            rate = session.images / max(1e-9, time.perf_counter() - session.t_start - self.eval_seconds)
            mean = session.loss_sum / session.loss_n
            self.scalars.add(self.step, {"train/loss": mean, "train/lr": lr, "train/images_per_s": rate})
            session.loss_sum, session.loss_n = 0.0, 0
        self.report_progress()
        if (run["checkpoint_every"] and self.step % run["checkpoint_every"] == 0) or last:
            session.last_good = self.save_checkpoint()
        every = self.cfg["eval"]["every"]
        if (every and self.step % every == 0) or last:
            self.run_evaluation()
            if self.ctx.main:
                self.write_summary(session)

    def run(self, on_step: Callable[[int], None] | None = None) -> dict[str, Any]:
        """Train to the configured length; returns the summary (also written to ``summary.json``). ``on_step``,
        when given, is called with the step number after each optimiser step, before any logging, checkpoint or
        evaluation of that step (`bench train` times steps with it)."""
        self._announce()
        self.model.train()
        if self.head is not None:
            self.head.train()
        found = ckpt.latest(self.ckpt_root)
        session = Session(start_step=self.step, last_good=found[1] if found else None, t_start=time.perf_counter())
        self.report_progress()
        batches = self.batches() if self.step < self.total else iter(())
        try:
            while self.step < self.total:
                lr, loss = self.train_step(next(batches), session)
                if on_step is not None:
                    on_step(self.step)
                self.after_step(lr, loss, session)
        finally:
            self.scalars.close()
        return self.finish(session)

    def _announce(self) -> None:
        ctx, init_from = self.ctx, self.cfg["run"]["init_from"]
        if self.missing_init:
            self.log(f"init_from {init_from}: {len(self.missing_init)} tensors not in the file keep their fresh "
                     f"values (e.g. {self.missing_init[0]})")  # fmt: skip
        self.log(
            f"training {self.name} ({self.task}) on {ctx.world_size} rank(s), {ctx.device}: {self.total} steps of "
            f"{self.global_batch} images ({self.steps_per_epoch} per epoch), peak lr {self.peak_lr:g}; scalars: "
            f"{self.scalars.kind}"
        )

    def finish(self, session: Session) -> dict[str, Any]:
        """Rank 0 writes the summary and the trained backbone (``backbone.pt``); returns the summary."""
        summary: dict[str, Any] = {}
        if self.ctx.main:
            from facetool.train.models import save_backbone

            summary = self.write_summary(session)
            save_backbone(self.output / "backbone.pt", self.backbone, self.name, self.options)
            self.log(f"trained {self.step - session.start_step} steps; backbone in {self.output / 'backbone.pt'}, "
                     f"summary in {self.output / 'summary.json'}")  # fmt: skip
        self.ctx.barrier()
        return summary

    def write_summary(self, session: Session) -> dict[str, Any]:
        """Write ``summary.json`` (steps, image rate, evaluation history) and return it."""
        seconds = time.perf_counter() - session.t_start
        training = seconds - self.eval_seconds
        summary = {
            "steps": self.step,
            "images_per_s": round(session.images / max(training, 1e-9), 2),  # this session, evaluation left out
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
    cfg: Config,
    output: str | os.PathLike,
    resume: bool = False,
    evaluate: Evaluate | None = None,
    *,
    overwrite: bool = False,
    allow_change: Sequence[str] = (),
    progress: Progress | None = None,
    notify: Notify | None = None,
) -> dict[str, Any]:
    """Build and run a training from a resolved config (see :class:`Trainer` for the options); returns the
    summary."""
    trainer = Trainer(cfg, Path(output), resume=resume, evaluate=evaluate, overwrite=overwrite,
                      allow_change=allow_change, progress=progress, notify=notify)  # fmt: skip
    try:
        return trainer.run()
    finally:
        if trainer.ctx.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()

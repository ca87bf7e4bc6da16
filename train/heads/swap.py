"""Partial FC's swap update (``update = "swap"``): only the sampled class rows are trained at each step.

With the dense update (``"dense"``, arcface_torch's ``partial_fc_v2.py``) a class weight is one parameter in the
optimiser: rows not sampled get a zero gradient, but weight decay and momentum (AdamW: decoupled decay and the
stale m / sqrt(v)) still move them. The swap update is the older Partial FC that FaceT trains with
(zyainfal/Joint-Holistic-and-Masked-Face-Recognition code/loss/partial_fc.py @ 3126602be5: ``PartialFCSGD``
L589-624, ``PartialFCAdamW`` L116-154, copied from deepinsight/insightface recognition/arcface_torch/partial_fc.py
@ d9cb10e6bd L96-149): each step the sampled rows become the parameter the optimiser sees, with their rows of the
optimiser state, and both are written back after the step. Rows not sampled, and their optimiser state, are not
touched at all (no decay, no momentum).

Layout (every per-class tensor has this rank's class count as its first dimension, so a shard can be re-cut):

- ``{name}`` (e.g. ``weight``, ``spheres.0.weight``): the full rows, a parameter with ``requires_grad=False`` (not
  in the optimiser; same key as with the dense update);
- ``{name}_active``: the parameter the optimiser holds, the sampled rows during a step and zero rows between steps
  (left out of the ``state_dict``);
- ``{name}_{key}`` buffers, the full rows of the optimiser state: ``momentum_buffer`` (SGD with momentum),
  ``exp_avg`` and ``exp_avg_sq`` (AdamW; ``max_exp_avg_sq`` with amsgrad), made by :meth:`SwapUpdate.bind`;
- ``swap_steps`` (a head buffer, one number): the swap steps taken, AdamW's step count in ``swap_step = "counter"``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from facetool.pipeline.errors import FacetoolError

UPDATES = ("dense", "swap")
#: AdamW's step count in swap mode: the head's count of swap steps, or FaceT's 0 for every fresh parameter.
SWAP_STEPS = ("counter", "reset")
ACTIVE = "_active"
STATE_KEYS = ("momentum_buffer", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")  # what SGD and AdamW keep per element


@dataclass
class Slot:
    """One class weight under the swap update: its module and name, and the rows gathered for the step."""

    owner: nn.Module
    name: str
    rows: Tensor | None = None  # the sampled rows (None: all of them)
    pending: bool = False  # gathered, not yet stepped

    @property
    def full(self) -> nn.Parameter:
        return getattr(self.owner, self.name)

    @property
    def active(self) -> nn.Parameter:
        return getattr(self.owner, self.name + ACTIVE)


def state_keys(optimizer: torch.optim.Optimizer, group: dict[str, Any]) -> tuple[str, ...]:
    """The per-element state ``optimizer`` keeps for a parameter of ``group``; SGD and Adam(W) only."""
    if isinstance(optimizer, torch.optim.SGD):
        return ("momentum_buffer",) if group.get("momentum", 0) else ()
    if isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW):
        return ("exp_avg", "exp_avg_sq", *(("max_exp_avg_sq",) if group.get("amsgrad") else ()))
    raise FacetoolError(f"head update = 'swap' works with SGD and AdamW, not {type(optimizer).__name__}")


def take(value: Tensor, rows: Tensor | None) -> Tensor:
    """A copy of ``value``'s ``rows`` (all of them when None)."""
    return value.detach().clone() if rows is None else value.detach()[rows]


class SwapUpdate:
    """The swap machinery of one head: placeholders at construction, optimiser hooks at :meth:`bind`."""

    def __init__(self, head: nn.Module, names: list[str], swap_step: str) -> None:
        self.head, self.swap_step = head, swap_step
        self.slots: list[Slot] = []
        for name in names:
            prefix, _, leaf = name.rpartition(".")
            owner = head.get_submodule(prefix)
            full = getattr(owner, leaf)
            full.requires_grad_(False)
            owner.register_parameter(leaf + ACTIVE, nn.Parameter(full.detach().new_empty(0, full.shape[1])))
            self.slots.append(Slot(owner, leaf))
        head.register_buffer("swap_steps", torch.zeros((), dtype=torch.int64))
        head.register_state_dict_post_hook(drop_active)
        head.register_load_state_dict_post_hook(self.after_load)
        self.optimizer: torch.optim.Optimizer | None = None
        self.keys: tuple[str, ...] = ()
        self.adam = False
        self.handles: list[Any] = []

    def bind(self, optimizer: torch.optim.Optimizer) -> None:
        """Hook ``optimizer`` (which must hold the ``*_active`` parameters) and make the optimiser-state buffers,
        zero (a checkpoint's ``load_state_dict`` fills them)."""
        groups = [g for g in optimizer.param_groups if any(p is self.slots[0].active for p in g["params"])]
        if not groups:
            raise FacetoolError("head update = 'swap': the optimiser does not hold the head's active rows")
        self.keys = state_keys(optimizer, groups[0])
        self.adam = not isinstance(optimizer, torch.optim.SGD)
        for slot in self.slots:
            for key in self.keys:
                if not hasattr(slot.owner, f"{slot.name}_{key}"):
                    slot.owner.register_buffer(f"{slot.name}_{key}", torch.zeros_like(slot.full.detach()))
        for handle in self.handles:
            handle.remove()
        self.handles = [optimizer.register_step_pre_hook(self.before), optimizer.register_step_post_hook(self.after)]
        self.optimizer = optimizer

    def after_load(self, module: nn.Module, incompatible: Any) -> None:
        """Load post-hook: a state needs no ``*_active`` placeholders (see :func:`drop_active`). A state holding
        another optimiser's buffers (``optim.name`` changed on resume) drops them, and the bound optimiser's state
        starts fresh: zero buffers, step count 0, as a fresh optimiser's state would."""
        missing, unexpected = incompatible.missing_keys, incompatible.unexpected_keys
        missing[:] = [k for k in missing if not k.endswith(ACTIVE)]
        others = [f"{s.name}_{key}" for s in self.slots for key in STATE_KEYS if key not in self.keys]
        dropped = [k for k in unexpected if k.endswith(tuple(others))]
        if not dropped:
            return
        unexpected[:] = [k for k in unexpected if k not in dropped]
        missing[:] = [k for k in missing if not k.endswith(tuple(f"_{key}" for key in self.keys))]
        with torch.no_grad():
            for slot in self.slots:
                for key in self.keys:
                    getattr(slot.owner, f"{slot.name}_{key}").zero_()
            self.head.swap_steps.zero_()

    def gather(self, index: int, rows: Tensor | None) -> nn.Parameter:
        """The step's parameter for class weight ``index``: a copy of the sampled ``rows`` (all when None)."""
        if self.optimizer is None:
            raise RuntimeError("head update = 'swap': call head.bind_optimizer(optimizer) before training")
        slot = self.slots[index]
        active = slot.active
        active.data = take(slot.full, rows)
        active.grad = None
        slot.rows, slot.pending = rows, True
        return active

    def before(self, optimizer: torch.optim.Optimizer, *_: Any) -> None:
        """Step pre-hook: the sampled rows' optimiser state goes into the optimiser."""
        for slot in (s for s in self.slots if s.pending):
            state = {key: take(getattr(slot.owner, f"{slot.name}_{key}"), slot.rows) for key in self.keys}
            if self.adam:
                count = int(self.head.swap_steps) if self.swap_step == "counter" else 0
                state["step"] = torch.tensor(float(count), dtype=torch.float32)
            optimizer.state[slot.active] = state

    @torch.no_grad()
    def after(self, optimizer: torch.optim.Optimizer, *_: Any) -> None:
        """Step post-hook: the updated rows and their optimiser state go back; the placeholders are emptied."""
        stepped = [s for s in self.slots if s.pending]
        for slot in stepped:
            state = optimizer.state.pop(slot.active, {})
            put(slot.full, slot.rows, slot.active.detach())
            for key in self.keys:
                put(getattr(slot.owner, f"{slot.name}_{key}"), slot.rows, state[key])
            slot.active.data = slot.full.detach().new_empty(0, slot.full.shape[1])
            slot.active.grad = None
            slot.rows, slot.pending = None, False
        if stepped:
            self.head.swap_steps += 1


def put(full: Tensor, rows: Tensor | None, values: Tensor) -> None:
    """Write ``values`` into ``full``'s ``rows`` (all of them when None)."""
    if rows is None:
        full.copy_(values)
    else:
        full[rows] = values


def drop_active(module: nn.Module, state: dict[str, Any], prefix: str, metadata: Any) -> None:
    """State-dict post-hook: the ``*_active`` placeholders are no state (the full rows are)."""
    for key in [k for k in state if k.startswith(prefix) and k.endswith(ACTIVE)]:
        del state[key]

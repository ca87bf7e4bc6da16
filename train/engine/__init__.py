"""The training engine behind ``facetool train``: TOML configs, the loop (DDP, Partial FC, AMP, schedules, exact
resume, evaluation hook, logging) and MAE pre-training for FaceT.

    from facetool.train.engine import load_config, train
    summary = train(load_config("configs/demo.toml"), "runs/demo", evaluate=my_eval)

Modules: ``config`` (schema, loading, checks), ``tomlwrite`` (the resolved config as TOML), ``context`` (ranks and
device), ``build`` (loader, backbone, head, MAE, optimiser, schedule; sizes checked on the meta device),
``trainer`` (the loop), ``sync`` (what keeps DDP ranks in lockstep: clipping, fp16's scaler, the replica check),
``state`` (what a checkpoint holds, exact resume), ``reshard`` (a checkpoint of N ranks resumed on M),
``clock`` (the epoch and batch of each step), ``resume`` (reusing an output folder: fresh-run refusal, the
config check of ``--resume``), ``checkpoint`` (the checkpoint files), ``scalars`` (the scalar log), ``optim``,
``mae`` and ``data`` (synthetic batches).
"""

from .config import SCHEMA, Config, load_config
from .mae import MAE
from .optim import Schedule, parameter_groups
from .tomlwrite import to_toml
from .trainer import Trainer, train

__all__ = ["MAE", "SCHEMA", "Config", "Schedule", "Trainer", "load_config", "parameter_groups", "to_toml", "train"]

"""Training engine: configs, the training loop, evaluation, checkpoints, EMA, logging, distributed setup.

Quick start::

    from dynwire.engine import load_config, train
    cfg = load_config("fmnist_resnet20", ["schedule.epochs=2"])
    final = train(cfg)

or from the shell: ``dynwire train --config fmnist_resnet20 --set schedule.epochs=2``.

Modules: ``config`` (schema, recipes, overrides), ``builders`` (datasets, loaders, model,
optimizer), ``trainer`` (the loop), ``evaluation``, ``state`` (``TrainState``), ``meters``,
``checkpoint``, ``files`` (``atomic_write``), ``logging`` (metrics, progress), ``signals``,
``rundir`` (run.json, resume), ``optim``, ``ema``, ``distributed``.
"""

from .builders import build_datasets, build_loaders, build_model, build_split, seed_everything
from .checkpoint import (
    CheckpointError,
    atomic_torch_save,
    capture_rng_state,
    export_safetensors,
    load_checkpoint,
    restore_rng_state,
    state_dict_sha256,
    unwrap_model,
)
from .config import RunConfig, config_from_dict, load_config, save_config, shipped_configs
from .ema import ModelEma
from .evaluation import evaluate, evaluate_model
from .files import atomic_write
from .optim import WarmupCosineSchedule, build_optimizer, grad_norm, lr_factor, param_groups
from .signals import TrainingInterrupted
from .state import TrainState
from .trainer import TrainingDiverged, train

__all__ = [
    "RunConfig",
    "load_config",
    "config_from_dict",
    "save_config",
    "shipped_configs",
    "train",
    "evaluate",
    "evaluate_model",
    "build_split",
    "build_datasets",
    "build_model",
    "build_loaders",
    "seed_everything",
    "TrainState",
    "TrainingDiverged",
    "TrainingInterrupted",
    "CheckpointError",
    "atomic_write",
    "atomic_torch_save",
    "load_checkpoint",
    "capture_rng_state",
    "restore_rng_state",
    "state_dict_sha256",
    "export_safetensors",
    "unwrap_model",
    "ModelEma",
    "param_groups",
    "build_optimizer",
    "grad_norm",
    "WarmupCosineSchedule",
    "lr_factor",
]

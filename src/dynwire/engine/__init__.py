"""Training engine: configs, the training loop, checkpoints, EMA, logging, distributed setup.

Quick start::

    from dynwire.engine import load_config, train
    cfg = load_config("fmnist_resnet20", ["schedule.epochs=2"])
    final = train(cfg)

or from the shell: ``dynwire train --config fmnist_resnet20 --set schedule.epochs=2``.
"""

from .checkpoint import (
    CheckpointError,
    atomic_torch_save,
    capture_rng_state,
    export_safetensors,
    load_checkpoint,
    restore_rng_state,
    unwrap_model,
)
from .config import RunConfig, config_from_dict, load_config, save_config, shipped_configs
from .ema import ModelEma
from .optim import WarmupCosineSchedule, build_optimizer, lr_factor, param_groups
from .trainer import TrainingDiverged, TrainingInterrupted, evaluate, evaluate_model, train

__all__ = [
    "RunConfig",
    "load_config",
    "config_from_dict",
    "save_config",
    "shipped_configs",
    "train",
    "evaluate",
    "evaluate_model",
    "TrainingDiverged",
    "TrainingInterrupted",
    "CheckpointError",
    "atomic_torch_save",
    "load_checkpoint",
    "capture_rng_state",
    "restore_rng_state",
    "export_safetensors",
    "unwrap_model",
    "ModelEma",
    "param_groups",
    "build_optimizer",
    "WarmupCosineSchedule",
    "lr_factor",
]

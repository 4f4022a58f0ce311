"""Builders: what a run config turns into (datasets, loaders, model, optimizer and schedule)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

from .._registry import create_model
from ..data import DatasetInfo, build_dataset, build_loader
from .config import RunConfig
from .optim import WarmupCosineSchedule, build_optimizer

__all__ = [
    "seed_everything",
    "build_split",
    "build_datasets",
    "build_model",
    "build_loaders",
    "Schedule",
    "build_optimization",
]


def seed_everything(seed: int) -> None:
    """Seed python ``random``, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_split(cfg: RunConfig, split: str, *, train: bool, info: Any = None) -> tuple[Dataset, DatasetInfo]:
    """One split from :func:`dynwire.data.build_dataset` (augmented when ``train``).

    ``info``: what a model was trained with (a :class:`DatasetInfo`, or the ``data_info`` of its
    checkpoint): its class names and input size are reused, so labels and shapes match the model.
    """
    image_size = cfg.data.image_size
    if image_size is None and info is not None:
        image_size = int(info.input_size[-1])
    return build_dataset(
        cfg.data.name,
        cfg.data.root,
        split,
        augment=train,
        image_size=image_size,
        on_bad_image="skip" if cfg.data.skip_bad_images else "raise",
        subset=cfg.data.subset if train else cfg.data.val_subset,
        subset_seed=cfg.train.seed,
        classes=list(info.classes) if info is not None and cfg.data.name == "imagefolder" else None,
    )


def build_datasets(cfg: RunConfig, *, split: str = "val") -> tuple[Dataset, Dataset, DatasetInfo]:
    """Training and evaluation datasets plus the :class:`DatasetInfo` of the training set."""
    train_ds, info = build_split(cfg, "train", train=True)
    val_ds, _ = build_split(cfg, split, train=False, info=info)
    return train_ds, val_ds, info


def build_model(cfg: RunConfig, info: Any) -> nn.Module:
    """:func:`dynwire.create_model` with channels/classes taken from the dataset info."""
    return create_model(
        cfg.model.name,
        num_classes=int(info.num_classes),
        wiring=cfg.model.wiring,
        in_chans=int(info.in_chans),
        drop_rate=cfg.model.drop_rate,
        **cfg.model.wiring_kwargs,
    )


def build_loaders(
    cfg: RunConfig, train_ds: Dataset, val_ds: Dataset, *, local_batch: int, distributed: bool
) -> tuple[DataLoader, DataLoader]:
    """Training loader (its ``batch_sampler`` is positioned with ``set_epoch``/``set_start``) and
    the sharded evaluation loader, both from :func:`dynwire.data.build_loader`."""
    if len(train_ds) < cfg.data.batch_size:  # type: ignore[arg-type]
        raise ValueError(
            f"data.batch_size={cfg.data.batch_size}: larger than the training set ({len(train_ds)} images); "  # type: ignore[arg-type]
            f"lower the batch size or use more data"
        )
    kw: dict[str, Any] = dict(num_workers=cfg.data.num_workers, distributed=distributed, seed=cfg.train.seed)
    train = build_loader(train_ds, local_batch, train=True, drop_last=True, **kw)
    val = build_loader(val_ds, local_batch, train=False, **kw)
    return train, val


@dataclass(frozen=True)
class Schedule:
    """Step counts of a run and the learning rate used (scaled to the global batch)."""

    lr: float
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int


def build_optimization(
    cfg: RunConfig, model: nn.Module, steps_per_epoch: int
) -> tuple[torch.optim.Optimizer, WarmupCosineSchedule, Schedule]:
    """SGD over the model's decay / no-decay groups and the per-step warm-up + cosine schedule."""
    total = steps_per_epoch * cfg.schedule.epochs
    sched = Schedule(
        lr=cfg.scaled_lr(),
        steps_per_epoch=steps_per_epoch,
        total_steps=total,
        warmup_steps=min(total, int(round(cfg.schedule.warmup_epochs * steps_per_epoch))),
    )
    optimizer = build_optimizer(
        model,
        lr=sched.lr,
        momentum=cfg.optim.momentum,
        weight_decay=cfg.optim.weight_decay,
        nesterov=cfg.optim.nesterov,
        no_decay_norm_bias=cfg.optim.no_decay_norm_bias,
    )
    scheduler = WarmupCosineSchedule(optimizer, total, sched.warmup_steps, cosine=cfg.schedule.cosine)
    return optimizer, scheduler, sched

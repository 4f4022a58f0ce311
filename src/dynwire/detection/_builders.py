"""Builders of :mod:`dynwire.detection.train`: the lr schedule, the data order, the datasets, the detector.

:func:`lr_factor` is Detectron2's ``WarmupMultiStepLR``; :class:`IterationBatchSampler` makes the
batches a function of ``(seed, iteration)`` (exact resume); :func:`build_detection_datasets` and
:func:`build_detector` build the train/val sets and Faster R-CNN + FPN from a
:class:`~dynwire.detection.config.DetectionConfig`.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Sampler

from .coco import CocoDetection, coco_split_paths
from .config import DetectionConfig
from .model import fasterrcnn_fpn


def lr_factor(it: int, warmup_iters: int, warmup_factor: float, steps: Sequence[int], gamma: float) -> float:
    """Detectron2's WarmupMultiStepLR factor for 0-based iteration ``it``."""
    f = gamma ** bisect.bisect_right(list(steps), it)
    if it < warmup_iters:
        alpha = it / warmup_iters
        f *= warmup_factor * (1 - alpha) + alpha
    return f


def _iter_seed(seed: int, it: int) -> int:
    return int(np.random.SeedSequence([int(seed), int(it)]).generate_state(1, dtype=np.uint64)[0] >> 1)


class IterationBatchSampler(Sampler[list[int]]):
    """Batches for iterations ``start .. stop-1``: consecutive slices of per-epoch permutations.

    Epoch ``e`` is ``randperm(n)`` seeded by ``(seed, e)``; iteration ``i`` takes positions
    ``i * batch .. (i + 1) * batch`` of their concatenation, so the batches depend only on
    ``(seed, i)`` and resuming at ``start`` continues exactly. ``rank``/``world_size`` give each
    process its share of every batch (for DDP).
    """

    def __init__(
        self, n: int, batch_size: int, seed: int, start: int, stop: int, rank: int = 0, world_size: int = 1
    ) -> None:
        if n < 1:
            raise ValueError("the training set is empty")
        self.n, self.batch, self.seed, self.start, self.stop = n, batch_size, seed, start, stop
        self.rank, self.world = rank, world_size

    def _perm(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(_iter_seed(self.seed, 1_000_000_007 + epoch))
        return torch.randperm(self.n, generator=g).tolist()

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __iter__(self) -> Iterator[list[int]]:
        pos = self.start * self.batch
        epoch, off = divmod(pos, self.n)
        perm = self._perm(epoch)
        for _ in range(len(self)):
            batch = []
            while len(batch) < self.batch:
                if off == self.n:
                    epoch, off = epoch + 1, 0
                    perm = self._perm(epoch)
                take = min(self.batch - len(batch), self.n - off)
                batch.extend(perm[off : off + take])
                off += take
            yield batch[self.rank :: self.world]


def build_detection_datasets(cfg: DetectionConfig) -> tuple[CocoDetection, CocoDetection]:
    d = cfg.data
    if d.root is None:
        hint = " (generate it: dynwire make-scenes DIR)" if d.name == "fmnist_scenes" else ""
        raise ValueError(f"data.root is not set: the folder with <split>/ and annotations/{hint}")
    sets = []
    for split, train in ((d.train_split, True), (d.val_split, False)):
        images, ann = coco_split_paths(d.root, split)
        if not ann.is_file():
            hint = f"; generate the scenes with: dynwire make-scenes {d.root}" if d.name == "fmnist_scenes" else ""
            raise ValueError(f"data: annotation file '{ann}' not found (data.root={d.root!r}, split {split!r}){hint}")
        sets.append(
            CocoDetection(
                images, ann, skip_bad=d.skip_bad, check_images=d.check_images, remove_empty=train and d.remove_empty
            )
        )
    return sets[0], sets[1]


def build_detector(cfg: DetectionConfig, num_classes: int, backbone_weights: bool = True) -> nn.Module:
    m, d = cfg.model, cfg.data
    return fasterrcnn_fpn(
        m.name,
        wiring=m.wiring,
        num_classes=num_classes,
        trainable_stages=m.trainable_stages,
        norm=m.norm,
        returned_stages=m.returned_stages,
        min_size=tuple(int(s) for s in d.train_min_size),
        max_size=d.max_size,
        backbone_weights=m.backbone_weights if backbone_weights else None,
        backbone_kwargs={**m.wiring_kwargs, **m.backbone_kwargs},
        fpn_channels=m.fpn_channels,
        anchor_sizes=m.anchor_sizes,
        representation_size=m.representation_size,
        **m.detector_kwargs,
    )


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

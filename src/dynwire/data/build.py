"""Dataset / DataLoader factories used by the training engine and the CLI."""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from ._paths import PathLike
from .cifar import CIFAR10, CIFAR100
from .fashion_mnist import FashionMNIST
from .imagefolder import IMAGENET_MEAN, IMAGENET_STD, ImageNetFolder, check_bad_image_mode, imagenet_transforms
from .transforms import tensor_transforms

__all__ = [
    "DATASET_NAMES",
    "DatasetInfo",
    "LabeledSubset",
    "build_dataset",
    "build_loader",
    "canonical_dataset_name",
    "get_dataset_info",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a dataset that models and the engine need."""

    name: str
    num_classes: int
    in_chans: int
    input_size: tuple[int, int, int]  # (C, H, W) fed to the model
    mean: tuple[float, ...]
    std: tuple[float, ...]


@dataclass(frozen=True)
class _Spec:
    num_classes: int
    in_chans: int
    native_size: int  # image side before optional resizing (default input size for imagenet)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    padding: int = 0  # RandomCrop padding for the tensor datasets


_SPECS: dict[str, _Spec] = {
    "fashion_mnist": _Spec(10, 1, 28, (0.2860,), (0.3530,), padding=2),
    "cifar10": _Spec(10, 3, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), padding=4),
    "cifar100": _Spec(100, 3, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), padding=4),
    "imagenet": _Spec(1000, 3, 224, IMAGENET_MEAN, IMAGENET_STD),
}
DATASET_NAMES: tuple[str, ...] = tuple(_SPECS)
_ALIASES = {
    "fmnist": "fashion_mnist",
    "fashionmnist": "fashion_mnist",
    "cifar_10": "cifar10",
    "cifar_100": "cifar100",
    "imagenet1k": "imagenet",
    "imagenet_1k": "imagenet",
}
_SPLITS = {"train": "train", "val": "val", "test": "val"}


def canonical_dataset_name(name: str) -> str:
    """Normalise ``name`` (case, ``-`` vs ``_``, a few aliases) to one of :data:`DATASET_NAMES`."""
    if not isinstance(name, str):
        raise ValueError(f"dataset name must be a string, got {name!r}; valid names: {list(DATASET_NAMES)}")
    key = name.strip().lower().replace("-", "_")
    key = _ALIASES.get(key, key)
    if key not in _SPECS:
        raise ValueError(f"unknown dataset {name!r}; valid names: {list(DATASET_NAMES)}")
    return key


def _check_positive_int(value: Any, what: str, *, allow_none: bool = False, minimum: int = 1) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        extra = " or None" if allow_none else ""
        raise ValueError(f"{what}={value!r} is not valid; expected an int >= {minimum}{extra}")


def get_dataset_info(name: str, image_size: int | None = None) -> DatasetInfo:
    """:class:`DatasetInfo` for ``name`` without touching the disk."""
    key = canonical_dataset_name(name)
    _check_positive_int(image_size, "image_size", allow_none=True)
    spec = _SPECS[key]
    side = image_size if image_size is not None else spec.native_size
    return DatasetInfo(key, spec.num_classes, spec.in_chans, (spec.in_chans, side, side), spec.mean, spec.std)


class LabeledSubset(Subset):
    """:class:`~torch.utils.data.Subset` that keeps ``targets`` and ``classes`` of its parent."""

    @property
    def targets(self) -> Any:
        t = getattr(self.dataset, "targets")
        if isinstance(t, torch.Tensor):
            return t[torch.as_tensor(self.indices, dtype=torch.long)]
        return [t[i] for i in self.indices]

    @property
    def classes(self) -> list[str]:
        return getattr(self.dataset, "classes")


def _take_subset(ds: Dataset, subset: int, seed: int) -> Dataset:
    n = len(ds)  # type: ignore[arg-type]
    if subset >= n:
        logger.warning("subset=%d >= dataset size %d; using the whole dataset", subset, n)
        return ds
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(n, generator=g)[:subset].sort().values.tolist()
    return LabeledSubset(ds, idx)


def build_dataset(
    name: str,
    root: PathLike | None = None,
    split: str = "train",
    *,
    augment: bool = True,
    image_size: int | None = None,
    on_bad_image: str = "raise",
    subset: int | None = None,
    subset_seed: int = 0,
) -> tuple[Dataset, DatasetInfo]:
    """Build a dataset with its standard transforms and return it with its :class:`DatasetInfo`.

    ``name``: one of ``fashion_mnist``, ``cifar10``, ``cifar100``, ``imagenet``.
    ``split``: ``"train"`` or ``"val"`` (the test split for Fashion-MNIST/CIFAR; ``"test"`` is an alias).
    ``augment``: random crop/flip on the train split (never on val).
    ``image_size``: model input side; defaults to 28 / 32 / 224 (small images are resized if it differs).
    ``on_bad_image``: ``"raise"`` or ``"skip"`` unreadable image files (ImageNet only).
    ``subset``: keep a deterministic random subset of that many samples (seeded by ``subset_seed``).
    """
    key = canonical_dataset_name(name)
    if split not in _SPLITS:
        raise ValueError(f"split={split!r} is not valid; use 'train' or 'val' ('test' is an alias of 'val')")
    split = _SPLITS[split]
    check_bad_image_mode(on_bad_image)
    _check_positive_int(subset, "subset", allow_none=True)
    _check_positive_int(subset_seed, "subset_seed", minimum=0)
    info = get_dataset_info(key, image_size)
    spec = _SPECS[key]
    train_tf = split == "train" and bool(augment)
    ds: Dataset
    if key == "imagenet":
        tf = imagenet_transforms(train=train_tf, image_size=info.input_size[1], mean=spec.mean, std=spec.std)
        ds = ImageNetFolder(root, split, transform=tf, on_bad_image=on_bad_image)
        if len(ds.classes) != spec.num_classes:
            logger.warning(
                "ImageNet %s split at '%s' has %d class folders (expected %d); "
                "labels follow the sorted folder names",
                split, ds.root, len(ds.classes), spec.num_classes,
            )
    else:
        tf = tensor_transforms(
            train=train_tf,
            native_size=spec.native_size,
            padding=spec.padding,
            mean=spec.mean,
            std=spec.std,
            image_size=info.input_size[1],
        )
        cls = {"fashion_mnist": FashionMNIST, "cifar10": CIFAR10, "cifar100": CIFAR100}[key]
        ds = cls(root, "train" if split == "train" else "test", transform=tf)
    if subset is not None:
        ds = _take_subset(ds, subset, subset_seed)
    return ds, info


def seed_worker(worker_id: int) -> None:
    """Seed numpy / random in a DataLoader worker from torch's per-worker seed."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def build_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    train: bool,
    num_workers: int = 0,
    distributed: bool = False,
    seed: int = 0,
    drop_last: bool | None = None,
) -> DataLoader:
    """DataLoader with reproducible shuffling.

    Not distributed: shuffles (when ``train``) with a ``torch.Generator`` seeded by ``seed``; the
    same generator seeds the workers, so order and worker-side augmentation repeat run to run
    (with ``num_workers=0`` augmentation uses the global torch RNG: call ``torch.manual_seed``).
    Distributed: ``DistributedSampler(shuffle=train, seed=seed)``; the caller must call
    ``loader.sampler.set_epoch(epoch)`` each epoch. ``drop_last`` defaults to ``train`` unless
    that would leave no batch. ``pin_memory`` only if CUDA is available; persistent workers
    when ``num_workers > 0``.
    """
    _check_positive_int(batch_size, "batch_size")
    _check_positive_int(num_workers, "num_workers", minimum=0)
    _check_positive_int(seed, "seed", minimum=0)
    if drop_last is not None and not isinstance(drop_last, bool):
        raise ValueError(f"drop_last={drop_last!r} is not valid; expected True, False or None")
    generator = torch.Generator()
    sampler: DistributedSampler | None = None
    if distributed:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "build_loader(distributed=True) needs an initialised torch.distributed process group "
                "(call torch.distributed.init_process_group first)"
            )
        sampler = DistributedSampler(dataset, shuffle=bool(train), seed=seed)
        n_local = sampler.num_samples
        generator.manual_seed(seed + dist.get_rank())  # distinct worker RNG streams per rank
    else:
        n_local = len(dataset)  # type: ignore[arg-type]
        generator.manual_seed(seed)
    if drop_last is None:
        drop_last = bool(train) and n_local >= batch_size
    elif drop_last and n_local < batch_size:
        raise ValueError(
            f"drop_last=True with batch_size={batch_size} but only {n_local} samples per process: "
            "the loader would yield no batches; lower batch_size or pass drop_last=False"
        )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=bool(train) and sampler is None,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        drop_last=drop_last,
        generator=generator,
        worker_init_fn=seed_worker if num_workers > 0 else None,
        persistent_workers=num_workers > 0,
    )

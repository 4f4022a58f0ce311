"""Dataset factory used by the training engine and the CLI: ``build_dataset`` and ``DatasetInfo``."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, Subset

from ._paths import PathLike
from .cifar import CIFAR10, CIFAR100
from .fashion_mnist import FashionMNIST
from .imagefolder import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageNetFolder,
    SafeImageFolder,
    check_bad_image_mode,
    first_image_side,
    holdout_split,
    imagenet_transforms,
    list_classes,
)
from .transforms import tensor_transforms

__all__ = [
    "DATASET_NAMES",
    "DatasetInfo",
    "LabeledSubset",
    "build_dataset",
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
    classes: tuple[str, ...] = ()  # class names by label (filled by build_dataset)


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
#: ``imagefolder``: your own class folders; class count, names and input size come from the data.
DATASET_NAMES: tuple[str, ...] = (*_SPECS, "imagefolder")
_ALIASES = {
    "image_folder": "imagefolder",
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
    if key not in DATASET_NAMES:
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
    if key not in _SPECS:
        raise ValueError(f"{key}: class count and input size come from the data; use build_dataset")
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
    classes: Sequence[str] | None = None,
) -> tuple[Dataset, DatasetInfo]:
    """Build a dataset with its standard transforms and return it with its :class:`DatasetInfo`.

    ``name``: one of :data:`DATASET_NAMES` (aliases such as ``fmnist`` / ``fashion-mnist`` work).
    ``split``: ``"train"`` or ``"val"`` (the test split for Fashion-MNIST/CIFAR; ``"test"`` is an alias).
    ``augment``: random crop/flip on the train split (never on val).
    ``image_size``: model input side; defaults to 28 / 32 / 224 (small images are resized if it differs);
    for ``imagefolder`` the smaller side of the first training image, at most 224.
    ``on_bad_image``: ``"raise"`` or ``"skip"`` unreadable image files (class-folder datasets).
    ``subset``: keep a deterministic random subset of that many samples (seeded by ``subset_seed``).
    ``classes`` (``imagefolder``): the class names of a trained model, so labels match its outputs.

    ``imagefolder`` reads ``root/train`` and ``root/val`` class folders or, without ``val/``, the
    class folders of ``root`` (or ``root/train``) split per class: 10% of each class (at least one
    image) for val, chosen by ``subset_seed``.
    """
    key = canonical_dataset_name(name)
    if split not in _SPLITS:
        raise ValueError(f"split={split!r} is not valid; use 'train' or 'val' ('test' is an alias of 'val')")
    split = _SPLITS[split]
    check_bad_image_mode(on_bad_image)
    _check_positive_int(subset, "subset", allow_none=True)
    _check_positive_int(subset_seed, "subset_seed", minimum=0)
    _check_positive_int(image_size, "image_size", allow_none=True)
    train_tf = split == "train" and bool(augment)
    ds: Any
    if key == "imagefolder":
        ds, info = _imagefolder(root, split, train_tf, image_size, on_bad_image, subset_seed, classes)
    elif key == "imagenet":
        info = get_dataset_info(key, image_size)
        tf = imagenet_transforms(train=train_tf, image_size=info.input_size[1], mean=info.mean, std=info.std)
        ds = ImageNetFolder(root, split, transform=tf, on_bad_image=on_bad_image)
        if len(ds.classes) != info.num_classes:
            logger.warning(
                "ImageNet %s split at '%s' has %d class folders (expected %d); labels follow the sorted "
                "folder names. For your own class folders use data.name=imagefolder",
                split, ds.root, len(ds.classes), info.num_classes,
            )  # fmt: skip
    else:
        info = get_dataset_info(key, image_size)
        spec = _SPECS[key]
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
    if not info.classes:
        info = dataclasses.replace(info, classes=tuple(ds.classes))
    if subset is not None:
        ds = _take_subset(ds, subset, subset_seed)
    return ds, info


def _imagefolder(
    root: PathLike | None,
    split: str,
    train_tf: bool,
    image_size: int | None,
    on_bad_image: str,
    seed: int,
    classes: Sequence[str] | None,
) -> tuple[Dataset, DatasetInfo]:
    if root is None:
        raise ValueError(
            "data.name=imagefolder needs data.root (or --data-dir): a folder with train/ and val/ class folders, "
            "or class folders to split"
        )
    base = Path(root).expanduser()
    if (base / "val").is_dir() and not (base / "train").is_dir():
        raise FileNotFoundError(f"imagefolder '{base}': found val/ but no train/ next to it")
    train_dir = base / "train" if (base / "train").is_dir() else base
    val_dir = base / "val" if (base / "val").is_dir() else None
    names = list(classes) if classes is not None else list_classes(train_dir)
    side = image_size or first_image_side(train_dir, list_classes(train_dir))
    info = DatasetInfo("imagefolder", len(names), 3, (3, side, side), IMAGENET_MEAN, IMAGENET_STD, tuple(names))
    tf = imagenet_transforms(train=train_tf, image_size=side)
    folder = val_dir if split == "val" and val_dir is not None else train_dir
    ds = SafeImageFolder(folder, transform=tf, on_bad_image=on_bad_image, classes=names)
    if val_dir is None:
        ds = LabeledSubset(ds, holdout_split(ds.targets, seed)[split])
    return ds, info

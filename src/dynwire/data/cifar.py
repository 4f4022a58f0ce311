"""CIFAR-10 / CIFAR-100 from the standard python-pickle layout, loaded with a restricted unpickler."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch.utils.data import Dataset

from ._paths import PathLike, candidate_roots, format_searched
from ._safe_pickle import safe_load_pickle

__all__ = ["CIFAR10", "CIFAR100"]

_SPLIT_ALIASES = {"train": "train", "test": "test", "val": "test"}


def _get(d: Any, key: str, path: Path) -> Any:
    """``d[key]`` accepting both str and bytes keys (python-2 pickles load with bytes keys)."""
    if not isinstance(d, dict):
        raise ValueError(f"corrupt CIFAR file '{path}': expected a dict, got {type(d).__name__}")
    if key in d:
        return d[key]
    bkey = key.encode()
    if bkey in d:
        return d[bkey]
    keys = sorted(k.decode() if isinstance(k, bytes) else str(k) for k in d)
    raise ValueError(f"corrupt CIFAR file '{path}': no '{key}' entry (found keys {keys})")


def _to_str(x: Any) -> str:
    return x.decode("utf-8") if isinstance(x, bytes) else str(x)


class _CIFARBase(Dataset):
    """Shared loader: ``data`` is a uint8 tensor (N, 3, 32, 32), ``targets`` an int64 tensor (N,)."""

    name: ClassVar[str]
    base_folder: ClassVar[str]
    train_files: ClassVar[Sequence[str]]
    test_files: ClassVar[Sequence[str]]
    meta_file: ClassVar[str]
    label_key: ClassVar[str]
    meta_key: ClassVar[str]
    num_classes: ClassVar[int]

    def __init__(
        self,
        root: PathLike | None = None,
        split: str = "train",
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        target_transform: Callable[[int], object] | None = None,
    ) -> None:
        try:
            self.split = _SPLIT_ALIASES[split]
        except (KeyError, TypeError):
            raise ValueError(f"split={split!r} is not valid for {self.name}; use 'train' or 'test' (alias 'val')") from None
        files = list(self.train_files if self.split == "train" else self.test_files)
        self.root = self._find_root(root, files + [self.meta_file])
        datas, labels = [], []
        for fname in files:
            path = self.root / fname
            entry = safe_load_pickle(path)
            data = _get(entry, "data", path)
            lbl = _get(entry, self.label_key, path)
            if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
                desc = f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
                raise ValueError(f"corrupt CIFAR file '{path}': 'data' is {desc}, expected uint8 array of shape (N, 3072)")
            try:
                lbl_arr = np.asarray(lbl, dtype=np.int64).reshape(-1)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"corrupt CIFAR file '{path}': '{self.label_key}' is not a list of ints") from exc
            if len(lbl_arr) != len(data):
                raise ValueError(
                    f"corrupt CIFAR file '{path}': {len(data)} images but {len(lbl_arr)} '{self.label_key}'"
                )
            if len(lbl_arr) and (lbl_arr.min() < 0 or lbl_arr.max() >= self.num_classes):
                raise ValueError(
                    f"corrupt CIFAR file '{path}': labels outside 0..{self.num_classes - 1} "
                    f"(min {lbl_arr.min()}, max {lbl_arr.max()})"
                )
            datas.append(data)
            labels.append(lbl_arr)
        meta_path = self.root / self.meta_file
        names = _get(safe_load_pickle(meta_path), self.meta_key, meta_path)
        self.classes: list[str] = [_to_str(n) for n in names]
        if len(self.classes) != self.num_classes:
            raise ValueError(
                f"corrupt CIFAR file '{meta_path}': {len(self.classes)} class names, expected {self.num_classes}"
            )
        self.data: torch.Tensor = torch.from_numpy(np.concatenate(datas).reshape(-1, 3, 32, 32))
        self.targets: torch.Tensor = torch.from_numpy(np.concatenate(labels))
        self.transform = transform
        self.target_transform = target_transform

    @classmethod
    def _find_root(cls, root: PathLike | None, files: list[str]) -> Path:
        notes: list[tuple[Path, str]] = []
        for folder in candidate_roots(root, [cls.base_folder]):
            if not folder.is_dir():
                notes.append((folder, "no such directory"))
                continue
            missing = [f for f in files if not (folder / f).is_file()]
            if not missing:
                return folder
            notes.append((folder, "missing " + ", ".join(missing)))
        raise FileNotFoundError(
            f"{cls.name} not found: expected the python-pickle files {', '.join(files)} in "
            f"'<root>/{cls.base_folder}/' (or in <root> itself). Pass --data-dir / set data.root to the "
            f"folder holding '{cls.base_folder}' (nothing is downloaded). Searched:\n{format_searched(notes)}"
        )

    def __len__(self) -> int:
        return self.data.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, object]:
        img = self.data[index]
        img = self.transform(img) if self.transform is not None else img.to(torch.float32).div_(255.0)
        target: object = int(self.targets[index])
        if self.target_transform is not None:
            target = self.target_transform(target)
        return img, target

    def __repr__(self) -> str:
        return f"{type(self).__name__}(split={self.split!r}, n={len(self)}, root='{self.root}')"


class CIFAR10(_CIFARBase):
    """CIFAR-10 from ``<root>/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}``."""

    name = "CIFAR-10"
    base_folder = "cifar-10-batches-py"
    train_files = tuple(f"data_batch_{i}" for i in range(1, 6))
    test_files = ("test_batch",)
    meta_file = "batches.meta"
    label_key = "labels"
    meta_key = "label_names"
    num_classes = 10


class CIFAR100(_CIFARBase):
    """CIFAR-100 (fine labels) from ``<root>/cifar-100-python/{train, test, meta}``."""

    name = "CIFAR-100"
    base_folder = "cifar-100-python"
    train_files = ("train",)
    test_files = ("test",)
    meta_file = "meta"
    label_key = "fine_labels"
    meta_key = "fine_label_names"
    num_classes = 100

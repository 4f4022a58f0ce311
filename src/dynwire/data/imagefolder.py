"""ImageNet-style class-folder datasets (``<root>/{train,val}/<wnid>/*.JPEG``) with bad-image handling.

File discovery and decoding are torchvision's (:class:`torchvision.datasets.ImageFolder`);
this module adds root search, a clear error for unreadable files, and an opt-in skip mode.

Skip mode (``on_bad_image="skip"``): a file that cannot be decoded is replaced by the next
readable sample (index + 1, wrapping), which carries *its own* label; a warning naming the
path is logged every time and the path is recorded in ``bad_images`` / ``num_bad_images``.
With DataLoader workers (``num_workers > 0``) each worker holds its own copy of the dataset,
so these records and warnings live in the worker processes and the main process's copy
stays empty; use ``num_workers=0`` (or scan the files up front) to collect them centrally.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS, default_loader, find_classes

from ._paths import PathLike, candidate_roots, format_searched

__all__ = [
    "BAD_IMAGE_MODES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SafeImageFolder",
    "check_bad_image_mode",
    "first_image_side",
    "holdout_split",
    "list_classes",
    "ImageNetFolder",
    "find_imagenet_split_dir",
    "imagenet_transforms",
]

logger = logging.getLogger(__name__)

BAD_IMAGE_MODES = ("raise", "skip")
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
_SPLIT_DIRS = {"train": "train", "val": "val", "test": "val"}


def check_bad_image_mode(on_bad_image: str) -> str:
    """Validate ``on_bad_image``; return it unchanged."""
    if on_bad_image not in BAD_IMAGE_MODES:
        raise ValueError(f"on_bad_image={on_bad_image!r} is not valid; use one of {list(BAD_IMAGE_MODES)}")
    return on_bad_image


class SafeImageFolder(ImageFolder):
    """:class:`torchvision.datasets.ImageFolder` that names unreadable files or skips them.

    ``on_bad_image="raise"`` (default) raises ``ValueError("cannot read image '<path>': ...")``;
    ``"skip"`` substitutes the next readable sample and records the path (see module docs).
    ``classes``: fixed class names for labels ``0..n-1`` (e.g. a trained model's); folders may be
    missing, an unknown folder is an error. Default: the sorted sub-folder names.
    """

    def __init__(
        self,
        root: PathLike,
        transform: Callable[[Any], Any] | None = None,
        target_transform: Callable[[int], Any] | None = None,
        loader: Callable[[str], Any] = default_loader,
        is_valid_file: Callable[[str], bool] | None = None,
        on_bad_image: str = "raise",
        classes: Sequence[str] | None = None,
    ) -> None:
        self.on_bad_image = check_bad_image_mode(on_bad_image)
        self._fixed_classes = None if classes is None else list(classes)
        super().__init__(
            str(root),
            transform=transform,
            target_transform=target_transform,
            loader=loader,
            is_valid_file=is_valid_file,
            allow_empty=classes is not None,
        )
        self.bad_images: list[str] = []

    def find_classes(self, directory: str | os.PathLike[str]) -> tuple[list[str], dict[str, int]]:
        found, mapping = find_classes(directory)
        if self._fixed_classes is None:
            return found, mapping
        unknown = sorted(set(found) - set(self._fixed_classes))
        if unknown:
            raise ValueError(
                f"'{directory}' has unknown class folder(s) {unknown}; expected only {self._fixed_classes}"
            )
        return list(self._fixed_classes), {c: i for i, c in enumerate(self._fixed_classes)}

    @property
    def num_bad_images(self) -> int:
        """Number of distinct unreadable files met so far (in this process)."""
        return len(self.bad_images)

    def _load(self, index: int) -> tuple[Any, int]:
        """Load sample ``index`` (or, in skip mode, the next readable one) without transforms."""
        n = len(self.samples)
        for attempt in range(n):
            path, target = self.samples[(index + attempt) % n]
            try:
                return self.loader(path), target
            except Exception as exc:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError...
                reason = f"{type(exc).__name__}: {exc}"
                if self.on_bad_image == "raise":
                    raise ValueError(
                        f"cannot read image '{path}': {reason}; "
                        "pass data.skip_bad_images=true to skip and count such files"
                    ) from exc
                if path not in self.bad_images:
                    self.bad_images.append(path)
                logger.warning("skipping unreadable image '%s' (%s); using the next sample instead", path, reason)
        raise RuntimeError(f"no readable image in '{self.root}': all {n} files failed to load")

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        if not -len(self.samples) <= index < len(self.samples):
            raise IndexError(f"index {index} out of range for {len(self.samples)} samples")
        sample, target = self._load(index % len(self.samples))
        if self.transform is not None:
            sample = self.transform(sample)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return sample, target


def find_imagenet_split_dir(root: PathLike | None, split: str) -> Path:
    """Locate ``<root>/<split>`` for an ImageNet-style tree.

    ``root=None`` searches ``$DYNWIRE_DATA_DIR/imagenet``, ``$DYNWIRE_DATA_DIR`` and
    ``./data/imagenet``; an explicit root is tried as ``root/imagenet`` then ``root``.
    """
    try:
        sub = _SPLIT_DIRS[split]
    except (KeyError, TypeError):
        raise ValueError(f"split={split!r} is not valid for ImageNet; use 'train' or 'val'") from None
    notes: list[tuple[Path, str]] = []
    for base in candidate_roots(root, ["imagenet"]):
        d = base / sub
        if d.is_dir():
            return d
        notes.append((d, "no such directory"))
    raise FileNotFoundError(
        f"ImageNet '{sub}' split not found: expected class folders '<root>/{sub}/<wnid>/*.JPEG' "
        "(the validation images must also be sorted into per-class folders). Pass --data-dir / set "
        f"data.root to the folder holding 'train/' and 'val/' (nothing is downloaded). Searched:\n"
        f"{format_searched(notes)}"
    )


class ImageNetFolder(SafeImageFolder):
    """ImageNet split ``train`` or ``val`` found under ``root`` (see :func:`find_imagenet_split_dir`)."""

    def __init__(
        self,
        root: PathLike | None = None,
        split: str = "train",
        transform: Callable[[Any], Any] | None = None,
        target_transform: Callable[[int], Any] | None = None,
        on_bad_image: str = "raise",
        loader: Callable[[str], Any] = default_loader,
    ) -> None:
        split_dir = find_imagenet_split_dir(root, split)
        self.split = _SPLIT_DIRS[split]
        super().__init__(
            split_dir, transform=transform, target_transform=target_transform, loader=loader, on_bad_image=on_bad_image
        )


def imagenet_transforms(
    *,
    train: bool,
    image_size: int = 224,
    resize_size: int | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> Callable[[Any], torch.Tensor]:
    """Standard PIL pipelines.

    train: RandomResizedCrop(image_size) + RandomHorizontalFlip + ToTensor + Normalize;
    eval: Resize(resize_size, default round(image_size * 256 / 224)) + CenterCrop(image_size) + ToTensor + Normalize.
    """
    if image_size <= 0:
        raise ValueError(f"image_size={image_size} must be a positive int")
    if train:
        return T.Compose(
            [T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean, std)]
        )
    resize = resize_size if resize_size is not None else int(round(image_size * 256 / 224))
    if resize < image_size:
        raise ValueError(f"resize_size={resize} must be >= image_size={image_size}")
    return T.Compose([T.Resize(resize), T.CenterCrop(image_size), T.ToTensor(), T.Normalize(mean, std)])


def list_classes(directory: PathLike) -> list[str]:
    """Sorted class-folder names under ``directory`` (a clear error if there are none)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"image folder '{directory}' not found (pass --data-dir / set data.root)")
    try:
        return find_classes(directory)[0]
    except FileNotFoundError:
        raise FileNotFoundError(
            f"image folder '{directory}' has no class folders: expected '<root>/<class>/<image>' "
            "(or '<root>/train/<class>/...' and '<root>/val/<class>/...')"
        ) from None


def first_image_side(directory: PathLike, classes: Sequence[str], cap: int = 224) -> int:
    """The smaller side of the first image (sorted) in the first non-empty class folder, at most ``cap``."""
    for name in classes:
        folder = Path(directory) / name
        if not folder.is_dir():
            continue
        for entry in sorted(os.scandir(folder), key=lambda e: e.name):
            if entry.is_file() and entry.name.lower().endswith(IMG_EXTENSIONS):
                try:
                    with Image.open(entry.path) as img:
                        return min(cap, *img.size)
                except Exception:  # an unreadable file: try the next one
                    continue
    raise FileNotFoundError(f"image folder '{directory}': no readable image ({', '.join(IMG_EXTENSIONS)})")


def holdout_split(targets: Sequence[int], seed: int, fraction: float = 0.1) -> dict[str, list[int]]:
    """Per-class split of sample indices into ``train`` / ``val``, a pure function of ``seed``.

    Each class with at least two images gives ``ceil(fraction * n)`` (>= 1) random images to val.
    """
    g = torch.Generator().manual_seed(seed)
    by_class: dict[int, list[int]] = {}
    for i, t in enumerate(targets):
        by_class.setdefault(int(t), []).append(i)
    val: list[int] = []
    for c in sorted(by_class):
        idx = by_class[c]
        k = math.ceil(fraction * len(idx)) if len(idx) >= 2 else 0
        val += [idx[j] for j in torch.randperm(len(idx), generator=g)[:k].tolist()]
    held = set(val)
    return {"train": [i for i in range(len(targets)) if i not in held], "val": sorted(val)}

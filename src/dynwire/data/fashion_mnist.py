"""Fashion-MNIST read straight from its IDX files (plain or gzipped)."""

from __future__ import annotations

import gzip
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ._paths import PathLike, candidate_roots, format_searched

__all__ = ["FashionMNIST", "FASHION_MNIST_CLASSES", "SYSTEM_DIR", "read_idx", "find_fashion_mnist_root"]

FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

#: Where the Debian package ``dataset-fashion-mnist`` installs the files.
SYSTEM_DIR = "/usr/share/datasets/fashion-mnist"

_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_SPLIT_ALIASES = {"train": "train", "test": "test", "val": "test"}

IMAGES_MAGIC = 2051  # 0x00000803: uint8, 3 dims
LABELS_MAGIC = 2049  # 0x00000801: uint8, 1 dim

INSTALL_HINT = (
    "Install it with `sudo apt-get update && sudo apt-get install dataset-fashion-mnist` "
    f"(files go to {SYSTEM_DIR}), or pass --data-dir / set data.root to a folder holding the four IDX files "
    "(train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte; "
    "each optionally .gz)."
)


def _read_bytes(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
        raise ValueError(f"cannot read IDX file '{path}': {exc}") from exc


def read_idx(path: PathLike, expected_magic: int) -> np.ndarray:
    """Parse an unsigned-byte IDX file, checking the magic number and the data size.

    Raises ``ValueError`` naming ``path`` if the file is corrupt or truncated.
    """
    path = Path(path)
    raw = _read_bytes(path)
    if len(raw) < 4:
        raise ValueError(f"corrupt IDX file '{path}': only {len(raw)} bytes, too short for a header")
    (magic,) = struct.unpack(">I", raw[:4])
    if magic != expected_magic:
        raise ValueError(
            f"corrupt IDX file '{path}': magic number {magic:#010x}, expected {expected_magic:#010x}"
        )
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"corrupt IDX file '{path}': truncated header ({len(raw)} bytes, need {header})")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(dims, dtype=np.int64))
    found = len(raw) - header
    if found != expected:
        raise ValueError(
            f"corrupt IDX file '{path}': header says shape {dims} ({expected} bytes of data) "
            f"but the file holds {found} bytes of data"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _find_file(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        p = folder / name
        if p.is_file():
            return p
    return None


def find_fashion_mnist_root(root: PathLike | None = None, split: str = "train") -> tuple[Path, Path, Path]:
    """Locate the split's (folder, images file, labels file).

    ``root=None`` searches ``$DYNWIRE_DATA_DIR/fashion-mnist``, ``$DYNWIRE_DATA_DIR``,
    ``./data/fashion-mnist`` and ``/usr/share/datasets/fashion-mnist``; an explicit
    ``root`` is tried as ``root/fashion-mnist``, ``root/FashionMNIST/raw`` and ``root``.
    Raises ``FileNotFoundError`` with install instructions and the searched paths.
    """
    split = _canonical_split(split)
    img_stem, lbl_stem = _FILES[split]
    if root is None:
        folders = candidate_roots(None, ["fashion-mnist"], system_dirs=[SYSTEM_DIR])
    else:
        folders = candidate_roots(root, ["fashion-mnist", "FashionMNIST/raw"])
    notes: list[tuple[Path, str]] = []
    for folder in folders:
        if not folder.is_dir():
            notes.append((folder, "no such directory"))
            continue
        img, lbl = _find_file(folder, img_stem), _find_file(folder, lbl_stem)
        if img is not None and lbl is not None:
            return folder, img, lbl
        missing = [s + "[.gz]" for s, f in ((img_stem, img), (lbl_stem, lbl)) if f is None]
        notes.append((folder, "missing " + ", ".join(missing)))
    raise FileNotFoundError(
        f"Fashion-MNIST ({split} split) not found. {INSTALL_HINT}\nSearched:\n{format_searched(notes)}"
    )


def _canonical_split(split: str) -> str:
    try:
        return _SPLIT_ALIASES[split]
    except (KeyError, TypeError):
        raise ValueError(f"split={split!r} is not valid for Fashion-MNIST; use 'train' or 'test' (alias 'val')") from None


class FashionMNIST(Dataset):
    """Fashion-MNIST split held in memory as a uint8 tensor ``data`` of shape (N, 28, 28).

    ``__getitem__`` returns ``(transform(uint8 image of shape (1, 28, 28)), label)``; without a
    transform the image is a float32 tensor in [0, 1].
    """

    classes: list[str] = list(FASHION_MNIST_CLASSES)

    def __init__(
        self,
        root: PathLike | None = None,
        split: str = "train",
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        target_transform: Callable[[int], object] | None = None,
    ) -> None:
        self.split = _canonical_split(split)
        self.root, images_path, labels_path = find_fashion_mnist_root(root, self.split)
        images = read_idx(images_path, IMAGES_MAGIC)
        labels = read_idx(labels_path, LABELS_MAGIC)
        if images.shape[1:] != (28, 28):
            raise ValueError(f"corrupt IDX file '{images_path}': images are {images.shape[1:]}, expected (28, 28)")
        if len(images) != len(labels):
            raise ValueError(
                f"Fashion-MNIST {self.split} split: '{images_path}' holds {len(images)} images but "
                f"'{labels_path}' holds {len(labels)} labels"
            )
        if len(labels) and int(labels.max()) >= len(self.classes):
            raise ValueError(f"corrupt IDX file '{labels_path}': label {int(labels.max())} out of range 0..9")
        self.data: torch.Tensor = torch.from_numpy(images.copy())
        self.targets: torch.Tensor = torch.from_numpy(labels.astype(np.int64))
        self.classes = list(FASHION_MNIST_CLASSES)
        self.transform = transform
        self.target_transform = target_transform

    def __len__(self) -> int:
        return self.data.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, object]:
        img = self.data[index].unsqueeze(0)
        img = self.transform(img) if self.transform is not None else img.to(torch.float32).div_(255.0)
        target: object = int(self.targets[index])
        if self.target_transform is not None:
            target = self.target_transform(target)
        return img, target

    def __repr__(self) -> str:
        return f"FashionMNIST(split={self.split!r}, n={len(self)}, root='{self.root}')"

"""Lightweight augmentations on uint8 image tensors (C, H, W).

Fashion-MNIST and CIFAR are held in memory as uint8 tensors, so their
augmentations work on tensors directly instead of going through PIL per
image: a full 60k-image Fashion-MNIST epoch costs a few seconds of CPU.

Randomness comes from torch's global RNG, which the DataLoader seeds per
worker (from the loader's generator); with ``num_workers=0`` seed it with
``torch.manual_seed`` for reproducible augmentation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "Compose",
    "RandomCrop",
    "RandomHorizontalFlip",
    "ToFloat",
    "Normalize",
    "Resize",
    "tensor_transforms",
]

Transform = Callable[[torch.Tensor], torch.Tensor]


class Compose:
    """Apply transforms in sequence."""

    def __init__(self, transforms: Sequence[Transform]) -> None:
        self.transforms = list(transforms)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        for t in self.transforms:
            x = t(x)
        return x

    def __repr__(self) -> str:
        inner = ", ".join(repr(t) for t in self.transforms)
        return f"{type(self).__name__}([{inner}])"


class RandomCrop:
    """Zero-pad by ``padding`` on every side, then crop a random ``size`` x ``size`` window."""

    def __init__(self, size: int, padding: int = 0) -> None:
        if size <= 0 or padding < 0:
            raise ValueError(f"RandomCrop needs size > 0 and padding >= 0, got size={size}, padding={padding}")
        self.size = int(size)
        self.padding = int(padding)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        p, s = self.padding, self.size
        h, w = x.shape[-2:]
        if h + 2 * p < s or w + 2 * p < s:
            raise ValueError(f"RandomCrop({s}, padding={p}) is larger than the padded image {tuple(x.shape)}")
        top, left = torch.randint(0, 1 << 30, (2,)).tolist()
        top %= h + 2 * p - s + 1
        left %= w + 2 * p - s + 1
        if p:
            x = F.pad(x, (p, p, p, p))
        return x[..., top : top + s, left : left + s]

    def __repr__(self) -> str:
        return f"RandomCrop(size={self.size}, padding={self.padding})"


class RandomHorizontalFlip:
    """Mirror the image left-right with probability ``p``."""

    def __init__(self, p: float = 0.5) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"RandomHorizontalFlip needs 0 <= p <= 1, got p={p}")
        self.p = float(p)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if torch.rand(()).item() < self.p:
            return x.flip(-1)
        return x

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


class ToFloat:
    """uint8 in [0, 255] -> float32 in [0, 1]."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(torch.float32).div_(255.0)

    def __repr__(self) -> str:
        return "ToFloat()"


class Normalize:
    """uint8 [0, 255] (or float [0, 1]) -> float32 ``(x/255 - mean) / std`` per channel."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        if len(mean) != len(std) or any(s <= 0 for s in std):
            raise ValueError(f"Normalize needs matching mean/std with std > 0, got mean={mean}, std={std}")
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        m = torch.tensor(self.mean, dtype=torch.float32).view(-1, 1, 1)
        s = torch.tensor(self.std, dtype=torch.float32).view(-1, 1, 1)
        self._scale_u8 = 1.0 / (255.0 * s)
        self._scale_f = 1.0 / s
        self._shift = m / s

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        scale = self._scale_u8 if x.dtype == torch.uint8 else self._scale_f
        return (x.to(torch.float32) * scale).sub_(self._shift)

    def __repr__(self) -> str:
        return f"Normalize(mean={self.mean}, std={self.std})"


class Resize:
    """Bilinear (antialiased) resize of a float tensor to ``size`` x ``size``; no-op if already that size."""

    def __init__(self, size: int) -> None:
        if size <= 0:
            raise ValueError(f"Resize needs size > 0, got {size}")
        self.size = int(size)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) == (self.size, self.size):
            return x
        if not x.is_floating_point():
            x = x.to(torch.float32)
        return F.interpolate(
            x.unsqueeze(0), size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True
        ).squeeze(0)

    def __repr__(self) -> str:
        return f"Resize({self.size})"


def tensor_transforms(
    *,
    train: bool,
    native_size: int,
    padding: int,
    mean: Sequence[float],
    std: Sequence[float],
    flip: bool = True,
    image_size: int | None = None,
) -> Compose:
    """Standard small-image pipeline on uint8 tensors.

    train: RandomCrop(native_size, padding) [+ flip] + Normalize [+ Resize(image_size)];
    eval: Normalize [+ Resize(image_size)].
    """
    ts: list[Transform] = []
    if train:
        ts.append(RandomCrop(native_size, padding=padding))
        if flip:
            ts.append(RandomHorizontalFlip())
    ts.append(Normalize(mean, std))
    if image_size is not None and image_size != native_size:
        ts.append(Resize(image_size))
    return Compose(ts)

"""Detection augmentation: the horizontal flip (resizing is the detector's ``GeneralizedRCNNTransform``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["hflip", "RandomHorizontalFlip", "random_hflip_batch"]


def hflip(image: Tensor, target: dict[str, Tensor] | None = None) -> tuple[Tensor, dict[str, Tensor] | None]:
    """Mirror a ``(C, H, W)`` image and its ``x1, y1, x2, y2`` boxes."""
    width = image.shape[-1]
    image = image.flip(-1)
    if target is not None and "boxes" in target:
        target = dict(target)
        b = target["boxes"]
        target["boxes"] = torch.stack([width - b[:, 2], b[:, 1], width - b[:, 0], b[:, 3]], dim=1)
    return image, target


class RandomHorizontalFlip:
    """Dataset transform ``(image, target) -> (image, target)`` flipping with probability ``p``."""

    def __init__(self, p: float = 0.5) -> None:
        self.p = float(p)

    def __call__(self, image: Tensor, target: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        if torch.rand(()) < self.p:
            image, target = hflip(image, target)
        return image, target


def random_hflip_batch(
    images: Sequence[Tensor], targets: Sequence[dict[str, Tensor]], p: float, generator: torch.Generator | None = None
) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    """Flip each image of a batch with probability ``p``, drawing from ``generator``.

    The training loop flips in the main process with a generator seeded from the iteration,
    so the augmentation does not depend on data-loader workers and resumes exactly.
    """
    out_i, out_t = [], []
    flips = torch.rand(len(images), generator=generator) < p
    for img, tgt, f in zip(images, targets, flips.tolist()):
        if f:
            img, tgt = hflip(img, tgt)
        out_i.append(img)
        out_t.append(tgt)
    return out_i, out_t

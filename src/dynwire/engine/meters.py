"""Meters: accuracy counts and the running training meter (summed over ranks at each log point)."""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from .distributed import DistInfo, all_reduce_sum

__all__ = ["accuracy_counts", "WindowMeter"]


def accuracy_counts(logits: torch.Tensor, target: torch.Tensor, ks: Sequence[int]) -> list[torch.Tensor]:
    """Number of samples whose target is among the top-``k`` logits, for each ``k``."""
    maxk = min(max(ks), logits.shape[1])
    pred = logits.topk(maxk, dim=1).indices
    hit = pred.eq(target.view(-1, 1))
    return [hit[:, : min(k, maxk)].any(dim=1).sum() for k in ks]


class WindowMeter:
    """Loss sum, correct count and image count since the last log point, kept on the device
    (no host sync per step) and reduced over ranks only when read."""

    def __init__(self, device: torch.device) -> None:
        self.sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss_sum, correct, count
        self.t0 = time.perf_counter()

    def add(self, loss: torch.Tensor, logits: torch.Tensor, target: torch.Tensor) -> None:
        n = target.shape[0]
        correct = (logits.detach().argmax(dim=1) == target).sum()
        count = torch.tensor(float(n), dtype=torch.float64, device=self.sums.device)
        self.sums += torch.stack([loss.detach().double() * n, correct.double(), count])

    @property
    def empty(self) -> bool:
        return bool(self.sums[2] == 0)

    def reduce(self, info: DistInfo) -> tuple[float, float, float, float]:
        """``(loss_sum, correct, count, seconds)`` over all ranks since the last reset; then reset."""
        sums = all_reduce_sum(self.sums.clone(), info)
        seconds = max(time.perf_counter() - self.t0, 1e-9)
        self.sums.zero_()
        self.t0 = time.perf_counter()
        loss_sum, correct, count = sums.tolist()
        return loss_sum, correct, count, seconds

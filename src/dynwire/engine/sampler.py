"""Resumable, rank-aware batch samplers whose order is a pure function of (seed, epoch).

Exact mid-epoch resume needs two things a stock ``DistributedSampler`` does
not give: skipping the batches already trained on without loading them, and
a data order that does not depend on how many epochs this process has seen.
:class:`EpochBatchSampler` draws one global permutation per epoch from
``seed + epoch`` (like ``DistributedSampler``), cuts it into global batches
of ``global_batch`` indices and hands rank ``r`` the strided slice
``batch[r::world_size]``, so the union over ranks of step ``k`` is exactly
the single-process batch ``k`` at the same global batch size.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..data.build import seed_worker

__all__ = ["EpochBatchSampler", "ShardSampler", "make_train_loader", "make_eval_loader", "seed_worker"]


class EpochBatchSampler(Sampler[list[int]]):
    """Per-rank training batches; drops the last incomplete global batch.

    ``set_epoch(e)`` selects the permutation, ``set_start(k)`` skips the first
    ``k`` steps of that epoch (for resuming mid-epoch).
    """

    def __init__(
        self,
        num_samples: int,
        global_batch: int,
        *,
        world_size: int = 1,
        rank: int = 0,
        seed: int = 0,
        shuffle: bool = True,
    ) -> None:
        if global_batch <= 0 or global_batch % world_size:
            raise ValueError(f"global batch {global_batch} must be a positive multiple of world size {world_size}")
        if num_samples < global_batch:
            raise ValueError(
                f"data.batch_size={global_batch}: larger than the training set ({num_samples} images); "
                f"lower the batch size or use more data"
            )
        self.num_samples = num_samples
        self.global_batch = global_batch
        self.world_size = world_size
        self.rank = rank
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.start = 0

    @property
    def steps_per_epoch(self) -> int:
        return self.num_samples // self.global_batch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def set_start(self, step: int) -> None:
        if not 0 <= step <= self.steps_per_epoch:
            raise ValueError(f"start step {step} outside [0, {self.steps_per_epoch}]")
        self.start = int(step)

    def global_order(self) -> torch.Tensor:
        """The epoch's permutation of dataset indices (identical on every rank)."""
        if not self.shuffle:
            return torch.arange(self.num_samples)
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        return torch.randperm(self.num_samples, generator=g)

    def __iter__(self) -> Iterator[list[int]]:
        order = self.global_order()
        for step in range(self.start, self.steps_per_epoch):
            batch = order[step * self.global_batch : (step + 1) * self.global_batch]
            yield batch[self.rank :: self.world_size].tolist()

    def __len__(self) -> int:
        return self.steps_per_epoch - self.start


class ShardSampler(Sampler[int]):
    """Evaluation order: rank ``r`` gets indices ``r, r + W, ...`` (no padding, no duplicates)."""

    def __init__(self, num_samples: int, *, world_size: int = 1, rank: int = 0) -> None:
        self.num_samples = num_samples
        self.world_size = world_size
        self.rank = rank

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.num_samples, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.num_samples, self.world_size))


def make_train_loader(
    dataset: Dataset,
    sampler: EpochBatchSampler,
    *,
    epoch: int,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> DataLoader:
    """A loader for one epoch. Its worker seeds come from a generator seeded by
    (seed, rank, epoch), so they do not depend on the process's history and
    building it does not touch the global RNG."""
    g = torch.Generator()
    g.manual_seed((sampler.seed * 1_000_003 + sampler.rank * 10_007 + epoch) % 2**63)
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        worker_init_fn=seed_worker if num_workers > 0 else None,
        generator=g,
        persistent_workers=False,
    )


def make_eval_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    world_size: int = 1,
    rank: int = 0,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> DataLoader:
    """Sequential, sharded evaluation loader (every image counted exactly once over ranks)."""
    g = torch.Generator()
    g.manual_seed(0)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=ShardSampler(len(dataset), world_size=world_size, rank=rank),  # type: ignore[arg-type]
        num_workers=num_workers,
        pin_memory=pin_memory,
        drop_last=False,
        worker_init_fn=seed_worker if num_workers > 0 else None,
        generator=g,
    )

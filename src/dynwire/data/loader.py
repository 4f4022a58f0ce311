"""The one DataLoader path: resumable rank-aware samplers, per-sample seeded augmentation, ``build_loader``.

Exact mid-epoch resume needs three things a stock ``DataLoader`` does not give:

* a data order that is a pure function of (seed, epoch): :class:`EpochBatchSampler` draws one
  global permutation per epoch from ``seed + epoch`` and hands rank ``r`` the strided slice
  ``batch[r::world_size]`` of every global batch, so the union over ranks of step ``k`` is the
  single-process batch ``k`` at the same global batch size;
* skipping the batches already trained on without loading them (``set_start``);
* augmentation that does not depend on which worker process loads a sample or on how many
  samples that worker loaded before: :class:`SeededDataset` runs ``dataset[index]`` with torch's
  CPU generator seeded from (seed, epoch, index) and restores the caller's RNG state afterwards.
  The sampler passes ``(epoch, index)`` keys, so this holds with persistent workers too.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Sampler

__all__ = [
    "EpochBatchSampler",
    "ShardSampler",
    "SeededDataset",
    "sample_seed",
    "seed_worker",
    "build_loader",
]


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed that is a pure function of (seed, epoch, index) (no nearby-seed correlation)."""
    digest = hashlib.blake2b(f"{seed}/{epoch}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class SeededDataset(Dataset):
    """``dataset[index]`` with torch's CPU RNG seeded from (seed, epoch, index).

    Keys are ``(epoch, index)`` tuples (what :class:`EpochBatchSampler` yields with
    ``keyed=True``) or plain indices (epoch 0). Every torch-RNG draw inside the dataset's
    transforms (dynwire's tensor transforms, torchvision's) is then reproducible per sample,
    whatever process or position loads it. The caller's RNG state is restored afterwards.
    Draws from ``numpy`` or ``random`` inside custom transforms are not covered.
    """

    def __init__(self, dataset: Dataset, seed: int = 0) -> None:
        self.dataset = dataset
        self.seed = int(seed)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: int | tuple[int, int]) -> Any:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        gen = torch.default_generator
        state = gen.get_state()
        gen.manual_seed(sample_seed(self.seed, epoch, index))
        try:
            return self.dataset[index]
        finally:
            gen.set_state(state)


class EpochBatchSampler(Sampler[list]):
    """Per-rank training batches whose order is a pure function of (seed, epoch).

    ``set_epoch(e)`` selects the permutation, ``set_start(k)`` skips the first ``k`` steps of
    that epoch (for resuming mid-epoch). Iterating again without either call moves on to the
    next epoch, so a plain ``for epoch ...: for batch in loader`` reshuffles. ``drop_last``
    drops the last incomplete global batch (required when it would leave a rank empty).
    ``keyed``: yield ``(epoch, index)`` keys for :class:`SeededDataset` instead of indices.
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
        drop_last: bool = True,
        keyed: bool = False,
    ) -> None:
        if global_batch <= 0 or global_batch % world_size:
            raise ValueError(f"global batch {global_batch} must be a positive multiple of world size {world_size}")
        if drop_last and num_samples < global_batch:
            raise ValueError(
                f"data.batch_size={global_batch}: larger than the training set ({num_samples} images); "
                f"lower the batch size or use more data"
            )
        if not drop_last and 0 < num_samples % global_batch < world_size:
            raise ValueError(
                f"the last batch of {num_samples % global_batch} samples cannot feed {world_size} ranks; use drop_last"
            )
        self.num_samples = num_samples
        self.global_batch = global_batch
        self.world_size = world_size
        self.rank = rank
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.keyed = keyed
        self.epoch = 0
        self.start = 0
        self._finished = False  # a full pass ended and no position was set since

    @property
    def steps_per_epoch(self) -> int:
        full, rest = divmod(self.num_samples, self.global_batch)
        return full + (1 if rest and not self.drop_last else 0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self._finished = False

    def set_start(self, step: int) -> None:
        if not 0 <= step <= self.steps_per_epoch:
            raise ValueError(f"start step {step} outside [0, {self.steps_per_epoch}]")
        self.start = int(step)
        self._finished = False

    def global_order(self) -> torch.Tensor:
        """The epoch's permutation of dataset indices (identical on every rank)."""
        if not self.shuffle:
            return torch.arange(self.num_samples)
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        return torch.randperm(self.num_samples, generator=g)

    def __iter__(self) -> Iterator[list]:
        if self._finished:
            self.epoch, self.start = self.epoch + 1, 0
        self._finished = False
        order = self.global_order()
        for step in range(self.start, self.steps_per_epoch):
            batch = order[step * self.global_batch : (step + 1) * self.global_batch][self.rank :: self.world_size]
            yield [(self.epoch, i) for i in batch.tolist()] if self.keyed else batch.tolist()
        self._finished = True

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


def seed_worker(worker_id: int) -> None:
    """Seed numpy / random in a DataLoader worker from torch's per-worker seed."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def _check_int(value: Any, what: str, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{what}={value!r} is not valid; expected an int >= {minimum}")


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
    """The DataLoader of training and evaluation (one process or a rank of ``torch.distributed``).

    ``batch_size`` is per process. ``train``: an :class:`EpochBatchSampler` (shuffled, a pure
    function of (seed, epoch); reach it as ``loader.batch_sampler`` to ``set_epoch`` /
    ``set_start``) over :class:`SeededDataset` (augmentation a pure function of (seed, epoch,
    index)), so order and augmentation repeat run to run, with any ``num_workers``, and after a
    mid-epoch resume. ``drop_last`` defaults to True unless that would leave no batch.
    Otherwise a :class:`ShardSampler`: in order, every sample exactly once over the ranks.
    ``distributed``: world size and rank from the initialised process group. ``pin_memory``
    only if CUDA is available; persistent workers when ``num_workers > 0``.
    """
    _check_int(batch_size, "batch_size", 1)
    _check_int(num_workers, "num_workers", 0)
    _check_int(seed, "seed", 0)
    if drop_last is not None and not isinstance(drop_last, bool):
        raise ValueError(f"drop_last={drop_last!r} is not valid; expected True, False or None")
    world_size, rank = 1, 0
    if distributed:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "build_loader(distributed=True) needs an initialised torch.distributed process group "
                "(call torch.distributed.init_process_group first)"
            )
        world_size, rank = dist.get_world_size(), dist.get_rank()
    n = len(dataset)  # type: ignore[arg-type]
    generator = torch.Generator()
    generator.manual_seed(seed * 1_000_003 + rank)  # worker seeds (numpy/random in custom code) per rank
    common: dict[str, Any] = dict(
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        generator=generator,
        worker_init_fn=seed_worker if num_workers > 0 else None,
        persistent_workers=num_workers > 0,
    )
    if not train:
        sampler = ShardSampler(n, world_size=world_size, rank=rank)
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=False, **common)  # type: ignore[arg-type]
    global_batch = batch_size * world_size
    if drop_last is None:
        drop_last = n >= global_batch
    elif drop_last and n < global_batch:
        raise ValueError(
            f"drop_last=True with batch_size={batch_size} but only {n // world_size} samples per process: "
            "the loader would yield no batches; lower batch_size or pass drop_last=False"
        )
    batches = EpochBatchSampler(
        n, global_batch, world_size=world_size, rank=rank, seed=seed, drop_last=drop_last, keyed=True
    )
    return DataLoader(SeededDataset(dataset, seed), batch_sampler=batches, **common)

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

import dynwire

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs one worker per core: one intra-op thread each, so workers do not oversubscribe
    torch.set_num_threads(1)


def small_size(name: str) -> tuple[int, int, int]:
    """A small input for fast tests: 32x32 for small-input models, 64x64 for ImageNet ones."""
    c, h, _ = dynwire.get_model_cfg(name).input_size
    return (c, 32, 32) if h <= 32 else (c, 64, 64)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def write_fmnist_fixture(root: Path, n_train: int = 96, n_test: int = 48, seed: int = 0) -> Path:
    """A tiny Fashion-MNIST in IDX .gz format (class c: a bright bar at row 2c)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = (np.arange(n) % 10).astype(np.uint8)
        images = rng.integers(0, 60, size=(n, 28, 28), dtype=np.uint8)
        for i, c in enumerate(labels):
            images[i, 2 + 2 * c : 4 + 2 * c, 4:24] = 255
        with gzip.open(root / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
            f.write(struct.pack(">IIII", 0x803, n, 28, 28) + images.tobytes())
        with gzip.open(root / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
            f.write(struct.pack(">II", 0x801, n) + labels.tobytes())
    return root


def set_thresholds_at_quantile(model, x, share: float) -> None:
    """Put every node's threshold at the ``share`` quantile of its incoming router weights on ``x``."""
    with dynwire.record_adjacency(model) as rec:
        model(x)
    with torch.no_grad():
        for name, stage in model.graph_stages():
            raw = rec.router[name]
            for j in range(1, stage.num_nodes):
                stage.edges.tau[j - 1] = _threshold_between(raw[:, j, :j].flatten(), share)


def _threshold_between(values, share: float, gap: float = 1e-5):
    """A threshold near the ``share`` quantile of ``values`` halfway between two of them that differ by
    at least ``gap``: no weight lies within float32 rounding of it, so every implementation of the
    router (the C one of the inference path, the reference) makes the same open/closed decisions."""
    v = values.double().sort().values
    k = min(max(int(share * (len(v) - 1)), 0), len(v) - 2) if len(v) > 1 else 0
    for d in range(len(v)):
        for i in (k + d, k - d):
            if 0 <= i < len(v) - 1 and v[i + 1] - v[i] >= gap:
                return float((v[i] + v[i + 1]) / 2)
    return float(torch.quantile(values, share))

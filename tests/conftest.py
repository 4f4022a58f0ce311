import pytest
import torch

import dynwire


def small_size(name: str) -> tuple[int, int, int]:
    """A small input for fast tests: 32x32 for small-input models, 64x64 for ImageNet ones."""
    c, h, _ = dynwire.get_model_cfg(name).input_size
    return (c, 32, 32) if h <= 32 else (c, 64, 64)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield

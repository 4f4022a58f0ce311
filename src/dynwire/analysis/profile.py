"""Parameters and multiply-accumulates of a model (Table 1), counted with torch's FLOP counter.

MACs come from :class:`torch.utils.flop_counter.FlopCounterMode` on the ``meta`` device (no
memory, no compute): convolutions and linear layers (the classifier and the routers) as torch
counts them, plus the aggregation op through its registered formula (``K`` MACs per output
element for ``K`` predecessors). Like the paper and torchvision, element-wise work (norms,
activations, pooling, the residual additions of the original blocks) is not counted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .._registry import create_model, get_model_cfg
from ..graph.stage import GraphStage

__all__ = ["count_params", "count_macs", "profile_model", "ProfileRow", "overhead_table"]


def count_params(model: nn.Module) -> int:
    """Number of parameters (buffers such as BN statistics or random-graph masks excluded)."""
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, input_size: Sequence[int] = (3, 224, 224), batch_size: int = 1) -> int:
    """Multiply-accumulates of one dense forward pass (every block executed) in evaluation mode,
    per batch of ``batch_size``."""
    if len(input_size) != 3:
        raise ValueError(f"input_size must be (channels, height, width), got {tuple(input_size)}")
    param = next(model.parameters())
    was_training = model.training
    stages = [(m, m.executor) for m in model.modules() if isinstance(m, GraphStage)]
    model.eval()
    try:
        for m, _ in stages:
            m.executor = "dense"
        x = torch.zeros(batch_size, *input_size, device=param.device, dtype=param.dtype)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(x)
    finally:
        model.train(was_training)
        for m, executor in stages:
            m.executor = executor
    return counter.get_total_flops() // 2


@dataclass
class ProfileRow:
    model: str
    wiring: str
    input_size: tuple[int, int, int]
    params: int
    macs: int

    def to_dict(self) -> dict:
        return asdict(self)


def profile_model(
    name: str, wiring: str = "dynamic", input_size: Sequence[int] | None = None, num_classes: int = 1000, **kwargs
) -> ProfileRow:
    """Build ``name`` on the meta device and count its parameters and MACs."""
    cfg = get_model_cfg(name)
    size = tuple(input_size) if input_size is not None else cfg.input_size
    with torch.device("meta"):
        model = create_model(name, num_classes=num_classes, wiring=wiring, in_chans=size[0], **kwargs)
    return ProfileRow(name, wiring, size, count_params(model), count_macs(model, size))


def overhead_table(rows: Sequence[tuple[ProfileRow, ProfileRow]]) -> str:
    """Format ``(baseline, other)`` pairs like Table 1."""
    head = f"{'model':<18} {'input':>11} {'params base':>12} {'params ' + rows[0][1].wiring if rows else '':>16} {'+%':>6} {'MACs base (M)':>14} {'MACs (M)':>10} {'+%':>6}"
    lines = [head, "-" * len(head)]
    for a, b in rows:
        dp = 100.0 * (b.params - a.params) / a.params
        dm = 100.0 * (b.macs - a.macs) / a.macs
        size = "x".join(str(s) for s in a.input_size)
        lines.append(
            f"{a.model:<18} {size:>11} {a.params:>12,} {b.params:>16,} {dp:>6.2f} {a.macs / 1e6:>14.1f} {b.macs / 1e6:>10.1f} {dm:>6.2f}"
        )
    return "\n".join(lines)

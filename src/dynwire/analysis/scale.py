"""Scale of every stage's output at initialisation (the measurement behind ``WiringConfig.node``).

A complete DAG of whole blocks sums every earlier block output, shortcut included, into each
node (Eq. 3, no normalisation), so inside a stage the scale grows roughly like ``(1 + w)^j``.
In branch form the DAG's edges are the shortcuts of the unrolled ResNet and the scale stays the
chain's. ``scripts/init_scale.py`` prints the table for every family, wiring and form.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["stage_output_stds"]


@torch.no_grad()
def stage_output_stds(model: nn.Module, x: Tensor) -> dict[str, float]:
    """Standard deviation of each graph stage's output for input ``x`` (in the model's mode).

    Also ``"logits"``: the classifier's output. The model's BatchNorm statistics are left as
    they were (the forward runs on a copy of its state).
    """
    state = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        out: dict[str, float] = {}
        h = model.forward_stem(x)
        for name, stage in model.graph_stages():
            h = stage(h)
            out[name] = h.float().std().item()
        out["logits"] = model.forward_head(model.forward_final(h)).float().std().item()
    finally:
        model.load_state_dict(state)
    return out

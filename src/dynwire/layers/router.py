"""Router and edge gate of a DG-Net node (paper Sec. 3.3, Eq. 4-5, App. 6.2 and 6.4)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

__all__ = ["Router", "edge_gate", "EVAL_GATES"]

EvalGate = Literal["hard", "soft", "masked"]
EVAL_GATES: tuple[str, ...] = ("hard", "soft", "masked")


class Router(nn.Module):
    """``phi(x) = sigmoid(W^T GAP(x) + b)``: weights of a node's output edges (Eq. 4).

    One router per node predicts the weights of all of its output edges (the "output type" of
    App. 6.2). The bias starts at ``bias_init`` (+3 by default, App. 6.4) so that every edge
    starts open (``sigmoid(3) = 0.95``).
    """

    def __init__(self, in_channels: int, num_edges: int, bias_init: float = 3.0, weight_std: float = 0.01) -> None:
        super().__init__()
        self.fc = nn.Linear(in_channels, num_edges)
        self.bias_init = float(bias_init)
        self.weight_std = float(weight_std)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.fc.weight, std=self.weight_std)
        nn.init.constant_(self.fc.bias, self.bias_init)

    def forward(self, x: Tensor) -> Tensor:
        # mean() rather than adaptive_avg_pool2d: its backward does not keep x alive.
        pooled = x.mean(dim=tuple(range(2, x.ndim))) if x.ndim > 2 else x
        logits = self.fc(pooled)
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()  # route in float32 under autocast; float64 models stay float64
        return torch.sigmoid(logits)


def edge_gate(alpha: Tensor, tau: Tensor, training: bool, eval_gate: str = "hard") -> Tensor:
    """Threshold the edge weights ``alpha`` of one node with its threshold ``tau`` (Eq. 5).

    Training uses the differentiable surrogate ``alpha * sigmoid(alpha - tau)``. Evaluation
    with ``"hard"`` applies Eq. 5 literally (``alpha`` where ``alpha >= tau``, else 0),
    ``"soft"`` keeps the training surrogate, and ``"masked"`` keeps the surrogate's values on
    open edges and zeroes closed ones (no train/test scale gap).
    """
    if training or eval_gate == "soft":
        return alpha * torch.sigmoid(alpha - tau)
    keep = (alpha >= tau).to(alpha.dtype)
    if eval_gate == "hard":
        return alpha * keep
    return alpha * torch.sigmoid(alpha - tau) * keep

"""Router and edge gate of a DG-Net node (paper Sec. 3.3, Eq. 4-5, App. 6.2 and 6.4)."""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

__all__ = ["Router", "edge_gate", "edge_gate_floats", "EVAL_GATES", "TRAIN_GATES"]

EvalGate = Literal["hard", "soft", "masked"]
EVAL_GATES: tuple[str, ...] = ("hard", "soft", "masked")
TRAIN_GATES: tuple[str, ...] = ("soft", "hard")


class _GlobalMean(torch.autograd.Function):
    """Global average pooling whose gradient stays a broadcast view ``(B, C, 1, 1) -> (B, C, H, W)``.

    ``x.mean((2, 3))``'s backward writes a full ``(B, C, H, W)`` map (``expand`` then ``div``) for
    every router, which the node output's gradient then reads again; here the division happens on
    the ``(B, C)`` gradient and the consumer adds the broadcast view where it sums the node's gradient.
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.shape = x.shape
        return x.mean(dim=tuple(range(2, x.ndim)))

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        shape = ctx.shape
        return (grad / math.prod(shape[2:])).reshape(*grad.shape, *([1] * (len(shape) - 2))).expand(shape)


def global_mean(x: Tensor) -> Tensor:
    """``x.mean`` over the spatial dimensions ``(B, C, ...) -> (B, C)``; a broadcast view as gradient."""
    if x.ndim <= 2:
        return x
    if torch.is_grad_enabled() and x.requires_grad and not torch.compiler.is_compiling() and not torch.jit.is_tracing():
        return _GlobalMean.apply(x)
    return x.mean(dim=tuple(range(2, x.ndim)))


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
        # a mean rather than adaptive_avg_pool2d: its backward does not keep x alive
        pooled = global_mean(x)
        logits = self.fc(pooled)
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()  # route in float32 under autocast; float64 models stay float64
        return torch.sigmoid(logits)


def edge_gate(
    alpha: Tensor, tau: Tensor, training: bool, eval_gate: str = "masked", train_gate: str = "soft"
) -> tuple[Tensor, Tensor | None]:
    """Threshold the edge weights ``alpha`` of one node with its threshold ``tau`` (Eq. 5).

    Returns ``(value, open)``: ``value`` is what an open edge carries and ``open`` the boolean
    mask of open edges (``None``: every edge open, nothing can be closed).

    * training, ``train_gate="soft"``: the differentiable surrogate ``alpha * sigmoid(alpha - tau)``,
      nothing closed;
    * training, ``train_gate="hard"``: the same value, open where ``alpha >= tau``; the graph
      stage zeroes closed edges with a straight-through gradient (backward sees the soft
      surrogate, so a closed edge can open again);
    * evaluation, ``eval_gate="masked"`` (default): open where ``alpha >= tau``, carrying the
      surrogate's value (what training saw); ``"hard"``: the literal Eq. 5 (open edges carry
      ``alpha``); ``"soft"``: the surrogate, nothing closed.
    """
    if training:
        soft = alpha * torch.sigmoid(alpha - tau)
        if train_gate == "soft":
            return soft, None
        return soft, alpha >= tau  # the stage closes edges with a straight-through mask
    if eval_gate == "soft":
        return alpha * torch.sigmoid(alpha - tau), None
    keep = alpha >= tau
    return (alpha if eval_gate == "hard" else alpha * torch.sigmoid(alpha - tau)), keep


def edge_gate_floats(alpha: list[float], tau: list[float], eval_gate: str = "masked") -> tuple[list[float], list[bool]]:
    """:func:`edge_gate` in evaluation on Python numbers (one sample's edges): ``(value, open)``.

    The batch-1 inference path's Python fallback (where its C call does not apply) gates a node's
    output edges this way after one ``.tolist()`` of its router's output, instead of four tensor
    ops: same decisions (``alpha >= tau`` on the same float32 numbers), values in double
    precision. ``eval_gate="soft"`` opens every edge.
    """
    if eval_gate == "hard":
        return list(alpha), [a >= t for a, t in zip(alpha, tau)]
    value = [a / (1.0 + math.exp(t - a)) for a, t in zip(alpha, tau)]  # alpha * sigmoid(alpha - tau)
    if eval_gate == "soft":
        return value, [True] * len(alpha)
    return value, [a >= t for a, t in zip(alpha, tau)]

"""SGD with decay-free 1-D parameters, and a per-step warm-up + cosine schedule."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn

__all__ = ["param_groups", "build_optimizer", "WarmupCosineSchedule", "lr_factor", "grad_norm"]


def param_groups(model: nn.Module, weight_decay: float, *, no_decay_norm_bias: bool = True) -> list[dict[str, Any]]:
    """Split trainable parameters into a decayed and a decay-free group.

    With ``no_decay_norm_bias`` every parameter with ``ndim <= 1`` (norm
    scales/shifts, biases, router biases, wiring thresholds ``tau``, static
    ``edge_logits``) gets ``weight_decay=0``; conv/linear weights (including
    router weights) are decayed. Each group records its parameter names.
    """
    decay: list[nn.Parameter] = []
    decay_names: list[str] = []
    no_decay: list[nn.Parameter] = []
    no_decay_names: list[str] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if no_decay_norm_bias and p.ndim <= 1:
            no_decay.append(p)
            no_decay_names.append(name)
        else:
            decay.append(p)
            decay_names.append(name)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay, "param_names": decay_names})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "param_names": no_decay_names})
    if not groups:
        raise ValueError("model has no trainable parameters")
    return groups


def build_optimizer(
    model: nn.Module,
    *,
    lr: float,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    no_decay_norm_bias: bool = True,
) -> torch.optim.SGD:
    """SGD over :func:`param_groups`."""
    if lr <= 0:
        raise ValueError(f"lr={lr!r}: must be > 0")
    if nesterov and momentum <= 0:
        raise ValueError("optim.nesterov=true needs optim.momentum > 0")
    groups = param_groups(model, weight_decay, no_decay_norm_bias=no_decay_norm_bias)
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)


def grad_norm(model: nn.Module, max_norm: float | None = None) -> torch.Tensor:
    """Total 2-norm of all gradients (one fused computation), clipping them to ``max_norm`` if given.

    The result is NaN/Inf when any gradient is, which the trainer checks after every step.
    """
    params = [p for p in model.parameters() if p.grad is not None]
    return nn.utils.clip_grad_norm_(params, math.inf if max_norm is None else max_norm)


def lr_factor(step: int, total_steps: int, warmup_steps: int, cosine: bool = True) -> float:
    """Multiplier of the base lr for optimizer step ``step`` (0-based).

    Warm-up: ``(step + 1) / warmup_steps`` for the first ``warmup_steps`` steps
    (reaches 1 on the last warm-up step). Then half a cosine period from 1 to 0
    over the remaining steps (``cosine=False``: stay at 1).
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if not cosine:
        return 1.0
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


class WarmupCosineSchedule:
    """Per-step LR schedule with ``state_dict``: sets ``group['lr'] = base_lr * lr_factor(step)``.

    Call :meth:`step` after each ``optimizer.step()``. The lr for step 0 is set
    at construction.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        total_steps: int,
        warmup_steps: int = 0,
        cosine: bool = True,
    ) -> None:
        if total_steps <= 0:
            raise ValueError(f"total_steps={total_steps!r}: must be > 0")
        if not 0 <= warmup_steps <= total_steps:
            raise ValueError(f"warmup_steps={warmup_steps!r}: must be in [0, total_steps={total_steps}]")
        self.optimizer = optimizer
        self.total_steps = int(total_steps)
        self.warmup_steps = int(warmup_steps)
        self.cosine = bool(cosine)
        for g in optimizer.param_groups:
            g.setdefault("initial_lr", g["lr"])
        self.base_lrs = [g["initial_lr"] for g in optimizer.param_groups]
        self.last_step = 0
        self._apply()

    def _apply(self) -> None:
        f = lr_factor(self.last_step, self.total_steps, self.warmup_steps, self.cosine)
        for g, base in zip(self.optimizer.param_groups, self.base_lrs):
            g["lr"] = base * f

    def step(self) -> None:
        self.last_step += 1
        self._apply()

    def get_last_lr(self) -> list[float]:
        return [g["lr"] for g in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        return {
            "last_step": self.last_step,
            "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps,
            "cosine": self.cosine,
            "base_lrs": list(self.base_lrs),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["total_steps"]) != self.total_steps or int(state["warmup_steps"]) != self.warmup_steps:
            raise ValueError(
                f"schedule mismatch: checkpoint has total_steps={state['total_steps']}, "
                f"warmup_steps={state['warmup_steps']}, this run has {self.total_steps}, {self.warmup_steps} "
                f"(epochs, batch size, dataset size or warm-up changed since the checkpoint)"
            )
        self.last_step = int(state["last_step"])
        self.base_lrs = [float(x) for x in state["base_lrs"]]
        self.cosine = bool(state["cosine"])
        self._apply()

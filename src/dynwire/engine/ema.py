"""Exponential moving average of model weights (in the spirit of timm's ``ModelEmaV3``)."""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn as nn

from .checkpoint import unwrap_model

__all__ = ["ModelEma"]


class ModelEma(nn.Module):
    """EMA copy of a model: ``ema = decay * ema + (1 - decay) * param`` after each step.

    Floating-point parameters are averaged; buffers (BatchNorm running stats,
    counters) are copied from the model. With ``warmup=True`` the decay used
    at update ``n`` is ``min(decay, (1 + n) / (10 + n))`` so early weights fade
    quickly. The EMA module is kept in eval mode with ``requires_grad=False``.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, *, warmup: bool = False, device: Any = None) -> None:
        super().__init__()
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema decay={decay!r}: must be in (0, 1)")
        self.module = copy.deepcopy(unwrap_model(model)).eval()
        self.module.requires_grad_(False)
        if device is not None:
            self.module.to(device)
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.num_updates = 0

    def current_decay(self) -> float:
        if self.warmup:
            return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        return self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Blend the current weights of ``model`` into the average."""
        src = unwrap_model(model)
        d = self.current_decay()
        params = dict(src.named_parameters())
        for name, ema_p in self.module.named_parameters():
            p = params[name].detach()
            if ema_p.is_floating_point():
                ema_p.lerp_(p.to(ema_p.device, ema_p.dtype), 1.0 - d)
            else:
                ema_p.copy_(p)
        buffers = dict(src.named_buffers())
        for name, ema_b in self.module.named_buffers():
            ema_b.copy_(buffers[name].detach())
        self.num_updates += 1

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    def train(self, mode: bool = True) -> ModelEma:
        # The average is only ever used for evaluation.
        super().train(False)
        return self

    def ema_state_dict(self) -> dict[str, Any]:
        """Weights plus bookkeeping, for checkpoints."""
        return {"weights": self.module.state_dict(), "decay": self.decay, "num_updates": self.num_updates}

    def load_ema_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["weights"])
        self.decay = float(state["decay"])
        self.num_updates = int(state["num_updates"])

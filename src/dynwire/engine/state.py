"""The training loop's position and meters: one dataclass, saved flat in every checkpoint."""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import Any

__all__ = ["TrainState"]


def _zero_meter() -> dict[str, float]:
    return {"loss_sum": 0.0, "correct": 0.0, "count": 0.0, "time": 0.0}


@dataclass
class TrainState:
    """Where the loop is and what it measured; the fields are the checkpoint entries.

    ``state_dict()`` gives one flat entry per field (``epoch``, ``global_step``, ...), which
    :meth:`load_state_dict` reads back with each field's type; adding a field here is all it
    takes to checkpoint and restore it.
    """

    epoch: int = 0  # current epoch (0-based)
    step_in_epoch: int = 0  # optimizer steps already done in `epoch`
    global_step: int = 0
    best_metric: float = -math.inf
    best_epoch: int = -1
    meter: dict[str, float] = field(default_factory=_zero_meter)  # running sums of the current epoch
    train_times: list[float] = field(default_factory=list)  # seconds per finished epoch
    train_images: list[int] = field(default_factory=list)  # images per finished epoch (all ranks)

    #: entries a checkpoint must have to be resumed from (the others default when absent)
    REQUIRED = ("epoch", "step_in_epoch", "global_step")

    def state_dict(self) -> dict[str, Any]:
        return {f.name: _copy(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = [k for k in self.REQUIRED if k not in state]
        if missing:
            raise KeyError(missing[0])
        fresh, hints = TrainState(), typing.get_type_hints(TrainState)
        for f in dataclasses.fields(self):
            value = state.get(f.name, getattr(fresh, f.name))
            setattr(self, f.name, _cast(hints[f.name], value))

    def epoch_record(self, *, lr: float) -> dict[str, Any]:
        """The metrics record of the epoch just trained (its time and images already appended)."""
        m = self.meter
        return {
            "kind": "epoch",
            "epoch": self.epoch + 1,
            "step": self.global_step,
            "lr": lr,
            "train_loss": m["loss_sum"] / max(m["count"], 1),
            "train_acc": 100.0 * m["correct"] / max(m["count"], 1),
            "train_img_per_s": self.train_images[-1] / max(self.train_times[-1], 1e-9),
            "epoch_time_s": self.train_times[-1],
        }

    def next_epoch(self) -> None:
        """Move to the start of the next epoch with a fresh meter."""
        self.epoch += 1
        self.step_in_epoch = 0
        self.meter = _zero_meter()


def _copy(v: Any) -> Any:
    return dict(v) if isinstance(v, dict) else list(v) if isinstance(v, list) else v


def _cast(tp: Any, value: Any) -> Any:
    """``value`` as the annotated type ``tp`` (``int``, ``float``, ``list[T]``, ``dict[str, T]``)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is dict:
        return {str(k): args[1](v) for k, v in value.items()}
    if origin is list:
        return [args[0](v) for v in value]
    return tp(value)

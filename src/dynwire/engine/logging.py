"""Rank-0 logging: ``metrics.csv`` + ``metrics.jsonl`` + TensorBoard, and live progress.

Live progress (:class:`Progress`) is a tqdm bar when stderr is a terminal; otherwise (a log
file, a pipe) one plain line every ``train.log_every`` steps, in a fixed format that
:func:`parse_progress` reads back (``scripts/demo.py`` draws its bars from them)::

    [dynwire] epoch 2/4 step 120/468 loss 0.4123 acc 85.2% 312 img/s eta 0:05:31

Runs without an accuracy (detection) leave out the ``acc`` field.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TextIO

from .files import atomic_write

__all__ = ["MetricsLogger", "Progress", "format_progress", "parse_progress"]


def _clean(v: Any) -> Any:
    if hasattr(v, "item") and callable(v.item):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/Inf
    return v


class MetricsLogger:
    """Append metric records to ``metrics.jsonl`` and ``metrics.csv``; scalars to TensorBoard.

    Every record has ``kind`` (``"train"`` for periodic step logs, ``"epoch"``
    for end-of-epoch summaries), ``epoch`` and ``step`` (global optimizer
    step). The CSV header is the union of keys seen; when a record brings a
    new key the CSV is rewritten with the wider header. When ``enabled`` is
    False (ranks other than 0) every method is a no-op.

    ``resume_step``: keep existing records up to this global step and drop
    later ones (written after the checkpoint a resumed run restarts from), so
    files and TensorBoard do not hold the same steps twice. ``None`` starts
    fresh files.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike[str],
        *,
        enabled: bool = True,
        tensorboard: bool = True,
        resume_step: int | None = None,
    ) -> None:
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self.jsonl_path = self.run_dir / "metrics.jsonl"
        self.csv_path = self.run_dir / "metrics.csv"
        self._records: list[dict[str, Any]] = []
        self._fields: list[str] = []
        self._writer = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.jsonl_path.exists():
            for line in self.jsonl_path.read_text(encoding="utf-8").splitlines():
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by a kill
                if int(rec.get("step", 0)) <= resume_step:
                    self._records.append(rec)
        for rec in self._records:
            self._add_fields(rec)
        self._rewrite()
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # Hide events past the resume point (or all old events on a fresh start).
            purge = resume_step + 1 if resume_step is not None else 0
            self._writer = SummaryWriter(log_dir=str(self.run_dir / "tb"), purge_step=purge)

    def _add_fields(self, rec: Mapping[str, Any]) -> bool:
        new = [k for k in rec if k not in self._fields]
        self._fields.extend(new)
        return bool(new)

    def _rewrite(self) -> None:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=self._fields, extrasaction="ignore")
        w.writeheader()
        for rec in self._records:
            w.writerow(rec)
        atomic_write(self.csv_path, buf.getvalue())
        atomic_write(self.jsonl_path, "".join(json.dumps(rec) + "\n" for rec in self._records))

    def log(self, record: Mapping[str, Any]) -> None:
        """Write one record (``kind``, ``epoch``, ``step`` plus metrics)."""
        if not self.enabled:
            return
        rec = {k: _clean(v) for k, v in record.items()}
        self._records.append(rec)
        with open(self.jsonl_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")
        if self._add_fields(rec) or not self.csv_path.exists():
            self._rewrite()
        else:
            with open(self.csv_path, "a", encoding="utf-8", newline="") as f:
                csv.DictWriter(f, fieldnames=self._fields, extrasaction="ignore").writerow(rec)
        if self._writer is not None:
            kind = rec.get("kind", "metrics")
            step = int(rec.get("step", 0))
            for k, v in rec.items():
                if k in ("kind", "step", "epoch") or isinstance(v, bool) or not isinstance(v, (int, float)):
                    continue
                self._writer.add_scalar(f"{kind}/{k}", v, step)
            self._writer.flush()

    @property
    def records(self) -> list[dict[str, Any]]:
        return list(self._records)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


_PROGRESS = re.compile(
    r"^\[dynwire\] epoch (?P<epoch>\d+)/(?P<epochs>\d+) step (?P<step>\d+)/(?P<steps>\d+) "
    r"loss (?P<loss>\S+) (?:acc (?P<acc>\S+)% )?(?P<img_per_s>\d+) img/s eta (?P<h>\d+):(?P<m>\d\d):(?P<s>\d\d)$"
)


def format_progress(
    *,
    epoch: int,
    epochs: int,
    step: int,
    steps: int,
    loss: float,
    acc: float | None,
    img_per_s: float,
    eta_s: float,
) -> str:
    """One plain progress line (``epoch`` and ``step`` 1-based; ``acc=None`` leaves the field out)."""
    eta = int(round(eta_s))
    acc_text = "" if acc is None else f"acc {acc:.1f}% "
    return (
        f"[dynwire] epoch {epoch}/{epochs} step {step}/{steps} loss {loss:.4f} {acc_text}"
        f"{img_per_s:.0f} img/s eta {eta // 3600}:{eta // 60 % 60:02d}:{eta % 60:02d}"
    )


def parse_progress(line: str) -> dict[str, Any] | None:
    """The fields of a :func:`format_progress` line (``eta_s`` in seconds), or None for other lines."""
    m = _PROGRESS.match(line.strip())
    if m is None:
        return None
    g = m.groupdict()
    out: dict[str, Any] = {k: int(g[k]) for k in ("epoch", "epochs", "step", "steps", "img_per_s")}
    acc = None if g["acc"] is None else float(g["acc"])
    out.update(loss=float(g["loss"]), acc=acc, eta_s=int(g["h"]) * 3600 + int(g["m"]) * 60 + int(g["s"]))
    return out


class Progress:
    """Live training progress on rank 0: a tqdm bar per epoch on a terminal, else plain lines.

    ``report`` is called at each log point; the ETA extrapolates the time per step measured in
    this process (evaluation included) over the steps left in the run.
    """

    def __init__(
        self,
        *,
        enabled: bool,
        epochs: int,
        steps_per_epoch: int,
        start_step: int,
        stream: TextIO | None = None,
    ) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.tty = enabled and self.stream.isatty()
        self.epochs = epochs
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = epochs * steps_per_epoch
        self.start_step = start_step
        self.t0 = time.perf_counter()
        self._bar: Any = None

    def start_epoch(self, epoch: int, step_in_epoch: int) -> None:
        """``epoch`` 0-based; ``step_in_epoch`` steps of it already done."""
        if self.tty:
            from tqdm.auto import tqdm

            self._bar = tqdm(
                total=self.steps_per_epoch,
                initial=step_in_epoch,
                desc=f"epoch {epoch + 1}/{self.epochs}",
                file=self.stream,
                dynamic_ncols=True,
                leave=False,
                unit="step",
            )

    def step(self) -> None:
        if self._bar is not None:
            self._bar.update(1)

    def report(
        self, *, epoch: int, step: int, global_step: int, loss: float, acc: float | None, img_per_s: float
    ) -> None:
        """Progress after ``step`` (1-based) of ``epoch`` (1-based), ``global_step`` steps in all."""
        if not self.enabled:
            return
        done = max(global_step - self.start_step, 1)
        eta = (self.total_steps - global_step) * (time.perf_counter() - self.t0) / done
        if self._bar is not None:
            shown = {"loss": f"{loss:.3f}"} | ({} if acc is None else {"acc": f"{acc:.1f}"})
            self._bar.set_postfix(**shown, img_s=f"{img_per_s:.0f}")
            return
        line = format_progress(
            epoch=epoch, epochs=self.epochs, step=step, steps=self.steps_per_epoch,
            loss=loss, acc=acc, img_per_s=img_per_s, eta_s=eta,
        )  # fmt: skip
        print(line, file=self.stream, flush=True)

    def end_epoch(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

"""Rank-0 metric logging: ``metrics.csv`` + ``metrics.jsonl`` + TensorBoard, and a tqdm bar."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["MetricsLogger", "progress_bar"]


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
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # pragma: no cover - tensorboard is a dependency
                self._writer = None
            else:
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
        tmp = self.csv_path.with_name(self.csv_path.name + ".tmp")
        tmp.write_text(buf.getvalue(), encoding="utf-8")
        os.replace(tmp, self.csv_path)
        with open(self.jsonl_path.with_name(self.jsonl_path.name + ".tmp"), "w", encoding="utf-8") as f:
            for rec in self._records:
                f.write(json.dumps(rec) + "\n")
        os.replace(self.jsonl_path.with_name(self.jsonl_path.name + ".tmp"), self.jsonl_path)

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


def progress_bar(total: int, *, enabled: bool, desc: str = "", initial: int = 0) -> Any:
    """A tqdm bar (shown only when ``enabled`` and stderr is a terminal)."""
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        disable=not (enabled and sys.stderr.isatty()),
        dynamic_ncols=True,
        leave=False,
        unit="step",
    )

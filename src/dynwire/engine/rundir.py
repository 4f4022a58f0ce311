"""The run directory's bookkeeping files: which checkpoint to resume, ``run.json``, ``final.json``."""

from __future__ import annotations

import datetime as _dt
import json
import math
import platform
import socket
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from .config import RunConfig
from .distributed import DistInfo
from .files import atomic_write_json
from .state import TrainState

__all__ = [
    "resolve_resume",
    "agreed_resume_path",
    "data_info",
    "write_run_json",
    "final_summary",
    "profile_summary",
    "versions",
]


def resolve_resume(cfg: RunConfig) -> Path | None:
    """The checkpoint to continue from (``train.resume``), refusing to overwrite an existing run."""
    resume, last = cfg.train.resume, cfg.run_dir / "last.pt"
    if resume is None:
        if last.exists():
            raise ValueError(
                f"run directory {str(cfg.run_dir)!r} already holds last.pt; continue it with --resume "
                f"(train.resume=auto) or choose another output.name/output.dir"
            )
        return None
    if resume == "auto":
        return last if last.exists() else None
    path = Path(resume).expanduser()
    if not path.is_file():
        raise ValueError(f"train.resume={resume!r}: no such checkpoint file (use 'auto' or a path to last.pt)")
    return path


def agreed_resume_path(cfg: RunConfig, info: DistInfo) -> Path | None:
    """:func:`resolve_resume` decided on rank 0 and shared (run dirs must be on storage all ranks read)."""
    if not info.distributed:
        return resolve_resume(cfg)
    box: list[Any] = [None]
    if info.is_main:
        try:
            found = resolve_resume(cfg)
            box[0] = ("ok", None if found is None else str(found))
        except ValueError as exc:
            box[0] = ("error", str(exc))
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise ValueError(value)
    return None if value is None else Path(value)


def data_info(info: Any, input_size: tuple[int, ...]) -> dict[str, Any]:
    """What a model was built for (saved in run.json and every checkpoint; ``dynwire eval`` reuses it)."""
    return {
        "name": str(getattr(info, "name", "custom")),
        "num_classes": int(info.num_classes),
        "classes": [str(c) for c in getattr(info, "classes", ())],
        "in_chans": int(info.in_chans),
        "input_size": [int(s) for s in input_size],
    }


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__}
    for pkg in ("torchvision", "dynwire"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "not installed"
    if torch.cuda.is_available():
        out["cuda"] = str(torch.version.cuda)
    return out


def write_run_json(cfg: RunConfig, dist_info: DistInfo, resumed_from: Path | None, extra: dict[str, Any]) -> None:
    """Create ``run.json`` (seed, command, host, versions, ``extra``), or append a resume entry to it."""
    path = cfg.run_dir / "run.json"
    now = _dt.datetime.now(_dt.timezone.utc).astimezone().isoformat(timespec="seconds")
    entry: dict[str, Any] = {
        "start_time": now,
        "command": list(sys.argv),
        "hostname": socket.gethostname(),
        "world_size": dist_info.world_size,
        "device": str(dist_info.device),
        "torch_threads": torch.get_num_threads(),
        "backend": dist_info.backend,
        "versions": versions(),
    }
    if dist_info.device.type == "cuda":
        entry["gpu"] = torch.cuda.get_device_name(dist_info.device)
    if resumed_from is not None and path.exists():
        data = json.loads(path.read_text(encoding="utf-8"))
        data.setdefault("resumes", []).append({**entry, "checkpoint": str(resumed_from)})
    else:
        data = {"seed": cfg.train.seed, **entry, **extra}
        if resumed_from is not None:
            data["resumed_from"] = str(resumed_from)
    atomic_write_json(path, data)


def final_summary(
    cfg: RunConfig,
    state: TrainState,
    dist_info: DistInfo,
    val: dict[str, float],
    ema_val: dict[str, float],
    digests: list[str],
) -> dict[str, Any]:
    """The ``final.json`` record of a finished run (``digests``: the weights' SHA-256 on each rank)."""
    imgs, secs = sum(state.train_images), sum(state.train_times)
    final: dict[str, Any] = {
        "run_dir": str(cfg.run_dir),
        "epochs": cfg.schedule.epochs,
        "global_step": state.global_step,
        "val": val,
        "best_val_top1": state.best_metric if math.isfinite(state.best_metric) else val.get("top1"),
        "best_epoch": state.best_epoch,
        "train_images_per_s": imgs / secs if secs > 0 else None,
        "train_time_s": secs,
        "world_size": dist_info.world_size,
        "device": str(dist_info.device),
    }
    if ema_val:
        final["ema_val"] = ema_val
    final["weights_sha256"] = digests[0]
    if dist_info.distributed:
        final["rank_weights_sha256"] = digests
        if len(set(digests)) != 1 and dist_info.is_main:
            warnings.warn(f"ranks ended with different weights: {digests}", stacklevel=2)
    return final


def profile_summary(model: nn.Module, input_size: tuple[int, ...]) -> dict[str, Any]:
    """Parameters and MACs of ``model`` at ``input_size`` for ``final.json`` (never fails the run)."""
    from ..analysis.profile import count_macs, count_params

    out: dict[str, Any] = {"input_size": list(input_size)}
    was_training = model.training
    try:
        out["params"] = int(count_params(model))
        out["macs"] = int(count_macs(model, input_size=input_size))
    except Exception as exc:  # profiling must not lose a finished run
        warnings.warn(f"MAC counting failed: {exc}", stacklevel=2)
        out.setdefault("params", sum(p.numel() for p in model.parameters()))
        out["macs"] = None
        out["profile_error"] = f"{type(exc).__name__}: {exc}"
    finally:
        model.train(was_training)
    return out

"""Evaluation: loss / top-1 / top-5 of a model over a loader, and of a saved checkpoint."""

from __future__ import annotations

import os
import time
import types
from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..data import build_loader
from ..graph.adjacency import record_adjacency
from ..graph.stage import GraphStage
from .builders import build_model, build_split, seed_everything
from .checkpoint import load_checkpoint, stored_config
from .config import RunConfig, apply_overrides, config_from_dict
from .distributed import DistInfo, all_reduce_sum, pick_device
from .meters import accuracy_counts

__all__ = ["autocast", "to_device", "evaluate_model", "evaluate"]


def autocast(device: torch.device, amp: str) -> Any:
    """bf16 autocast for ``amp="bf16"``, else a no-op context."""
    if amp == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


def to_device(x: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    x = x.to(device, non_blocking=True)
    if channels_last and x.ndim == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


@torch.no_grad()
def evaluate_model(
    model: nn.Module,
    loader: Any,
    *,
    device: torch.device,
    dist_info: DistInfo | None = None,
    amp: str = "none",
    channels_last: bool = False,
    executed_macs: bool = False,
) -> dict[str, Any]:
    """Loss, top-1 and top-5 accuracy (percent) over ``loader``, summed over ranks.

    With ``executed_macs`` (models with graph stages) also the mean multiply-adds executed per
    image (``macs``, counted from what ran: removed nodes cost nothing, Sec. 3.3) and, per
    stage, the share of (sample, block) pairs removed (``removed``).
    """
    info = dist_info or DistInfo(device=device)
    was_training = model.training
    model.eval()
    stages = [n for n, m in model.named_modules() if isinstance(m, GraphStage)] if executed_macs else []
    sums = torch.zeros(5 + len(stages), dtype=torch.float64, device=device)  # loss, top1, top5, n, macs, removed..
    blocks = torch.zeros(len(stages), dtype=torch.float64, device=device)
    for images, target in loader:
        images = to_device(images, device, channels_last)
        target = target.to(device, non_blocking=True)
        with autocast(device, amp), record_adjacency(model) if stages else nullcontext() as rec:
            logits = model(images)
        logits = logits.float()
        loss = F.cross_entropy(logits, target, reduction="sum")
        c1, c5 = accuracy_counts(logits, target, (1, 5))
        n = torch.tensor(float(len(target)), device=device, dtype=torch.float64)
        extra = []
        if stages:
            extra.append(rec.macs.sum().to(device))
            for k, name in enumerate(stages):
                removed = rec.removed[name][:, 1:-1]  # blocks that can be removed (not node 0, not the output)
                extra.append(removed.sum().double().to(device))
                blocks[k] = removed.shape[1]
        else:
            extra.append(torch.zeros((), dtype=torch.float64, device=device))
        sums += torch.stack([loss.double(), c1.double(), c5.double(), n, *extra])
    all_reduce_sum(sums, info)
    model.train(was_training)
    loss_sum, top1, top5, n, macs, *removed = sums.tolist()
    if n == 0:
        raise ValueError("evaluation set is empty")
    out: dict[str, Any] = {"loss": loss_sum / n, "top1": 100.0 * top1 / n, "top5": 100.0 * top5 / n, "images": int(n)}
    if stages:
        out["macs"] = macs / n
        out["removed"] = {name: (r / (n * b) if b else 0.0) for name, r, b in zip(stages, removed, blocks.tolist())}
    return out


def evaluate(
    checkpoint_path: str | os.PathLike[str],
    *,
    data_dir: str | None = None,
    split: str = "val",
    batch_size: int | None = None,
    num_workers: int | None = None,
    subset: int | None = None,
    use_ema: bool = False,
    device: str = "auto",
    overrides: Sequence[str] = (),
    datasets: tuple[Dataset, Dataset, Any] | None = None,
) -> dict[str, Any]:
    """Evaluate a checkpoint (``last.pt``/``best.pt``) on a split; returns loss/top1/top5.

    The model and data settings come from the config stored in the checkpoint, and the
    classes and input size from its ``data_info`` (so an ``imagefolder`` model is rebuilt with
    its own class list); ``overrides`` (``key.sub=value``, e.g.
    ``model.wiring_kwargs.eval_gate=soft``), ``data_dir``, ``batch_size``, ``num_workers`` and
    ``subset`` change them.
    """
    ckpt = load_checkpoint(checkpoint_path, map_location="cpu")
    if "config" not in ckpt or "model" not in ckpt:
        raise ValueError(
            f"checkpoint {str(checkpoint_path)!r}: no config/model entry; not a dynwire training checkpoint"
        )
    root = None if data_dir is None else str(data_dir)
    data_overrides = {"root": root, "batch_size": batch_size, "num_workers": num_workers, "val_subset": subset}
    raw = apply_overrides(stored_config(ckpt), list(overrides))
    raw["data"] = {**(raw.get("data") or {}), **{k: v for k, v in data_overrides.items() if v is not None}}
    cfg = config_from_dict(raw)
    dev = pick_device(device)
    threads = torch.get_num_threads()
    if cfg.train.num_threads is not None:
        torch.set_num_threads(cfg.train.num_threads)
    try:
        return _evaluate(ckpt, cfg, checkpoint_path, split, use_ema, dev, datasets)
    finally:
        torch.set_num_threads(threads)


def _evaluate(
    ckpt: dict[str, Any],
    cfg: RunConfig,
    checkpoint_path: Any,
    split: str,
    use_ema: bool,
    dev: torch.device,
    datasets: tuple[Dataset, Dataset, Any] | None,
) -> dict[str, Any]:
    if datasets is None:
        saved = ckpt.get("data_info")
        val_ds, info = build_split(
            cfg, split, train=False, info=types.SimpleNamespace(**saved) if saved is not None else None
        )
    else:
        _, val_ds, info = datasets
    seed_everything(cfg.train.seed)
    model = build_model(cfg, info)
    weights = ckpt["model"]
    if use_ema:
        if ckpt.get("ema") is None:
            raise ValueError(f"checkpoint {str(checkpoint_path)!r} has no EMA weights (train.ema_decay was off)")
        weights = ckpt["ema"]["weights"]
    model.load_state_dict(weights)
    model.to(dev)
    if cfg.train.channels_last:
        model.to(memory_format=torch.channels_last)
    loader = build_loader(val_ds, cfg.data.batch_size, train=False, num_workers=cfg.data.num_workers)
    kw = dict(device=dev, amp=cfg.train.amp, channels_last=cfg.train.channels_last, executed_macs=True)
    t0 = time.perf_counter()
    metrics = evaluate_model(model, loader, **kw)
    dt = time.perf_counter() - t0
    if "macs" in metrics:  # the same model with every block executed, for comparison
        stages = [m for m in model.modules() if isinstance(m, GraphStage)]
        for st in stages:
            st.executor = "dense"
        dense = evaluate_model(model, loader, **kw)
        for st in stages:
            st.executor = "pruned"
        metrics["dense"] = {k: dense[k] for k in ("top1", "top5", "loss", "macs")}
        metrics["mac_fraction"] = metrics["macs"] / dense["macs"]
    return {
        "checkpoint": str(checkpoint_path),
        "split": split,
        "weights": "ema" if use_ema else "model",
        "epoch": int(ckpt.get("epoch", 0)),
        "global_step": int(ckpt.get("global_step", 0)),
        **metrics,
        "images_per_s": metrics["images"] / dt if dt > 0 else None,
    }

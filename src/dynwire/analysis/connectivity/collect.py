"""Step 1 of :mod:`dynwire.analysis.connectivity`, collecting: running a model and recording its wiring.

:func:`analyze_model` runs a model over a loader inside :func:`dynwire.record_adjacency` and feeds
a :class:`~dynwire.analysis.connectivity.ConnectivityAccumulator` (step 2, :mod:`.stats`);
:func:`load_for_eval` rebuilds model and split from a training checkpoint as ``dynwire eval``
does; :func:`executed_macs` measures only the mean multiply-adds executed per sample.
"""

from __future__ import annotations

import math
import sys
import time
import types
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ...data import build_loader
from ...engine import build_model, build_split, config_from_dict, load_checkpoint, seed_everything
from ...engine.checkpoint import stored_config
from ...engine.config import apply_overrides
from ...engine.distributed import pick_device
from ...graph.adjacency import record_adjacency
from ...graph.stage import GraphStage
from .stats import ConnectivityAccumulator


# --------------------------------------------------------------------------- running a model
def graph_stages(model: nn.Module) -> dict[str, Any]:
    """The model's :class:`~dynwire.GraphStage` modules by name, in forward order."""
    stages = {n: m for n, m in model.named_modules() if isinstance(m, GraphStage)}
    if not stages:
        raise ValueError("the model has no graph stages (build it with dynwire.create_model)")
    return stages


@torch.no_grad()
def analyze_model(
    model: nn.Module,
    loader: Iterable[tuple[Tensor, Tensor]],
    *,
    num_classes: int,
    device: torch.device | str = "cpu",
    max_images: int | None = None,
    per_class: int = 2,
    top_k: int = 4,
    progress: bool = False,
    reference: nn.Module | None = None,
) -> ConnectivityAccumulator:
    """Run ``model`` (in eval mode) over ``loader`` and return the filled accumulator.

    ``reference``: a second model run on the same images (e.g. the dense static network) whose
    per-sample loss measures their difficulty, for the rank correlation with executed MACs."""
    device = torch.device(device)
    stages = graph_stages(model)
    masks = {n: s.edges.edge_mask_matrix().numpy() > 0 for n, s in stages.items()}
    chains = [n for n, s in stages.items() if s.edges.is_chain]
    acc = ConnectivityAccumulator(masks, num_classes, per_class=per_class, top_k=top_k)
    was_training = model.training
    model.eval()
    if reference is not None:
        reference.eval()
    t0, last = time.perf_counter(), 0.0
    try:
        for images, labels in loader:
            if max_images is not None and acc.count >= max_images:
                break
            if max_images is not None and acc.count + len(labels) > max_images:
                keep = max_images - acc.count
                images, labels = images[:keep], labels[:keep]
            x = images.to(device)
            with record_adjacency(model) as rec:
                logits = model(x)
            ref_logits = reference(x) if reference is not None else None
            # a chain stage (sequential) runs its blocks without the graph executor: it removes no
            # node and records neither rec.removed nor its MACs, so rec.macs would miss its blocks
            no_removal = {n: torch.zeros(len(labels), stages[n].num_nodes, dtype=torch.bool) for n in chains}
            acc.update(
                dict(rec.adjacency),
                logits,
                labels,
                removed={**no_removal, **rec.removed},
                macs=None if chains else rec.macs,
                router=dict(rec.router),
                images=images,
                reference_logits=ref_logits,
            )
            now = time.perf_counter()
            if progress and now - last > 10:
                last = now
                rate = acc.count / max(now - t0, 1e-9)
                print(f"[analyze] {acc.count} images ({rate:.0f} img/s)", file=sys.stderr, flush=True)
    finally:
        model.train(was_training)
    if acc.count == 0:
        raise ValueError("analysis: the data loader produced no images")
    return acc


@dataclass
class Loaded:
    """A checkpoint's model, ready for evaluation, and its evaluation split."""

    ckpt: dict[str, Any]
    cfg: Any  # RunConfig
    model: nn.Module
    dataset: Any
    info: Any
    loader: Any
    device: torch.device


def load_for_eval(
    checkpoint: str | Path,
    *,
    data_dir: str | None,
    split: str,
    max_images: int | None,
    batch_size: int | None,
    overrides: Sequence[str],
    use_ema: bool,
    device: str,
) -> Loaded:
    """Rebuild model and split from a training checkpoint, as ``dynwire eval`` does (classes and input
    size from its ``data_info``); ``max_images``: a fixed random subset (seeded by ``train.seed``)."""
    ckpt = load_checkpoint(checkpoint, map_location="cpu")
    if "config" not in ckpt or "model" not in ckpt:
        raise ValueError(f"checkpoint {str(checkpoint)!r}: no config/model entry; not a dynwire training checkpoint")
    raw = apply_overrides(stored_config(ckpt), list(overrides))
    raw["data"] = dict(raw.get("data") or {})
    if data_dir is not None:
        raw["data"]["root"] = str(data_dir)
    if batch_size is not None:
        raw["data"]["batch_size"] = int(batch_size)
    raw["data"]["val_subset"] = max_images
    cfg = config_from_dict(raw)
    dev = pick_device(device)
    saved = ckpt.get("data_info")
    ds, info = build_split(cfg, split, train=False, info=types.SimpleNamespace(**saved) if saved is not None else None)
    seed_everything(cfg.train.seed)  # as dynwire eval: the model is built as in training
    model = build_model(cfg, info)
    weights = ckpt["model"]
    if use_ema:
        if ckpt.get("ema") is None:
            raise ValueError(f"checkpoint {str(checkpoint)!r} has no EMA weights")
        weights = ckpt["ema"]["weights"]
    model.load_state_dict(weights)
    model.to(dev)
    loader = build_loader(ds, cfg.data.batch_size, train=False, num_workers=cfg.data.num_workers)
    return Loaded(ckpt, cfg, model, ds, info, loader, dev)


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@torch.no_grad()
def executed_macs(
    checkpoint: str | Path,
    *,
    data_dir: str | None = None,
    split: str = "val",
    max_images: int | None = None,
    device: str = "cpu",
    num_threads: int | None = 1,
) -> dict[str, Any]:
    """Mean multiply-adds executed per sample (``rec.macs``, removed nodes skipped) of a checkpoint's
    model over a split, with its top-1 on the same images as a check. Only the MAC total is kept."""
    with torch_threads(num_threads):
        ld = load_for_eval(
            checkpoint,
            data_dir=data_dir,
            split=split,
            max_images=max_images,
            batch_size=None,
            overrides=(),
            use_ema=False,
            device=device,
        )
        model = ld.model.eval()
        chains = [n for n, st in graph_stages(model).items() if st.edges.is_chain]
        if chains:
            raise ValueError(
                f"executed_macs: stages {chains} are chains (sequential wiring): rec.macs does not count their blocks"
            )
        total, lo, hi, n, correct = 0.0, math.inf, -math.inf, 0, 0
        t0 = time.perf_counter()
        for images, labels in ld.loader:
            with record_adjacency(model) as rec:
                logits = model(images.to(ld.device))
            m = rec.macs.double().cpu()
            total += float(m.sum())
            lo, hi = min(lo, float(m.min())), max(hi, float(m.max()))
            n += len(labels)
            correct += int((logits.argmax(1).cpu() == labels).sum())
    if n == 0:
        raise ValueError("executed_macs: the data loader produced no images")
    return {
        "executed_macs": total / n,
        "executed_macs_min": lo,
        "executed_macs_max": hi,
        "images": n,
        "top1": 100.0 * correct / n,
        "split": split,
        "checkpoint": str(checkpoint),
        "epoch": int(ld.ckpt.get("epoch", 0)),
        "seconds": round(time.perf_counter() - t0, 2),
    }

"""Statistics and figures of the learned connectivity (paper App. 6.5, Figs. 5-7).

``dynwire analyze CHECKPOINT --out DIR`` (or ``python -m dynwire.analysis.connectivity``) runs a
trained model over a dataset split inside :func:`dynwire.record_adjacency` and accumulates, in a
single streaming pass (nothing per sample is kept except a few samples for Fig. 7):

* per stage, the mean and standard deviation over the samples of every edge weight (Figs. 5, 6),
  for the weights actually used (after the Eq. 5 threshold) and for the raw router outputs;
* the per-class mean adjacency;
* the share of closed edges (an edge of the graph whose used weight is 0) and of removed nodes
  (``rec.removed``: blocks the evaluation executor skipped for the sample, Sec. 3.3), per stage,
  per edge and per node;
* the multiply-adds each sample executed (``rec.macs``) and the number of open edges per sample;
* a few samples per class and the most and least confident samples, drawn as graphs (Fig. 7);
* the paper's observations (2) (output-edge weight falls with topological order) and (4)
  (the standard deviation grows with order and with stage) as numbers: per-node means, least-squares
  slope and Spearman correlation.

It writes PNGs, ``analysis.json`` and ``analysis.md``. Convention (as in the paper's Fig. 2): in an
``N x N`` matrix, row ``j`` holds node ``j``'s input edges and column ``i`` node ``i``'s output
edges; node 0 is the stage's input node, node ``N-1`` its output node.
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import sys
import time
import types
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data import build_loader
from ..engine import build_model, build_split, config_from_dict, load_checkpoint, seed_everything
from ..engine.config import apply_overrides
from ..engine.distributed import pick_device
from ..graph.adjacency import record_adjacency
from ..graph.stage import GraphStage
from . import _stats

__all__ = [
    "StageStats",
    "SampleRecord",
    "ConnectivityAccumulator",
    "analyze_model",
    "analyze_checkpoint",
    "executed_macs",
    "write_report",
    "main_analyze",
]


# --------------------------------------------------------------------------- accumulation
class _Moments:
    """Streaming mean and M2 (sum of squared deviations) of ``(N, N)`` matrices (Chan et al.)."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.n = 0
        self.mean = np.zeros(shape, dtype=np.float64)
        self.m2 = np.zeros(shape, dtype=np.float64)

    def update(self, x: np.ndarray) -> None:
        nb = x.shape[0]
        if nb == 0:
            return
        mb = x.mean(axis=0)
        m2b = ((x - mb) ** 2).sum(axis=0)
        delta = mb - self.mean
        tot = self.n + nb
        self.mean = self.mean + delta * (nb / tot)
        self.m2 = self.m2 + m2b + delta**2 * (self.n * nb / tot)
        self.n = tot

    @property
    def std(self) -> np.ndarray:
        """Sample standard deviation (divisor ``n - 1``); zeros when ``n < 2``."""
        if self.n < 2:
            return np.zeros_like(self.mean)
        return np.sqrt(np.maximum(self.m2 / (self.n - 1), 0.0))


@dataclass
class StageStats:
    """Streaming statistics of one graph stage."""

    name: str
    index: int
    edge_mask: np.ndarray  # (N, N) bool: edges of the graph (row = receiver)
    num_classes: int
    used: _Moments = field(init=False)
    raw: _Moments = field(init=False)
    class_sum: np.ndarray = field(init=False)
    class_count: np.ndarray = field(init=False)
    closed_count: np.ndarray = field(init=False)  # (N, N) samples in which the edge was closed
    removed_count: np.ndarray = field(init=False)  # (N,) samples in which the node was removed
    has_raw: bool = False

    def __post_init__(self) -> None:
        n = self.num_nodes
        self.used = _Moments((n, n))
        self.raw = _Moments((n, n))
        self.class_sum = np.zeros((self.num_classes, n, n), dtype=np.float64)
        self.class_count = np.zeros(self.num_classes, dtype=np.int64)
        self.closed_count = np.zeros((n, n), dtype=np.int64)
        self.removed_count = np.zeros(n, dtype=np.int64)

    @property
    def num_nodes(self) -> int:
        return int(self.edge_mask.shape[0])

    @property
    def count(self) -> int:
        return self.used.n

    def update(self, adj: Tensor, raw: Tensor | None, labels: Tensor, removed: Tensor) -> tuple[Tensor, Tensor]:
        """Add a batch (``removed``: ``(B, N)`` bools, ``rec.removed[stage]``); returns the per-sample
        open-edge mask ``(B, N, N)`` and the removed nodes."""
        mask_t = torch.as_tensor(self.edge_mask, device=adj.device)
        a = adj.detach().float()
        x = a.cpu().double().numpy()
        self.used.update(x)
        if raw is not None:
            self.has_raw = True
            self.raw.update(raw.detach().cpu().double().numpy())
        lab = labels.cpu().numpy().astype(np.int64)
        valid = (lab >= 0) & (lab < self.num_classes)
        np.add.at(self.class_sum, lab[valid], x[valid])
        np.add.at(self.class_count, lab[valid], 1)
        closed = (a == 0) & mask_t.unsqueeze(0)
        self.closed_count += closed.sum(dim=0).cpu().numpy().astype(np.int64)
        removed = removed.to(torch.bool)
        if removed.shape != (a.shape[0], self.num_nodes):
            raise ValueError(
                f"stage {self.name!r}: removed has shape {tuple(removed.shape)}, expected {(a.shape[0], self.num_nodes)}"
            )
        self.removed_count += removed.sum(dim=0).cpu().numpy().astype(np.int64)
        return (~closed) & mask_t.unsqueeze(0), removed

    # ---------------------------------------------------------------- results
    def mean(self) -> np.ndarray:
        return np.where(self.edge_mask, self.used.mean, np.nan)

    def std(self) -> np.ndarray:
        return np.where(self.edge_mask, self.used.std, np.nan)

    def class_mean(self) -> np.ndarray:
        cnt = np.maximum(self.class_count, 1)[:, None, None]
        out = self.class_sum / cnt
        out[self.class_count == 0] = np.nan
        return np.where(self.edge_mask[None], out, np.nan)

    def closed_share(self) -> float:
        edges = int(self.edge_mask.sum())
        return float(self.closed_count.sum() / (edges * self.count)) if edges and self.count else float("nan")

    def removed_share_per_node(self) -> np.ndarray:
        return self.removed_count / max(self.count, 1)

    def node_order_stats(self) -> dict[str, Any]:
        """Observation (2) and (4) for this stage: per-node output/input edge mean and std vs order."""
        m, s, mask = self.used.mean, self.used.std, self.edge_mask
        n = self.num_nodes
        senders = [i for i in range(n) if mask[:, i].any()]
        receivers = [j for j in range(n) if mask[j, :].any()]
        out_mean = [float(m[mask[:, i], i].mean()) for i in senders]
        out_sum = [float(m[mask[:, i], i].sum()) for i in senders]
        out_std = [float(s[mask[:, i], i].mean()) for i in senders]
        in_mean = [float(m[j, mask[j, :]].mean()) for j in receivers]
        in_std = [float(s[j, mask[j, :]].mean()) for j in receivers]

        def trend(order: list[int], ys: list[float]) -> dict[str, Any]:
            return {
                "n_points": len(order),
                "slope_per_step": _num(_stats.linear_slope(order, ys)),
                "spearman": _num(_stats.spearman(order, ys)),
            }

        return {
            "senders": senders,
            "out_edge_mean": out_mean,
            "out_edge_sum": out_sum,
            "out_edge_std": out_std,
            "receivers": receivers,
            "in_edge_mean": in_mean,
            "in_edge_std": in_std,
            "out_mean_vs_order": trend(senders, out_mean),
            "out_std_vs_order": trend(senders, out_std),
            "in_std_vs_order": trend(receivers, in_std),
            "mean_edge_std": _num(float(s[mask].mean())) if mask.any() else None,
            "mean_edge_weight": _num(float(m[mask].mean())) if mask.any() else None,
        }


@dataclass
class SampleRecord:
    """One sample kept for Fig. 7."""

    index: int
    label: int
    pred: int
    confidence: float
    adjacency: dict[str, np.ndarray]  # stage -> (N, N) used weights
    removed: dict[str, np.ndarray]  # stage -> (N,) bool
    image: np.ndarray | None = None
    macs: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "label": self.label,
            "pred": self.pred,
            "confidence": self.confidence,
            "macs": self.macs,
            "adjacency": {k: _round_matrix(v) for k, v in self.adjacency.items()},
            "removed_nodes": {k: [int(i) for i in np.flatnonzero(v)] for k, v in self.removed.items()},
        }


class ConnectivityAccumulator:
    """Streaming statistics over batches of recorded adjacencies.

    Call :meth:`update` once per batch with what :func:`dynwire.record_adjacency` recorded (the
    ``(B, N, N)`` matrices, removed nodes and executed MACs of every stage), the logits and the
    labels. Memory is independent of the number of samples except for a few
    floats per sample (confidence, open-edge count, executed MACs) and the Fig. 7 samples.
    """

    def __init__(
        self,
        stage_masks: dict[str, np.ndarray],
        num_classes: int,
        *,
        per_class: int = 2,
        top_k: int = 4,
        keep_images: bool = True,
    ) -> None:
        self.stages = {
            name: StageStats(name, i, np.asarray(mask, dtype=bool), num_classes)
            for i, (name, mask) in enumerate(stage_masks.items())
        }
        self.num_classes = num_classes
        self.per_class, self.top_k, self.keep_images = per_class, top_k, keep_images
        self.count = 0
        self.correct = 0
        self.loss_sum = 0.0
        self.confidences: list[float] = []
        self.correct_flags: list[bool] = []
        self.open_edges: list[int] = []
        self.macs: list[float] = []
        self.class_samples: dict[int, list[SampleRecord]] = {}
        self._most: list[tuple[float, int, SampleRecord]] = []  # min-heap on confidence
        self._least: list[tuple[float, int, SampleRecord]] = []  # min-heap on -confidence

    def update(
        self,
        adjacency: dict[str, Tensor],
        logits: Tensor,
        labels: Tensor,
        *,
        removed: dict[str, Tensor],
        macs: Tensor | None,
        router: dict[str, Tensor] | None = None,
        images: Tensor | None = None,
    ) -> None:
        b = labels.shape[0]
        logits = logits.detach().float().cpu()
        labels = labels.detach().cpu().long()
        prob = logits.softmax(dim=1)
        conf, pred = prob.max(dim=1)
        self.loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
        hit = pred == labels
        self.correct += int(hit.sum())
        open_total = torch.zeros(b, dtype=torch.long)
        removed_b: dict[str, Tensor] = {}
        for name, st in self.stages.items():
            if name not in adjacency or name not in removed:
                raise KeyError(f"nothing recorded for stage {name!r} (recorded: {list(adjacency)})")
            raw = router.get(name) if router is not None else None
            open_mask, rem = st.update(adjacency[name], raw, labels, removed[name])
            open_total += open_mask.sum(dim=(1, 2)).cpu()
            removed_b[name] = rem.cpu()
        macs_list = None if macs is None else [float(v) for v in macs.detach().cpu().reshape(-1).tolist()]
        if macs_list is not None:
            if len(macs_list) != b:
                raise ValueError(f"rec.macs has {len(macs_list)} values for a batch of {b}")
            self.macs.extend(macs_list)
        self.confidences.extend(conf.tolist())
        self.correct_flags.extend(hit.tolist())
        self.open_edges.extend(int(v) for v in open_total.tolist())

        for k in range(b):
            idx = self.count + k
            c, lab = float(conf[k]), int(labels[k])
            want_class = len(self.class_samples.get(lab, [])) < self.per_class
            want_most = self.top_k > 0 and (len(self._most) < self.top_k or c > self._most[0][0])
            want_least = self.top_k > 0 and (len(self._least) < self.top_k or -c > self._least[0][0])
            if not (want_class or want_most or want_least):
                continue
            rec = SampleRecord(
                index=idx,
                label=lab,
                pred=int(pred[k]),
                confidence=c,
                adjacency={n: adjacency[n][k].detach().float().cpu().numpy() for n in self.stages},
                removed={n: removed_b[n][k].numpy().astype(bool) for n in self.stages},
                image=images[k].detach().float().cpu().numpy() if (images is not None and self.keep_images) else None,
                macs=macs_list[k] if macs_list is not None else None,
            )
            if want_class:
                self.class_samples.setdefault(lab, []).append(rec)
            if want_most:
                _push(self._most, (c, idx, rec), self.top_k)
            if want_least:
                _push(self._least, (-c, idx, rec), self.top_k)
        self.count += b

    @property
    def most_confident(self) -> list[SampleRecord]:
        return [r for _, _, r in sorted(self._most, key=lambda t: (-t[0], t[1]))]

    @property
    def least_confident(self) -> list[SampleRecord]:
        return [r for _, _, r in sorted(self._least, key=lambda t: (-t[0], t[1]))]

    # ---------------------------------------------------------------- summary
    def summary(self, class_names: Sequence[str] | None = None) -> dict[str, Any]:
        """Everything except the figures, as a JSON-ready dict."""
        names = list(class_names) if class_names else [str(c) for c in range(self.num_classes)]
        stages: dict[str, Any] = {}
        orders = {}
        for name, st in self.stages.items():
            orders[name] = st.node_order_stats()
            stages[name] = {
                "index": st.index,
                "num_nodes": st.num_nodes,
                "num_edges": int(st.edge_mask.sum()),
                "samples": st.count,
                "mean": _round_matrix(st.mean()),
                "std": _round_matrix(st.std()),
                "router_mean": _round_matrix(np.where(st.edge_mask, st.raw.mean, np.nan)) if st.has_raw else None,
                "router_std": _round_matrix(np.where(st.edge_mask, st.raw.std, np.nan)) if st.has_raw else None,
                "closed_edge_share": _num(st.closed_share()),
                "closed_share_per_edge": _round_matrix(
                    np.where(st.edge_mask, st.closed_count / max(st.count, 1), np.nan)
                ),
                "removed_node_share": _num(float(st.removed_share_per_node().mean())),
                "removed_share_per_node": [_num(float(v)) for v in st.removed_share_per_node()],
                "per_class_mean": {
                    names[c] if c < len(names) else str(c): _round_matrix(m)
                    for c, m in enumerate(st.class_mean())
                    if st.class_count[c] > 0
                },
                "node_order": orders[name],
            }
        stage_names = list(self.stages)
        stage_std = [orders[n]["mean_edge_std"] for n in stage_names]
        valid = [(i, v) for i, v in enumerate(stage_std) if v is not None]
        pooled_x, pooled_out, pooled_std = [], [], []
        for n in stage_names:
            o = orders[n]
            last = max(max(o["senders"], default=0), 1)
            pooled_x += [i / last for i in o["senders"]]
            pooled_out += o["out_edge_mean"]
            pooled_std += o["out_edge_std"]
        obs = {
            "obs2_out_weight_vs_order": {
                "claim": "output edges of nodes early in topological order have larger weights (negative trend)",
                "per_stage": {n: orders[n]["out_mean_vs_order"] for n in stage_names},
                "pooled_relative_order_spearman": _num(_stats.spearman(pooled_x, pooled_out)),
            },
            "obs4_std_vs_order": {
                "claim": "edges of nodes late in topological order vary more across samples (positive trend)",
                "per_stage_out_edges": {n: orders[n]["out_std_vs_order"] for n in stage_names},
                "per_stage_in_edges": {n: orders[n]["in_std_vs_order"] for n in stage_names},
                "pooled_relative_order_spearman": _num(_stats.spearman(pooled_x, pooled_std)),
            },
            "obs4_std_vs_stage": {
                "claim": "edges in deeper stages vary more across samples (positive trend)",
                "mean_edge_std_per_stage": dict(zip(stage_names, stage_std)),
                "spearman": _num(_stats.spearman([i for i, _ in valid], [v for _, v in valid])),
                "slope_per_stage": _num(_stats.linear_slope([i for i, _ in valid], [v for _, v in valid])),
            },
        }
        n = max(self.count, 1)
        out: dict[str, Any] = {
            "images": self.count,
            "top1": 100.0 * self.correct / n,
            "loss": self.loss_sum / n,
            "class_names": names,
            "stages": stages,
            "observations": obs,
            "open_edges_per_sample": _distribution(self.open_edges),
            "open_edges_vs_confidence_spearman": _num(_stats.spearman(self.confidences, self.open_edges))
            if self.count > 1
            else None,
            "executed_macs": None,
        }
        if self.macs:
            correct = [m for m, h in zip(self.macs, self.correct_flags) if h]
            wrong = [m for m, h in zip(self.macs, self.correct_flags) if not h]
            out["executed_macs"] = {
                **_distribution(self.macs),
                "mean_correct": _num(_stats.mean(correct)),
                "mean_wrong": _num(_stats.mean(wrong)),
                "vs_confidence_spearman": _num(_stats.spearman(self.confidences, self.macs)),
            }
        out["samples"] = {
            "per_class": {names[c]: [r.to_dict() for r in rs] for c, rs in sorted(self.class_samples.items())},
            "most_confident": [r.to_dict() for r in self.most_confident],
            "least_confident": [r.to_dict() for r in self.least_confident],
        }
        return out


def _push(heap: list, item: tuple, k: int) -> None:
    if len(heap) < k:
        heapq.heappush(heap, item)
    else:
        heapq.heapreplace(heap, item)


def _num(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(float(x)) else float(x)


def _round_matrix(m: np.ndarray, digits: int = 5) -> list:
    return [[None if not math.isfinite(v) else round(float(v), digits) for v in row] for row in np.asarray(m)]


def _distribution(xs: Sequence[float]) -> dict[str, Any]:
    if not xs:
        return {"n": 0}
    a = np.asarray(xs, dtype=np.float64)
    q = np.percentile(a, [0, 5, 25, 50, 75, 95, 100])
    return {
        "n": int(a.size),
        "mean": float(a.mean()),
        "std": float(a.std(ddof=1)) if a.size > 1 else 0.0,
        "min": float(q[0]),
        "p5": float(q[1]),
        "p25": float(q[2]),
        "median": float(q[3]),
        "p75": float(q[4]),
        "p95": float(q[5]),
        "max": float(q[6]),
    }


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
) -> ConnectivityAccumulator:
    """Run ``model`` (in eval mode) over ``loader`` and return the filled accumulator."""
    device = torch.device(device)
    stages = graph_stages(model)
    masks = {n: s.edges.edge_mask_matrix().numpy() > 0 for n, s in stages.items()}
    chains = [n for n, s in stages.items() if s.edges.is_chain]
    acc = ConnectivityAccumulator(masks, num_classes, per_class=per_class, top_k=top_k)
    was_training = model.training
    model.eval()
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
class _Loaded:
    """A checkpoint's model, ready for evaluation, and its evaluation split."""

    ckpt: dict[str, Any]
    cfg: Any  # RunConfig
    model: nn.Module
    dataset: Any
    info: Any
    loader: Any
    device: torch.device


def _load_for_eval(
    checkpoint: str | Path,
    *,
    data_dir: str | None,
    split: str,
    max_images: int | None,
    batch_size: int | None,
    overrides: Sequence[str],
    use_ema: bool,
    device: str,
) -> _Loaded:
    """Rebuild model and split from a training checkpoint, as ``dynwire eval`` does (classes and input
    size from its ``data_info``); ``max_images``: a fixed random subset (seeded by ``train.seed``)."""
    ckpt = load_checkpoint(checkpoint, map_location="cpu")
    if "config" not in ckpt or "model" not in ckpt:
        raise ValueError(f"checkpoint {str(checkpoint)!r}: no config/model entry; not a dynwire training checkpoint")
    raw = apply_overrides(ckpt["config"], list(overrides))
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
    return _Loaded(ckpt, cfg, model, ds, info, loader, dev)


@contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
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
    with _torch_threads(num_threads):
        ld = _load_for_eval(
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


def analyze_checkpoint(
    checkpoint: str | Path,
    out_dir: str | Path,
    *,
    data_dir: str | None = None,
    split: str = "val",
    max_images: int | None = None,
    batch_size: int | None = None,
    per_class: int = 2,
    top_k: int = 4,
    device: str = "auto",
    overrides: Sequence[str] = (),
    use_ema: bool = False,
    num_threads: int | None = None,
    plots: bool = True,
) -> dict[str, Any]:
    """Rebuild the model and evaluation split from a training checkpoint, analyze, write the report.

    ``max_images`` takes a fixed random subset of the split (seeded by the run's ``train.seed``,
    as ``data.val_subset`` does). Returns the ``analysis.json`` dict.
    """
    ld = _load_for_eval(
        checkpoint,
        data_dir=data_dir,
        split=split,
        max_images=max_images,
        batch_size=batch_size,
        overrides=overrides,
        use_ema=use_ema,
        device=device,
    )
    with _torch_threads(num_threads if num_threads is not None else ld.cfg.train.num_threads):
        t0 = time.perf_counter()
        acc = analyze_model(
            ld.model,
            ld.loader,
            num_classes=int(ld.info.num_classes),
            device=ld.device,
            per_class=per_class,
            top_k=top_k,
            progress=True,
        )
        seconds = time.perf_counter() - t0
    ckpt, cfg, ds = ld.ckpt, ld.cfg, ld.dataset
    class_names = getattr(ds, "classes", None)
    meta = {
        "checkpoint": str(checkpoint),
        "epoch": int(ckpt.get("epoch", 0)),
        "global_step": int(ckpt.get("global_step", 0)),
        "model": cfg.model.name,
        "wiring": cfg.model.wiring,
        "wiring_kwargs": dict(cfg.model.wiring_kwargs),
        "dataset": cfg.data.name,
        "split": split,
        "max_images": max_images,
        "subset_seed": cfg.train.seed,
        "weights": "ema" if use_ema else "model",
        "overrides": list(overrides),
        "seconds": round(seconds, 2),
    }
    return write_report(acc, out_dir, meta=meta, class_names=class_names, plots=plots)


# --------------------------------------------------------------------------- report
def write_report(
    acc: ConnectivityAccumulator,
    out_dir: str | Path,
    *,
    meta: dict[str, Any] | None = None,
    class_names: Sequence[str] | None = None,
    plots: bool = True,
) -> dict[str, Any]:
    """Write ``analysis.json``, ``analysis.md`` and (``plots=True``) the PNGs into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = {"meta": dict(meta or {}), **acc.summary(class_names)}
    figures: dict[str, str] = {}
    if plots:
        from . import _plots

        figures = _plots.connectivity_figures(acc, summary, out)
    summary["figures"] = figures
    (out / "analysis.json").write_text(json.dumps(summary, indent=1, allow_nan=False) + "\n", encoding="utf-8")
    (out / "analysis.md").write_text(_markdown(summary), encoding="utf-8")
    return summary


def _fmt(x: Any, spec: str = ".3f") -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float) and not math.isfinite(x):
        return "n/a"
    return format(x, spec)


def _markdown(s: dict[str, Any]) -> str:
    meta = s.get("meta", {})
    lines = ["# Connectivity analysis", ""]
    if meta:
        lines += [
            f"Checkpoint `{meta.get('checkpoint')}` (epoch {meta.get('epoch')}): `{meta.get('model')}`, "
            f"wiring `{meta.get('wiring')}` {meta.get('wiring_kwargs') or ''}, {meta.get('dataset')} "
            f"split `{meta.get('split')}`.",
            "",
        ]
    lines += [
        f"{s['images']} images, top-1 {s['top1']:.2f}%, loss {s['loss']:.4f}. Convention: row j = input edges "
        "of node j, column i = output edges of node i; node 0 is the stage's input node, the last node its "
        "output node. Weights are those used in the aggregation (after the Eq. 5 threshold).",
        "",
        "## Per stage",
        "",
        "| stage | nodes | edges | mean weight | mean std | closed edges | removed nodes | removed share by node |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for name, st in s["stages"].items():
        no = st["node_order"]
        lines.append(
            f"| {name} | {st['num_nodes']} | {st['num_edges']} | {_fmt(no['mean_edge_weight'])} | "
            f"{_fmt(no['mean_edge_std'], '.4f')} | {_fmt(_pct(st['closed_edge_share']), '.2f')}% | "
            f"{_fmt(_pct(st['removed_node_share']), '.2f')}% | "
            f"{', '.join(_fmt(v, '.3f') for v in st['removed_share_per_node'])} |"
        )
    lines += [
        "",
        "Removed nodes (`rec.removed`): blocks none of whose input edges was open for the sample, which the "
        "evaluation executor skipped (Sec. 3.3); the input node and the output node are never removed.",
        "",
        "## Observation (2): output-edge weight vs topological order",
        "",
        "Paper: nodes early in the topological order have larger output-edge weights (expect a negative trend).",
        "",
        "| stage | mean output-edge weight by node (0, 1, ...) | slope / step | Spearman |",
        "| --- | --- | ---: | ---: |",
    ]
    for name, st in s["stages"].items():
        no = st["node_order"]
        tr = no["out_mean_vs_order"]
        vals = ", ".join(f"{v:.3f}" for v in no["out_edge_mean"])
        lines.append(f"| {name} | {vals} | {_fmt(tr['slope_per_step'], '+.4f')} | {_fmt(tr['spearman'], '+.2f')} |")
    o2 = s["observations"]["obs2_out_weight_vs_order"]
    lines += [
        "",
        f"Pooled over stages (order relative to the last sender): Spearman "
        f"{_fmt(o2['pooled_relative_order_spearman'], '+.2f')}.",
        "",
        "## Observation (4): standard deviation vs order and stage",
        "",
        "Paper: edges of nodes late in the order, and edges in deeper stages, vary more across samples.",
        "",
        "| stage | mean std, output edges by sender | Spearman (senders) | mean std, input edges by receiver "
        "| Spearman (receivers) | mean edge std |",
        "| --- | --- | ---: | --- | ---: | ---: |",
    ]
    for name, st in s["stages"].items():
        no = st["node_order"]
        lines.append(
            f"| {name} | {', '.join(f'{v:.4f}' for v in no['out_edge_std'])} | "
            f"{_fmt(no['out_std_vs_order']['spearman'], '+.2f')} | "
            f"{', '.join(f'{v:.4f}' for v in no['in_edge_std'])} | "
            f"{_fmt(no['in_std_vs_order']['spearman'], '+.2f')} | {_fmt(no['mean_edge_std'], '.4f')} |"
        )
    o4 = s["observations"]["obs4_std_vs_stage"]
    lines += [
        "",
        f"Across stages: Spearman {_fmt(o4['spearman'], '+.2f')}, slope {_fmt(o4['slope_per_stage'], '+.4f')} per "
        "stage (few points: a sign, not a test).",
        "",
        "## Per-sample cost",
        "",
    ]
    oe = s["open_edges_per_sample"]
    if oe.get("n"):
        lines.append(
            f"Open edges per sample (all stages): mean {oe['mean']:.2f}, min {oe['min']:.0f}, median "
            f"{oe['median']:.0f}, max {oe['max']:.0f}; Spearman with confidence "
            f"{_fmt(s['open_edges_vs_confidence_spearman'], '+.2f')}."
        )
    em = s.get("executed_macs")
    if em:
        lines.append(
            f"Executed MACs per sample (`rec.macs`): mean {em['mean'] / 1e6:.3f} M, p5 {em['p5'] / 1e6:.3f} M, "
            f"median {em['median'] / 1e6:.3f} M, p95 {em['p95'] / 1e6:.3f} M; correct {_fmt(_mega(em['mean_correct']))} M"
            f" vs wrong {_fmt(_mega(em['mean_wrong']))} M; Spearman with confidence "
            f"{_fmt(em['vs_confidence_spearman'], '+.2f')}."
        )
    figs = s.get("figures") or {}
    if figs:
        lines += ["", "## Figures", ""]
        for key, path in figs.items():
            lines += [f"**{_FIG_TITLES.get(key, key)}**", "", f"![{key}]({path})", ""]
    return "\n".join(lines).rstrip() + "\n"


_FIG_TITLES = {
    "fig5_mean": "Fig. 5: mean edge weight per stage",
    "fig6_std": "Fig. 6: standard deviation of the edge weights per stage",
    "router_mean": "Mean raw router weight (before the threshold)",
    "closed_share": "Share of samples in which each edge is closed",
    "per_class_mean": "Per-class mean adjacency",
    "order_trends": "Observations (2) and (4): per-node means vs topological order",
    "fig7_per_class": "Fig. 7: connectivity of individual samples, per class",
    "fig7_most_confident": "Fig. 7: most confident samples",
    "fig7_least_confident": "Fig. 7: least confident samples",
    "open_edges_hist": "Open edges per sample",
    "macs_hist": "Executed MACs per sample",
}


def _pct(x: float | None) -> float | None:
    return None if x is None else 100.0 * x


def _mega(x: float | None) -> float | None:
    return None if x is None else x / 1e6


# --------------------------------------------------------------------------- CLI
ANALYZE_DESCRIPTION = "Statistics and figures of a trained model's learned connectivity (paper App. 6.5, Figs. 5-7)."


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of ``dynwire analyze`` (shared by :func:`build_parser` and :mod:`dynwire.cli`)."""
    p.add_argument("checkpoint", help="a training checkpoint (last.pt / best.pt)")
    p.add_argument("--out", required=True, help="output folder for PNGs, analysis.json and analysis.md")
    p.add_argument("--data-dir", help="dataset folder (overrides the checkpoint's data.root)")
    p.add_argument("--split", default="val", help="dataset split (default: val, the test split for small datasets)")
    p.add_argument("--max-images", type=int, help="analyze a fixed random subset of this many images")
    p.add_argument("--batch-size", type=int, help="evaluation batch size (default: the run's)")
    p.add_argument("--per-class", type=int, default=2, help="samples per class drawn in Fig. 7 (default 2)")
    p.add_argument("--top-k", type=int, default=4, help="most/least confident samples drawn (default 4)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--num-threads", type=int, help="torch CPU threads (default: the run's train.num_threads)")
    p.add_argument("--ema", action="store_true", help="analyze the EMA weights")
    p.add_argument("--no-plots", action="store_true", help="write only analysis.json and analysis.md")
    p.add_argument(
        "--set",
        dest="overrides",
        metavar="KEY=VALUE",
        nargs="+",
        action="extend",
        default=[],
        help="override the checkpoint's config, e.g. --set model.wiring_kwargs.eval_gate=soft",
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dynwire analyze", description=ANALYZE_DESCRIPTION)
    add_arguments(p)
    return p


def run_analyze(args: argparse.Namespace) -> int:
    """Run ``dynwire analyze`` for parsed arguments; bad input raises ``ValueError``/``FileNotFoundError``."""
    for flag in ("max_images", "batch_size", "num_threads"):
        v = getattr(args, flag)
        if v is not None and v < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1")
    for flag in ("per_class", "top_k"):
        if getattr(args, flag) < 0:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 0")
    try:
        s = analyze_checkpoint(
            args.checkpoint,
            args.out,
            data_dir=args.data_dir,
            split=args.split,
            max_images=args.max_images,
            batch_size=args.batch_size,
            per_class=args.per_class,
            top_k=args.top_k,
            device=args.device,
            overrides=args.overrides,
            use_ema=args.ema,
            num_threads=args.num_threads,
            plots=not args.no_plots,
        )
    except KeyError as exc:  # a stage without a record: report it like other bad input
        raise ValueError(str(exc)) from None
    closed = ", ".join(f"{n} {_fmt(_pct(st['closed_edge_share']), '.2f')}%" for n, st in s["stages"].items())
    removed = ", ".join(f"{n} {_fmt(_pct(st['removed_node_share']), '.2f')}%" for n, st in s["stages"].items())
    print(f"analyzed {s['images']} images: top-1 {s['top1']:.2f}%; closed edges: {closed}; removed nodes: {removed}")
    em = s.get("executed_macs")
    if em:
        print(
            f"executed MACs per sample: mean {em['mean'] / 1e6:.3f} M (min {em['min'] / 1e6:.3f}, max {em['max'] / 1e6:.3f})"
        )
    print(f"wrote {Path(args.out) / 'analysis.md'}")
    return 0


def main_analyze(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m dynwire.analysis.connectivity`` (same as ``dynwire analyze``)."""
    args = build_parser().parse_args(argv)
    try:
        return run_analyze(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"dynwire analyze: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main_analyze())

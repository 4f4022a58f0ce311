"""Step 2 of :mod:`dynwire.analysis.connectivity`, the statistics: per-stage edge-weight moments and samples.

:class:`ConnectivityAccumulator` takes what :func:`dynwire.record_adjacency` recorded, batch by
batch, into per-stage :class:`StageStats` (mean and standard deviation of every edge weight,
per-class means, closed edges, removed nodes) and keeps a few :class:`SampleRecord` samples for
Fig. 7; :meth:`ConnectivityAccumulator.summary` turns them into a JSON-ready dict.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _stats


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
        self.losses: list[float] = []  # per-sample cross-entropy of the analyzed model
        self.labels: list[int] = []
        self.reference_losses: list[float] = []  # per-sample loss of a reference model (difficulty)
        self.class_samples: dict[int, list[SampleRecord]] = {}
        self._most: list[tuple[float, int, SampleRecord]] = []  # min-heap on confidence
        self._least: list[tuple[float, int, SampleRecord]] = []  # min-heap on -confidence
        self._cheap: list[tuple[float, int, SampleRecord]] = []  # min-heap on -MACs
        self._dear: list[tuple[float, int, SampleRecord]] = []  # min-heap on MACs

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
        reference_logits: Tensor | None = None,
    ) -> None:
        b = labels.shape[0]
        logits = logits.detach().float().cpu()
        labels = labels.detach().cpu().long()
        prob = logits.softmax(dim=1)
        conf, pred = prob.max(dim=1)
        losses = F.cross_entropy(logits, labels, reduction="none")
        self.loss_sum += float(losses.sum())
        self.losses.extend(losses.tolist())
        self.labels.extend(labels.tolist())
        if reference_logits is not None:
            if reference_logits.shape != logits.shape:
                raise ValueError(
                    f"reference logits have shape {tuple(reference_logits.shape)}, the model's {tuple(logits.shape)}:"
                    " the reference must classify the same classes"
                )
            ref = F.cross_entropy(reference_logits.detach().float().cpu(), labels, reduction="none")
            self.reference_losses.extend(ref.tolist())
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
            m = macs_list[k] if macs_list is not None else None
            want_cheap = m is not None and self.top_k > 0 and (len(self._cheap) < self.top_k or -m > self._cheap[0][0])
            want_dear = m is not None and self.top_k > 0 and (len(self._dear) < self.top_k or m > self._dear[0][0])
            if not (want_class or want_most or want_least or want_cheap or want_dear):
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
            if want_cheap:
                _push(self._cheap, (-m, idx, rec), self.top_k)
            if want_dear:
                _push(self._dear, (m, idx, rec), self.top_k)
        self.count += b

    @property
    def most_confident(self) -> list[SampleRecord]:
        return [r for _, _, r in sorted(self._most, key=lambda t: (-t[0], t[1]))]

    @property
    def least_confident(self) -> list[SampleRecord]:
        return [r for _, _, r in sorted(self._least, key=lambda t: (-t[0], t[1]))]

    @property
    def cheapest(self) -> list[SampleRecord]:
        """The samples that executed the fewest MACs, cheapest first."""
        return [r for _, _, r in sorted(self._cheap, key=lambda t: (-t[0], t[1]))]

    @property
    def most_expensive(self) -> list[SampleRecord]:
        """The samples that executed the most MACs, most expensive first."""
        return [r for _, _, r in sorted(self._dear, key=lambda t: (-t[0], t[1]))]

    def _any_removed(self) -> bool:
        return any(bool(st.removed_count.any()) for st in self.stages.values())

    def compute_summary(self, names: Sequence[str]) -> dict[str, Any] | None:
        """Per-sample compute: the executed-MAC distribution, whether removal is per-sample or static,
        its rank correlation with difficulty (own loss and confidence, a reference model's loss) and
        its mean per class. ``None`` without recorded MACs."""
        if not self.macs:
            return None
        correct = [m for m, h in zip(self.macs, self.correct_flags) if h]
        wrong = [m for m, h in zip(self.macs, self.correct_flags) if not h]
        dist = _distribution(self.macs)
        distinct = len({round(m) for m in self.macs})
        per_class: dict[str, Any] = {}
        for c in range(self.num_classes):
            ms = [m for m, lab in zip(self.macs, self.labels) if lab == c]
            if ms:
                per_class[names[c] if c < len(names) else str(c)] = {"n": len(ms), "mean": float(np.mean(ms))}

        def rank(ys: Sequence[float]) -> float | None:
            return _num(_stats.spearman(self.macs, ys)) if len(ys) == len(self.macs) > 1 else None

        return {
            **dist,
            "cv": _num(dist["std"] / dist["mean"]) if dist["mean"] else None,
            "distinct_values": distinct,
            # "none": nothing removed anywhere; "static": the same MACs for every sample; else per-sample
            "removal": "per-sample" if distinct > 1 else ("static" if self._any_removed() else "none"),
            "mean_correct": _num(_stats.mean(correct)),
            "mean_wrong": _num(_stats.mean(wrong)),
            "vs_confidence_spearman": rank(self.confidences),
            "vs_loss_spearman": rank(self.losses),
            "vs_reference_loss_spearman": rank(self.reference_losses) if self.reference_losses else None,
            "per_class_mean": per_class,
        }

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
        out["executed_macs"] = self.compute_summary(names)
        out["samples"] = {
            "per_class": {names[c]: [r.to_dict() for r in rs] for c, rs in sorted(self.class_samples.items())},
            "most_confident": [r.to_dict() for r in self.most_confident],
            "least_confident": [r.to_dict() for r in self.least_confident],
            "cheapest": [r.to_dict() for r in self.cheapest],
            "most_expensive": [r.to_dict() for r in self.most_expensive],
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

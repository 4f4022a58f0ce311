"""The figures of :mod:`dynwire.analysis.connectivity`'s report (matplotlib, headless Agg backend)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .._plots import pyplot

if TYPE_CHECKING:  # pragma: no cover
    from .stats import ConnectivityAccumulator, SampleRecord

__all__ = ["connectivity_figures", "heatmaps", "draw_sample_graph"]


def heatmaps(
    mats: dict[str, np.ndarray],
    path: Path,
    *,
    title: str,
    cmap: str = "Blues",
    vmin: float | None = 0.0,
    vmax: float | None = None,
    fmt: str = ".2f",
) -> None:
    """One ``N x N`` heatmap per stage (NaN = no such edge), values written in the cells when small."""
    plt = pyplot()
    k = len(mats)
    fig, axes = plt.subplots(1, k, figsize=(3.4 * k + 0.6, 3.6), squeeze=False)
    finite = [m[np.isfinite(m)] for m in mats.values()]
    top = vmax if vmax is not None else max((float(f.max()) for f in finite if f.size), default=1.0)
    top = top if top > 0 else 1.0
    im = None
    for ax, (name, m) in zip(axes[0], mats.items()):
        n = m.shape[0]
        im = ax.imshow(np.ma.masked_invalid(m), cmap=cmap, vmin=vmin, vmax=top)
        ax.set_title(f"{name} ({n} nodes)", fontsize=10)
        ax.set_xlabel("from node i (output edges)", fontsize=8)
        ax.set_ylabel("to node j (input edges)", fontsize=8)
        step = max(1, n // 8)
        ax.set_xticks(range(0, n, step))
        ax.set_yticks(range(0, n, step))
        ax.tick_params(labelsize=7)
        if n <= 12:
            for j in range(n):
                for i in range(n):
                    v = m[j, i]
                    if math.isfinite(v):
                        ax.text(
                            i,
                            j,
                            format(v, fmt),
                            ha="center",
                            va="center",
                            fontsize=6 if n > 6 else 8,
                            color="white" if v > 0.6 * top else "black",
                        )
    fig.suptitle(title, fontsize=11)
    if im is not None:
        fig.colorbar(im, ax=list(axes[0]), shrink=0.8)
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)


def _sample_graph(sample: SampleRecord, masks: dict[str, np.ndarray]):
    """The sample's stage graphs chained into one networkx DAG, with a layered layout."""
    import networkx as nx

    g = nx.DiGraph()
    prev_out = None
    for s, (name, mask) in enumerate(masks.items()):
        n = mask.shape[0]
        for k in range(n):
            g.add_node((s, k), stage=name)
        for j in range(n):
            for i in range(n):
                if mask[j, i]:
                    g.add_edge((s, i), (s, j), weight=float(sample.adjacency[name][j, i]), link=False)
        if prev_out is not None:
            g.add_edge(prev_out, (s, 0), weight=1.0, link=True)
        prev_out = (s, n - 1)
    # Layers = topological generations (a complete DAG is a chain of single-node layers).
    for layer, nodes in enumerate(nx.topological_generations(g)):
        for v in nodes:
            g.nodes[v]["layer"] = layer
    pos = nx.multipartite_layout(g, subset_key="layer", align="vertical", scale=1.0)
    return g, pos


def draw_sample_graph(ax: Any, sample: SampleRecord, masks: dict[str, np.ndarray]) -> None:
    """Fig. 7 panel: edge width = used weight, closed edges dashed grey, removed nodes grey."""
    import networkx as nx

    cmap = pyplot().get_cmap("Blues")
    g, pos = _sample_graph(sample, masks)
    stage_names = list(masks)
    removed = {(s, k) for s, n in enumerate(stage_names) for k in np.flatnonzero(sample.removed[n])}
    for u, v, d in g.edges(data=True):
        if d["link"]:
            style, color, width, rad = "solid", "0.55", 1.0, 0.0
        else:
            w = d["weight"]
            span = v[1] - u[1]
            rad = 0.0 if span == 1 else -0.45
            if w == 0.0:
                style, color, width = "dashed", "0.75", 0.7
            else:
                wc = min(max(w, 0.0), 1.0)
                style, color, width = "solid", cmap(0.35 + 0.65 * wc), 0.4 + 3.2 * wc
        nx.draw_networkx_edges(
            g,
            pos,
            edgelist=[(u, v)],
            ax=ax,
            width=width,
            style=style,
            edge_color=color,
            arrows=True,
            arrowsize=6,
            connectionstyle=f"arc3,rad={rad}",
            node_size=90,
        )
    colors = []
    for v in g.nodes:
        n = masks[stage_names[v[0]]].shape[0]
        if v in removed:
            colors.append("0.85")
        elif v[1] in (0, n - 1):
            colors.append("#f2a541")
        else:
            colors.append("#6fa8dc")
    nx.draw_networkx_nodes(g, pos, ax=ax, node_size=90, node_color=colors, edgecolors="0.3", linewidths=0.6)
    labels = {v: ("o" if v[1] == masks[stage_names[v[0]]].shape[0] - 1 else str(v[1])) for v in g.nodes}
    nx.draw_networkx_labels(g, pos, labels=labels, ax=ax, font_size=5)
    ax.set_axis_off()
    xs = sorted({round(float(p[0]), 6) for p in pos.values()})
    ys = [float(p[1]) for p in pos.values()]
    step = (xs[-1] - xs[0]) / max(len(xs) - 1, 1) if xs else 0.1
    longest = max((v[1] - u[1] for u, v, d in g.edges(data=True) if not d["link"]), default=1)
    arc = 0.5 * 0.45 * longest * step  # height of the highest arc (arc3: rad * chord / 2)
    ax.set_ylim(min(ys) - 0.6 * step, max(ys) + arc + 0.6 * step)
    ax.margins(x=0.03)


def _sample_title(sample: SampleRecord, class_names: Sequence[str]) -> tuple[str, str]:
    def cname(c: int) -> str:
        return class_names[c] if 0 <= c < len(class_names) else str(c)

    ok = sample.label == sample.pred
    extra = f", {sample.macs / 1e6:.2f}M MACs" if sample.macs is not None else ""
    text = f"#{sample.index} {cname(sample.label)}" + ("" if ok else f" -> {cname(sample.pred)}")
    return f"{text} (p={sample.confidence:.2f}{extra})", ("black" if ok else "#b00020")


def sample_grid(
    rows: list[list[SampleRecord]],
    masks: dict[str, np.ndarray],
    path: Path,
    *,
    title: str,
    class_names: Sequence[str],
    row_labels: Sequence[str] | None = None,
) -> None:
    """A grid of Fig. 7 panels, each with the input image on its left."""
    plt = pyplot()
    ncols = max((len(r) for r in rows), default=1)
    nodes = sum(m.shape[0] for m in masks.values())
    gw = min(max(2.8, 0.33 * nodes), 9.0)
    fig = plt.figure(figsize=(ncols * (gw + 0.9), 1.1 * len(rows) + 0.6))
    gs = fig.add_gridspec(len(rows), 2 * ncols, width_ratios=[0.9, gw] * ncols, wspace=0.05, hspace=0.5)
    for r, samples in enumerate(rows):
        for c, smp in enumerate(samples):
            ax_img = fig.add_subplot(gs[r, 2 * c])
            ax_g = fig.add_subplot(gs[r, 2 * c + 1])
            if smp.image is not None:
                img = smp.image
                if img.ndim == 3 and img.shape[0] in (1, 3):
                    img = img[0] if img.shape[0] == 1 else np.transpose(img, (1, 2, 0))
                if img.ndim == 3:
                    lo, hi = float(img.min()), float(img.max())
                    img = (img - lo) / (hi - lo + 1e-12)
                ax_img.imshow(img, cmap="gray")
            ax_img.set_xticks([])
            ax_img.set_yticks([])
            if c == 0 and row_labels is not None:
                ax_img.set_ylabel(row_labels[r], fontsize=7)
            draw_sample_graph(ax_g, smp, masks)
            text, color = _sample_title(smp, class_names)
            ax_g.set_title(text, fontsize=7, color=color, loc="left")
    fig.suptitle(
        f"{title}\nstages left to right; edge width = weight, dashed grey = closed, grey node = removed, "
        "orange = stage input/output node",
        fontsize=9,
        y=1.0,
        va="bottom",
    )
    fig.savefig(path, dpi=75, bbox_inches="tight")
    plt.close(fig)


def per_class_grid(summary: dict[str, Any], path: Path, max_classes: int = 20) -> None:
    """Rows = classes, columns = stages: the per-class mean adjacency."""
    plt = pyplot()
    stages = summary["stages"]
    classes = list(next(iter(stages.values()))["per_class_mean"])[:max_classes]
    if not classes:
        return
    fig, axes = plt.subplots(
        len(classes), len(stages), figsize=(1.9 * len(stages) + 0.8, 1.55 * len(classes)), squeeze=False
    )
    for c, cname in enumerate(classes):
        for s, (sname, st) in enumerate(stages.items()):
            ax = axes[c][s]
            m = np.array([[np.nan if v is None else v for v in row] for row in st["per_class_mean"][cname]])
            ax.imshow(np.ma.masked_invalid(m), cmap="Blues", vmin=0.0, vmax=1.0)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_title(sname, fontsize=8)
            if s == 0:
                ax.set_ylabel(cname, fontsize=7)
    fig.suptitle(
        "Per-class mean edge weight (row = receiver, column = sender; 0 white .. 1 dark)",
        fontsize=9,
        y=1.0,
        va="bottom",
    )
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)


def order_trends(summary: dict[str, Any], path: Path) -> None:
    """Observation (2) and (4): per-node mean output weight and mean std against topological order."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for name, st in summary["stages"].items():
        no = st["node_order"]
        sp = no["out_mean_vs_order"]["spearman"]
        axes[0].plot(no["senders"], no["out_edge_mean"], "o-", label=f"{name} (rho {_r(sp)})")
        sp = no["out_std_vs_order"]["spearman"]
        axes[1].plot(no["senders"], no["out_edge_std"], "o-", label=f"{name} (rho {_r(sp)})")
        sp = no["in_std_vs_order"]["spearman"]
        axes[2].plot(no["receivers"], no["in_edge_std"], "o-", label=f"{name} (rho {_r(sp)})")
    axes[0].set(title="(2) mean weight of a node's output edges", xlabel="sender node (topological order)")
    axes[1].set(title="(4) mean std of a node's output edges", xlabel="sender node (topological order)")
    axes[2].set(title="(4) mean std of a node's input edges", xlabel="receiver node (topological order)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _r(x: float | None) -> str:
    return "n/a" if x is None else f"{x:+.2f}"


def histogram(values: Sequence[float], path: Path, *, title: str, xlabel: str, discrete: bool = False) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    a = np.asarray(values, dtype=np.float64)
    if discrete:
        lo, hi = int(a.min()), int(a.max())
        bins = np.arange(lo - 0.5, hi + 1.5, 1.0)
    else:
        bins = min(50, max(5, int(math.sqrt(a.size))))
    ax.hist(a, bins=bins, color="#6fa8dc", edgecolor="0.3")
    ax.axvline(float(a.mean()), color="#b00020", lw=1, label=f"mean {a.mean():.4g}")
    ax.set(title=title, xlabel=xlabel, ylabel="samples")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def connectivity_figures(acc: ConnectivityAccumulator, summary: dict[str, Any], out: Path) -> dict[str, str]:
    """Write every figure of the analysis into ``out``; returns {key: file name}."""
    masks = {n: st.edge_mask for n, st in acc.stages.items()}
    names = summary["class_names"]
    figs: dict[str, str] = {}

    def save(key: str, fn, *args, **kw) -> None:
        fname = f"{key}.png"
        fn(*args, out / fname, **kw)
        figs[key] = fname

    save("fig5_mean", heatmaps, {n: st.mean() for n, st in acc.stages.items()}, title="Mean edge weight (Fig. 5)")
    std = {n: st.std() for n, st in acc.stages.items()}
    save("fig6_std", heatmaps, std, title="Std of the edge weight over samples (Fig. 6)", cmap="Oranges", fmt=".3f")
    if any(st.has_raw for st in acc.stages.values()):
        raw = {n: np.where(st.edge_mask, st.raw.mean, np.nan) for n, st in acc.stages.items()}
        save("router_mean", heatmaps, raw, title="Mean raw router weight (before the Eq. 5 threshold)")
    closed = {n: np.where(st.edge_mask, st.closed_count / max(st.count, 1), np.nan) for n, st in acc.stages.items()}
    save("closed_share", heatmaps, closed, title="Share of samples with the edge closed", cmap="Reds", vmax=1.0)
    save("per_class_mean", per_class_grid, summary)
    save("order_trends", order_trends, summary)
    rows = [acc.class_samples[c] for c in sorted(acc.class_samples)]
    if rows:
        labels = [names[c] if c < len(names) else str(c) for c in sorted(acc.class_samples)]
        save(
            "fig7_per_class", sample_grid, rows, masks, title="Per-class samples", class_names=names, row_labels=labels
        )
    for key, samples, title in (
        ("fig7_most_confident", acc.most_confident, "Most confident samples"),
        ("fig7_least_confident", acc.least_confident, "Least confident samples"),
        ("fig7_cheapest", acc.cheapest, "Samples that executed the fewest MACs"),
        ("fig7_most_expensive", acc.most_expensive, "Samples that executed the most MACs"),
    ):
        if samples:
            per_row = 2
            grid = [samples[i : i + per_row] for i in range(0, len(samples), per_row)]
            save(key, sample_grid, grid, masks, title=title, class_names=names)
    if acc.open_edges:
        save(
            "open_edges_hist",
            histogram,
            acc.open_edges,
            title="Open edges per sample (all stages)",
            xlabel="open edges",
            discrete=True,
        )
    if acc.macs:
        save("macs_hist", histogram, [m / 1e6 for m in acc.macs], title="Executed MACs per sample", xlabel="MMACs")
    return figs

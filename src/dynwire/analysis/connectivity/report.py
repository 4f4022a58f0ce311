"""Step 3 of :mod:`dynwire.analysis.connectivity`, the report: ``analysis.json``, ``analysis.md`` and the figures."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .stats import ConnectivityAccumulator


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
        from .plots import connectivity_figures  # matplotlib, only when drawing

        figures = connectivity_figures(acc, summary, out)
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
        lines += [
            "",
            f"Removal is **{em['removal']}**: {em['distinct_values']} distinct executed-MAC values, std/mean "
            f"{_fmt(_pct(em['cv']), '.2f')}% (min {em['min'] / 1e6:.3f} M, max {em['max'] / 1e6:.3f} M). Spearman of "
            f"executed MACs with the sample's own loss {_fmt(em['vs_loss_spearman'], '+.2f')}, with the reference "
            f"model's loss {_fmt(em['vs_reference_loss_spearman'], '+.2f')}"
            + (f" (`{meta['reference']}`)." if meta.get("reference") else " (no `--reference`)."),
        ]
        pc = em.get("per_class_mean") or {}
        if pc:
            lines += ["", "| class | images | mean executed MMACs |", "| --- | ---: | ---: |"]
            lines += [f"| {c} | {v['n']} | {v['mean'] / 1e6:.3f} |" for c, v in pc.items()]
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
    "fig7_cheapest": "Fig. 7: samples that executed the fewest MACs",
    "fig7_most_expensive": "Fig. 7: samples that executed the most MACs",
}


def _pct(x: float | None) -> float | None:
    return None if x is None else 100.0 * x


def _mega(x: float | None) -> float | None:
    return None if x is None else x / 1e6

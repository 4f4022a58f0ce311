"""``dynwire graphs``: what each stage's graph looks like for a wiring (nodes, edges, depth)."""

from __future__ import annotations

from typing import Any

import torch

from .._registry import create_model
from ..graph.edges import graph_stats

__all__ = ["describe_graphs", "graphs_table"]


def describe_graphs(name: str, wiring: str = "dynamic", seeds: int = 1, **kwargs: Any) -> list[dict[str, Any]]:
    """One row per stage: nodes, edges, depth and whether the graph varies with ``graph_seed``.

    With ``seeds > 1`` the model is built for ``graph_seed = 0 .. seeds-1`` and ``distinct``
    counts the different graphs the stage gets.
    """
    rows: dict[str, dict[str, Any]] = {}
    masks: dict[str, set] = {}
    for s in range(max(1, seeds)):
        with torch.device("meta"):
            model = create_model(name, wiring=wiring, graph_seed=kwargs.pop("graph_seed", 0) + s, **kwargs)
        for stage_name, stage in model.graph_stages():
            rows.setdefault(stage_name, dict(stage=stage_name, **graph_stats(stage.edges)))
            preds = tuple(tuple(stage.edges.predecessors(j)) for j in range(stage.num_nodes))
            masks.setdefault(stage_name, set()).add(preds)
    for stage_name, row in rows.items():
        row["distinct"] = len(masks[stage_name])
    return list(rows.values())


def graphs_table(rows: list[dict[str, Any]]) -> str:
    head = "| stage | wiring | nodes | edges | of complete | depth | distinct graphs | varies with seed |"
    lines = [head, "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        varies = "n/a" if not r["kind"].startswith("random") else ("no" if r["seed_independent"] else "yes")
        lines.append(
            f"| {r['stage']} | {r['kind']} | {r['nodes']} | {r['edges']} | {r['possible_edges']} | {r['depth']} "
            f"| {r['distinct']} | {varies} |"
        )
    return "\n".join(lines)

"""Wiring specifications: which edges a stage graph has and how their weights are made.

A stage with ``n`` blocks is a graph over ``N = n + 1`` nodes in topological order:
nodes ``0 .. n-1`` are the blocks (node 0, the first block, receives the stage input and
changes resolution: it is the *input node*), node ``n`` is the *output node*, which applies no
transformation and gathers its predecessors by weighted sum into the stage output.
Edges go from a lower to a higher index, so the complete DAG has ``n (n + 1) / 2`` edges.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from ..layers.router import EVAL_GATES, TRAIN_GATES

__all__ = [
    "WiringConfig",
    "WIRINGS",
    "NODE_FORMS",
    "LEGACY_NODE",
    "resolve_wiring",
    "random_dag_edges",
    "complete_dag_edges",
]

WIRINGS: tuple[str, ...] = ("sequential", "dynamic", "static", "random-er", "random-ba", "random-ws")
NODE_FORMS: tuple[str, ...] = ("block", "branch")
#: the node form of every file written before the form was recorded (dynwire 0.1: training
#: checkpoints of version 1, build information of version 1): what ``node`` defaulted to then
LEGACY_NODE = "block"


@dataclass(frozen=True)
class WiringConfig:
    """How every stage of a model is wired.

    Attributes:
        kind: one of :data:`WIRINGS`. ``sequential`` is the original backbone, ``dynamic`` is
            DG-Net (per-sample routed weights, the paper's alpha_b), ``static`` one learnable
            weight per edge shared by all samples (Table 6's alpha), ``random-*`` RandWire
            graphs (Table 4) with learnable static edge weights.
        router_bias: initial router bias (App. 6.4; +3 opens every edge at the start).
        router_weight_std: standard deviation of the routers' initial weights (0.01; issue 17 asks
            whether a wider start makes the routers vary more per image).
        tau_init: initial value of each node's learnable threshold tau (Eq. 5).
        eval_gate: how evaluation applies Eq. 5: ``masked`` (default: edges with
            ``alpha < tau`` closed, open edges keep the training value
            ``alpha * sigmoid(alpha - tau)``), ``hard`` (literal Eq. 5: open edges pass ``alpha``,
            a train/test scale gap) or ``soft`` (the training surrogate, nothing closed). In
            evaluation a block none of whose input edges is open is removed (Sec. 3.3).
        train_gate: ``soft`` (default: the paper's surrogate, nothing closed in training) or
            ``hard`` (closed edges exactly 0 and nodes removed in training too, with a
            straight-through gradient), so the training forward matches evaluation.
        er_p, ba_m, ws_k, ws_p: RandWire generator parameters (defaults: Table 4).
        graph_seed: seed of the random generators; stage ``k`` uses ``graph_seed + k``.
        node: what a node of the DAG is. ``"branch"`` (default since 0.2): the residual branch of
            the block without its shortcut (the unrolled ResNet of the paper's footnote 1): block 0 of each stage stays whole, the
            DAG's edges are the shortcuts, and with every edge weight 1 the stage is the residual
            network ``s_j = s_(j-1) + F_j(act(s_(j-1)))``. Blocks without a residual branch (RandWire's
            nodes, MobileNetV2's strided blocks) stay whole in either form; ``sequential`` ignores it.
            ``"block"``: a whole block, its shortcut included (the literal reading, the default of
            0.1; files written by 0.1 load as it).
        recompute: recompute aggregated node inputs in backward instead of storing them.
        recompute_max_inputs: recompute only nodes with at most this many predecessors
            (``None``: all); the others store their input. Recomputing node ``j`` costs ``j + 1``
            passes over a feature map, so a limit such as 8 stores only the inputs of nodes deep in
            long stages (ResNet-101's layer3: 14 of 23), where recomputation costs the most time
            per byte it saves (``bench/train_overhead.py``: +4% peak memory for ResNet-101 at
            batch 4, and a time difference inside the run-to-run spread).
    """

    kind: str = "dynamic"
    router_bias: float = 3.0
    router_weight_std: float = 0.01
    tau_init: float = 0.0
    eval_gate: str = "masked"
    train_gate: str = "soft"
    er_p: float = 0.2
    ba_m: int = 5
    ws_k: int = 4
    ws_p: float = 0.75
    graph_seed: int = 0
    node: str = "branch"
    recompute: bool = True
    recompute_max_inputs: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in WIRINGS:
            import difflib

            close = difflib.get_close_matches(str(self.kind), WIRINGS, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ValueError(f"unknown wiring '{self.kind}'; choose one of {', '.join(WIRINGS)}.{hint}")
        for name in ("router_bias", "tau_init", "router_weight_std"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"wiring {name}={v!r} must be a finite number")
        if self.router_weight_std < 0:
            raise ValueError(f"wiring router_weight_std={self.router_weight_std!r} must be >= 0")
        if self.eval_gate not in EVAL_GATES:
            raise ValueError(f"eval_gate={self.eval_gate!r} is not valid; choose one of {', '.join(EVAL_GATES)}")
        if self.train_gate not in TRAIN_GATES:
            raise ValueError(f"train_gate={self.train_gate!r} is not valid; choose one of {', '.join(TRAIN_GATES)}")
        if not (0.0 < self.er_p <= 1.0):
            raise ValueError(f"er_p={self.er_p!r}: the Erdos-Renyi edge probability must be in (0, 1]")
        if not isinstance(self.ba_m, int) or self.ba_m < 1:
            raise ValueError(f"ba_m={self.ba_m!r}: the Barabasi-Albert M must be an int >= 1")
        if not isinstance(self.ws_k, int) or self.ws_k < 2 or self.ws_k % 2:
            raise ValueError(f"ws_k={self.ws_k!r}: the Watts-Strogatz K must be an even int >= 2")
        if not (0.0 <= self.ws_p <= 1.0):
            raise ValueError(f"ws_p={self.ws_p!r}: the Watts-Strogatz rewiring probability must be in [0, 1]")
        if self.node not in NODE_FORMS:
            raise ValueError(f"node={self.node!r} is not valid; choose one of {', '.join(NODE_FORMS)}")
        if self.recompute_max_inputs is not None and (
            not isinstance(self.recompute_max_inputs, int) or self.recompute_max_inputs < 1
        ):
            raise ValueError(f"recompute_max_inputs={self.recompute_max_inputs!r} must be an int >= 1 or None")
        if not isinstance(self.graph_seed, int) or self.graph_seed < 0:
            raise ValueError(f"graph_seed={self.graph_seed!r} must be an int >= 0")

    @property
    def routed(self) -> bool:
        return self.kind == "dynamic"

    @property
    def is_random(self) -> bool:
        return self.kind.startswith("random-")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_FIELDS = {f.name for f in dataclasses.fields(WiringConfig)}


def resolve_wiring(wiring: str | WiringConfig | dict, **kwargs: Any) -> tuple[WiringConfig, dict[str, Any]]:
    """Build a :class:`WiringConfig` from a name, config or dict plus flat kwargs.

    Returns the config and the kwargs that were not wiring options.
    """
    wkw = {k: kwargs.pop(k) for k in list(kwargs) if k in _FIELDS}
    if isinstance(wiring, WiringConfig):
        cfg = dataclasses.replace(wiring, **wkw) if wkw else wiring
    elif isinstance(wiring, dict):
        unknown = set(wiring) - _FIELDS
        if unknown:
            raise ValueError(f"unknown wiring option(s) {sorted(unknown)}; allowed: {sorted(_FIELDS)}")
        cfg = WiringConfig(**{**wiring, **wkw})
    elif isinstance(wiring, str):
        cfg = WiringConfig(kind=wiring, **wkw)
    else:
        raise ValueError(f"wiring must be a name, dict or WiringConfig, got {type(wiring).__name__}")
    return cfg, kwargs


def complete_dag_edges(num_nodes: int) -> list[tuple[int, int]]:
    """All edges ``(i, j)``, ``i < j``, ordered by receiver ``j`` then sender ``i``."""
    return [(i, j) for j in range(1, num_nodes) for i in range(j)]


def random_dag_edges(num_blocks: int, cfg: WiringConfig, seed: int) -> list[bool]:
    """RandWire graph over the blocks of a stage, as a mask over :func:`complete_dag_edges`.

    The undirected networkx graph over ``num_blocks`` nodes is oriented from lower to higher
    index. As in RandWire, a block without predecessors is fed by the input node (node 0) and a
    block without successors feeds the output node; the output node gathers only those sinks.
    Generator parameters that do not fit a small stage are clamped (BA ``M < n``; WS with
    ``K >= n`` is the complete graph).
    """
    import networkx as nx

    n = num_blocks
    edges: set[tuple[int, int]] = set()
    if n > 1:
        if cfg.kind == "random-er":
            g = nx.erdos_renyi_graph(n, cfg.er_p, seed=seed)
        elif cfg.kind == "random-ba":
            g = nx.barabasi_albert_graph(n, min(cfg.ba_m, n - 1), seed=seed)
        elif cfg.kind == "random-ws":
            if cfg.ws_k >= n:
                g = nx.complete_graph(n)
            else:
                g = nx.watts_strogatz_graph(n, cfg.ws_k, cfg.ws_p, seed=seed)
        else:
            raise ValueError(f"{cfg.kind} is not a random wiring")
        edges = {(min(u, v), max(u, v)) for u, v in g.edges() if u != v}
    for j in range(1, n):
        if not any(e[1] == j for e in edges):
            edges.add((0, j))
    for i in range(n):
        if not any(e[0] == i for e in edges):
            edges.add((i, n))
    all_edges = complete_dag_edges(n + 1)
    return [e in edges for e in all_edges]

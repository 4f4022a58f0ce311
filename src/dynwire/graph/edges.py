"""Edge weights of a stage graph: one module per wiring, chosen once by :func:`build_edges`.

Every implementation answers the same four questions for the stage's forward loop:

* ``predecessors(j)``: which nodes feed node ``j``;
* ``begin(batch)``: a fresh per-forward :class:`EdgeState`;
* ``observe(state, i, y)``: node ``i`` produced ``y`` (a router reads it here, Eq. 4);
* ``node_weights(state, j)``: raw weights ``(B, k)`` of node ``j``'s input edges, the value
  each carries when open, and the boolean mask of open edges (Eq. 5; ``None`` when nothing can
  be closed), in predecessor order.

A new edge-weight scheme (another router type of App. 6.2, a pruned executor's view) is a new
subclass; the stage and the model families do not change.
"""

from __future__ import annotations

import warnings
from typing import ClassVar

import torch
from torch import Tensor, nn

from ..layers._fused_glue import fused_router_gate
from ..layers.router import Router, edge_gate
from .wiring import WiringConfig, complete_dag_edges, random_dag_edges

__all__ = [
    "EdgeState",
    "EdgeMatrices",
    "EdgeWeights",
    "ChainEdges",
    "RoutedEdges",
    "StaticEdges",
    "RandomEdges",
    "build_edges",
    "graph_stats",
]


class EdgeState:
    """Per-forward scratch space of an :class:`EdgeWeights` (router outputs, shared alphas)."""

    __slots__ = ("batch", "router_out", "alpha")

    def __init__(self, batch: int, alpha: Tensor | None = None) -> None:
        self.batch = batch
        self.router_out: list[tuple[Tensor, ...]] = []  # per node: its output edges, one (B,) column each
        self.alpha = alpha


class EdgeMatrices:
    """Every edge's weight at once, for the inference fast path (``graph._inference``).

    ``value[b, j, i]`` is what edge ``i -> j`` carries for sample ``b`` when open, ``open`` the
    boolean mask of open edges (``None``: nothing can close) and ``alpha_out[b, i]`` the raw
    weight of edge ``i -> output node`` (the output node's fallback, Sec. 3.3). Rows of receivers
    are filled when their senders are observed; a sender that never runs leaves zeros.
    """

    __slots__ = ("value", "open", "alpha_out")

    def __init__(self, value: Tensor, open_: Tensor | None, alpha_out: Tensor) -> None:
        self.value = value
        self.open = open_
        self.alpha_out = alpha_out


class EdgeWeights(nn.Module):
    """Base class: the DAG of a stage with ``num_blocks`` blocks and ``num_blocks + 1`` nodes."""

    kind: ClassVar[str] = ""
    #: True when every node has exactly its previous node as input with weight 1 (a plain chain).
    is_chain: ClassVar[bool] = False
    #: True when edge weights depend on the sample (then ``output_gates`` gives them node by node).
    data_dependent: ClassVar[bool] = False

    def __init__(self, num_blocks: int, cfg: WiringConfig) -> None:
        super().__init__()
        if num_blocks < 1:
            raise ValueError(f"a graph stage needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.num_nodes = num_blocks + 1
        self.eval_gate = cfg.eval_gate
        self.edges = complete_dag_edges(self.num_nodes)
        self._preds: list[list[int]] = [list(range(j)) for j in range(self.num_nodes)]

    # -- structure ----------------------------------------------------------------------
    def predecessors(self, j: int) -> list[int]:
        """Indices of the nodes feeding node ``j``."""
        return self._preds[j]

    def complete_dag(self) -> bool:
        """Whether every node ``j`` reads all nodes ``0 .. j-1`` (predecessors are earlier nodes)."""
        return all(len(p) == j for j, p in enumerate(self._preds))

    def edge_mask_matrix(self) -> Tensor:
        """``(N, N)`` 0/1 matrix of the edges that exist, row = receiver, column = sender."""
        m = torch.zeros(self.num_nodes, self.num_nodes)
        for j, preds in enumerate(self._preds):
            m[j, preds] = 1.0
        return m

    def num_edges(self) -> int:
        return sum(len(p) for p in self._preds)

    # -- per-forward interface ------------------------------------------------------------
    def begin(self, batch: int) -> EdgeState:
        return EdgeState(batch)

    def observe(self, state: EdgeState, i: int, y: Tensor) -> None:
        """Node ``i`` produced ``y``; only routed wirings look at it."""

    def node_weights(self, state: EdgeState, j: int) -> tuple[Tensor, Tensor, Tensor | None]:
        raise NotImplementedError

    def begin_matrices(self, batch: int, like: Tensor) -> EdgeMatrices:
        """All edges' weights as ``(B, N, N)`` matrices (inference; see :class:`EdgeMatrices`).

        The default asks :meth:`node_weights` node by node, which suits weights that do not
        depend on the data; routed wirings override it and fill rows in :meth:`observe_matrices`.
        """
        state = self.begin(batch)
        n = self.num_nodes
        value = like.new_zeros(batch, n, n, dtype=_gate_dtype(like))
        open_ = like.new_zeros(batch, n, n, dtype=torch.bool) if self.can_close() else None
        alpha_out = like.new_zeros(batch, n, dtype=value.dtype)
        for j in range(1, n):
            preds = self._preds[j]
            alpha, v, o = self.node_weights(state, j)
            value[:, j, preds] = v.to(value.dtype)
            if open_ is not None:
                open_[:, j, preds] = o
            if j == n - 1:
                alpha_out[:, preds] = alpha.to(value.dtype)
        return EdgeMatrices(value, open_, alpha_out)

    def observe_matrices(self, mats: EdgeMatrices, i: int, y: Tensor) -> None:
        """Node ``i`` produced ``y`` (inference fast path); only routed wirings look at it."""

    def output_gates(self, i: int, y: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """``(alpha, value, open)`` of node ``i``'s output edges, for data-dependent wirings."""
        raise NotImplementedError(f"{type(self).__name__} edge weights do not depend on the data")

    def can_close(self) -> bool:
        """Whether edges can be closed (and nodes removed) in the current mode."""
        return False

    def reset_parameters(self) -> None:
        """Initialise the wiring's own parameters (none by default)."""

    def extra_repr(self) -> str:
        return f"kind={self.kind}, nodes={self.num_nodes}, edges={self.num_edges()}, eval_gate={self.eval_gate}"


class ChainEdges(EdgeWeights):
    """``sequential``: block ``j`` feeds block ``j + 1``, no parameters (the plain backbone)."""

    kind = "sequential"
    is_chain = True

    def __init__(self, num_blocks: int, cfg: WiringConfig) -> None:
        super().__init__(num_blocks, cfg)
        self._preds = [[j - 1] if j else [] for j in range(self.num_nodes)]

    def node_weights(self, state: EdgeState, j: int) -> tuple[Tensor, Tensor, Tensor | None]:
        ones = torch.ones(state.batch, 1)
        return ones, ones, None


class _Thresholded(EdgeWeights):
    """A learnable threshold ``tau`` per receiving node ``1 .. n`` (Eq. 5)."""

    def __init__(self, num_blocks: int, cfg: WiringConfig) -> None:
        super().__init__(num_blocks, cfg)
        self.train_gate = cfg.train_gate
        self._tau_init = float(cfg.tau_init)
        self.tau = nn.Parameter(torch.full((num_blocks,), self._tau_init))

    def reset_parameters(self) -> None:
        nn.init.constant_(self.tau, self._tau_init)

    def can_close(self) -> bool:
        return self.train_gate == "hard" if self.training else self.eval_gate != "soft"

    def gate(self, alpha: Tensor, j: int) -> tuple[Tensor, Tensor | None]:
        return edge_gate(alpha, self.tau[j - 1], self.training, self.eval_gate, self.train_gate)


class RoutedEdges(_Thresholded):
    """``dynamic`` (DG-Net, alpha_b): block ``i``'s router predicts its ``n - i`` output edges."""

    kind = "dynamic"
    data_dependent = True

    def __init__(self, num_blocks: int, channels: int, cfg: WiringConfig) -> None:
        super().__init__(num_blocks, cfg)
        n = num_blocks
        self.routers = nn.ModuleList(Router(channels, n - i, cfg.router_bias, cfg.router_weight_std) for i in range(n))

    def reset_parameters(self) -> None:
        super().reset_parameters()
        for r in self.routers:
            r.reset_parameters()

    def observe(self, state: EdgeState, i: int, y: Tensor) -> None:
        # one column per output edge, each read by one receiver: one unbind (backward: one stack)
        # instead of a select per edge, whose backward writes a zero-padded copy of the router
        # output per edge and adds them up
        state.router_out.append(self.routers[i](y).unbind(1))

    def begin_matrices(self, batch: int, like: Tensor) -> EdgeMatrices:
        n = self.num_nodes
        dtype = _gate_dtype(like)
        open_ = like.new_zeros(batch, n, n, dtype=torch.bool) if self.can_close() else None
        return EdgeMatrices(like.new_zeros(batch, n, n, dtype=dtype), open_, like.new_zeros(batch, n, dtype=dtype))

    def output_gates(self, i: int, y: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """Raw weight, open value and open mask of node ``i``'s output edges (receivers ``i+1 .. n``)."""
        alpha = self.routers[i](y)
        return (alpha, *edge_gate(alpha, self.tau[i:], self.training, self.eval_gate, self.train_gate))

    def observe_matrices(self, mats: EdgeMatrices, i: int, y: Tensor) -> None:
        # one router call and one gate for all of node i's output edges; on the CPU one C call
        # that writes the matrices (the reference below is what it computes)
        if not self.training and fused_router_gate(
            self.routers[i],
            y,
            self.tau[i:],
            self.eval_gate,
            mats.value[:, i + 1 :, i],
            None if mats.open is None else mats.open[:, i + 1 :, i],
            mats.alpha_out[:, i],
        ):
            return
        alpha, value, open_ = self.output_gates(i, y)
        mats.value[:, i + 1 :, i] = value
        if mats.open is not None:
            mats.open[:, i + 1 :, i] = open_
        mats.alpha_out[:, i] = alpha[:, -1]

    def node_weights(self, state: EdgeState, j: int) -> tuple[Tensor, Tensor, Tensor | None]:
        ro = state.router_out
        alpha = torch.stack([ro[i][j - i - 1] for i in self._preds[j]], dim=1)
        return (alpha, *self.gate(alpha, j))


class StaticEdges(_Thresholded):
    """``static`` (Table 6's alpha): ``sigmoid(theta)`` per edge, shared by all samples."""

    kind = "static"
    thresholded: ClassVar[bool] = True

    def __init__(self, num_blocks: int, cfg: WiringConfig) -> None:
        super().__init__(num_blocks, cfg)
        self._logit_init = float(cfg.router_bias)
        self.edge_logits = nn.Parameter(torch.full((len(self.edges),), self._logit_init))

    def reset_parameters(self) -> None:
        super().reset_parameters()
        nn.init.constant_(self.edge_logits, self._logit_init)

    def begin(self, batch: int) -> EdgeState:
        return EdgeState(batch, torch.sigmoid(self.edge_logits))

    def can_close(self) -> bool:
        return self.thresholded and super().can_close()

    def begin_matrices(self, batch: int, like: Tensor) -> EdgeMatrices:
        n = self.num_nodes
        exists, order = self._layout(like.device)
        alpha = like.new_zeros(n, n, dtype=_gate_dtype(like))
        alpha[exists] = torch.sigmoid(self.edge_logits).to(alpha.dtype)[order]
        if self.thresholded:
            tau = torch.cat([self.tau.new_zeros(1), self.tau]).to(alpha.dtype)  # receiver j uses tau[j - 1]
            value, open_ = edge_gate(alpha, tau[:, None], self.training, self.eval_gate, self.train_gate)
            value = value * exists
            open_ = None if open_ is None else (open_ & exists).expand(batch, n, n)
        else:
            value, open_ = alpha, None
        return EdgeMatrices(value.expand(batch, n, n), open_, alpha[-1].expand(batch, n))

    def _layout(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """``(N, N)`` mask of the existing edges and the indices of their logits in row-major order
        (cached per device; a random graph loaded from a checkpoint resets the cache)."""
        key = (device, tuple(map(tuple, self._preds)))
        cached = self.__dict__.get("_layout_cache")
        if cached is None or cached[0] != key:
            order = [j * (j - 1) // 2 + i for j in range(self.num_nodes) for i in self._preds[j]]
            exists = self.edge_mask_matrix().to(device=device, dtype=torch.bool)
            cached = (key, exists, torch.tensor(order, dtype=torch.long, device=device))
            self.__dict__["_layout_cache"] = cached
        return cached[1], cached[2]

    def node_weights(self, state: EdgeState, j: int) -> tuple[Tensor, Tensor, Tensor | None]:
        start = j * (j - 1) // 2
        idx = [start + i for i in self._preds[j]]
        alpha = state.alpha[idx].unsqueeze(0).expand(state.batch, len(idx))
        return (alpha, *self.gate(alpha, j)) if self.thresholded else (alpha, alpha, None)


class RandomEdges(StaticEdges):
    """``random-*`` (Table 4): a RandWire graph with learnable static weights, no thresholds.

    The edge mask is a buffer, so a checkpoint restores exactly the same graph.
    """

    thresholded = False

    def __init__(self, num_blocks: int, cfg: WiringConfig, stage_index: int = 0) -> None:
        super().__init__(num_blocks, cfg)
        del self.tau  # RandWire graphs have no thresholds
        self.kind = cfg.kind
        seed = cfg.graph_seed + stage_index
        mask = random_dag_edges(num_blocks, cfg, seed=seed)
        self.register_buffer("edge_mask", torch.tensor(mask, dtype=torch.bool))
        self._set_preds(mask)
        self.seed_independent = _seed_independent(num_blocks, cfg, mask, seed)

    def reset_parameters(self) -> None:
        nn.init.constant_(self.edge_logits, self._logit_init)

    def _set_preds(self, mask: list[bool]) -> None:
        self._preds = [[] for _ in range(self.num_nodes)]
        for keep, (i, j) in zip(mask, self.edges):
            if keep:
                self._preds[j].append(i)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if self.edge_mask.device.type != "meta":
            self._set_preds(self.edge_mask.tolist())


def _gate_dtype(like: Tensor) -> torch.dtype:
    """Edge weights are float32 under half-precision autocast (as the router makes them)."""
    return torch.float32 if like.dtype in (torch.float16, torch.bfloat16) else like.dtype


_PROBE_SEEDS = 16
_WARNED: set[tuple] = set()


def _seed_independent(num_blocks: int, cfg: WiringConfig, mask: list[bool], seed: int) -> bool:
    """True when the generator gives this same graph for every probed seed."""
    return all(random_dag_edges(num_blocks, cfg, seed=seed + s) == mask for s in range(1, _PROBE_SEEDS))


def warn_if_seed_independent(edges: EdgeWeights, stage_name: str) -> None:
    """Warn (once per model, wiring and stage) that a random stage cannot vary with the seed."""
    if not getattr(edges, "seed_independent", False) or edges.num_blocks < 2:
        return  # a one-block stage has one possible graph in every wiring
    key = (edges.kind, edges.num_blocks, stage_name)
    if key in _WARNED:
        return
    _WARNED.add(key)
    warnings.warn(
        f"stage '{stage_name}': {edges.kind} over {edges.num_blocks} blocks gives the same graph for every "
        f"graph_seed ({edges.num_edges()} edges); the stage is too small for this generator to vary "
        "(see `dynwire graphs MODEL --wiring ...`)",
        UserWarning,
        stacklevel=3,
    )


def build_edges(num_blocks: int, channels: int, cfg: WiringConfig, stage_index: int = 0) -> EdgeWeights:
    """The edge-weight module of a stage for wiring ``cfg`` (the one place that branches on it)."""
    # Every wiring takes exactly one draw from the global RNG and builds its parameters from a
    # private stream seeded by it: the same seed then gives the same block weights in every
    # wiring (paired comparisons between wirings are real), and router weights do not reuse the
    # random numbers of the blocks built after them.
    seed = int(torch.randint(0, 2**62, (), device="cpu"))
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seed)
        if cfg.kind == "sequential":
            return ChainEdges(num_blocks, cfg)
        if cfg.kind == "dynamic":
            return RoutedEdges(num_blocks, channels, cfg)
        if cfg.kind == "static":
            return StaticEdges(num_blocks, cfg)
        if cfg.is_random:
            return RandomEdges(num_blocks, cfg, stage_index)
    raise ValueError(f"no edge-weight implementation for wiring '{cfg.kind}'")


def graph_stats(edges: EdgeWeights) -> dict:
    """Nodes, edges, depth (longest input-to-output path) and seed dependence of one stage."""
    depth = [0] * edges.num_nodes
    for j in range(1, edges.num_nodes):
        depth[j] = 1 + max(depth[i] for i in edges.predecessors(j))
    return dict(
        kind=edges.kind,
        nodes=edges.num_nodes,
        edges=edges.num_edges(),
        possible_edges=len(edges.edges),
        depth=depth[-1],
        seed_independent=bool(getattr(edges, "seed_independent", False)),
    )

"""The graph stage: any list of same-shaped blocks wired as a DAG (paper Sec. 3, Fig. 1-2)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..layers.aggregation import GradSlot, aggregate, tap
from ..layers.router import EVAL_GATES, Router, edge_gate
from .wiring import WiringConfig, complete_dag_edges, random_dag_edges

__all__ = ["GraphStage", "StageWiring"]


class StageWiring(nn.Module):
    """Edge weights of one stage graph: routers, thresholds, static or random edges.

    Holds no parameters for ``sequential`` wiring, so a sequential stage has exactly the
    parameters (and ``state_dict`` keys) of the plain backbone.
    """

    def __init__(self, num_blocks: int, channels: int, cfg: WiringConfig, stage_index: int = 0) -> None:
        super().__init__()
        if num_blocks < 1:
            raise ValueError(f"a graph stage needs at least one block, got {num_blocks}")
        self.kind = cfg.kind
        self.num_blocks = n = num_blocks
        self.num_nodes = n + 1
        self.eval_gate = cfg.eval_gate
        self._tau_init = float(cfg.tau_init)
        self._router_bias = float(cfg.router_bias)
        self.edges = complete_dag_edges(self.num_nodes)
        if cfg.kind == "dynamic":
            # Router of block i predicts its n - i output edges (to nodes i+1 .. n).
            self.routers = nn.ModuleList(Router(channels, n - i, cfg.router_bias) for i in range(n))
        if cfg.kind in ("dynamic", "static"):
            self.tau = nn.Parameter(torch.full((n,), float(cfg.tau_init)))  # one per receiving node 1..n
        if cfg.kind == "static" or cfg.is_random:
            self.edge_logits = nn.Parameter(torch.full((len(self.edges),), float(cfg.router_bias)))
        if cfg.is_random:
            mask = random_dag_edges(n, cfg, seed=cfg.graph_seed + stage_index)
            self._set_preds(mask)
            self.register_buffer("edge_mask", torch.tensor(mask, dtype=torch.bool))
        else:
            chain = cfg.kind == "sequential"
            self._preds = [([j - 1] if j else []) if chain else list(range(j)) for j in range(self.num_nodes)]

    def _set_preds(self, mask: list[bool]) -> None:
        self._preds = [[] for _ in range(self.num_nodes)]
        for keep, (i, j) in zip(mask, self.edges):
            if keep:
                self._preds[j].append(i)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if hasattr(self, "edge_mask") and self.edge_mask.device.type != "meta":
            self._set_preds(self.edge_mask.tolist())

    def reset_parameters(self) -> None:
        if hasattr(self, "routers"):
            for r in self.routers:
                r.reset_parameters()
        if hasattr(self, "tau"):
            nn.init.constant_(self.tau, self._tau_init)
        if hasattr(self, "edge_logits"):
            nn.init.constant_(self.edge_logits, self._router_bias)

    def predecessors(self, j: int) -> list[int]:
        """Indices of the nodes feeding node ``j``."""
        return self._preds[j]

    def edge_mask_matrix(self) -> Tensor:
        """``(N, N)`` 0/1 matrix of the edges that exist, row = receiver, column = sender."""
        m = torch.zeros(self.num_nodes, self.num_nodes)
        for j, preds in enumerate(self._preds):
            m[j, preds] = 1.0
        return m

    def static_alpha(self) -> Tensor | None:
        """Per-edge weights shared by all samples (static and random wirings)."""
        return torch.sigmoid(self.edge_logits) if hasattr(self, "edge_logits") else None

    def node_weights(
        self, j: int, router_out: Sequence[Tensor], static_alpha: Tensor | None, batch: int
    ) -> tuple[Tensor, Tensor]:
        """Raw and gated weights ``(B, k)`` of node ``j``'s input edges, in predecessor order."""
        preds = self._preds[j]
        if self.kind == "dynamic":
            alpha = torch.stack([router_out[i][:, j - i - 1] for i in preds], dim=1)
        else:
            start = j * (j - 1) // 2
            idx = [start + i for i in preds]
            alpha = static_alpha[idx].unsqueeze(0).expand(batch, len(idx))
        if hasattr(self, "tau"):
            gated = edge_gate(alpha, self.tau[j - 1], self.training, self.eval_gate)
        else:
            gated = alpha
        return alpha, gated

    def extra_repr(self) -> str:
        return f"kind={self.kind}, nodes={self.num_nodes}, edges={sum(len(p) for p in self._preds)}, eval_gate={self.eval_gate}"


class GraphStage(nn.Module):
    """A stage of a backbone whose blocks are nodes of a DAG (Eq. 3).

    Args:
        blocks: the stage's blocks in topological order; block 0 receives the stage input
            (and may change resolution and channels), every later block must map a tensor of
            block 0's output shape to the same shape.
        channels: output channels of the blocks (router input width).
        wiring: how the blocks are connected, see :class:`WiringConfig`.
        stage_index: position of the stage in the network (seeds random graphs).

    The stage has ``N = len(blocks) + 1`` nodes: the blocks and an output node that sums its
    predecessors by their edge weights. Blocks are registered as children ``"0"``, ``"1"``,
    ... (the names torchvision uses inside a ResNet layer); the wiring lives in ``graph``.

    Setting ``record_adjacency = True`` makes every forward store the per-sample adjacency
    ``(B, N, N)`` of the weights actually used in ``adjacency`` (and the routers' raw outputs in
    ``router_adjacency``); by default nothing is kept. See :func:`dynwire.record_adjacency`.
    """

    def __init__(self, blocks: Sequence[nn.Module], channels: int, wiring: WiringConfig, stage_index: int = 0) -> None:
        super().__init__()
        blocks = list(blocks)
        for i, b in enumerate(blocks):
            self.add_module(str(i), b)
        self.num_blocks = len(blocks)
        self.channels = channels
        self.wiring = wiring
        self.graph = StageWiring(len(blocks), channels, wiring, stage_index)
        self.record_adjacency = False
        self.fused_grad = True  # accumulate node-output gradients in place (see layers.aggregation.tap)
        self.adjacency: Tensor | None = None
        self.router_adjacency: Tensor | None = None

    @property
    def num_nodes(self) -> int:
        return self.num_blocks + 1

    def blocks(self) -> list[nn.Module]:
        return [self._modules[str(i)] for i in range(self.num_blocks)]

    def set_eval_gate(self, mode: str) -> None:
        if mode not in EVAL_GATES:
            raise ValueError(f"eval_gate={mode!r} is not valid; choose one of {', '.join(EVAL_GATES)}")
        self.graph.eval_gate = mode

    def forward(self, x: Tensor) -> Tensor:
        blocks = self.blocks()
        if self.graph.kind == "sequential":
            for b in blocks:
                x = b(x)
            if self.record_adjacency:
                m = self.graph.edge_mask_matrix().to(x.device)
                self.adjacency = self.router_adjacency = m.expand(x.shape[0], -1, -1).clone()
            return x

        g = self.graph
        batch = x.shape[0]
        static_alpha = g.static_alpha()
        record = self.record_adjacency
        if record:
            adj = x.new_zeros(batch, self.num_nodes, self.num_nodes, dtype=torch.float32)
            raw = adj.clone()
        xs: list[Tensor] = []
        slots: list[GradSlot] = []
        use_taps = (
            self.fused_grad
            and torch.is_grad_enabled()
            and not torch.compiler.is_compiling()
            and not torch.jit.is_tracing()
        )
        router_out: list[Tensor] = []
        for j in range(self.num_nodes):
            if j == 0:
                h = x
            else:
                preds = g.predecessors(j)
                alpha, gated = g.node_weights(j, router_out, static_alpha, batch)
                if record:
                    adj[:, j, preds] = gated.detach().float()
                    raw[:, j, preds] = alpha.detach().float()
                h = aggregate(gated, [xs[i] for i in preds], [slots[i] for i in preds] if use_taps else None)
            if j == self.num_blocks:
                break
            y = blocks[j](h)
            if use_taps:
                y, slot = tap(y)
                slots.append(slot)
            xs.append(y)
            if g.kind == "dynamic":
                router_out.append(g.routers[j](y))
        if record:
            self.adjacency, self.router_adjacency = adj, raw
        return h

"""The graph stage: any list of same-shaped blocks wired as a DAG (paper Sec. 3, Fig. 1-2)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..layers.aggregation import GradSlot, aggregate, recompute_aggregations, tap
from ..layers.router import EVAL_GATES
from .edges import EdgeWeights, build_edges
from .wiring import WiringConfig

__all__ = ["GraphStage"]


def _tracing() -> bool:
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


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
    ... (the names torchvision uses inside a ResNet layer); the edge weights live in ``edges``
    (an :class:`~dynwire.graph.edges.EdgeWeights`), the configuration in ``wiring``.

    The stage owns its memory mechanics in training: gradient taps (each block output's
    gradient is accumulated in place from all its consumers) and recomputation of aggregated
    node inputs in backward (``wiring.recompute``). Both switch off under ``torch.compile`` and
    tracing, where the compiler plans memory itself.

    Setting ``record_adjacency = True`` makes every forward store the per-sample adjacency
    ``(B, N, N)`` of the weights actually used in ``adjacency`` (and the raw weights in
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
        self.edges: EdgeWeights = build_edges(len(blocks), channels, wiring, stage_index)
        self.record_adjacency = False
        self.fused_grad = True  # accumulate node-output gradients in place (see layers.aggregation.tap)
        self.adjacency: Tensor | None = None
        self.router_adjacency: Tensor | None = None
        self._register_load_state_dict_pre_hook(_rename_legacy_keys)

    @property
    def num_nodes(self) -> int:
        return self.num_blocks + 1

    def blocks(self) -> list[nn.Module]:
        return [self._modules[str(i)] for i in range(self.num_blocks)]

    def set_eval_gate(self, mode: str) -> None:
        if mode not in EVAL_GATES:
            raise ValueError(f"eval_gate={mode!r} is not valid; choose one of {', '.join(EVAL_GATES)}")
        self.edges.eval_gate = mode

    def _recompute(self) -> bool:
        return self.training and torch.is_grad_enabled() and self.wiring.recompute and not _tracing()

    def forward(self, x: Tensor) -> Tensor:
        blocks = self.blocks()
        if self.edges.is_chain:
            for b in blocks:
                x = b(x)
            if self.record_adjacency:
                m = self.edges.edge_mask_matrix().to(x.device)
                self.adjacency = self.router_adjacency = m.expand(x.shape[0], -1, -1).clone()
            return x
        with recompute_aggregations(self._recompute(), self.wiring.recompute_max_inputs):
            return self._forward_graph(x, blocks)

    def _forward_graph(self, x: Tensor, blocks: list[nn.Module]) -> Tensor:
        g = self.edges
        batch = x.shape[0]
        state = g.begin(batch)
        record = self.record_adjacency
        if record:
            adj = x.new_zeros(batch, self.num_nodes, self.num_nodes, dtype=torch.float32)
            raw = adj.clone()
        xs: list[Tensor] = []
        slots: list[GradSlot] = []
        use_taps = self.fused_grad and torch.is_grad_enabled() and not _tracing()
        h = x
        for j in range(self.num_nodes):
            if j:
                preds = g.predecessors(j)
                alpha, gated = g.node_weights(state, j)
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
            g.observe(state, j, y)
        if record:
            self.adjacency, self.router_adjacency = adj, raw
        return h


def _rename_legacy_keys(state_dict, prefix, *args) -> None:
    """Checkpoints written before 0.2 kept the edge weights under ``graph.``; now ``edges.``."""
    old = prefix + "graph."
    for k in [k for k in state_dict if k.startswith(old)]:
        state_dict[prefix + "edges." + k[len(old) :]] = state_dict.pop(k)

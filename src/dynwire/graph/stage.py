"""The graph stage: any list of same-shaped blocks wired as a DAG (paper Sec. 3, Fig. 1-2)."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from functools import partial

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import _get_current_dispatch_mode
from torch.utils.flop_counter import FlopCounterMode

from ..layers.aggregation import GradSlot, aggregate, aggregate_reference, recompute_aggregations, tap
from ..layers.router import EVAL_GATES
from ._inference import _GLOBAL_HOOKS, forward_inference, forward_one_kept, in_onnx_export
from .edges import EdgeWeights, RoutedEdges, build_edges
from .wiring import WiringConfig

__all__ = ["GraphStage", "BranchNode"]


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

    With ``wiring.node == "branch"`` node ``j >= 1`` of a block that has a residual branch
    (``has_residual_branch``) runs only that branch, ``block.forward_branch`` (a
    :class:`BranchNode` view; parameter names do not change), and the stage's output is passed
    through the last such block's ``branch_act``: with every edge weight 1 the stage is the
    unrolled residual network ``s_j = s_(j-1) + F_j(act(s_(j-1)))`` and returns ``act(s_(n-1))``,
    what the next stage and the head receive from the chain.

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
        # the callables that are the nodes (a plain list: the blocks stay the registered children)
        self._nodes: list[nn.Module] = list(blocks)
        self.output_act: nn.Module | None = None
        if wiring.node == "branch" and wiring.kind != "sequential":
            for j in range(1, len(blocks)):
                if getattr(blocks[j], "has_residual_branch", False):
                    self._nodes[j] = BranchNode(blocks[j])
                    self.output_act = blocks[j].branch_act
        self.edges: EdgeWeights = build_edges(len(blocks), channels, wiring, stage_index)
        self.record_adjacency = False
        self.fused_grad = True  # accumulate node-output gradients in place (see layers.aggregation.tap)
        #: ``"pruned"`` runs each block only for the samples where it is alive (removed nodes are
        #: skipped); ``"dense"`` runs every block on the whole batch and zeroes removed samples
        #: (the reference, and what compile / ONNX use). Same outputs either way.
        self.executor = "pruned"
        self.adjacency: Tensor | None = None
        self.router_adjacency: Tensor | None = None
        self.removed: Tensor | None = None
        self.macs: Tensor | None = None
        # compute budget (graph.budget.ComputeBudget sets the temperature): per-sample MACs of each
        # block, counted once, and the expected MACs of blocks 1..n-1 in the last training forward
        self.cost_temperature: float | None = None
        self.block_macs: list[float] | None = None
        self.expected_block_macs: Tensor | None = None
        self._register_load_state_dict_pre_hook(_rename_legacy_keys)

    @property
    def num_nodes(self) -> int:
        return self.num_blocks + 1

    def blocks(self) -> list[nn.Module]:
        """The nodes' callables: the blocks, or their :class:`BranchNode` views in branch form."""
        return list(self._nodes)

    @property
    def node_form(self) -> list[str]:
        """``"branch"`` or ``"block"`` for each block node."""
        return ["branch" if isinstance(b, BranchNode) else "block" for b in self._nodes]

    def set_eval_gate(self, mode: str) -> None:
        if mode not in EVAL_GATES:
            raise ValueError(f"eval_gate={mode!r} is not valid; choose one of {', '.join(EVAL_GATES)}")
        self.edges.eval_gate = mode

    def _recompute(self) -> bool:
        return self.training and torch.is_grad_enabled() and self.wiring.recompute and not _tracing()

    def forward(self, x: Tensor) -> Tensor:
        out = forward_one_kept(self, x)  # one CPU sample, as the last such forward ran it
        if out is not None:
            return out
        blocks = self.blocks()
        if self.edges.is_chain:
            if not self.record_adjacency:
                for b in blocks:
                    x = b(x)
                return x
            macs = _MacCounter(x.shape[0])
            for b in blocks:
                x = macs.run(b, x)
            m = self.edges.edge_mask_matrix().to(x.device)
            self.adjacency = self.router_adjacency = m.expand(x.shape[0], -1, -1).clone()
            self.removed = torch.zeros(x.shape[0], self.num_nodes, dtype=torch.bool)
            self.macs = macs.total
            return x
        if self._fast_inference(x):
            return forward_inference(self, x, blocks, pruned=True, output_act=self.output_act)
        with recompute_aggregations(self._recompute(), self.wiring.recompute_max_inputs):
            return self._forward_graph(x, blocks, self.output_act)

    def _fast_inference(self, x: Tensor) -> bool:
        """Inference on the pruned executor, nothing recorded: the few-ops path (``graph._inference``)."""
        return (
            not self.training
            and not torch.is_grad_enabled()
            and self.executor == "pruned"
            and not self.record_adjacency
            and x.device.type != "meta"
            and not _tracing()
            and not in_onnx_export()
            # under a dispatch mode (the FLOP counter) the general loop keeps the aggregation op visible
            and _get_current_dispatch_mode() is None
        )

    def _forward_graph(self, x: Tensor, blocks: list[nn.Module], output_act: nn.Module | None = None) -> Tensor:
        g = self.edges
        batch = x.shape[0]
        n = self.num_blocks
        state = g.begin(batch)
        record = self.record_adjacency
        removal = g.can_close()
        pruned = removal and self.executor == "pruned" and not _tracing() and x.device.type != "meta"
        if record:
            adj = x.new_zeros(batch, self.num_nodes, self.num_nodes, dtype=torch.float32)
            raw = adj.clone()
            macs = _MacCounter(batch)
        xs: list[Tensor] = []
        slots: list[GradSlot] = []
        alive: list[Tensor] = []  # (B,) bool per node, when nodes can be removed
        use_taps = self.fused_grad and torch.is_grad_enabled() and not _tracing()
        onnx = in_onnx_export()
        # ReLUs in place on fresh sums (node inputs, the output): not while recording, exporting or tracing
        relu_in_place = not record and not onnx and not _tracing()
        cost = self.training and self.cost_temperature is not None and hasattr(g, "tau")
        if cost:
            count = self.block_macs is None
            self.block_macs = [] if count else self.block_macs
            p_open: list[Tensor] = [x.new_empty(0)]
        # per sender (training with taps, routed complete DAG): node i's router and gate run once for all
        # of its output edges, and the weights' gradients <g_j, x_i> are computed at i's tap, in the
        # pass that sums its consumers' gradients (Eq. 9-10): no aggregation reads its inputs again
        senders = _SenderWeights(g, x, removal, record, cost) if use_taps and _gates_per_sender(g) else None
        h = x
        for j in range(self.num_nodes):
            node_alive = None
            if j:
                preds = g.predecessors(j)
                alpha, value, open_ = g.node_weights(state, j) if senders is None else senders.node_weights(j)
                if cost:
                    a = alpha if senders is None else senders.alpha_with_grad(j)
                    p_open.append(torch.sigmoid((a - g.tau[j - 1]) / self.cost_temperature))
                if removal:
                    open_, node_alive = _close_removed(alpha, open_, [alive[i] for i in preds], output=j == n)
                    closed = value * (~open_).to(value.dtype)
                    # training: straight-through, the forward closes edges, backward sees every edge
                    weights = value - (closed.detach() if self.training else closed)
                else:
                    weights = value
                if record:
                    adj[:, j, preds] = weights.detach().float()
                    raw[:, j, preds] = alpha.detach().float()
                cols = list(range(len(preds)))
                if pruned:  # predecessors removed for every sample of the batch are not read
                    any_alive = torch.stack([alive[i] for i in preds], 1).any(0).tolist()
                    cols = [c for c, keep in enumerate(any_alive) if keep]
                    if j < n and not bool(node_alive.any()):
                        cols = []  # nothing to compute for this node
                if cols:
                    w = weights if len(cols) == len(preds) else weights[:, cols]
                    ins = [xs[preds[c]] for c in cols]
                    # a sum activated in place below can never be recomputed: keep no recipe for it
                    fresh_act = relu_in_place and (
                        type(output_act) is nn.ReLU if j == n else getattr(blocks[j], "relu_input", False)
                    )
                    if onnx or _tracing():
                        # standard ops in an exported graph; under compile the compiler fuses them
                        # with the gate (compiled cifar_resnet56 training step: 1.14x the compiled
                        # chain's, 1.36x with the opaque custom op; bench/results/compile_cpu.json)
                        h = aggregate_reference(w, ins)
                    elif senders is not None:
                        sl = [slots[preds[c]] for c in cols]
                        h = aggregate(w, ins, sl, [j - preds[c] - 1 for c in cols], recompute=not fresh_act)
                    else:
                        sl = [slots[preds[c]] for c in cols] if use_taps else None
                        h = aggregate(w, ins, sl, recompute=not fresh_act)
                    if record:
                        macs.add_all(len(cols) * ins[0][0].numel())
            if j == n:
                if output_act is not None:
                    # the output sum is as fresh as a node input: a plain ReLU in place (one map less)
                    fresh = cols and relu_in_place and type(output_act) is nn.ReLU
                    h = torch.relu_(h) if fresh else output_act(h)
                break
            if cost and count:
                self.block_macs.append(_block_macs(blocks[j], xs[0] if j else h))
            block = blocks[j]
            if j and cols and relu_in_place and getattr(block, "relu_input", False):
                # the node input is a fresh sum that only this branch reads: its ReLU in place
                # (no second map per node; autograd's ReluBackward keeps the result as before)
                h = torch.relu_(h)
                block = partial(block, act=False)
            if node_alive is None:
                y = macs.run(block, h) if record else block(h)
            else:
                y = self._run_block(block, h if cols else None, node_alive, pruned, macs if record else None, xs[0])
                alive.append(node_alive)
            if j == 0 and removal:
                alive.append(torch.ones(batch, dtype=torch.bool, device=x.device))
            if senders is not None:
                values = senders.observe(j, y)  # the router reads the block's output before its tap
                y, slot = tap(y, values) if y.requires_grad else (y, GradSlot())
                if not y.requires_grad and values.requires_grad:
                    senders.unread.append(values)  # a node removed for the whole batch
            elif use_taps and y.requires_grad:
                y, slot = tap(y)
            else:
                slot = GradSlot()
            slots.append(slot)
            xs.append(y)
            if senders is None:
                g.observe(state, j, y)
            if record and hasattr(g, "routers"):
                macs.add_all(g.routers[j].fc.in_features * g.routers[j].fc.out_features)
        if senders is not None and senders.unread and h.requires_grad:
            # what the per-receiver gates give the routers of nodes removed for the whole batch: zero
            # gradients, not none (an optimizer's weight decay and momentum still step them)
            h = h + 0 * torch.stack([v.sum() for v in senders.unread]).sum()
        if cost:
            p_alive = alive_probabilities(p_open, [g.predecessors(j) for j in range(self.num_nodes)], batch)
            self.expected_block_macs = sum(p_alive[j] * self.block_macs[j] for j in range(1, n)) if n > 1 else 0.0
        if record:
            self.adjacency, self.router_adjacency = adj, raw
            self.removed = ~torch.stack(alive, 1) if removal else torch.zeros(batch, self.num_nodes, dtype=torch.bool)
            if removal:
                self.removed = torch.cat([self.removed, self.removed.new_zeros(batch, 1)], 1)  # output node
            self.macs = macs.total
        return h

    @staticmethod
    def _run_block(
        block: nn.Module, h: Tensor | None, alive: Tensor, pruned: bool, macs: _MacCounter | None, like: Tensor
    ) -> Tensor:
        """Run ``block`` for the samples where it is alive; removed samples get a zero output."""
        run = macs.run if macs is not None else (lambda b, t, idx=None: b(t))
        if not pruned:  # dense reference: compute everything, zero the removed samples
            y = run(block, h)
            return y * alive.view(-1, *([1] * (y.ndim - 1))).to(y.dtype)
        if h is None:
            return torch.zeros_like(like)
        count = int(alive.sum())
        if count == alive.numel():
            return run(block, h)
        idx = alive.nonzero().squeeze(1)
        y = run(block, h.index_select(0, idx), idx)
        return y.new_zeros((alive.numel(), *y.shape[1:])).index_copy(0, idx, y)


class BranchNode(nn.Module):
    """Node view of a block in branch form: calls ``block.forward_branch`` (no shortcut).

    Held by the stage outside its registered children, so the block's parameters keep their names.
    ``relu_input`` says that the branch starts with a plain ``nn.ReLU`` and that
    ``forward_branch(x, act=False)`` skips it: inference then applies it in the aggregation's pass.
    """

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block
        fb = getattr(block, "forward_branch", None)
        takes_act = fb is not None and "act" in inspect.signature(fb).parameters
        self.relu_input = takes_act and type(getattr(block, "branch_act", None)) is nn.ReLU

    def forward(self, x: Tensor, act: bool = True) -> Tensor:
        return self.block.forward_branch(x) if act else self.block.forward_branch(x, act=False)

    def without_act(self) -> Callable[[Tensor], Tensor]:
        """``self(x, act=False)`` as a one-argument callable for the inference fast paths: the
        block's ``forward_branch`` itself where the module call would do nothing but call
        ``forward`` (no hook, here or global, no compiled call, ``forward`` not replaced)."""
        if _module_call_is_forward(self) and "forward" not in self.__dict__:
            return partial(self.block.forward_branch, act=False)
        return partial(self, act=False)


def _module_call_is_forward(m: nn.Module) -> bool:
    """Whether ``m(...)`` is ``m.forward(...)`` right now: ``nn.Module._call_impl``'s own test for
    skipping its hook logic (False where this torch keeps the global hooks elsewhere)."""
    return not (
        None in _GLOBAL_HOOKS
        or any(_GLOBAL_HOOKS)
        or m._forward_hooks
        or m._forward_pre_hooks
        or m._backward_hooks
        or m._backward_pre_hooks
        or getattr(m, "_compiled_call_impl", None) is not None
    )


def _gates_per_sender(g: EdgeWeights) -> bool:
    """Whether ``g`` is a routed complete DAG whose gates can run per sender (``RoutedEdges`` as
    shipped: nothing of its per-forward interface overridden by a subclass or on the instance)."""
    if not (isinstance(g, RoutedEdges) and g.data_dependent and g.complete_dag()):
        return False
    return all(
        name not in vars(g) and getattr(type(g), name) is getattr(RoutedEdges, name)
        for name in ("observe", "node_weights", "output_gates")
    )


class _SenderWeights:
    """A training forward's edge weights gated per sender (``RoutedEdges.output_gates``).

    Node ``i``'s output edges are gated once, right after its block: their values (with autograd)
    go to ``i``'s tap, which returns their gradients, and detached copies go into ``(B, N, N)``
    matrices (row = receiver) from which each receiver reads its inputs' weights. Same values
    and gradients as ``node_weights`` per receiver, without a stack and a gate per node.
    """

    def __init__(self, g: RoutedEdges, x: Tensor, removal: bool, record: bool, cost: bool) -> None:
        n = g.num_nodes
        batch = x.shape[0]
        self.g = g
        self._keep_alpha = removal or record  # raw weights: the output node's fallback, the record
        self._cost = cost
        self.alpha: Tensor | None = None
        self.alphas: list[Tensor] = []  # with autograd, for the compute budget
        self.unread: list[Tensor] = []  # output-edge values of nodes without a tap
        self.value: Tensor | None = None
        self.open: Tensor | None = torch.zeros(batch, n, n, dtype=torch.bool, device=x.device) if removal else None
        self._shape = (batch, n, n)

    def observe(self, i: int, y: Tensor) -> Tensor:
        """Gate node ``i``'s output edges from its output ``y``; returns their values, with autograd."""
        alpha, value, open_ = self.g.output_gates(i, y)
        if self.value is None:
            self.value = value.new_zeros(self._shape)
            self.alpha = value.new_zeros(self._shape) if self._keep_alpha else None
        with torch.no_grad():
            self.value[:, i + 1 :, i] = value
            if self.alpha is not None:
                self.alpha[:, i + 1 :, i] = alpha
            if self.open is not None:
                self.open[:, i + 1 :, i] = open_
        if self._cost:
            self.alphas.append(alpha)
        return value

    def node_weights(self, j: int) -> tuple[Tensor | None, Tensor, Tensor | None]:
        """``(alpha, value, open)`` of node ``j``'s input edges (detached), as ``node_weights``; the
        values a copy (the aggregation saves them, and later senders write the matrix). ``alpha``
        is None unless nodes can be removed or the forward is recorded (nothing else reads it)."""
        alpha = None if self.alpha is None else self.alpha[:, j, :j]
        return alpha, self.value[:, j, :j].clone(), None if self.open is None else self.open[:, j, :j]

    def alpha_with_grad(self, j: int) -> Tensor:
        return torch.stack([self.alphas[i][:, j - i - 1] for i in range(j)], 1)


def alive_probabilities(p_open: list[Tensor], preds: list[list[int]], batch: int) -> list[Tensor]:
    """``P(block j alive)`` per sample, ``j = 0 .. n-1``, from edge-open probabilities.

    ``p_open[j]`` is ``(B, k_j)`` for node ``j``'s input edges from ``preds[j]``: the removal rule of
    Sec. 3.3 with independent edges (node 0 always runs; the output node is not a block).
    """
    alive = [torch.ones(batch, dtype=p_open[-1].dtype, device=p_open[-1].device)]
    for j in range(1, len(p_open) - 1):
        live = torch.stack([alive[i] for i in preds[j]], 1)
        alive.append(1 - torch.prod(1 - p_open[j] * live, dim=1))
    return alive


def _block_macs(block: nn.Module, h: Tensor) -> float:
    """Per-sample MACs of ``block`` on inputs like ``h``: one counted call, in eval mode so that
    no BatchNorm statistics move."""
    modes = [(m, m.training) for m in block.modules()]
    block.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            block(h[:1].detach())
    finally:
        for m, mode in modes:
            m.training = mode
    return fc.get_total_flops() / 2


def _close_removed(
    alpha: Tensor, open_: Tensor | None, pred_alive: list[Tensor], output: bool
) -> tuple[Tensor, Tensor]:
    """Close the edges of removed predecessors; say per sample whether the node is alive.

    A block none of whose input edges is open is removed (Sec. 3.3). The output node is never
    removed: when all its edges are closed it keeps its strongest edge from a live node.
    """
    live = torch.stack(pred_alive, 1)
    open_ = live if open_ is None else open_ & live
    any_open = open_.any(1)
    if not output:
        return open_, any_open
    strongest = alpha.detach().masked_fill(~live, float("-inf")).argmax(1, keepdim=True)
    forced = torch.zeros_like(open_).scatter_(1, strongest, True) & ~any_open.unsqueeze(1)
    return open_ | forced, torch.ones_like(any_open)


class _MacCounter:
    """Multiply-adds executed per sample in one stage forward, counted with torch's FLOP counter."""

    def __init__(self, batch: int) -> None:
        self.total = torch.zeros(batch, dtype=torch.float64)

    def add_all(self, per_sample: float) -> None:
        self.total += per_sample

    def run(self, block: nn.Module, h: Tensor, idx: Tensor | None = None) -> Tensor:
        with FlopCounterMode(display=False) as fc:
            y = block(h)
        per_sample = fc.get_total_flops() / 2 / h.shape[0]
        if idx is None:
            self.total += per_sample
        else:
            self.total.index_add_(0, idx.cpu(), torch.full((idx.numel(),), per_sample, dtype=torch.float64))
        return y


def _rename_legacy_keys(state_dict, prefix, *args) -> None:
    """Checkpoints written before 0.2 kept the edge weights under ``graph.``; now ``edges.``."""
    old = prefix + "graph."
    for k in [k for k in state_dict if k.startswith(old)]:
        state_dict[prefix + "edges." + k[len(old) :]] = state_dict.pop(k)

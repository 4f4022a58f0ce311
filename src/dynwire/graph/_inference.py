"""The inference fast path of a graph stage: node removal (Sec. 3.3) with few ops per node.

The stage's general loop (``GraphStage._forward_graph``) builds every node's weights edge by
edge, records adjacency and MACs, and serves training; it stays the reference. In inference
(no gradients, nothing recorded, not traced) this path computes the same outputs with work per
node that does not grow with the number of its inputs, apart from the aggregation itself:

* each router runs once and gates all of its node's output edges in one call, written into
  ``(B, N, N)`` edge matrices (:class:`~dynwire.graph.edges.EdgeMatrices`);
* a node reads its row of those matrices, masks it with its predecessors' alive flags, and
  one ``.sum()`` decides whether it runs for all samples, some (gather, run, scatter) or none;
* inputs that are dead for every sample of the batch are never read, and a block dead for
  every sample is skipped together with its router and its aggregation;
* on the CPU a plain router and its gate are one C call (``layers._fused_glue.fused_router_gate``)
  that writes the edge matrices directly, and a branch node whose branch starts with a ReLU
  (``BranchNode.relu_input``; also the stage's output activation) gets it applied in the
  aggregation's own pass, so the node input is written once and never copied by the activation;
* at batch 1 on the CPU a node is its block and one C call (``SampleKernels.run``): its router and
  gate, the removal of the nodes after it and the next node's input, in C arrays, not tensors;
* at a larger batch on the CPU (a complete DAG of plain routers) a node is its block and one C call
  too (``SampleKernels.run_batch``): the previous node's router and gate into the edge matrices,
  this node's per-sample weights and alive flags, and its input for the live samples only, packed
  (sample by sample on one thread, so the sum reads the previous output while it is in cache).
  In a long stage some calls also write the next node's partial sum over the inputs they read,
  while those are in cache, so that node reads two maps from memory instead of all of its inputs
  (``layers._fused_glue._partial_sum_steps``; the same bits on a build with the line kernels).
  ``_forward_batch`` is that call's tensor-op reference.

At batch 1 a stage keeps the path its C calls took (``_OneSample``) and later forwards only check,
before anything runs, that what it was built on still holds (``_OneSample.fits``): the stage's
whole decision above is Python that runs between convolutions, on every forward.
"""

from __future__ import annotations

import weakref
from functools import partial

import torch
from torch import Tensor, nn

from ..layers._fused_glue import SampleKernels, _backend_for, _node_calls, fused_node_weights
from ..layers.aggregation import _aggregate_impl
from ..layers.router import edge_gate_floats
from .edges import RoutedEdges

__all__ = ["forward_inference", "forward_one_kept"]


def forward_inference(
    stage: nn.Module, x: Tensor, blocks: list[nn.Module], pruned: bool, output_act: nn.Module | None = None
) -> Tensor:
    """Run ``stage`` on ``x`` in inference; equal to ``stage._forward_graph(x, blocks, output_act)`` (the reference).

    ``pruned``: removed nodes are not computed (the pruned executor); otherwise every block runs
    on the whole batch and removed samples are zeroed (the dense executor's arithmetic).
    """
    g = stage.edges
    batch = x.shape[0]
    n = stage.num_blocks
    # which aggregations may apply the ReLU that follows them: branch inputs and the stage output
    relu = [getattr(b, "relu_input", False) for b in blocks] + [type(output_act) is nn.ReLU]
    if batch == 1 and pruned and x.device.type == "cpu":
        out = _forward_one(g, x, blocks, relu, stage=stage)
        return out if output_act is None or relu[n] else output_act(out)
    mats = g.begin_matrices(batch, x)
    removal = mats.open is not None
    alive = x.new_ones(batch, n + 1, dtype=torch.bool) if removal else None
    kern = _stage_kernels(g, x)
    if kern is not None:
        first = blocks[0](x)
        out = kern.run_batch(blocks, first, mats, alive, relu, g.eval_gate, pruned)
        if out is not None:
            return out if output_act is None or relu[n] else output_act(out)
        return _forward_batch(g, x, blocks, pruned, output_act, relu, mats, alive, first)
    return _forward_batch(g, x, blocks, pruned, output_act, relu, mats, alive)


#: the per-forward interface of ``RoutedEdges`` that the C calls replace (overridden: not taken)
_PER_FORWARD = frozenset({"output_gates", "begin_matrices", "observe_matrices"})


def _stage_kernels(g: nn.Module, x: Tensor) -> SampleKernels | None:
    """The C calls for a complete DAG of plain routers (``RoutedEdges`` as shipped, nothing of its
    per-forward interface overridden by a subclass or on the instance), or None."""
    if not (isinstance(g, RoutedEdges) and g.data_dependent and g.complete_dag()):
        return None
    for name in _PER_FORWARD:
        if name in vars(g) or getattr(type(g), name) is not getattr(RoutedEdges, name):
            return None
    return SampleKernels.for_stage(g.routers, g.tau, x)


def _forward_batch(
    g: nn.Module,
    x: Tensor,
    blocks: list[nn.Module],
    pruned: bool,
    output_act: nn.Module | None,
    relu: list[bool],
    mats,
    alive: Tensor | None,
    first: Tensor | None = None,
) -> Tensor:
    """A batch, node by node with tensor ops (the C calls' reference); ``first``: block 0's
    output, when it ran already."""
    n = len(blocks)
    batch = x.shape[0]
    removal = mats.open is not None
    dead = [False] * (n + 1)  # node removed for every sample of the batch: never read again
    xs: list[Tensor | None] = []
    h = x
    for j in range(n + 1):
        node_alive = count = None
        if j:
            preds = g.predecessors(j)
            cols = preds if preds == list(range(j)) else None
            index = slice(0, j) if cols is not None else preds
            fused = removal and j < n and cols is not None and fused_node_weights(mats.value, mats.open, alive, j)
            if fused:  # one C call for the tensor ops below
                w, count = fused
                node_alive = alive[:, j]
                if count == 0 and pruned:
                    dead[j] = True
                    xs.append(None)
                    continue
            elif removal:
                value = mats.value[:, j, index]
                open_ = mats.open[:, j, index] & alive[:, index]
                if j < n:
                    node_alive = open_.any(1)
                    count = int(node_alive.sum())
                    alive[:, j] = node_alive
                    if count == 0 and pruned:
                        dead[j] = True
                        xs.append(None)
                        continue
                else:
                    open_ = _output_fallback(open_, mats.alpha_out[:, index], alive[:, index])
                w = value * open_
            else:
                w = mats.value[:, j, index]
            live = [c for c, i in enumerate(preds) if not dead[i]]
            if len(live) < len(preds):
                w = w[:, live]
            h = _aggregate_impl(w, [xs[preds[c]] for c in live], relu=relu[j])
        if j == n:
            return h if output_act is None or relu[n] else output_act(h)
        block = partial(blocks[j], act=False) if j and relu[j] else blocks[j]
        y = first if j == 0 and first is not None else _run(block, h, node_alive, count, batch, pruned)
        xs.append(y)
        g.observe_matrices(mats, j, y)
    raise AssertionError("unreachable")


def _forward_one(
    g: nn.Module,
    x: Tensor,
    blocks: list[nn.Module],
    relu: list[bool],
    first: Tensor | None = None,
    stage: nn.Module | None = None,
) -> Tensor:
    """One sample on the CPU: the gates as Python numbers (one ``.tolist()`` per router), so a
    node costs its block, its router and one ``add_`` per live input, and a removed node nothing.
    Plain routers of a complete DAG take one C call per node instead
    (:meth:`~dynwire.layers._fused_glue.SampleKernels.run`), and ``stage`` then keeps that path for
    its next forwards (:class:`_OneSample`). ``first``: block 0's output, when it ran already (then
    the Python numbers go on from it)."""
    n = len(blocks)
    removal = g.can_close()
    routers = tau = None
    if isinstance(g, RoutedEdges) and type(g).output_gates is RoutedEdges.output_gates:
        routers = g.routers
        kern = _stage_kernels(g, x) if first is None else None
        if kern is not None:
            first = blocks[0](x)
            calls = _node_calls(blocks, relu)
            out = kern.run(blocks, first, relu, g.eval_gate, removal, calls)
            if out is not None:
                if stage is not None:
                    _ONE[stage] = _OneSample(stage, g, kern, blocks, relu, removal, calls)
                return out
        tau = g.tau.tolist()
    if g.data_dependent:
        value = [[0.0] * (n + 1) for _ in range(n + 1)]
        opened = [[False] * (n + 1) for _ in range(n + 1)]
        alpha_out: list = [0.0] * (n + 1)  # raw weight of each edge into the output node (its fallback)
    else:
        mats = g.begin_matrices(1, x)
        value, alpha_out = mats.value[0].tolist(), mats.alpha_out[0].tolist()
        opened = mats.open[0].tolist() if removal else None
    alive = [True] + [False] * n
    xs: list[Tensor | None] = []
    h = x
    for j in range(n + 1):
        if j:
            preds = g.predecessors(j)
            if removal:
                live = [i for i in preds if alive[i] and opened[j][i]]
                if not live and j < n:  # removed (Sec. 3.3)
                    xs.append(None)
                    continue
                if not live:  # the output node keeps its strongest edge from a live node
                    live = [max((i for i in preds if alive[i]), key=lambda i: alpha_out[i])]
            else:
                live = preds
            h = xs[live[0]] * value[j][live[0]]
            for i in live[1:]:
                h.add_(xs[i], alpha=value[j][i])
            if relu[j]:
                h.relu_()
        if j == n:
            return h
        alive[j] = True
        if j == 0 and first is not None:  # block 0 ran already
            y = first
        else:
            y = blocks[j](h, act=False) if j and relu[j] else blocks[j](h)
        xs.append(y)
        if g.data_dependent:
            if routers is not None:  # one router call and one .tolist(); the gate on Python numbers
                a = routers[j](y).tolist()[0]
                v, o = edge_gate_floats(a, tau[j:], g.eval_gate)
                o = o if removal else None
            else:
                a, v, o = g.output_gates(j, y)
                a, v, o = a.tolist()[0], v.tolist()[0], None if o is None else o.tolist()[0]
            for r, vv in enumerate(v, start=j + 1):
                value[r][j] = vv
            if o is not None:
                for r, oo in enumerate(o, start=j + 1):
                    opened[r][j] = oo
            alpha_out[j] = a[-1]
    raise AssertionError("unreachable")


#: torch's global module hooks (a None where this torch keeps them elsewhere)
_GLOBAL_HOOKS = tuple(
    getattr(torch.nn.modules.module, name, None)
    for name in (
        "_global_forward_hooks",
        "_global_forward_pre_hooks",
        "_global_backward_hooks",
        "_global_backward_pre_hooks",
    )
)


#: each stage's batch-1 path with the C calls as last built (:class:`_OneSample`), keyed weakly by
#: the stage: a model that is deleted, copied or pickled takes nothing along
_ONE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def forward_one_kept(stage: nn.Module, x: Tensor) -> Tensor | None:
    """``stage(x)`` for one CPU sample through the path its last such forward built with the C calls
    (the same outputs as :func:`forward_inference`), where everything that path was built on still
    holds (:meth:`_OneSample.fits`); None otherwise, before anything ran."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing():  # first: nothing below is traced
        return None
    one = _ONE.get(stage)
    if one is None or not one.fits(stage, x):
        return None
    return one(x)


_ONNX: list = []  # the flags torch.onnx.is_in_onnx_export reads, once bound; [None] where not found


def in_onnx_export() -> bool:
    """``torch.onnx.is_in_onnx_export()`` without the two imports it runs per call (on every stage of
    every forward): it reads the flags of the TorchScript exporter and of the exporter; that function
    itself under ``torch.compile`` and where this torch keeps them elsewhere."""
    if torch.compiler.is_compiling():  # what the compiler knows how to trace
        return torch.onnx.is_in_onnx_export()
    if not _ONNX:
        try:
            from torch.onnx._internal.exporter import _flags
            from torch.onnx._internal.torchscript_exporter._globals import GLOBALS
        except ImportError:
            _ONNX.append(None)
        else:
            _ONNX.append((GLOBALS, _flags))
    flags = _ONNX[0]
    if flags is None:
        return torch.onnx.is_in_onnx_export()
    return bool(flags[0].in_onnx_export or flags[1]._is_onnx_exporting)


def _own_call(d: dict) -> bool:
    return "forward" in d or d.get("_compiled_call_impl") is not None


class _OneSample:
    """A stage's batch-1 CPU path with the C calls, kept between forwards: its kernels, node
    callables, relu flags and gate, and what :func:`forward_inference` checked to choose them
    (inference on the pruned executor, nothing recorded or traced, a complete DAG of plain routers
    as checked by :meth:`SampleKernels._still_fits`, branch nodes called without their module call
    only while that call would do nothing). :meth:`fits` checks it all again in a few operations,
    so that a forward at batch 1 costs its blocks and C calls, not the setup's Python."""

    __slots__ = ("blocks", "calls", "eval_gate", "g", "hooks", "kern", "kind", "output_act", "preds")
    __slots__ += ("relu", "removal", "shortcuts")

    def __init__(self, stage, g, kern: SampleKernels, blocks, relu: list[bool], removal: bool, calls: list) -> None:
        self.g, self.kind, self.preds, self.eval_gate = g, type(g), g._preds, g.eval_gate
        self.kern, self.blocks, self.relu, self.removal, self.calls = kern, list(blocks), relu, removal, calls
        self.output_act = stage.output_act
        # nodes whose module call is skipped (BranchNode.without_act): their hooks and own call are watched
        skipped = [b for b, c in zip(blocks, calls) if isinstance(c, partial) and c.func is not b]
        self.hooks = tuple(_GLOBAL_HOOKS) + tuple(
            d
            for b in skipped
            for d in (b._forward_hooks, b._forward_pre_hooks, b._backward_hooks, b._backward_pre_hooks)
        )
        self.shortcuts = tuple(b.__dict__ for b in skipped)

    def fits(self, stage: nn.Module, x: Tensor) -> bool:
        """Whether ``stage(x)`` would take this path: see the class."""
        g = self.g
        backend = _backend_for(x)  # inference, CPU, dtype, not compiling, no dispatch mode
        return (
            backend is not None
            and x.shape[0] == 1
            and not (stage.training or g.training or stage.record_adjacency)
            and stage.executor == "pruned"
            and not in_onnx_export()
            and stage._nodes == self.blocks
            and stage._modules.get("edges") is g
            and stage._modules.get("output_act") is self.output_act  # where a module (or None) is set
            and type(g) is self.kind
            and g._preds is self.preds
            and g.eval_gate == self.eval_gate
            and not (g.__dict__.keys() & _PER_FORWARD)
            and not any(self.hooks)
            and not any(map(_own_call, self.shortcuts))
            and self.kern._still_fits(backend, g._modules.get("routers"), g._parameters.get("tau"), x.dtype)
        )

    def __call__(self, x: Tensor) -> Tensor:
        first = self.blocks[0](x)
        out = self.kern.run(self.blocks, first, self.relu, self.eval_gate, self.removal, self.calls)
        if out is None:  # block 0's output does not fit the C call: Python numbers from it
            out = _forward_one(self.g, x, self.blocks, self.relu, first)
        return out if self.output_act is None or self.relu[-1] else self.output_act(out)


def _output_fallback(open_: Tensor, alpha: Tensor, live: Tensor) -> Tensor:
    """The output node keeps its strongest edge from a live node when all its edges are closed."""
    none_open = ~open_.any(1)
    if not bool(none_open.any()):
        return open_
    strongest = alpha.masked_fill(~live, float("-inf")).argmax(1, keepdim=True)
    forced = torch.zeros_like(open_).scatter_(1, strongest, True) & none_open.unsqueeze(1)
    return open_ | forced


def _run(block: nn.Module, h: Tensor, alive: Tensor | None, count: int | None, batch: int, pruned: bool) -> Tensor:
    if alive is None or count == batch:
        return block(h)
    if not pruned:
        y = block(h)
        return y * alive.view(-1, *([1] * (y.ndim - 1))).to(y.dtype)
    idx = alive.nonzero().squeeze(1)
    y = block(h.index_select(0, idx))
    return y.new_zeros((batch, *y.shape[1:])).index_copy_(0, idx, y)

"""Weighted feature aggregation of a graph node (paper Eq. 3, gradients Eq. 8-10).

``aggregate(weights, xs)`` computes ``sum_i weights[:, i] * xs[i]`` per sample without
stacking the predecessors: the forward pass accumulates in place into one output tensor
and the backward pass computes ``grad_x_i = w_i * g`` and ``grad_w_i = <g, x_i>``.
It is a ``torch.library`` custom op so that ``torch.compile`` treats it as one opaque node
and ``torch.utils.flop_counter`` counts it (``K`` multiply-adds per output element).

``recompute_aggregations()`` is the memory half of the buffer mechanism (Sec. 3.4): while it
is active, an aggregated tensor that a later layer saves for backward is not kept; only the
recipe (weights plus references to the predecessors, which are alive anyway) is kept and the
sum is recomputed when backward needs it.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode
from torch.utils.flop_counter import register_flop_formula

from ._fused import _flat, _fused_backend, fused_aggregation, fused_available  # noqa: F401  (public here too)

__all__ = [
    "aggregate",
    "aggregate_reference",
    "fused_aggregation",
    "fused_available",
    "recompute_aggregations",
    "GradSlot",
    "tap",
]


def _per_sample(w: Tensor, ndim: int) -> Tensor:
    return w.reshape(w.shape[0], *([1] * (ndim - 1)))


def _columns(weights: Tensor, dtype: torch.dtype, ndim: int) -> Tensor:
    """``(K, B, 1, 1, ...)``: row ``k`` is column ``k`` of ``weights`` shaped to broadcast (no copies per k)."""
    return weights.to(dtype).t().contiguous().reshape(weights.shape[1], weights.shape[0], *([1] * (ndim - 1)))


def _aggregate_plain(weights: Tensor, xs: Sequence[Tensor]) -> Tensor:
    """The reference kernel: one whole-tensor pass per input (reads ``x_k``, reads and writes the sum)."""
    w = _columns(weights, xs[0].dtype, xs[0].ndim)
    out = xs[0] * w[0]
    for k in range(1, len(xs)):
        out.addcmul_(xs[k], w[k])
    return out


_CHECK = object()


def _aggregate_impl(weights: Tensor, xs: Sequence[Tensor], relu: bool = False, backend=_CHECK) -> Tensor:
    """The forward sum (a new tensor); ``relu``: ``max(sum, 0)`` in the same pass (inference of a
    branch node whose branch starts with a ReLU). ``backend``: ``_fused_backend(xs)`` when the
    caller has it already."""
    if backend is _CHECK:
        backend = _fused_backend(xs)
    if backend is None:
        out = _aggregate_plain(weights, xs)
        return out.relu_() if relu else out
    out = torch.empty_like(xs[0])
    backend.forward(weights.detach(), xs, _flat(out), relu)  # xs checked dense: their pointers suffice
    return out


@torch.library.custom_op("dynwire::aggregate", mutates_args=())
def _aggregate_op(weights: Tensor, xs: list[Tensor]) -> Tensor:
    return _aggregate_impl(weights, xs)


@_aggregate_op.register_fake
def _(weights: Tensor, xs: list[Tensor]) -> Tensor:
    return torch.empty_like(xs[0])


def _batched_dot(g: Tensor, x: Tensor) -> Tensor:
    fg, fx = _flat(g), _flat(x)
    if fg is not None and fx is not None and g.stride() == x.stride():
        if g.device.type == "cpu" and fg.shape[1] >= 65536 and fg.shape[0] <= 64:
            # one BLAS dot per sample reads each tensor once and allocates nothing: ~2x faster
            # than vecdot (mul + sum) on large CPU feature maps; bmm of (1 x N)(N x 1) is ~15x slower.
            return torch.stack([torch.dot(fg[b], fx[b]) for b in range(fg.shape[0])])
        return torch.linalg.vecdot(fg, fx)
    return (g * x).flatten(1).sum(1)


def _setup_context(ctx, inputs, output) -> None:
    weights, xs = inputs
    ctx.save_for_backward(weights, *xs)


def _backward(ctx, grad: Tensor):
    weights, *xs = ctx.saved_tensors
    backend = _fused_backend([grad, *xs])
    if backend is not None:
        grad_xs = [torch.empty_like(grad) for _ in xs]
        fx, fgx = [_flat(x) for x in xs], [_flat(t) for t in grad_xs]
        grad_w = backend.backward(weights.detach(), _flat(grad), fx, fgx, [True] * len(xs), True)
        return grad_w.to(weights.dtype), grad_xs
    grad_w = torch.stack([_batched_dot(grad, x) for x in xs], dim=1).to(weights.dtype)
    wc = _columns(weights, grad.dtype, grad.ndim)
    grad_xs = [grad * wc[k] for k in range(len(xs))]
    return grad_w, grad_xs


_aggregate_op.register_autograd(_backward, setup_context=_setup_context)


@register_flop_formula(torch.ops.dynwire.aggregate)
def _aggregate_flops(weights_shape, xs_shape, *args, **kwargs) -> int:
    # K multiply-adds per output element (the first term is a multiply only; counted anyway
    # so that a pass-through edge with a weight is not free).
    numel = 1
    for d in xs_shape[0]:
        numel *= d
    return 2 * len(xs_shape) * numel


def aggregate_reference(weights: Tensor, xs: Sequence[Tensor]) -> Tensor:
    """Plain autograd version of :func:`aggregate` (for tests and ONNX export)."""
    out = xs[0] * _per_sample(weights[:, 0].to(xs[0].dtype), xs[0].ndim)
    for k in range(1, len(xs)):
        out = out + xs[k] * _per_sample(weights[:, k].to(xs[k].dtype), xs[k].ndim)
    return out


class _Recipe:
    __slots__ = ("weights", "xs", "version")

    def __init__(self, weights: Tensor, xs: list[Tensor], version: int) -> None:
        self.weights = weights
        self.xs = xs
        self.version = version  # the sum's version counter when it was made


class _RecomputeState(threading.local):
    def __init__(self) -> None:
        self.live: dict[int, tuple[weakref.ref, _Recipe]] | None = None
        self.max_inputs: int | None = None


_STATE = _RecomputeState()


def _check_inputs(weights: Tensor, xs: Sequence[Tensor]) -> None:
    if len(xs) == 0:
        raise ValueError("aggregate() needs at least one predecessor tensor")
    if weights.ndim != 2 or weights.shape[1] != len(xs) or weights.shape[0] != xs[0].shape[0]:
        raise ValueError(
            f"aggregate(): weights must have shape (batch, {len(xs)}) for {len(xs)} inputs of "
            f"batch {xs[0].shape[0]}, got {tuple(weights.shape)}"
        )
    shape = xs[0].shape
    for i, x in enumerate(xs):
        if x.shape != shape:
            raise ValueError(
                f"aggregate(): all predecessors of a node must have the same shape; input 0 is "
                f"{tuple(shape)} but input {i} is {tuple(x.shape)}. Every block of a graph stage "
                "after the first must keep the stage's channels and resolution."
            )


class GradSlot:
    """Gradient accumulator of one node output, shared by every aggregation that reads it.

    Consumers either add ``w * g`` into ``grad`` in place (``accumulate``: the plain kernels) or
    leave ``(w, g)`` in ``pending`` (``defer``: the fused kernels), and the tap sums the pending
    terms in one fused pass when the node's own backward runs (``take``). Deferring reads each
    consumer's ``g`` once, where accumulating reads and writes the slot once per consumer.

    A slot made with ``edges > 0`` (:func:`tap` with the node's output-edge weights) also
    computes those weights' gradients, ``<g_j, x>`` for each consumer ``j`` (Eq. 9): from the
    pending ``g_j`` in the tap's pass, which already reads them (``take_edges``), or added by a
    consumer on the plain kernels (``add_dot``). Consumers then do not read their inputs again for
    their weights' gradients.

    The state belongs to one backward pass (autograd graph task). A pass that runs an
    aggregation's backward but not the tap (``torch.autograd.grad`` with respect to a threshold
    only, say) leaves a partial sum behind; it is tagged with that pass's id and discarded by the
    next pass instead of being added to its gradient.
    """

    __slots__ = ("grad", "pending", "task", "edges", "dots")

    def __init__(self, edges: int = 0) -> None:
        self.grad: Tensor | None = None
        self.pending: list[tuple[Tensor, Tensor, int]] = []
        self.task: int = -1
        self.edges = edges  # output edges whose weights' gradients this slot computes (0: none)
        self.dots: Tensor | None = None  # (B, edges) float64, from consumers on the plain kernels

    def _claim(self) -> None:
        task = torch._C._current_graph_task_id()
        if self.task != task:
            self.grad, self.pending, self.dots, self.task = None, [], None, task

    def accumulate(self, g: Tensor, w: Tensor) -> None:
        """``grad += w * g`` now (``w`` broadcasts per sample)."""
        self._claim()
        if self.grad is None:
            self.grad = g * w
        else:
            self.grad.addcmul_(g, w)

    def defer(self, g: Tensor, w: Tensor, col: int = -1) -> None:
        """Remember ``w * g`` (``w``: ``(B,)``) for ``take`` to sum; ``g`` is kept alive until then.
        ``col``: the output edge it came through (a slot with ``edges``: its weight's gradient)."""
        self._claim()
        self.pending.append((w, g, col))

    def add_dot(self, col: int, dot: Tensor) -> None:
        """Add ``dot`` (``(B,)``) to the gradient of output edge ``col``'s weight."""
        self._claim()
        if self.dots is None:
            self.dots = dot.new_zeros(dot.shape[0], self.edges, dtype=torch.float64)
        self.dots[:, col] += dot

    def _reset(self) -> tuple[Tensor | None, list, Tensor | None]:
        acc, pending, dots, task = self.grad, self.pending, self.dots, self.task
        self.grad, self.pending, self.dots, self.task = None, [], None, -1
        if task != torch._C._current_graph_task_id():
            return None, [], None
        return acc, pending, dots

    def take(self, grad: Tensor | None = None) -> Tensor | None:
        """This backward pass's gradient plus ``grad`` (the node output's other consumers); empties
        the slot. None when there is neither."""
        acc, pending, _ = self._reset()
        return _sum_terms(acc, pending, grad)

    def take_edges(self, grad: Tensor | None, x: Tensor) -> tuple[Tensor | None, Tensor | None]:
        """:meth:`take`, and the gradient ``(B, edges)`` of the output edges' weights (``x``: the
        node output; None when no consumer ran). The sum and the pending edges' dot products
        in one pass where the fused kernels apply."""
        acc, pending, dots = self._reset()
        if pending:
            pending.sort(key=lambda p: p[2])
            cols = [c for _, _, c in pending]
            if cols[0] < 0 or cols[-1] >= self.edges or any(a == b for a, b in zip(cols, cols[1:])):
                raise ValueError(f"GradSlot.take_edges(): output edges {cols} must be distinct, of 0..{self.edges - 1}")
            ws, gs = [w for w, _, _ in pending], [g for _, g, _ in pending]
            terms = [t for t in (acc, grad) if t is not None]
            # deferred terms come from consumers whose fused backward checked them against this
            # node's (tapped) output: the first stands for all of them, other terms are checked
            backend = _fused_backend(gs + terms + [x]) if terms else _fused_backend([gs[0], x])
            with torch.no_grad():
                if backend is not None:
                    out = torch.empty_like(x)
                    w = torch.stack(ws + [torch.ones_like(ws[0])] * len(terms), 1)
                    d = backend.tap(w, gs + terms, x, _flat(out), len(gs))
                else:
                    out = _sum_terms(acc, pending, grad)
                    d = torch.stack([_batched_dot(g, x).to(torch.float64) for g in gs], 1)
            if dots is None and len(cols) == self.edges:  # every output edge, in order
                return out, d
            dots = x.new_zeros(x.shape[0], self.edges, dtype=torch.float64) if dots is None else dots
            dots[:, cols] += d
            return out, dots
        return _sum_terms(acc, [], grad), dots


def _sum_terms(acc: Tensor | None, pending: list, grad: Tensor | None) -> Tensor | None:
    """``acc + grad + sum of w * g`` over ``pending`` (any of them missing); None when all are."""
    terms = [t for t in (acc, grad) if t is not None]
    if not pending:
        if len(terms) == 2:
            return acc.add_(grad)
        return terms[0] if terms else None
    ws, gs = [p[0] for p in pending], [p[1] for p in pending]
    with torch.no_grad():
        if terms and _fused_backend(gs + terms) is not None:  # the other terms in the same pass
            return _aggregate_impl(torch.stack(ws + [torch.ones_like(ws[0])] * len(terms), 1), gs + terms)
        out = _aggregate_impl(torch.stack(ws, 1), gs)
        for t in terms:
            out.add_(t)
        return out


class _Tap(torch.autograd.Function):
    """Identity whose backward adds the gradient that aggregations left in its slot."""

    @staticmethod
    def forward(ctx, x: Tensor, slot: GradSlot) -> Tensor:
        ctx.slot = slot
        ctx.set_materialize_grads(False)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor | None):
        return ctx.slot.take(grad), None


class _EdgeTap(torch.autograd.Function):
    """:class:`_Tap` that also returns the gradient of the node's output-edge weights ``values``."""

    @staticmethod
    def forward(ctx, x: Tensor, values: Tensor, slot: GradSlot) -> Tensor:
        ctx.slot = slot
        ctx.set_materialize_grads(False)
        ctx.values_dtype = values.dtype
        ctx.save_for_backward(x)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor | None):
        (x,) = ctx.saved_tensors
        gx, dots = ctx.slot.take_edges(grad, x)
        return gx, None if dots is None else dots.to(ctx.values_dtype), None


def tap(x: Tensor, edge_values: Tensor | None = None) -> tuple[Tensor, GradSlot]:
    """Route the gradients that aggregations send to ``x`` through one in-place accumulator.

    Autograd would give every consumer edge its own ``w * g`` tensor and then add them up (an
    allocation and two extra passes per edge); with a tap each aggregation backward adds
    ``w * g`` into the slot in place and the tap hands the sum on once.

    ``edge_values``: the ``(B, E)`` weights of ``x``'s output edges, with autograd. Consumers then
    aggregate with their weights detached and name their edge (``aggregate(..., cols=...)``): the
    weights' gradients ``<g_j, x>`` are computed here, in the pass that sums the ``g_j``
    (Eq. 9-10), and enter autograd through ``edge_values``.
    """
    if edge_values is None:
        slot = GradSlot()
        return _Tap.apply(x, slot), slot
    if edge_values.ndim != 2 or edge_values.shape[0] != x.shape[0]:
        raise ValueError(
            f"tap(): edge_values must be (batch, edges) for a batch of {x.shape[0]}, got {tuple(edge_values.shape)}"
        )
    slot = GradSlot(edge_values.shape[1])
    return _EdgeTap.apply(x, edge_values, slot), slot


def _fused_backward_tapped(
    weights: Tensor,
    grad: Tensor,
    xs: Sequence[Tensor],
    slots: Sequence[GradSlot],
    need_w: bool,
    cols: Sequence[int] | None = None,
    xs_checked: bool = False,
):
    """Fused backward into gradient slots: ``grad_w`` in one pass that reads ``grad`` once and every
    input once, and ``(w_k, grad)`` deferred to each slot, which its tap sums with its other
    consumers' terms in one pass (``GradSlot.take``; a slot with edges computes edge ``cols[k]``'s
    weight gradient there). Returns ``grad_w`` (None if not needed), or False when the fused
    kernel does not apply (then nothing has been touched). ``xs_checked``: the forward found ``xs``
    fit for the fused kernels (one layout), so ``grad`` is checked against the first only."""
    backend = _fused_backend([grad, xs[0]] if xs_checked else [grad, *xs])
    if backend is None:
        return False
    w = weights.detach()
    grad_w = backend.backward(w, _flat(grad), xs, None, None, True) if need_w else None
    for k, s in enumerate(slots):
        s.defer(grad, w[:, k], -1 if cols is None else cols[k])
    return None if grad_w is None else grad_w.to(weights.dtype)


def _plain_backward_tapped(
    weights: Tensor,
    grad: Tensor,
    xs: Sequence[Tensor],
    slots: Sequence[GradSlot],
    need_w: bool,
    cols: Sequence[int] | None = None,
) -> Tensor | None:
    """The reference backward into gradient slots: whole-tensor passes, one edge at a time."""
    grad_w = None
    if need_w:
        grad_w = torch.stack([_batched_dot(grad, x) for x in xs], dim=1).to(weights.dtype)
    wc = _columns(weights, grad.dtype, grad.ndim)
    for k, slot in enumerate(slots):
        slot.accumulate(grad, wc[k])
        if slot.edges and cols is not None and cols[k] >= 0:
            slot.add_dot(cols[k], _batched_dot(grad, xs[k]).to(torch.float64))
    return grad_w


class _AggregateTapped(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weights: Tensor, slots: tuple, cols: tuple, *xs: Tensor) -> Tensor:
        ctx.save_for_backward(weights, *xs)
        ctx.slots, ctx.cols = slots, cols
        backend = _fused_backend(xs)
        ctx.xs_checked = backend is not None
        return _aggregate_impl(weights, xs, backend=backend)

    @staticmethod
    def backward(ctx, grad: Tensor):
        weights, *xs = ctx.saved_tensors
        need_w = ctx.needs_input_grad[0]
        grad_w = _fused_backward_tapped(weights, grad, xs, ctx.slots, need_w, ctx.cols, ctx.xs_checked)
        if grad_w is False:
            grad_w = _plain_backward_tapped(weights, grad, xs, ctx.slots, need_w, ctx.cols)
        return (grad_w, None, None) + (None,) * len(xs)


def aggregate(
    weights: Tensor,
    xs: Sequence[Tensor],
    slots: Sequence[GradSlot] | None = None,
    cols: Sequence[int] | None = None,
    recompute: bool = True,
) -> Tensor:
    """Per-sample weighted sum of same-shaped tensors (Eq. 3).

    Args:
        weights: ``(B, K)`` edge weights, row ``b`` holds the weights of sample ``b``.
        xs: ``K`` tensors of identical shape ``(B, ...)``.
        slots: optional :class:`GradSlot` of each input (from :func:`tap`); their gradients are
            then accumulated in place instead of being returned to autograd.
        cols: with ``slots`` from :func:`tap` with ``edge_values``: the output edge of each input
            that this sum reads (its column in that input's ``edge_values``). The weights'
            gradients are then computed by the taps, and ``weights`` must be detached.
        recompute: False when the caller modifies the sum in place (an activation): it could not be
            recomputed then, so no recipe is kept for it (under :func:`recompute_aggregations`).
    """
    _check_inputs(weights, xs)
    xs = list(xs)
    if not torch.compiler.is_compiling() and not torch.is_grad_enabled() and _get_current_dispatch_mode() is None:
        # inference: the same sum without the custom op's dispatch (tens of microseconds per call);
        # under a dispatch mode (the FLOP counter) the op stays visible
        return _aggregate_impl(weights, xs)
    if cols is not None:
        if slots is None or len(cols) != len(xs):
            raise ValueError(
                f"aggregate(): cols needs a gradient slot per input, got {len(cols)} cols for {len(xs)} inputs"
            )
        if weights.requires_grad:
            raise ValueError(
                "aggregate(): with cols the edge weights' gradients come from the taps' edge_values; "
                "pass the weights detached (weights.detach())"
            )
    if slots is not None and torch.is_grad_enabled() and not torch.compiler.is_compiling():
        if len(slots) != len(xs):
            raise ValueError(f"aggregate(): got {len(slots)} gradient slots for {len(xs)} inputs")
        cols = tuple(cols) if cols is not None else (-1,) * len(xs)
        out = _AggregateTapped.apply(weights, tuple(slots), cols, *xs)
    else:
        out = _aggregate_op(weights, xs)
    live = _STATE.live
    if (
        recompute
        and live is not None
        and out.requires_grad
        and (_STATE.max_inputs is None or len(xs) <= _STATE.max_inputs)
    ):
        live[out.data_ptr()] = (weakref.ref(out), _Recipe(weights.detach(), [x.detach() for x in xs], out._version))
    return out


def _pack(t: Tensor):
    live = _STATE.live
    if live is not None:
        entry = live.get(t.data_ptr())
        if entry is not None:
            ref, recipe = entry
            o = ref()
            if (
                o is not None
                and o.shape == t.shape
                and o.stride() == t.stride()
                and o.dtype == t.dtype
                and o.storage_offset() == t.storage_offset()
                # an in-place op (a block starting with ReLU(inplace=True)) changed the sum:
                # the recipe no longer describes the tensor, so keep the tensor itself
                and t._version == recipe.version
            ):
                return recipe
    return t


def _unpack(p):
    if isinstance(p, _Recipe):
        with torch.no_grad():
            return _aggregate_impl(p.weights, p.xs)
    return p


@contextmanager
def recompute_aggregations(enabled: bool = True, max_inputs: int | None = None) -> Iterator[None]:
    """Do not keep aggregated node inputs for backward; recompute them from their recipe.

    Each node input ``x'_j = sum_i a_ij x_i`` is a new tensor that the block's first
    convolution would otherwise save, one extra activation per block. The predecessors
    ``x_i`` are kept alive by the graph anyway, so keeping only the weights costs nothing.
    The sum is recomputed (``K`` multiply-adds per element) in backward. That costs ``K``
    passes over the node's input, so with ``max_inputs`` only nodes with at most that many
    predecessors are recomputed: early stages (large maps, few blocks) save the most memory per
    pass, nodes deep in a long stage cost the most time.
    """
    if not enabled or _STATE.live is not None:
        yield
        return
    _STATE.live = {}
    _STATE.max_inputs = max_inputs
    try:
        with torch.autograd.graph.saved_tensors_hooks(_pack, _unpack):
            yield
    finally:
        _STATE.live = None

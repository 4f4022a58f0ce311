"""The C library's inference glue on the CPU: a node's router and edge gate, a block node's input
weights, and the batch-1 path's calls (``graph._inference``). Each returns None / False where it
does not apply; the caller's tensor ops (``Router``, ``edge_gate``, the masks) are the reference
and the tests compare against them.
"""

from __future__ import annotations

import ctypes
import weakref
from functools import partial

import torch
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode

from ._fused import _BACKENDS, _MODE, _CpuKernels
from .router import Router

__all__ = ["SampleKernels", "fused_node_weights", "fused_router_gate"]


_GATE_MODES = {"masked": 0, "hard": 1, "soft": 2}


def _backend_for(t: Tensor) -> _CpuKernels | None:
    """The CPU kernels for inference on ``t``; None under autograd, compile, a dispatch mode (the
    FLOP counter) or ``fused_aggregation("off")``, and for a device or dtype they do not cover."""
    backend = _BACKENDS["cpu"]
    if (
        _MODE.mode == "off"
        or torch.is_grad_enabled()
        or not t.is_cpu
        or not isinstance(backend, _CpuKernels)
        or t.dtype not in backend._router
        or torch.compiler.is_compiling()
        or _get_current_dispatch_mode() is not None
    ):
        return None
    return backend


def _plain_router(router: torch.nn.Module, dt: torch.dtype) -> tuple[Tensor, Tensor] | None:
    """``(weight, bias)`` of a plain :class:`Router` without hooks whose parameters are dense CPU
    tensors of dtype ``dt``; None for anything else (the C calls would skip what it does)."""
    if type(router) is not Router or router._forward_hooks or router._forward_pre_hooks:
        return None
    fc = router._modules.get("fc")
    if type(fc) is not torch.nn.Linear or fc._forward_hooks or fc._forward_pre_hooks:
        return None
    weight, bias = fc._parameters["weight"], fc._parameters["bias"]
    if (
        bias is None
        or not (weight.is_cpu and bias.is_cpu)
        or weight.dtype != dt
        or bias.dtype != dt
        or not (weight.is_contiguous() and bias.is_contiguous())
    ):
        return None
    return weight, bias


def fused_router_gate(
    router: torch.nn.Module,
    y: Tensor,
    tau: Tensor,
    eval_gate: str,
    value: Tensor,
    open_: Tensor | None = None,
    alpha_last: Tensor | None = None,
) -> bool:
    """A node's router (Eq. 4) and edge gate (Eq. 5) in inference as one C call; False when it
    does not apply (then the caller runs :class:`~dynwire.layers.router.Router` and
    :func:`~dynwire.layers.router.edge_gate`, the reference).

    Writes ``value`` ``(B, K)`` (what each open edge carries), ``open_`` (bool, ``alpha >= tau``)
    and ``alpha_last`` ``(B,)`` (the raw weight of the last edge) through their strides, e.g.
    straight into the stage's edge matrices; ``eval_gate="hard"`` makes ``value`` the raw weights.
    Applies to a plain ``Router`` (no hooks) on a dense float32/float64 CPU ``y`` ``(B, C, ...)``
    whose parameters, ``tau`` and outputs share its dtype, outside autograd, compile and
    dispatch modes. Sums are float32 for float32 (the decision ``alpha >= tau`` may differ from
    the reference's in the last bit of ``alpha``).
    """
    backend = _backend_for(y)
    dt = y.dtype
    params = None if backend is None else _plain_router(router, dt)
    if params is None:
        return False
    weight, bias = params
    outs = (value,) if open_ is None else (value, open_)
    if alpha_last is not None:
        outs += (alpha_last,)
    if not all(t.is_cpu for t in (tau, *outs)) or not all(
        t.dtype == dt for t in (tau, value) + (() if alpha_last is None else (alpha_last,))
    ):
        return False
    B, K = value.shape
    if (
        y.ndim < 2
        or not (y.is_contiguous() and tau.is_contiguous())
        or B == 0
        or y.numel() == 0
        or y.shape[0] != B
        or weight.shape != (K, y.shape[1])
        or tau.shape != (K,)
        or (open_ is not None and (open_.dtype != torch.bool or open_.shape != (B, K)))
        or (alpha_last is not None and alpha_last.shape != (B,))
    ):
        return False
    backend.router_gate(y, weight, bias, tau, _GATE_MODES[eval_gate], value, open_, alpha_last)
    return True


def fused_node_weights(value: Tensor, open_: Tensor, alive: Tensor, j: int) -> tuple[Tensor, int] | None:
    """Block node ``j``'s input weights from the stage's edge matrices in one C call (inference).

    ``value`` ``(B, N, N)`` and ``open_`` (bool, same shape) are :class:`~dynwire.graph.edges.EdgeMatrices`
    fields, ``alive`` ``(B, N)`` bool the nodes alive per sample; node ``j`` reads inputs ``0 .. j-1``
    (a complete DAG). Returns ``(w, count)``: ``w`` ``(B, j)`` with closed edges and removed inputs at 0,
    and the number of samples for which node ``j`` stays alive; ``alive[:, j]`` is written. ``None``
    where the kernels do not apply (then the caller's tensor ops are the reference).
    """
    backend = _backend_for(value)
    if (
        backend is None
        or not (value.is_contiguous() and open_.is_contiguous() and alive.is_contiguous())
        or open_.dtype != torch.bool
        or alive.dtype != torch.bool
        or open_.shape != value.shape
        or alive.shape != value.shape[:2]
        or not 0 < j < value.shape[1]
    ):
        return None
    B, N, _ = value.shape
    w = value.new_empty(B, j)
    ptr = alive.data_ptr()
    count = backend._node_weights[value.dtype](
        B,
        j,
        value.data_ptr() + j * N * value.element_size(),
        N * N,
        open_.data_ptr() + j * N,
        N * N,
        ptr,
        N,
        w.data_ptr(),
        ptr + j,
        N,
    )
    return w, int(count)


def _node_calls(blocks, relu: list[bool]) -> list:
    """Each node as a one-argument callable: ``block(x, act=False)`` where ``relu[j]`` says that
    its input's aggregation applied the activation (through the node's ``without_act()`` where
    it has one: ``graph.stage.BranchNode``, which skips its module call when that does nothing)."""
    calls = []
    for b, r in zip(blocks, relu):
        if not r:
            calls.append(b)
        else:
            fn = getattr(b, "without_act", None)
            calls.append(fn() if fn is not None else partial(b, act=False))
    return calls


#: the most nodes of a stage (block nodes and output) for the batch step's partial sums (C: PENDING_MAX_N)
_PENDING_MAX_N = 64


def _layout(y: Tensor) -> int | None:
    """How the C calls read a stage's maps: 0 where ``y`` is dense in its own order (``(B, C, ...)``),
    1 where it is a dense channels_last 4-d map (a sample ``(H, W, C)``), None otherwise (declined)."""
    if y.is_contiguous():
        return 0
    if y.ndim == 4 and y.is_contiguous(memory_format=torch.channels_last):
        return 1
    return None


def _partial_sum_steps(n: int) -> frozenset[int]:
    """The nodes ``j`` of a stage of ``n`` block nodes whose batch step also writes node ``j + 1``'s
    partial sum over inputs ``0 .. j-1`` (``dynwire_batch_step``): node ``j + 1`` then reads 2 maps
    from memory instead of ``j + 1``, and the partial sum costs one map written and read plus a
    second read of inputs still in cache. Pairs from the output node down (``n``, ``n - 2``, ... read
    partial sums), where ``j >= 4`` saves more than it costs; none beyond ``_PENDING_MAX_N`` nodes."""
    if n + 1 > _PENDING_MAX_N:
        return frozenset()
    return frozenset(c - 1 for c in range(n, 4, -2))


#: each stage's kernels, keyed weakly by its routers' ``ModuleList`` (a model that is deleted,
#: copied or pickled takes nothing along) and reused while :meth:`SampleKernels._still_fits`
_STAGES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class SampleKernels:
    """The inference fast path's C calls for a stage of plain routers (``graph._inference``),
    built by :meth:`for_stage` and kept for the stage's next forwards while its routers stay as
    they were checked (:meth:`_still_fits`). After each block one call runs the
    block's router and gate and writes the next node's input: at batch 1 (:meth:`run`) it also
    decides which node runs next (Sec. 3.3); at batch B (:meth:`run_batch`) it computes the next
    node's weights per sample, which samples keep it alive, and writes their inputs compacted. A
    node costs its block and one C call instead of tensor ops or Python arithmetic per edge."""

    def __init__(
        self, backend: _CpuKernels, dtype: torch.dtype, params: list[tuple[Tensor, Tensor]], tau: Tensor, channels: int
    ) -> None:
        self._backend = backend
        self._step = backend._sample_step[dtype]
        self._batch_step = backend._batch_step[dtype]
        self._dtype = dtype
        self._params = params  # kept alive while their pointers are in a plan
        self._tau = tau
        self._channels = channels
        self._ptrs = [tau.data_ptr()]
        for w, b in params:
            self._ptrs += (w.data_ptr(), b.data_ptr())
        self._plans: dict[tuple, ctypes.Array] = {}  # read-only once built: shared by concurrent forwards
        # what for_stage checked, for _still_fits, a row per router: (router, its fc, weight, bias,
        # their addresses and shapes)
        self._rows: tuple[tuple, ...] = ()

    @staticmethod
    def for_stage(routers, tau: Tensor, like: Tensor) -> SampleKernels | None:
        """The kernels for plain ``Router`` modules (no hooks) of a stage's ``n`` block nodes
        (router ``i``: ``(n - i, C)``) whose parameters and ``tau`` (``n``) are dense CPU tensors of
        ``like``'s dtype (float32 or float64), outside autograd, compile and dispatch modes; None
        otherwise (the caller's tensor ops are the reference)."""
        backend = _backend_for(like)
        if backend is None:
            return None
        dt = like.dtype
        cached = _STAGES.get(routers)
        if cached is not None and cached._still_fits(backend, routers, tau, dt):
            return cached
        n = len(routers)
        if not (tau.is_cpu and tau.dtype == dt and tau.is_contiguous() and tau.shape == (n,)):
            return None
        params = []
        channels = None
        for i, r in enumerate(routers):
            p = _plain_router(r, dt)
            if p is None:
                return None
            shape = p[0].shape
            if channels is None:
                channels = shape[1]
            if shape[0] != n - i or shape[1] != channels:
                return None
            params.append(p)
        if not n:
            return None
        kern = SampleKernels(backend, dt, params, tau, channels)
        kern._rows = tuple(
            (r, r._modules["fc"], w, b, w.data_ptr(), b.data_ptr(), w.shape, b.shape)
            for r, (w, b) in zip(routers, params)
        )
        _STAGES[routers] = kern
        return kern

    def _still_fits(self, backend: _CpuKernels, routers, tau: Tensor | None, dt: torch.dtype) -> bool:
        """Whether what :meth:`for_stage` checked holds for the same stage as it did: the same
        router and linear modules, still without hooks, the same parameters (and ``tau``) at the
        same addresses, shapes and dtype. A module or parameter replaced, converted or moved, or
        a hook registered, fails here, and ``for_stage`` checks the stage anew."""
        rows = self._rows
        if (
            backend is not self._backend
            or dt != self._dtype
            or tau is not self._tau
            or tau.data_ptr() != self._ptrs[0]
            or routers is None
            or len(routers._modules) != len(rows)
        ):
            return False
        for r, (r0, fc, w, b, pw, pb, ws, bs) in zip(routers._modules.values(), rows):
            if (
                r is not r0
                or r._forward_hooks
                or r._forward_pre_hooks
                or r._modules.get("fc") is not fc
                or fc._forward_hooks
                or fc._forward_pre_hooks
                or fc._parameters.get("weight") is not w
                or fc._parameters.get("bias") is not b
                or w.data_ptr() != pw
                or b.data_ptr() != pb
                or w.dtype != dt
                or b.dtype != dt
                or w.shape != ws
                or b.shape != bs
            ):
                return False
        return True

    def _plan(self, n: int, hw: int, hwc: int, eval_gate: str, removal: bool, relu: list[bool]):
        """The stage's plan as the C calls read it: ``n, C, HW, gate mode, removal, tau, hwc,
        routers' (W, b), relu flags`` (``hwc``: the maps are channels_last, see :func:`_layout`)."""
        key = (n, hw, hwc, eval_gate, removal, *relu)
        arr = self._plans.get(key)
        if arr is None:
            tau, *routers = self._ptrs
            plan = [n, self._channels, hw, _GATE_MODES[eval_gate], int(removal), tau, hwc, *routers, *map(int, relu)]
            arr = self._plans[key] = (ctypes.c_int64 * len(plan))(*plan)
        return arr

    def _checked(self, j: int, y: Tensor, shape: torch.Size, hwc: int, any_batch: bool = False) -> Tensor:
        """Block ``j``'s output, dense in block 0's layout (``hwc``: channels_last); a ValueError where
        its shape (batch aside when ``any_batch``: a block run on the live samples only) or dtype is
        not block 0's."""
        if (y.shape[1:] != shape[1:] if any_batch else y.shape != shape) or y.dtype != self._dtype:
            raise ValueError(
                f"block {j} of a graph stage returned {tuple(y.shape)} {y.dtype}, block 0 {tuple(shape)} "
                f"{self._dtype}: the blocks of a stage must return outputs of one shape and dtype"
            )
        # same values: the sum and the router read every node's output in one layout
        return y.contiguous(memory_format=torch.channels_last) if hwc else y.contiguous()

    def run(
        self, blocks, y: Tensor, relu: list[bool], eval_gate: str, removal: bool, calls: list | None = None
    ) -> Tensor | None:
        """The stage on one sample from ``y``, block 0's output ``(1, C, ...)``: blocks ``j >= 1`` get
        ``act=False`` where ``relu[j]`` says that their input aggregation applies the activation
        (``relu[n]``: the stage output's); ``calls``: ``_node_calls(blocks, relu)`` where the caller
        has it. None, before anything ran, where ``y`` does not fit the C call (dtype, layout,
        router width); then the caller goes on from ``y``."""
        n = len(blocks)
        C = self._channels
        hwc = _layout(y)
        if (
            n != len(self._params)
            or y.dtype != self._dtype
            or hwc is None
            or y.ndim < 2
            or y.shape[0] != 1
            or y.shape[1] != C
        ):
            return None
        shape = y.shape
        N = n + 1
        plan_arr = self._plan(n, y.numel() // C, hwc, eval_gate, removal, relu)
        open_at = N * 8 + (N * N + 2 * N) * y.element_size()  # the scratch layout the C call reads
        scratch = (ctypes.c_char * (open_at + N * N + N))()
        if not removal:  # every edge open
            ctypes.memset(ctypes.addressof(scratch) + open_at, 1, N * N)
        scratch[open_at + N * N] = b"\x01"  # alive[0]: block 0 ran
        step = self._step
        calls = _node_calls(blocks, relu) if calls is None else calls
        outs = [y]  # every node output stays alive: the scratch area holds pointers to them
        i = 0
        while True:
            out = torch.empty_like(y)
            j = step(plan_arr, scratch, i, y.data_ptr(), out.data_ptr())
            if j == n:
                return out
            y = self._checked(j, calls[j](out), shape, hwc)
            outs.append(y)
            i = j

    def run_batch(
        self,
        blocks,
        y: Tensor,
        mats,
        alive: Tensor | None,
        relu: list[bool],
        eval_gate: str,
        pruned: bool,
    ) -> Tensor | None:
        """The stage on a batch from ``y``, block 0's output ``(B, C, ...)``, with the stage's fresh
        (zeroed) :class:`~dynwire.graph.edges.EdgeMatrices` ``mats`` and ``alive`` ``(B, N)`` (all
        True; None without removal, then ``mats.open`` is None too). ``pruned``: a node runs on its
        live samples only (their inputs written packed by the call, the outputs scattered back),
        otherwise on all with removed samples zeroed, as ``graph._inference._run``. In a long stage
        some calls also write the next node's partial sum (:func:`_partial_sum_steps`). None, before
        anything ran, where ``y`` or the matrices do not fit the C call; then the caller goes on
        from ``y``."""
        n = len(blocks)
        C = self._channels
        B = y.shape[0]
        N = n + 1
        removal = mats.open is not None
        dt = self._dtype
        hwc = _layout(y)
        if (
            n != len(self._params)
            or y.dtype != dt
            or hwc is None
            or y.ndim < 2
            or y.shape[1] != C
            or removal != (alive is not None)
            or mats.value.dtype != dt
            or mats.alpha_out.dtype != dt
            or not all(t.is_contiguous() for t in (mats.value, mats.alpha_out))
            or mats.value.shape != (B, N, N)
            or (
                removal
                and not (
                    mats.open.dtype == alive.dtype == torch.bool
                    and mats.open.is_contiguous()
                    and alive.is_contiguous()
                    and alive.shape == (B, N)
                )
            )
        ):
            return None
        shape = y.shape
        plan_arr = self._plan(n, y.numel() // (B * C), hwc, eval_gate, removal, relu)
        xs = (ctypes.c_void_p * N)()
        w = y.new_empty(B, N)
        idx = torch.empty(B, dtype=torch.int64)
        ptrs = (
            mats.value.data_ptr(),
            None if not removal else mats.open.data_ptr(),
            mats.alpha_out.data_ptr(),
            None if not removal else alive.data_ptr(),
        )
        threads = _CpuKernels._threads(y.numel())
        step = self._batch_step
        calls = _node_calls(blocks, relu)
        emits = _partial_sum_steps(n)
        outs = [y]  # every node output stays alive: xs holds pointers to them
        xs[0] = y.data_ptr()
        i_ptr: int | None = xs[0]
        pending: Tensor | None = None  # node j's partial sum from the call of node j - 1
        for j in range(1, N):
            compact = pruned and j < n
            # node j's input over its partial sum, in place (not with parallel compaction: rows race)
            out = pending if pending is not None and (threads == 1 or not compact) else torch.empty_like(y)
            pin, pending = pending, (torch.empty_like(y) if j in emits else None)
            count = step(
                plan_arr,
                B,
                j - 1,
                i_ptr,
                *ptrs,
                xs,
                j,
                w.data_ptr(),
                out.data_ptr(),
                idx.data_ptr(),
                compact,
                threads,
                None if pin is None else pin.data_ptr(),
                None if pending is None else pending.data_ptr(),
            )
            if count < 0:  # the C call refused the partial sums (_partial_sum_steps and its PENDING_MAX_N disagree)
                raise RuntimeError(f"dynwire_batch_step refused node {j}'s partial sums: rebuild the C kernels")
            if j == n:
                return out
            if count == 0 and pruned:  # removed for every sample: never read, its router never runs
                i_ptr = None
                continue
            if compact and count < B:
                out = out[:count]
            y = self._checked(j, calls[j](out), shape, hwc, any_batch=True)
            if count < B:
                if pruned:
                    y = torch.zeros_like(outs[0]).index_copy_(0, idx[:count], y)  # block 0's shape and layout
                else:
                    y = self._checked(j, y * alive[:, j].view(-1, *([1] * (y.ndim - 1))).to(dt), shape, hwc)
            outs.append(y)
            xs[j] = i_ptr = y.data_ptr()
        raise AssertionError("unreachable")

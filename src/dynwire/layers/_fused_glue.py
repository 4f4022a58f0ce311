"""The C library's inference glue on the CPU: a node's router and edge gate, a block node's input
weights, and the batch-1 path's calls (``graph._inference``). Each returns None / False where it
does not apply; the caller's tensor ops (``Router``, ``edge_gate``, the masks) are the reference
and the tests compare against them.
"""

from __future__ import annotations

import ctypes

import torch
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode

from ._fused import _BACKENDS, _MODE, FUSED_CHUNK, _CpuKernels
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
    if bias is None or not all(t.is_cpu and t.dtype == dt and t.is_contiguous() for t in (weight, bias)):
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


class SampleKernels:
    """The C calls of the batch-1 inference path (``graph._inference._forward_one``), checked once
    per stage forward by :meth:`for_stage`: a router's raw weights as Python numbers, and the
    weighted sum of a node's inputs with Python-number weights. Each call then costs a few
    pointer reads instead of the tensor ops (and checks) it replaces."""

    def __init__(self, backend: _CpuKernels, dtype: torch.dtype, routers, tau: Tensor) -> None:
        self._router = backend._router[dtype]
        self._fwd = backend._fwd[dtype]
        self._ctype = ctypes.c_float if dtype == torch.float32 else ctypes.c_double
        self._dtype = dtype
        fcs = [r._modules["fc"] for r in routers]
        self._params = [(fc._parameters["weight"], fc._parameters["bias"]) for fc in fcs]  # kept alive
        self._ptrs = [(w.shape[1], w.shape[0], w.data_ptr(), b.data_ptr()) for w, b in self._params]
        self._tau = tau
        self._tau_ptr, self._esize = tau.data_ptr(), tau.element_size()

    @staticmethod
    def for_stage(routers, tau: Tensor, like: Tensor) -> SampleKernels | None:
        """The kernels for plain ``Router`` modules (no hooks) whose parameters and ``tau`` are dense
        CPU tensors of ``like``'s dtype (float32 or float64), outside autograd, compile and dispatch
        modes; None otherwise (the caller's tensor ops are the reference)."""
        backend = _backend_for(like)
        dt = like.dtype
        if backend is None or not (tau.is_cpu and tau.dtype == dt and tau.is_contiguous()):
            return None
        if any(_plain_router(r, dt) is None for r in routers):
            return None
        return SampleKernels(backend, dt, routers, tau)

    def router(self, i: int, y: Tensor) -> list[float] | None:
        """Router ``i``'s raw weights ``alpha`` on one sample ``y`` ``(1, C, ...)``, or None."""
        c, k, wp, bp = self._ptrs[i]
        if y.dtype != self._dtype or not y.is_contiguous() or y.ndim < 2 or y.shape[0] != 1 or y.shape[1] != c:
            return None
        out = (self._ctype * k)()
        addr = ctypes.addressof(out)
        tp = self._tau_ptr + i * self._esize
        self._router(1, c, y.numel() // c, y.data_ptr(), wp, bp, k, tp, 1, addr, k, 1, None, 0, 0, None, 0, 1)
        return out[:]

    def sum(self, weights: list[float], xs: list[Tensor], relu: bool) -> Tensor | None:
        """``sum_k weights[k] * xs[k]`` (``max(., 0)`` of it with ``relu``) for one sample, or None."""
        x0 = xs[0]
        shape = x0.shape
        if x0.dtype != self._dtype or shape[0] != 1:
            return None
        for x in xs:
            if x.shape != shape or x.dtype != x0.dtype or not x.is_contiguous():
                return None
        out = torch.empty_like(x0)
        k = len(xs)
        ptrs = (ctypes.c_void_p * k)(*[x.data_ptr() for x in xs])
        w = (self._ctype * k)(*weights)
        self._fwd(1, x0.numel(), k, ptrs, ctypes.addressof(w), out.data_ptr(), FUSED_CHUNK, 1, int(relu))
        return out

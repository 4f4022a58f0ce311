"""Fused, cache-blocked aggregation kernels (CPU: ``_aggkernel.c`` through ctypes) and their dispatch.

:mod:`dynwire.layers.aggregation` calls :func:`_fused_backend` for every aggregation; ``None``
means the plain PyTorch kernels (the reference) run.
"""

from __future__ import annotations

import ctypes
import importlib.util
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode

__all__ = ["fused_aggregation", "fused_available"]


# # The plain kernels stream whole tensors once per edge: forward reads ``x_k`` and reads and
# writes the running sum (3 passes over a feature map per edge), the recomputation in backward
# repeats that, and backward reads ``g`` and ``x_k`` for ``grad_w`` and then ``g`` again plus the
# gradient slot (read and write): about 11 passes per edge. The fused kernels walk each sample in
# blocks that stay in L1 and handle all ``K`` edges per block: the running sum (forward) and ``g``
# (backward) are read from memory once per node, so an edge costs one pass forward, one in the
# recomputation and two in backward: ``x_k`` for the weight's gradient, and ``g`` once more when the
# predecessor's tap sums all its consumers' ``w * g`` (``GradSlot.take``; accumulating into a slot
# per edge instead reads and writes the slot, three passes). About 4 in all. On CPU
# they are a small C/OpenMP library (``_aggkernel.c``, built at install time, one parallel loop per
# call in PyTorch's own OpenMP runtime), called through ctypes. Tiled ATen ops (one call per
# sample, L2-sized tile and edge) were tried first and measured no faster than the plain kernels:
# one ATen call streams a single input, which does not keep enough memory traffic in flight, and
# each call is a parallel region that a busy machine can stall.


class _FusedBackend:
    """A device's fused kernels. ``fo`` and ``fg`` are ``(B, N)`` row-major views; the other
    tensors (``fx``, ``fgs``, ``fslots``) are of one dtype with the same memory layout, a dense
    ``(B, N)`` block (checked by :func:`_fused_backend`): only their data pointers are read."""

    def forward(self, weights: Tensor, fx: list[Tensor], fo: Tensor, relu: bool = False) -> None:
        """``fo[b] = sum_k weights[b, k] * fx[k][b]`` (``max(., 0)`` of it when ``relu``)."""
        raise NotImplementedError

    def backward(
        self,
        weights: Tensor,
        fg: Tensor,
        fx: list[Tensor],
        fslots: list[Tensor] | None,
        fresh: list[bool] | None,
        need_w: bool,
    ) -> Tensor | None:
        """``fslots[k] (+)= weights[:, k] * fg`` (``=`` where ``fresh[k]``; nothing when ``fslots`` is None);
        returns ``grad_w[b, k] = <fg[b], fx[k][b]>`` (float64) when ``need_w``."""
        raise NotImplementedError

    def tap(self, weights: Tensor, fgs: list[Tensor], fx: Tensor, fo: Tensor, kd: int) -> Tensor:
        """``fo[b] = sum_k weights[b, k] * fgs[k][b]``; returns ``dots[b, k] = <fgs[k][b], fx[b]>`` (float64)
        for ``k < kd``, in the same pass."""
        raise NotImplementedError


#: Elements of one sample per OpenMP task of the CPU kernels (load balance and partial dot products).
FUSED_CHUNK = 16384
#: Below this many bytes per tensor the plain kernels are used: everything is cache-resident and
#: the difference is a few microseconds either way.
FUSED_MIN_BYTES = 16 * 1024
#: Below this many elements per tensor the CPU kernels run on one thread.
_PARALLEL_MIN_NUMEL = 32768


class _CpuKernels(_FusedBackend):
    """ctypes bindings of ``_aggkernel``; ``load()`` returns None when it was not built."""

    _NAMES = {torch.float32: "f32", torch.float64: "f64", torch.bfloat16: "bf16"}

    def __init__(self, lib) -> None:
        p, i64, cint = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
        self._fwd, self._bwd, self._tap = {}, {}, {}
        self._lines_isa = lib.dynwire_lines_isa
        self._lines_isa.argtypes, self._lines_isa.restype = [cint], cint
        #: how many inputs the forward sums read together, line by line, in their order (0: none)
        self.lines_max_k = int(lib.dynwire_lines_max_k())
        self._router, self._node_weights, self._sample_step, self._batch_step = {}, {}, {}, {}
        for dtype, name in self._NAMES.items():
            f = getattr(lib, f"dynwire_agg_forward_{name}")
            f.argtypes, f.restype = [i64, i64, i64, p, p, p, i64, cint, cint], None
            b = getattr(lib, f"dynwire_agg_backward_{name}")
            b.argtypes, b.restype = [i64, i64, i64, p, p, p, p, p, p, i64, cint], None
            t = getattr(lib, f"dynwire_agg_tap_{name}")
            t.argtypes, t.restype = [i64, i64, i64, i64, p, p, p, p, p, i64, cint], None
            self._fwd[dtype], self._bwd[dtype], self._tap[dtype] = f, b, t
            if dtype != torch.bfloat16:
                r = getattr(lib, f"dynwire_router_gate_{name}")
                r.argtypes = [i64, i64, i64, p, p, p, i64, p, cint, p, i64, i64, p, i64, i64, p, i64, cint]
                r.restype = None
                self._router[dtype] = r
                nw = getattr(lib, f"dynwire_node_weights_{name}")
                nw.argtypes, nw.restype = [i64, i64, p, i64, p, i64, p, i64, p, p, i64], i64
                self._node_weights[dtype] = nw
                st = getattr(lib, f"dynwire_sample_step_{name}")
                st.argtypes, st.restype = [p, p, i64, p, p], i64
                self._sample_step[dtype] = st
                bs = getattr(lib, f"dynwire_batch_step_{name}")
                bs.argtypes = [p, i64, i64, p, p, p, p, p, p, i64, p, p, p, cint, cint, p, p]
                bs.restype = i64
                self._batch_step[dtype] = bs

    def line_bytes(self, width: int | None = None) -> int:
        """Bytes per line (one vector register) of the line-by-line kernels: 64 with AVX-512, 32
        with AVX2, else 16, the widest the CPU runs; 0 where the build has none. ``width`` (16, 32
        or 64) selects a narrower one, for tests and benchmarks; a wider one than the CPU runs
        gives its widest. Returns the width in use."""
        levels = {16: 0, 32: 1, 64: 2}
        if width is not None and width not in levels:
            raise ValueError(f"line_bytes(): width must be 16, 32 or 64 (bytes), got {width!r}")
        return self._lines_isa(-1 if width is None else levels[width])

    @staticmethod
    def load() -> _CpuKernels | None:
        try:
            spec = importlib.util.find_spec("dynwire.layers._aggkernel")
            if spec is None or not spec.origin:
                return None
            lib = ctypes.CDLL(spec.origin)
            if lib.dynwire_agg_abi() != 9:
                return None
            return _CpuKernels(lib)
        except (OSError, AttributeError, ImportError):
            return None

    @staticmethod
    def _weights(weights: Tensor, dtype: torch.dtype, batch: int, k: int) -> Tensor:
        """``(B, K)`` weights in the kernel's arithmetic dtype, rounded to ``dtype`` first as the
        plain kernels do (``_columns``); the shape is checked here, the C code trusts it."""
        if tuple(weights.shape) != (batch, k):
            raise ValueError(f"aggregate(): weights must have shape ({batch}, {k}), got {tuple(weights.shape)}")
        if dtype == torch.bfloat16:
            return weights.to(torch.bfloat16).float().contiguous()
        return weights.to(dtype).contiguous()

    @staticmethod
    def _threads(numel: int) -> int:
        return torch.get_num_threads() if numel >= _PARALLEL_MIN_NUMEL else 1

    def router_gate(
        self, y: Tensor, weight: Tensor, bias: Tensor, tau: Tensor, mode: int, value: Tensor, open_, alpha_last
    ) -> None:
        B, K = value.shape
        C = weight.shape[1]
        fn = self._router[y.dtype]
        fn(
            B,
            C,
            y.numel() // (B * C),
            y.data_ptr(),
            weight.data_ptr(),
            bias.data_ptr(),
            K,
            tau.data_ptr(),
            mode,
            value.data_ptr(),
            *value.stride(),
            None if open_ is None else open_.data_ptr(),
            *((0, 0) if open_ is None else open_.stride()),
            None if alpha_last is None else alpha_last.data_ptr(),
            0 if alpha_last is None else alpha_last.stride(0),
            self._threads(y.numel()),
        )

    def supports(self, dtype: torch.dtype) -> bool:
        return dtype in self._fwd

    def forward(self, weights: Tensor, fx: list[Tensor], fo: Tensor, relu: bool = False) -> None:
        B, N = fo.shape
        w = self._weights(weights, fo.dtype, B, len(fx))
        xs = (ctypes.c_void_p * len(fx))(*[f.data_ptr() for f in fx])
        self._fwd[fo.dtype](
            B, N, len(fx), xs, w.data_ptr(), fo.data_ptr(), FUSED_CHUNK, self._threads(fo.numel()), int(relu)
        )

    def backward(
        self,
        weights: Tensor,
        fg: Tensor,
        fx: list[Tensor],
        fslots: list[Tensor] | None,
        fresh: list[bool] | None,
        need_w: bool,
    ) -> Tensor | None:
        B, N = fg.shape
        if fslots is None and not need_w:
            return None
        K = len(fx)
        w = self._weights(weights, fg.dtype, B, K)
        chunks = -(-N // FUSED_CHUNK)
        dots = torch.empty(B * chunks, K, dtype=torch.float64) if need_w else None
        xs = (ctypes.c_void_p * K)(*[f.data_ptr() for f in fx])
        slots = None if fslots is None else (ctypes.c_void_p * K)(*[f.data_ptr() for f in fslots])
        fr = None if fslots is None else (ctypes.c_uint8 * K)(*fresh)
        self._bwd[fg.dtype](
            B,
            N,
            K,
            fg.data_ptr(),
            xs,
            slots,
            w.data_ptr(),
            fr,
            None if dots is None else dots.data_ptr(),
            FUSED_CHUNK,
            self._threads(fg.numel()),
        )
        if dots is None:
            return None
        return dots if chunks == 1 else dots.view(B, chunks, K).sum(1)

    def tap(self, weights: Tensor, fgs: list[Tensor], fx: Tensor, fo: Tensor, kd: int) -> Tensor:
        B, N = fo.shape
        K = len(fgs)
        if not 0 < kd <= K:
            raise ValueError(f"tap(): {kd} dot products asked of {K} inputs")
        w = self._weights(weights, fo.dtype, B, K)
        chunks = -(-N // FUSED_CHUNK)
        dots = torch.empty(B * chunks, kd, dtype=torch.float64)
        gs = (ctypes.c_void_p * K)(*[f.data_ptr() for f in fgs])
        self._tap[fo.dtype](
            B, N, K, kd, gs, w.data_ptr(), fx.data_ptr(), fo.data_ptr(), dots.data_ptr(), FUSED_CHUNK,
            self._threads(fo.numel()),
        )  # fmt: skip
        return dots if chunks == 1 else dots.view(B, chunks, kd).sum(1)


class _LazyBackends(dict):
    """Fused backends by device type, loaded on first use. CUDA tensors take the plain kernels: a
    batched ATen backend (``stack`` then ``bmm``, two launches per node instead of one per edge) was
    slower on an H200 in every case but one (``bench/results/gpu_batched_aggregation.json``, commit
    909ad81); a Triton kernel with the CPU kernels' blocking is not written."""

    def __missing__(self, device_type: str) -> _FusedBackend | None:
        backend = _CpuKernels.load() if device_type == "cpu" else None
        self[device_type] = backend
        return backend


_BACKENDS = _LazyBackends()


class _FusedMode(threading.local):
    def __init__(self) -> None:
        self.mode = "auto"


_MODE = _FusedMode()


@contextmanager
def fused_aggregation(mode: str = "auto") -> Iterator[None]:
    """Choose the aggregation kernels: ``"auto"`` (fused where available and the tensors are not
    tiny), ``"off"`` (the plain kernels, the reference) or ``"always"`` (fused regardless of size)."""
    if mode not in ("auto", "off", "always"):
        raise ValueError(f"fused_aggregation(): mode must be 'auto', 'off' or 'always', got {mode!r}")
    prev, _MODE.mode = _MODE.mode, mode
    try:
        yield
    finally:
        _MODE.mode = prev


def fused_available(device: str | torch.device = "cpu") -> bool:
    """Whether fused aggregation kernels exist for ``device`` (on CPU: whether ``_aggkernel`` was built)."""
    return _BACKENDS[torch.device(device).type] is not None


def _fused_backend(ts: Sequence[Tensor], small: bool = False) -> _FusedBackend | None:
    """The fused backend for tensors ``ts``, or None: then the plain kernels are used.

    Fused needs one shape, dtype, device and dense batch-major layout (contiguous or channels-last,
    identical strides) for all of them, real tensors (not traced: compile, export and FakeTensor
    see the plain ops) and no dispatch mode (the FLOP counter sees the op). ``small``: also for
    tensors under ``FUSED_MIN_BYTES`` (a caller that saves one op per input by it)."""
    mode = _MODE.mode
    if mode == "off":
        return None
    t0 = ts[0]
    backend = _BACKENDS[t0.device.type]
    if backend is None or not backend.supports(t0.dtype) or t0.ndim < 2 or t0.numel() == 0:
        return None
    if mode == "auto" and not small and t0.numel() * t0.element_size() < FUSED_MIN_BYTES:
        return None
    if torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None:
        return None
    stride = t0.stride()
    for t in ts:
        if type(t) is not Tensor and type(t) is not torch.nn.Parameter:
            return None
        if t.stride() != stride or t.shape != t0.shape or t.dtype != t0.dtype or t.device != t0.device:
            return None
    f = _flat(t0)
    if f is None or f.stride() != (f.shape[1], 1):
        return None
    return backend


def _flat(t: Tensor) -> Tensor | None:
    """A (B, -1) view of ``t`` without copying, or None when the layout does not allow it."""
    if t.is_contiguous():
        return t.view(t.shape[0], -1)
    if t.ndim == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return t.permute(0, 2, 3, 1).reshape(t.shape[0], -1)
    return None

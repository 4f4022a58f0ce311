"""The aggregation op (Eq. 3, 8-10): gradients, FLOP formula, recomputation."""

import shutil

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import dynwire
from dynwire.layers.aggregation import aggregate, aggregate_reference, fused_aggregation, fused_available, tap


def _inputs(k=3, dtype=torch.float64, channels_last=False):
    w = torch.rand(2, k, dtype=dtype, requires_grad=True)
    xs = []
    for _ in range(k):
        x = torch.randn(2, 3, 4, 5, dtype=dtype)
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        xs.append(x.requires_grad_())
    return w, xs


@pytest.mark.parametrize("channels_last", [False, True])
def test_gradcheck(channels_last):
    w, xs = _inputs(channels_last=channels_last)
    assert torch.autograd.gradcheck(lambda w, *xs: aggregate(w, xs), (w, *xs))


def test_matches_reference_forward_and_backward():
    w, xs = _inputs(k=4)
    g = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    out = aggregate(w, xs)
    grads = torch.autograd.grad(out, [w, *xs], g)
    w2, xs2 = w.detach().clone().requires_grad_(), [x.detach().clone().requires_grad_() for x in xs]
    ref = aggregate_reference(w2, xs2)
    ref_grads = torch.autograd.grad(ref, [w2, *xs2], g)
    torch.testing.assert_close(out, ref)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)
    # Eq. 8-10: d out / d w_i is <g, x_i> and d out / d x_i is w_i * g
    torch.testing.assert_close(grads[0][:, 1], (g * xs[1]).flatten(1).sum(1))
    torch.testing.assert_close(grads[2], g * w[:, 1].view(2, 1, 1, 1))


def test_opcheck():
    w, xs = _inputs(k=2, dtype=torch.float32)
    torch.library.opcheck(torch.ops.dynwire.aggregate.default, (w, xs))


def test_flop_formula_counts_k_macs_per_element():
    w, xs = _inputs(k=3, dtype=torch.float32)
    with FlopCounterMode(display=False) as c, torch.no_grad():
        aggregate(w, xs)
    assert c.get_total_flops() == 2 * 3 * xs[0].numel()


def test_recompute_gives_identical_gradients():
    torch.manual_seed(0)
    m = dynwire.create_model("cifar_resnet20", num_classes=10, wiring="dynamic", recompute=False)
    m2 = dynwire.create_model("cifar_resnet20", num_classes=10, wiring="dynamic", recompute=True)
    m2.load_state_dict(m.state_dict())
    x = torch.randn(4, 3, 32, 32)
    m(x).logsumexp(1).sum().backward()
    m2(x).logsumexp(1).sum().backward()
    for (n, p), (_, p2) in zip(m.named_parameters(), m2.named_parameters()):
        torch.testing.assert_close(p.grad, p2.grad, msg=n)


@pytest.mark.parametrize("recompute, max_inputs, expected_alive", [(False, None, 6), (True, None, 0), (True, 1, 3)])
def test_recompute_frees_node_inputs(recompute, max_inputs, expected_alive):
    """Node inputs (aggregated tensors) are freed after forward only when recomputed (block form: in
    branch form the first layer saves ``act(input)``, not the input, so nothing keeps it anyway)."""
    import weakref

    m = dynwire.create_model(
        "cifar_resnet20",
        num_classes=10,
        wiring="dynamic",
        node="block",
        recompute=recompute,
        recompute_max_inputs=max_inputs,
    )
    refs = []
    for _, stage in m.graph_stages():
        for b in stage.blocks()[1:]:
            b.register_forward_pre_hook(lambda mod, args: refs.append(weakref.ref(args[0])))
    loss = m(torch.randn(4, 3, 32, 32)).sum()
    alive = sum(r() is not None for r in refs)
    assert len(refs) == 6
    assert alive == expected_alive  # blocks 1 and 2 of each stage have 1 and 2 predecessors
    loss.backward()  # recomputation in backward works after the tensors are gone


def test_mixed_dtypes_under_autocast():
    m = dynwire.create_model("cifar_resnet20", num_classes=10, wiring="dynamic")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(torch.randn(2, 3, 32, 32))
    out.float().sum().backward()
    assert all(p.grad is not None for p in m.parameters())


def test_gradcheck_tapped_path():
    """Two nodes sharing predecessors, gradients accumulated through taps."""

    def f(w1, w2, x0, x1):
        t0, s0 = tap(x0)
        t1, s1 = tap(x1)
        a, sa = tap(aggregate(w1, [t0, t1], [s0, s1]))
        b = aggregate(w2, [t0, t1, a], [s0, s1, sa])
        return b * t1 + a.sin()

    w1 = torch.rand(2, 2, dtype=torch.float64, requires_grad=True)
    w2 = torch.rand(2, 3, dtype=torch.float64, requires_grad=True)
    x0, x1 = (torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True) for _ in range(2))
    assert torch.autograd.gradcheck(f, (w1, w2, x0, x1))


@pytest.mark.parametrize("wiring", ["dynamic", "static", "random-ws"])
def test_fused_gradients_match_plain_autograd(wiring):
    torch.manual_seed(0)
    m = dynwire.create_model("cifar_resnet20", num_classes=10, wiring=wiring)
    x = torch.randn(4, 3, 32, 32)
    grads = []
    for fused in (True, False):
        for _, s in m.graph_stages():
            s.fused_grad = fused
        m.zero_grad()
        m(x).logsumexp(1).sum().backward()
        grads.append([p.grad.clone() for p in m.parameters()])
    for (n, _), a, b in zip(m.named_parameters(), *grads):
        torch.testing.assert_close(a, b, msg=n)


@pytest.mark.parametrize("channels_last", [False, True])
def test_edge_weight_gradient_on_large_maps(channels_last):
    """Large feature maps take the per-sample BLAS dot path; it must equal <g, x_i>."""
    from dynwire.layers.aggregation import _batched_dot

    g = torch.randn(3, 64, 40, 40, dtype=torch.float64)
    x = torch.randn_like(g)
    if channels_last:
        g, x = g.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
    torch.testing.assert_close(_batched_dot(g, x), (g * x).flatten(1).sum(1))


# --------------------------------------------------------------------------- fused (cache-blocked) kernels

needs_fused = pytest.mark.skipif(not fused_available(), reason="the C kernels (_aggkernel) were not built")


@pytest.fixture(params=[16, 32, 64])
def line_bytes(request):
    """Each line width of the C kernels' line-by-line loops (16, 32, 64 bytes: SSE / NEON, AVX2,
    AVX-512) that this CPU runs; wider ones are skipped. The widest is restored afterwards. A build
    without line kernels (other compilers) runs once, on its block kernels."""
    from dynwire.layers import _fused

    kern = _fused._BACKENDS["cpu"]
    if not isinstance(kern, _fused._CpuKernels):
        pytest.skip("the C kernels (_aggkernel) were not built")
    widest = kern.line_bytes()
    if widest == 0:  # built without line-by-line kernels: the block kernels, once
        if request.param != 16:
            pytest.skip("built without line-by-line kernels")
        yield 0
        return
    if request.param > widest:
        pytest.skip(f"this CPU runs lines of up to {widest} bytes")
    assert kern.line_bytes(request.param) == request.param
    try:
        yield request.param
    finally:
        kern.line_bytes(widest)


@needs_fused
def test_line_bytes_names_its_choices():
    from dynwire.layers import _fused

    kern = _fused._BACKENDS["cpu"]
    with pytest.raises(ValueError, match="16, 32 or 64"):
        kern.line_bytes(48)
    widest = kern.line_bytes()
    assert widest in (0, 16, 32, 64)
    assert kern.line_bytes(64) == widest  # never wider than the CPU runs


def test_fused_kernels_are_built_where_a_compiler_is():
    """``pip install`` / ``make kernels`` builds them wherever a C compiler exists: a silent fallback
    to the plain kernels would only show as a slower training step."""
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler")
    assert fused_available("cpu"), "run `make kernels` (python setup.py build_ext --inplace)"
    assert not fused_available("meta")


def _run_both(fn):
    """``fn()`` with the fused kernels forced on, then with the plain (reference) kernels."""
    out = []
    for mode in ("always", "off"):
        with fused_aggregation(mode):
            out.append(fn())
    return out


def _op_and_tapped(w, xs, g):
    """Forward and every gradient through the custom op and through taps (two consumers per slot)."""
    w1, xs1 = w.detach().clone().requires_grad_(), [x.detach().clone().requires_grad_() for x in xs]
    out = aggregate(w1, xs1)
    grads = torch.autograd.grad(out, [w1, *xs1], g)
    w2, xs2 = w.detach().clone().requires_grad_(), [x.detach().clone().requires_grad_() for x in xs]
    taps = [tap(x) for x in xs2]
    t, slots = [t for t, _ in taps], [s for _, s in taps]
    a = aggregate(w2, t, slots)
    b = aggregate(w2[:, :2] * 0.5, t[:2], slots[:2])  # slots 0 and 1 accumulate twice
    tgrads = torch.autograd.grad((a * g).sum() + (b * g).sum(), [w2, *xs2])
    assert all(s.grad is None for s in slots)  # taken by the taps
    return out, grads, a, tgrads


@needs_fused
@pytest.mark.parametrize("chunk", [None, 7, 100])  # None: one task per sample; else several, ragged
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("k", [1, 2, 5])
def test_fused_equals_plain(k, channels_last, chunk, monkeypatch):
    from dynwire.layers import _fused as agg

    if chunk is not None:
        monkeypatch.setattr(agg, "FUSED_CHUNK", chunk)
    torch.manual_seed(k)
    w = torch.rand(3, k, dtype=torch.float64)
    w[1, 0] = 0.0  # a closed edge of one sample: the fused forward skips its input
    xs = [torch.randn(3, 4, 6, 5, dtype=torch.float64) for _ in range(k)]
    if channels_last:
        xs = [x.to(memory_format=torch.channels_last) for x in xs]
    g = torch.randn_like(xs[0])
    fused, plain = _run_both(lambda: _op_and_tapped(w, xs, g))
    for f, p in zip(fused, plain):
        torch.testing.assert_close(f, p, rtol=1e-12, atol=1e-12)
    assert fused[0].stride() == xs[0].stride()  # the inputs' layout (the fake impl's empty_like)


@needs_fused
@pytest.mark.parametrize("k", [6, 14])  # read line by line (k <= 12) and in blocks
def test_fused_equals_plain_float32_large(k):
    """Several blocks and tasks per sample, two threads: float32 rounding only."""
    torch.manual_seed(0)
    w = torch.rand(4, k)
    xs = [torch.randn(4, 64, 28, 28) for _ in range(k)]
    g = torch.randn_like(xs[0])
    fused, plain = _run_both(lambda: _op_and_tapped(w, xs, g))
    for f, p in zip(fused, plain):
        torch.testing.assert_close(f, p, rtol=1e-5, atol=1e-4)


@needs_fused
@pytest.mark.parametrize("tapped", [False, True])
def test_fused_gradcheck(tapped, monkeypatch):
    from dynwire.layers import _fused as agg

    monkeypatch.setattr(agg, "FUSED_CHUNK", 50)  # three tasks per sample

    def f(w, *xs):
        if not tapped:
            return aggregate(w, xs)
        (t0, s0), (t1, s1), (t2, s2) = (tap(x) for x in xs)
        a, sa = tap(aggregate(w, [t0, t1, t2], [s0, s1, s2]))
        b = aggregate(w[:, :2].cos(), [a, t0], [sa, s0])  # slot 0 has two consumers
        return b * t1 + a.sin()

    w = torch.rand(2, 3, dtype=torch.float64, requires_grad=True)
    xs = [torch.randn(2, 3, 4, 12, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    with fused_aggregation("always"):
        assert torch.autograd.gradcheck(f, (w, *xs))


@needs_fused
def test_fused_slot_semantics():
    """The fused backward defers ``(w, g)`` to the slots; the tap adds what this pass left in the slot
    (here a hook plays an earlier consumer) and discards a stale partial sum of another pass."""
    from dynwire.layers.aggregation import _AggregateTapped

    w = torch.rand(2, 2, dtype=torch.float64, requires_grad=True)
    xs = [torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    g = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    taps = [tap(x) for x in xs]
    slots = [s for _, s in taps]
    with fused_aggregation("always"):
        out = _AggregateTapped.apply(w, tuple(slots), (-1, -1), *[t for t, _ in taps])
        stale = torch.zeros(2, 3, 4, 4, dtype=torch.float64)
        slots[1].grad, slots[1].task = stale, -5  # left behind by another backward pass
        slots[1].pending = [(torch.ones(2, dtype=torch.float64), torch.ones_like(stale), -1)]
        seen = {}

        def hook(grad):  # runs inside this backward pass, before the aggregation's backward
            slots[0].accumulate(torch.ones_like(grad), torch.ones(2, 1, 1, 1, dtype=torch.float64))
            return grad

        def after(grad):  # the tap's gradient: the aggregation has deferred to the slots by now
            seen["pending"] = [len(s.pending) for s in slots]
            return grad

        out.register_hook(hook)
        out.grad_fn.register_hook(lambda *a: after(None))
        gw, gx0, gx1 = torch.autograd.grad(out, [w, *xs], g)
    wc = w.detach()
    assert seen["pending"] == [1, 1]  # one deferred term each, the stale one dropped
    torch.testing.assert_close(gx0, 1 + g * wc[:, 0].view(2, 1, 1, 1))  # held gradient + deferred term
    torch.testing.assert_close(gx1, g * wc[:, 1].view(2, 1, 1, 1))  # stale partial sum discarded
    assert stale.abs().sum() == 0  # ... and not written to
    assert all(s.grad is None and not s.pending for s in slots)  # emptied by the taps
    torch.testing.assert_close(gw, torch.stack([(g * x).flatten(1).sum(1) for x in xs], 1))


@needs_fused
def test_fused_bf16_is_at_least_as_accurate_as_plain():
    torch.manual_seed(0)
    w = torch.rand(3, 4)
    xs = [torch.randn(3, 64, 16, 20, dtype=torch.bfloat16) for _ in range(4)]
    g = torch.randn_like(xs[0])
    wr = w.to(torch.bfloat16).double()  # both kernels compute with bfloat16-rounded weights
    exact_out = sum(wr[:, k].view(3, 1, 1, 1) * xs[k].double() for k in range(4))
    exact_w = torch.stack([(g.double() * x.double()).flatten(1).sum(1) for x in xs], 1)
    scale_w = torch.stack([(g.double() * x.double()).abs().flatten(1).sum(1) for x in xs], 1)
    errs = []
    for out, grads, *_ in _run_both(lambda: _op_and_tapped(w, xs, g)):
        assert out.dtype == torch.bfloat16 and grads[0].dtype == torch.float32 and grads[1].dtype == torch.bfloat16
        errs.append(
            (
                ((out.double() - exact_out).abs().max() / exact_out.abs().max()).item(),
                ((grads[0].double() - exact_w).abs() / scale_w).max().item(),
            )
        )
    (fo, fw), (po, pw) = errs
    assert fo < 1e-2 and fw < 1e-2
    assert fo <= po * 1.01 and fw <= pw * 1.01


def test_fused_selection():
    """Fused for real CPU tensors of one layout; plain under a FLOP counter, for tiny maps, mixed
    layouts or dtypes, unsupported dtypes, other devices, and with 'off'."""
    from dynwire.layers.aggregation import _fused_backend

    big = [torch.randn(2, 64, 32, 32) for _ in range(2)]
    small = [torch.randn(2, 4, 4, 4)] * 2
    expect = fused_available()
    assert (_fused_backend(big) is not None) == expect
    assert (_fused_backend([b.double() for b in big]) is not None) == expect
    assert _fused_backend(small) is None
    assert _fused_backend([big[0], big[1].to(memory_format=torch.channels_last)]) is None
    assert _fused_backend([big[0], big[1].double()]) is None
    assert _fused_backend([big[0].half()] * 2) is None  # float16: no CPU kernel, plain
    assert _fused_backend([big[0].int()] * 2) is None
    assert _fused_backend([big[0][:, ::2]] * 2) is None  # not dense
    assert _fused_backend([torch.empty(2, 64, 32, 32, device="meta")] * 2) is None
    with FlopCounterMode(display=False):
        assert _fused_backend(big) is None
    with fused_aggregation("off"):
        assert _fused_backend(big) is None
    with fused_aggregation("always"):
        assert (_fused_backend(small) is not None) == expect
    with pytest.raises(ValueError, match="mode"), fused_aggregation("fast"):
        pass


@needs_fused
def test_fused_model_gradients_match_plain():
    """A dynamic model with recomputation: every parameter gradient equal with fused and plain kernels."""
    torch.manual_seed(0)
    m = dynwire.create_model("cifar_resnet20", num_classes=10, wiring="dynamic", recompute=True)
    x = torch.randn(4, 3, 32, 32)

    def step():
        m.zero_grad()
        m(x).logsumexp(1).sum().backward()
        return [p.grad.clone() for p in m.parameters()]

    fused, plain = _run_both(step)
    for (n, _), a, b in zip(m.named_parameters(), fused, plain):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=n)


@needs_fused
def test_fused_checks_weight_shape_before_the_c_code():
    """The op called directly (bypassing aggregate()'s checks) must not read past the weights."""
    xs = [torch.randn(2, 3, 4, 4) for _ in range(3)]
    with fused_aggregation("always"), pytest.raises(ValueError, match="weights must have shape"):
        torch.ops.dynwire.aggregate(torch.rand(2, 2), xs)


@needs_fused
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_relu_forward_equals_relu_of_the_sum(dtype):
    from dynwire.layers.aggregation import _aggregate_impl

    torch.manual_seed(0)
    xs = [torch.randn(3, 8, 16, 16, dtype=dtype) for _ in range(5)]
    w = torch.rand(3, 5, dtype=dtype) - 0.3  # some negative weights: sums of both signs
    w[1, 2] = 0.0  # a closed edge (the kernel skips its input)
    ref = aggregate_reference(w, xs).relu()
    with fused_aggregation("always"):
        out = _aggregate_impl(w, xs, relu=True)
    with fused_aggregation("off"):
        plain = _aggregate_impl(w, xs, relu=True)
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    assert (ref < 0).sum() == 0 and (out - ref).abs().max() <= tol and (plain - ref).abs().max() <= tol
    assert (out == 0).float().mean() > 0.2  # the ReLU did clip


@needs_fused
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("eval_gate", ["masked", "hard", "soft"])
@pytest.mark.parametrize("shape", [(4, 6, 5, 7), (4, 6), (3, 5, 9, 10)])  # 35, 1 and 90 values per channel
def test_fused_router_gate_matches_router_and_edge_gate(dtype, eval_gate, shape):
    from dynwire.layers._fused_glue import fused_router_gate
    from dynwire.layers.router import Router, edge_gate

    torch.manual_seed(0)
    k, n = 3, 6
    router = Router(shape[1], k, bias_init=0.0, weight_std=0.5).to(dtype)
    y = torch.randn(*shape, dtype=dtype)
    tau = torch.tensor([0.3, 0.5, 0.7], dtype=dtype)
    with torch.no_grad():
        alpha = router(y)
        value_ref, open_ref = edge_gate(alpha, tau, False, eval_gate)
        # outputs are strided views into (B, N, N) matrices, as the inference path passes them
        value = torch.zeros(shape[0], n, n, dtype=dtype)
        opened = torch.zeros(shape[0], n, n, dtype=torch.bool)
        last = torch.zeros(shape[0], n, dtype=dtype)
        o = None if eval_gate == "soft" else opened[:, 2 : 2 + k, 1]
        assert fused_router_gate(router, y, tau, eval_gate, value[:, 2 : 2 + k, 1], o, last[:, 1])
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    assert (value[:, 2 : 2 + k, 1] - value_ref).abs().max() <= tol
    assert (last[:, 1] - alpha[:, -1]).abs().max() <= tol
    if open_ref is not None:
        assert torch.equal(opened[:, 2 : 2 + k, 1], open_ref) and 0 < open_ref.sum() < open_ref.numel()
    # nothing else of the matrices was written
    value[:, 2 : 2 + k, 1] = 0
    opened[:, 2 : 2 + k, 1] = False
    last[:, 1] = 0
    assert not value.any() and not opened.any() and not last.any()


@needs_fused
def test_fused_router_gate_declines_what_it_does_not_implement():
    from dynwire.layers._fused_glue import fused_router_gate
    from dynwire.layers.router import Router

    router = Router(6, 3)
    y, tau, out = torch.randn(2, 6, 4, 4), torch.zeros(3), torch.empty(2, 3)
    with torch.no_grad():
        assert fused_router_gate(router, y, tau, "masked", out)
        assert not fused_router_gate(router, y.bfloat16(), tau, "masked", out)  # dtype
        assert not fused_router_gate(router, y.to(memory_format=torch.channels_last), tau, "masked", out)
        with fused_aggregation("off"):
            assert not fused_router_gate(router, y, tau, "masked", out)
        h = router.register_forward_hook(lambda *a: None)  # a hook must see the module run
        assert not fused_router_gate(router, y, tau, "masked", out)
        h.remove()
    assert not fused_router_gate(router, y, tau, "masked", out)  # autograd on: the training path


@needs_fused
@pytest.mark.parametrize("mode", ["always", "off"])
def test_inference_fast_path_with_fused_router_and_relu_equals_reference(mode, line_bytes, monkeypatch):
    """Branch nodes: the ReLU applied in the aggregation's pass and the C router (``mode="always"``:
    the batch's one C call per node) or the plain kernels and ``Router`` (``"off"``) give the
    general loop's outputs and decisions."""
    from conftest import set_thresholds_at_quantile

    from dynwire.layers import _fused_glue

    calls = []
    real = _fused_glue.SampleKernels.run_batch

    def run_batch(*a):
        out = real(*a)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(_fused_glue.SampleKernels, "run_batch", run_batch)
    torch.manual_seed(0)
    model = dynwire.create_model("cifar_resnet20", num_classes=10, wiring="dynamic", node="branch", in_chans=1).eval()
    x = torch.randn(4, 1, 20, 20)
    set_thresholds_at_quantile(model, x, 0.4)
    with torch.no_grad(), fused_aggregation(mode):
        fast = model(x)
        one = torch.cat([model(x[i : i + 1]) for i in range(len(x))])
    assert any(calls) == (mode == "always")
    with torch.no_grad(), dynwire.record_adjacency(model) as rec:  # the general loop
        ref = model(x)
    assert sum(int(r[:, 1:-1].sum()) for r in rec.removed.values()) > 0
    assert (fast - ref).abs().max() <= 1e-5 and (one - ref).abs().max() <= 1e-5


@needs_fused
@pytest.mark.parametrize(
    "node,eval_gate,dtype,output_closed",
    [
        ("branch", "masked", torch.float32, False),
        ("branch", "hard", torch.float32, True),
        ("branch", "soft", torch.float64, False),
        ("block", "masked", torch.float64, True),
        ("block", "hard", torch.float32, False),
    ],
)
def test_batch_one_stage_step_equals_general_loop(node, eval_gate, dtype, output_closed, monkeypatch):
    """Batch 1 on the CPU: one C call per node (``SampleKernels.run``: router, gate, removal, the
    next node's input) gives the general loop's outputs, with nodes removed and, with
    ``output_closed``, the output node's fallback to its strongest edge from a live node."""
    from conftest import set_thresholds_at_quantile

    from dynwire.layers import _fused_glue

    ran = []
    real = _fused_glue.SampleKernels.run
    monkeypatch.setattr(_fused_glue.SampleKernels, "run", lambda self, *a: ran.append(r := real(self, *a)) or r)
    torch.manual_seed(0)
    model = dynwire.create_model(
        "cifar_resnet20", num_classes=10, wiring="dynamic", node=node, in_chans=1, eval_gate=eval_gate
    )
    model = model.to(dtype).eval()
    x = torch.randn(6, 1, 20, 20, dtype=dtype)
    set_thresholds_at_quantile(model, x, 0.4)
    if output_closed:
        with torch.no_grad():
            model.layer2.edges.tau[-1] = 2.0  # every router weight is below 1: all output edges close
    with torch.no_grad():
        one = torch.cat([model(x[i : i + 1]) for i in range(len(x))])
    assert len(ran) == 3 * len(x) and all(r is not None for r in ran), "every stage took the C step"
    with torch.no_grad(), dynwire.record_adjacency(model) as rec:  # the general loop
        ref = model(x)
    if eval_gate != "soft":
        assert sum(int(r[:, 1:-1].sum()) for r in rec.removed.values()) > 0, "some nodes are removed"
    if output_closed:
        assert ((rec["layer2"][:, -1] != 0).sum(1) == 1).all(), "the output node keeps one edge"
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    assert (one - ref).abs().max() <= tol * max(1.0, ref.abs().max().item())
    with torch.no_grad(), fused_aggregation("off"):  # the Python-number path of batch 1
        plain = torch.cat([model(x[i : i + 1]) for i in range(len(x))])
    assert len(ran) == 3 * len(x)
    assert (one - plain).abs().max() <= tol * max(1.0, ref.abs().max().item())


@needs_fused
def test_batch_one_stage_step_declines_what_it_does_not_take(monkeypatch):
    """Block 0's output the C step does not take (dense in neither layout: transposed by a hook)
    leaves the stage to the Python-number path, going on from that output (block 0 runs once): the
    same result."""
    from dynwire.layers import _fused_glue

    ran = []
    real = _fused_glue.SampleKernels.run
    monkeypatch.setattr(_fused_glue.SampleKernels, "run", lambda self, *a: ran.append(r := real(self, *a)) or r)
    torch.manual_seed(0)
    model = dynwire.create_model("cifar_resnet20", num_classes=10, wiring="dynamic", node="branch", in_chans=1).eval()
    x = torch.randn(1, 1, 20, 20)
    calls = []
    model.layer1.blocks()[0].register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        ref = model(x)
        assert ran and all(r is not None for r in ran)
        ran.clear()
        calls.clear()
        model.layer1.blocks()[0].register_forward_hook(lambda mod, a, out: out.transpose(2, 3))
        got = model(x)
        with fused_aggregation("off"):
            plain = model(x)
    assert ran and ran[0] is None, "a transposed block output is declined"
    assert calls == [1, 1], "block 0 ran once (and once more in the plain forward)"
    assert (got - plain).abs().max() <= 1e-5
    assert (got - ref).abs().max() > 1e-3, "the transposed output changed the result (the hook ran)"


@needs_fused
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_node_weights_match_the_tensor_ops(dtype):
    from dynwire.layers._fused_glue import fused_node_weights

    torch.manual_seed(0)
    B, N = 7, 6
    value = torch.rand(B, N, N, dtype=dtype)
    opened = torch.rand(B, N, N) < 0.5
    for j in range(1, N - 1):
        alive = torch.rand(B, N) < 0.7
        alive[:, 0] = True
        ref_open = opened[:, j, :j] & alive[:, :j]
        ref_w, ref_alive = value[:, j, :j] * ref_open, ref_open.any(1)
        got = alive.clone()
        assert fused_node_weights(value, opened, got, j) is None  # autograd on: not inference
        with torch.no_grad():
            w, count = fused_node_weights(value, opened, got, j)
        assert torch.equal(w, ref_w) and count == int(ref_alive.sum())
        assert torch.equal(got[:, j], ref_alive)
        got[:, j] = alive[:, j]
        assert torch.equal(got, alive)  # nothing else written
    with torch.no_grad():
        assert fused_node_weights(value, opened, alive.float(), 2) is None  # not a bool mask


def test_complete_dag_follows_the_predecessor_lists():
    """The batch-1 C step needs a complete DAG; the answer follows the current predecessor lists."""
    m = dynwire.create_model("cifar_resnet20", num_classes=10, wiring="dynamic")
    g = m.layer1.edges
    assert g.complete_dag()
    g._preds = [list(range(j)) if j != 2 else [1] for j in range(g.num_nodes)]
    assert not g.complete_dag()
    r = dynwire.create_model("cifar_resnet20", num_classes=10, wiring="random-ws").layer1.edges
    assert r.complete_dag() == all(len(r.predecessors(j)) == j for j in range(r.num_nodes))


@needs_fused
def test_batch_one_stage_step_names_a_block_of_another_shape():
    model = dynwire.create_model("cifar_resnet20", num_classes=10, wiring="dynamic", node="branch", in_chans=1).eval()
    node = model.layer1.blocks()[2]
    node.forward = lambda x, act=True: x[:, :, :-1]  # a block whose output is smaller than block 0's
    with torch.no_grad(), pytest.raises(ValueError, match="block 2 of a graph stage returned"):
        model(torch.randn(1, 1, 20, 20))


# --------------------------------------------------------------------------- edge weights' gradients at the taps


def _edge_tapped(v0, v1, x0, x1):
    """x0 feeds a (edge 0) and b (edge 1), x1 feeds b (edge 0): their weights' gradients come from
    the taps (``cols``); a reaches b through a plain tap with a constant weight, and x1 is also
    read outside any aggregation (the tap adds that gradient in its pass)."""
    t0, s0 = tap(x0, v0)
    t1, s1 = tap(x1, v1)
    a = aggregate(v0[:, :1].detach(), [t0], [s0], [0])
    ta, sa = tap(a)
    w_b = torch.stack([v0[:, 1], v1[:, 0], torch.full_like(v1[:, 0], 0.5)], 1).detach()
    b = aggregate(w_b, [t0, t1, ta], [s0, s1, sa], [1, 0, -1])
    return b * t1 + a.sin()


def _edge_reference(v0, v1, x0, x1):
    a = aggregate_reference(v0[:, :1], [x0])
    b = aggregate_reference(torch.stack([v0[:, 1], v1[:, 0], torch.full_like(v1[:, 0], 0.5)], 1), [x0, x1, a])
    return b * x1 + a.sin()


def _edge_inputs():
    torch.manual_seed(0)
    v0, v1 = torch.rand(2, 2, dtype=torch.float64), torch.rand(2, 1, dtype=torch.float64)
    x0, x1 = (torch.randn(2, 3, 4, 12, dtype=torch.float64) for _ in range(2))
    return [t.requires_grad_() for t in (v0, v1, x0, x1)]


@pytest.mark.parametrize(
    "mode",
    ["off", pytest.param("always", marks=pytest.mark.skipif(not fused_available(), reason="C kernels not built"))],
)
def test_edge_tap_gradients_equal_plain_autograd(mode, monkeypatch):
    """Off: consumers add their dot products to the slot (plain kernels); always: the tap's C pass
    computes them from the deferred gradients. Both against autograd through the weights, and gradcheck."""
    from dynwire.layers import _fused

    monkeypatch.setattr(_fused, "FUSED_CHUNK", 50)  # several tasks per sample: partial dots summed
    inputs = _edge_inputs()
    g = torch.randn(2, 3, 4, 12, dtype=torch.float64)
    with fused_aggregation(mode):
        got = torch.autograd.grad(_edge_tapped(*inputs), inputs, g)
        assert torch.autograd.gradcheck(_edge_tapped, inputs)
    want = torch.autograd.grad(_edge_reference(*inputs), inputs, g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@needs_fused
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("relu", [False, True])
# nonzero inputs: up to 12 are read line by line, more in blocks (four at a time, then the rest)
@pytest.mark.parametrize("k, closed", [(3, 0), (14, 2), (14, 1), (17, 0), (5, 5)])
def test_forward_kernel_sums(dtype, relu, k, closed, line_bytes, monkeypatch):
    """The C forward: the weighted sum of the inputs with a non-zero weight (ReLU'd in the same pass;
    a NaN of an open input stays NaN, as in ``torch.relu``)."""
    from dynwire.layers import _fused

    n = 20000
    monkeypatch.setattr(_fused, "FUSED_CHUNK", 17000)  # ragged chunks, several blocks inside one
    torch.manual_seed(k + closed)
    xs = [torch.randn(3, n).to(dtype) for _ in range(k)]
    xs[0][0, 5] = float("nan")  # a closed edge's input is not read: no NaN gets through its 0 weight
    xs[-1][2, 37] = -float("nan")  # an open one's NaN is the sum's (negative sign bit: not clipped)
    w = torch.rand(3, k, dtype=torch.float64)
    w[1, :closed] = 0.0
    w[0, 0] = 0.0
    out = torch.full((3, n), 7.0).to(dtype)
    _fused._BACKENDS["cpu"].forward(w, xs, out, relu=relu)
    x64 = [t.double() for t in xs]
    ref = sum(w[:, i : i + 1].to(dtype).double() * torch.nan_to_num(x64[i]) for i in range(k))
    ref[2, 37] = float("nan")
    if k == closed:
        ref[1] = 0.0  # every input of a sample closed: its sum is 0
    ref = ref.relu() if relu else ref
    tol = dict(rtol=1e-2, atol=5e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(out.double(), ref, **tol, equal_nan=True)


@needs_fused
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
# (K, Kd): up to 12 inputs read line by line, dotted and undotted; more in groups of 12 with the
# dotted inputs ending inside the first group (15, 10), at its end (14, 14) or in the second
# (17, 13). Built with -DLINES_MAX_K=0 the same cases cover the block kernel: dotted inputs four
# at a time, a remainder of 1-3, undotted terms, blocks of 1024 elements below 8 inputs, 8192 from 8.
@pytest.mark.parametrize("k, kd", [(7, 5), (3, 3), (2, 1), (4, 2), (10, 10), (11, 7), (14, 14), (15, 10), (17, 13)])
def test_tap_kernel_sums_and_dots(dtype, k, kd, line_bytes, monkeypatch):
    """The C tap: the weighted sum of all K inputs and the first Kd inputs' dot products with x."""
    from dynwire.layers import _fused

    n = 20000
    monkeypatch.setattr(_fused, "FUSED_CHUNK", 17000)  # ragged chunks, several blocks inside one
    torch.manual_seed(k)
    gs = [torch.randn(3, n).to(dtype) for _ in range(k)]
    x = torch.randn(3, n).to(dtype)
    w = torch.rand(3, k, dtype=torch.float64)
    w[0, kd - 1] = 0.0  # a closed edge still has its dot product (straight-through gates need it)
    out = torch.empty(3, n, dtype=dtype)
    dots = _fused._BACKENDS["cpu"].tap(w, gs, x, out, kd)
    g64 = [t.double() for t in gs]
    ref = sum(w[:, i : i + 1].to(dtype).double() * g64[i] for i in range(k))
    ref_dots = torch.stack([(t * x.double()).sum(1) for t in g64[:kd]], 1)
    tol = dict(rtol=1e-2, atol=5e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(out.double(), ref, **tol)
    torch.testing.assert_close(dots, ref_dots, rtol=1e-5, atol=1e-2)
    with pytest.raises(ValueError, match="dot products"):
        _fused._BACKENDS["cpu"].tap(w, gs, x, out, k + 1)


def test_edge_tap_errors_name_the_fix():
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    v = torch.rand(2, 2, requires_grad=True)
    t, s = tap(x, v)
    with pytest.raises(ValueError, match="detached"):
        aggregate(v[:, :1], [t], [s], [0])
    with pytest.raises(ValueError, match="slot per input"):
        aggregate(v[:, :1].detach(), [t], None, [0])
    with pytest.raises(ValueError, match=r"\(batch, edges\)"):
        tap(x, torch.rand(3, 2))


@pytest.mark.parametrize("node", ["block", "branch"])
def test_sums_activated_in_place_keep_no_recipe(node, monkeypatch):
    """A branch node's input and the stage output are ReLU'd in place, so they could never be
    recomputed: no recipe is kept for them; block-form node inputs keep theirs."""
    from dynwire.layers import aggregation as agg

    made = []

    class Counting(agg._Recipe):
        def __init__(self, *a):
            made.append(1)
            super().__init__(*a)

    monkeypatch.setattr(agg, "_Recipe", Counting)
    m = dynwire.create_model("cifar_resnet20", num_classes=10, wiring="dynamic", node=node, recompute=True).train()
    m(torch.randn(2, 3, 16, 16)).sum().backward()
    # block form: the inputs of blocks 1 and 2 and the output node of each of the 3 stages
    assert len(made) == (9 if node == "block" else 0)


@needs_fused
def test_router_gradient_is_added_in_place_of_the_taps_sum(monkeypatch):
    """The router reads its node's output before the tap, so autograd adds the router's (broadcast)
    gradient to the tap's sum: in place, into the tensor the tap wrote, not into a new map."""
    from dynwire.layers import aggregation as agg

    written, received = [], []
    take_edges = agg.GradSlot.take_edges

    def recording(self, grad, x):
        gx, dots = take_edges(self, grad, x)
        written.append(gx.data_ptr())
        return gx, dots

    monkeypatch.setattr(agg.GradSlot, "take_edges", recording)
    torch.manual_seed(0)
    m = dynwire.create_model("cifar_resnet20", num_classes=10, in_chans=1, wiring="dynamic").train()

    def hook(mod, args, out):
        if out.requires_grad:
            out.register_hook(lambda g: received.append(g.data_ptr()))

    for _, stage in m.graph_stages():
        for b in stage.blocks():
            b.register_forward_hook(hook)
    m(torch.randn(8, 1, 28, 28)).sum().backward()
    assert len(written) == 9 and received == written

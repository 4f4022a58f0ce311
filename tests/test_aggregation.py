"""The aggregation op (Eq. 3, 8-10): gradients, FLOP formula, recomputation."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import dynwire
from dynwire.layers.aggregation import aggregate, aggregate_reference, tap


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
    """Node inputs (aggregated tensors) are freed after forward only when recomputed."""
    import weakref

    m = dynwire.create_model(
        "cifar_resnet20", num_classes=10, wiring="dynamic", recompute=recompute, recompute_max_inputs=max_inputs
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

"""Whole-model gradients against a plain-autograd reference written from the paper's equations.

The reference below does not use the library's aggregation op, taps, recomputation or edge
modules: it recomputes every stage from Eq. 3-5 with plain tensor ops (``aggregate_reference``)
and reads only the parameters. The library's forward and every parameter's gradient must match
it in float64, with recomputation on and off.
"""

import dataclasses

import pytest
import torch
from torch import nn

import dynwire
from dynwire.layers.aggregation import aggregate_reference, fused_aggregation, fused_available

# one small model per family; SiLU keeps float64 gradcheck away from ReLU kinks
FAMILIES = {
    "resnet": dict(name="cifar_resnet20", layers=(2, 3), widths=(4, 8), stem_width=4),
    "mobilenetv2": dict(name="mobilenet_v2", setting=((1, 8, 1, 1), (2, 8, 3, 2)), stem_width=8, last_channel=16),
    "regnet": dict(name="regnet_y_600mf"),
    "randwire": dict(name="cifar_randwire_small", channels=4, nodes=5, head_width=8),
}
# RegNet's last stage is 1x1 at 32x32: BatchNorm over 2 values is too ill-conditioned to compare
INPUT = {"resnet": (2, 32), "mobilenetv2": (2, 32), "regnet": (4, 64), "randwire": (2, 32)}


def _small(family: str, wiring: str, dtype=torch.float64, **kw) -> nn.Module:
    spec = dict(FAMILIES[family])
    name = spec.pop("name")
    torch.manual_seed(0)
    m = dynwire.create_model(name, num_classes=3, wiring=wiring, drop_rate=0.0, **spec, **kw)
    return m.to(dtype)


def _edge_weights(stage, j: int, outs: list[torch.Tensor], training: bool) -> tuple[list[int], torch.Tensor]:
    """Eq. 4-5 for node ``j`` of a stage, from the parameters only."""
    e = stage.edges
    kind = stage.wiring.kind
    n = stage.num_blocks
    if kind == "sequential":
        return [j - 1], torch.ones(outs[0].shape[0], 1, dtype=outs[0].dtype)
    if kind == "dynamic":
        preds = list(range(j))
        cols = []
        for i in preds:
            r = e.routers[i].fc
            cols.append(torch.sigmoid(outs[i].mean((2, 3)) @ r.weight.t() + r.bias)[:, j - i - 1])
        alpha = torch.stack(cols, 1)
    else:
        all_edges = [(i, jj) for jj in range(1, n + 1) for i in range(jj)]
        if kind == "static":
            preds = list(range(j))
        else:
            preds = [i for (i, jj), keep in zip(all_edges, e.edge_mask.tolist()) if keep and jj == j]
        idx = [all_edges.index((i, j)) for i in preds]
        alpha = torch.sigmoid(e.edge_logits[idx]).unsqueeze(0).expand(outs[0].shape[0], -1)
    if kind in ("dynamic", "static"):
        tau = e.tau[j - 1]
        soft = alpha * torch.sigmoid(alpha - tau)
        alpha = soft if training else soft * (alpha >= tau).to(alpha.dtype)
    return preds, alpha


def reference_forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    x = model.forward_stem(x)
    for _, stage in model.graph_stages():
        blocks = [stage._modules[str(i)] for i in range(stage.num_blocks)]
        # branch form: node j >= 1 of a block with a residual branch is that branch, F(act(h))
        branch = [
            j > 0 and model.wiring.node == "branch" and model.wiring.kind != "sequential" and b.has_residual_branch
            if hasattr(b, "has_residual_branch")
            else False
            for j, b in enumerate(blocks)
        ]
        outs: list[torch.Tensor] = []
        h = x
        for j in range(stage.num_nodes):
            if j:
                preds, w = _edge_weights(stage, j, outs, model.training)
                h = aggregate_reference(w, [outs[i] for i in preds])
            if j < stage.num_blocks:
                outs.append(blocks[j].forward_branch(h) if branch[j] else blocks[j](h))
        acts = [b.branch_act for b, br in zip(blocks, branch) if br]
        x = acts[-1](h) if acts and acts[-1] is not None else h
    return model.forward_head(model.forward_final(x))


def _grads(model, x, fn):
    model.zero_grad(set_to_none=True)
    xi = x.clone().requires_grad_()
    out = fn(xi)
    (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype, device=out.device).view_as(out)).sum().backward()
    return out.detach(), xi.grad, {n: p.grad.clone() for n, p in model.named_parameters()}


KERNELS = [
    "auto",
    # the fused C kernels on every aggregation, however small (auto leaves these tiny maps to the
    # plain kernels): deferred slot gradients summed by the taps, against the same reference
    pytest.param("always", marks=pytest.mark.skipif(not fused_available(), reason="fused kernels not built")),
]


@pytest.mark.parametrize("node", ["block", "branch"])
@pytest.mark.parametrize("recompute", [True, False])
@pytest.mark.parametrize("wiring", ["dynamic", "static", "random-er", "sequential"])
@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("kernels", KERNELS)
def test_model_matches_plain_autograd_reference(family, wiring, recompute, kernels, node):
    if kernels == "always" and wiring == "sequential":
        pytest.skip("no aggregation")
    if node == "branch" and (wiring == "sequential" or family == "randwire"):
        pytest.skip("the same network in both forms (sequential ignores the form; RandWire's nodes have no shortcut)")
    model = _small(family, wiring, recompute=recompute, act_layer=nn.SiLU, node=node).train()
    b, size = INPUT[family]
    x = torch.randn(b, 3, size, size, dtype=torch.float64)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with fused_aggregation(kernels):
        out, gx, grads = _grads(model, x, model)
    model.load_state_dict(state)  # undo the BatchNorm running-stat update
    ref, rgx, rgrads = _grads(model, x, lambda t: reference_forward(model, t))
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gx, rgx, rtol=1e-9, atol=1e-12)
    assert grads.keys() == rgrads.keys()
    for n in grads:
        torch.testing.assert_close(grads[n], rgrads[n], rtol=1e-8, atol=1e-11, msg=lambda m, n=n: f"{n}: {m}")
    # evaluation (thresholds applied as Eq. 5) agrees with the reference too
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference_forward(model, x), rtol=1e-10, atol=1e-12)


def test_whole_model_float64_gradcheck():
    """Input and every parameter of a dynamic model, float64 end to end (routers included)."""
    model = _small("resnet", "dynamic", act_layer=nn.SiLU).train()
    names, params = zip(*model.named_parameters())
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    assert all(p.dtype == torch.float64 for p in params)
    # the routers must route in float64: their output is float64 too
    ro = model.layer1.edges.routers[0](torch.randn(2, 4, 3, 3, dtype=torch.float64))
    assert ro.dtype == torch.float64

    def f(x, *ps):
        return torch.func.functional_call(model, dict(zip(names, ps)), (x,))

    ps = tuple(p.detach().clone().requires_grad_() for p in params)
    assert torch.autograd.gradcheck(f, (x, *ps), fast_mode=True, atol=1e-6, rtol=1e-5)


def _two_backwards(fused: bool, kernels: str = "off"):
    model = _small("resnet", "dynamic", dtype=torch.float32).train()
    for _, s in model.graph_stages():
        s.fused_grad = fused
    x = torch.randn(4, 3, 16, 16)
    with fused_aggregation(kernels):
        loss = model(x).square().mean()
        taus = [s.edges.tau for _, s in model.graph_stages()]
        (g_tau,) = torch.autograd.grad(loss, [taus[0]], retain_graph=True)
        loss.backward()
    return g_tau, {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("kernels", KERNELS)
def test_partial_autograd_grad_leaves_no_stale_gradient(kernels):
    """``autograd.grad`` w.r.t. one threshold, then ``backward``: same as plain autograd."""
    g_tau, fused = _two_backwards(True, kernels)
    g_tau_ref, plain = _two_backwards(False)
    torch.testing.assert_close(g_tau, g_tau_ref)
    for n in plain:
        torch.testing.assert_close(fused[n], plain[n], rtol=1e-4, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")


@pytest.mark.parametrize("kernels", KERNELS)
def test_repeated_backward_with_retained_graph(kernels):
    model = _small("resnet", "static", dtype=torch.float32).train()
    x = torch.randn(4, 3, 16, 16)
    with fused_aggregation(kernels):
        loss = model(x).square().mean()
        loss.backward(retain_graph=True)
        once = {n: p.grad.clone() for n, p in model.named_parameters()}
        loss.backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, 2 * once[n], rtol=1e-5, atol=1e-7)


class _InplaceFirst(nn.Module):
    """A block that starts with an in-place op on its (aggregated) input."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.act = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.conv(self.act(x))


@pytest.mark.parametrize("recompute", [True, False])
def test_recompute_respects_inplace_edits_of_the_node_input(recompute):
    torch.manual_seed(0)
    cfg = dynwire.WiringConfig("static", recompute=recompute)
    blocks = [nn.Conv2d(2, 4, 3, padding=1)] + [_InplaceFirst(4) for _ in range(3)]
    stage = dynwire.GraphStage(blocks, 4, cfg)
    x = torch.randn(2, 2, 6, 6)
    stage(x).sum().backward()
    grads = {n: p.grad.clone() for n, p in stage.named_parameters()}
    # plain reference: the same graph computed with non-in-place activations
    stage.zero_grad()
    for b in stage.blocks()[1:]:
        b.act.inplace = False
    stage.fused_grad = False
    stage.wiring = dataclasses.replace(cfg, recompute=False)
    stage(x).sum().backward()
    for n, p in stage.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, msg=lambda m, n=n: f"{n}: {m}")


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("node", ["block", "branch"])
@pytest.mark.parametrize("train_gate", ["soft", "hard"])
def test_gates_per_sender_equal_gates_per_receiver(train_gate, node, kernels, monkeypatch):
    """Training gates each node's output edges once and takes their gradients at its tap
    (``stage._SenderWeights``); the same loss and every gradient as gating per receiver with the
    weights' gradients from the aggregations. Hard gates with some edges closed, the compute
    budget's term in the loss, removed nodes on the pruned executor."""
    from dynwire.graph import stage as stage_mod
    from dynwire.graph.budget import ComputeBudget
    from dynwire.layers import aggregation as agg

    model = _small("resnet", "dynamic", dtype=torch.float64, train_gate=train_gate, node=node).train()
    for _, s in model.graph_stages():
        with torch.no_grad():  # thresholds inside the routers' range: edges close, some nodes are removed
            s.edges.tau.fill_(0.95)
            for r in s.edges.routers:
                r.fc.weight.normal_(0, 1.0)
    budget = ComputeBudget(model, target=0.5, weight=1.0)
    x = torch.randn(6, 3, 16, 16, dtype=torch.float64)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []
    monkeypatch.setattr(agg.GradSlot, "take_edges", _counting(agg.GradSlot.take_edges, calls))

    def run():
        model.load_state_dict(state)
        model.zero_grad(set_to_none=True)
        with fused_aggregation(kernels):
            out = model(x)
            loss = out.square().mean() + budget.loss((3, 16, 16))[0]
            loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss, grads = run()
    assert calls, "the per-sender path did not run"
    monkeypatch.setattr(stage_mod, "_gates_per_sender", lambda g: False)
    calls.clear()
    ref_loss, ref = run()
    assert not calls
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
    assert grads.keys() == ref.keys()  # a router of a node removed for the whole batch: zeros, not None
    for n in grads:
        torch.testing.assert_close(grads[n], ref[n], rtol=1e-9, atol=1e-12, msg=lambda m, n=n: f"{n}: {m}")


def _counting(fn, calls):
    def wrapped(*a, **kw):
        calls.append(1)
        return fn(*a, **kw)

    return wrapped

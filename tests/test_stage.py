"""Graph stage semantics: adjacency buffer, thresholds, wirings, random graphs."""

import io
import warnings

import pytest
import torch

import dynwire
from dynwire.graph.stage import GraphStage
from dynwire.graph.wiring import WiringConfig, random_dag_edges


def _model(wiring="dynamic", **kw):
    return dynwire.create_model("cifar_resnet20", num_classes=10, wiring=wiring, **kw)


@pytest.mark.parametrize("gate", ["hard", "masked"])
def test_adjacency_shape_and_semantics(gate):
    m = _model(eval_gate=gate).eval()
    x = torch.randn(5, 3, 32, 32)
    outputs = {}
    for name, stage in m.graph_stages():
        for i, b in enumerate(stage.blocks()):
            b.register_forward_hook(lambda mod, a, out, key=(name, i): outputs.__setitem__(key, out))
    with dynwire.record_adjacency(m) as rec:
        m(x)
    assert set(rec.keys()) == {"layer1", "layer2", "layer3"}
    for name, stage in m.graph_stages():
        adj, raw = rec[name], rec.router[name]
        n = stage.num_nodes
        assert adj.shape == (5, n, n) == raw.shape
        assert torch.all(torch.triu(adj) == 0), "zeros on and above the diagonal"
        assert torch.all(adj[:, 1:, :].sum(-1) > 0), "every non-input node has an open input edge at init"
        # column i holds node i's output edges: the router of block i, applied to its output
        for i in range(stage.num_blocks):
            expected = stage.edges.routers[i](outputs[(name, i)])
            torch.testing.assert_close(raw[:, i + 1 :, i], expected)
        # row j holds node j's input edges, thresholded in eval (Eq. 5: closed where alpha < tau)
        tau = stage.edges.tau.detach()
        for j in range(1, n):
            a = raw[:, j, :j]
            keep = a >= tau[j - 1]
            open_value = a if gate == "hard" else a * torch.sigmoid(a - tau[j - 1])
            torch.testing.assert_close(adj[:, j, :j], open_value * keep)
    # nothing is kept outside the context, and later passes do not record
    assert all(s.adjacency is None for _, s in m.graph_stages())
    m(x)
    assert all(s.adjacency is None for _, s in m.graph_stages())
    assert rec["layer1"].shape == (5, 4, 4)  # the record keeps the last pass


def test_sequential_adjacency_is_a_chain():
    m = _model("sequential")
    with dynwire.record_adjacency(m) as rec:
        m(torch.randn(2, 3, 32, 32))
    expected = torch.diag(torch.ones(3), -1)
    assert torch.equal(rec["layer2"][1], expected)


def test_hard_threshold_closes_edges_below_tau():
    m = _model().eval()
    stage = m.layer2
    x = torch.randn(4, 3, 32, 32)
    with dynwire.record_adjacency(m) as rec:
        m(x)
    raw = rec.router["layer2"]
    # put node 2's threshold between its two incoming weights for sample 0
    a, b = raw[0, 2, 0].item(), raw[0, 2, 1].item()
    with torch.no_grad():
        stage.edges.tau[1] = (a + b) / 2
        stage.edges.tau[0] = 2.0  # node 1: every edge closed
    with dynwire.record_adjacency(m) as rec:
        out_hard = m(x)
    adj = rec["layer2"]
    lo = 0 if a < b else 1
    assert adj[0, 2, lo] == 0 and adj[0, 2, 1 - lo] > 0
    assert torch.all(adj[:, 1, :] == 0)
    # soft gate in eval keeps every edge open and changes the output
    m.set_eval_gate("soft")
    with dynwire.record_adjacency(m) as rec:
        out_soft = m(x)
    assert torch.all(rec["layer2"][:, 1, 0] > 0)
    assert not torch.allclose(out_hard, out_soft)
    # training always uses the differentiable surrogate alpha * sigmoid(alpha - tau)
    m.train()
    with dynwire.record_adjacency(m) as rec:
        m(x)
    r = rec.router["layer2"][:, 2, :2]
    torch.testing.assert_close(rec["layer2"][:, 2, :2], r * torch.sigmoid(r - stage.edges.tau[1].detach()))


def test_static_wiring_is_sample_independent():
    m = _model("static").eval()
    with dynwire.record_adjacency(m) as rec:
        m(torch.randn(3, 3, 32, 32))
    adj = rec["layer3"]
    assert torch.equal(adj[0], adj[1]) and torch.equal(adj[1], adj[2])
    assert not any("routers" in n for n, _ in m.named_parameters())


def test_dynamic_wiring_is_sample_dependent():
    m = _model().eval()
    with dynwire.record_adjacency(m) as rec:
        m(torch.randn(3, 3, 32, 32))
    assert not torch.equal(rec.router["layer3"][0], rec.router["layer3"][1])


@pytest.mark.parametrize("kind", ["random-er", "random-ba", "random-ws"])
def test_random_wiring_reproducible_and_restored(kind):
    cfg = WiringConfig(kind=kind)
    assert random_dag_edges(9, cfg, seed=3) == random_dag_edges(9, cfg, seed=3)
    masks = {tuple(random_dag_edges(9, cfg, seed=s)) for s in range(6)}
    assert len(masks) > 1, "different seeds give different graphs"

    a = dynwire.create_model("cifar_resnet56", num_classes=10, wiring=kind, graph_seed=1).eval()
    b = dynwire.create_model("cifar_resnet56", num_classes=10, wiring=kind, graph_seed=2).eval()
    assert any(
        not torch.equal(sa.edges.edge_mask, sb.edges.edge_mask)
        for (_, sa), (_, sb) in zip(a.graph_stages(), b.graph_stages())
    )
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b.load_state_dict(torch.load(buf, weights_only=True))
    for (_, sa), (_, sb) in zip(a.graph_stages(), b.graph_stages()):
        assert torch.equal(sa.edges.edge_mask, sb.edges.edge_mask)
        assert [sa.edges.predecessors(j) for j in range(sa.num_nodes)] == [
            sb.edges.predecessors(j) for j in range(sb.num_nodes)
        ]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x))


def test_random_graph_every_node_connected():
    for kind in ("random-er", "random-ba", "random-ws"):
        m = dynwire.create_model("cifar_resnet56", wiring=kind, graph_seed=5)
        for _, s in m.graph_stages():
            for j in range(1, s.num_nodes):
                assert s.edges.predecessors(j), f"{kind}: node {j} has no input"
                assert all(i < j for i in s.edges.predecessors(j))


def test_stage_accepts_any_same_shape_blocks():
    blocks = [torch.nn.Conv2d(4, 8, 3, 2, 1)] + [
        torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3, 1, 1), torch.nn.ReLU()) for _ in range(3)
    ]
    stage = GraphStage(blocks, 8, WiringConfig("dynamic"))
    y = stage(torch.randn(2, 4, 16, 16))
    assert y.shape == (2, 8, 8, 8)
    bad = GraphStage([torch.nn.Conv2d(4, 8, 3, 2, 1), torch.nn.Conv2d(8, 8, 3, 2, 1)], 8, WiringConfig("dynamic"))
    with pytest.raises(ValueError, match="same shape"):
        bad(torch.randn(2, 4, 16, 16))


def test_router_bias_init_configurable():
    m = _model(router_bias=-3.0)
    r = m.layer1.edges.routers[0]
    assert torch.all(r.fc.bias == -3.0)
    assert torch.all(_model().layer1.edges.routers[0].fc.bias == 3.0)


def _expected_open(raw: torch.Tensor, tau: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sec. 3.3 removal written out per sample: edges with alpha < tau are closed, a block with
    no open input edge is removed and its output edges close; the output node keeps its
    strongest live edge when all are closed."""
    b_, n_, _ = raw.shape
    open_ = torch.zeros_like(raw, dtype=torch.bool)
    removed = torch.zeros(b_, n_, dtype=torch.bool)
    for b in range(b_):
        for j in range(1, n_):
            for i in range(j):
                open_[b, j, i] = bool(raw[b, j, i] >= tau[j - 1]) and not removed[b, i]
            if j < n_ - 1:
                removed[b, j] = not open_[b, j, :j].any()
            elif not open_[b, j, :j].any():
                live = [i for i in range(j) if not removed[b, i]]
                open_[b, j, max(live, key=lambda i: raw[b, j, i])] = True
    return open_, removed


def test_hard_gate_closes_edges_and_changes_the_output():
    """eval_gate='hard' with thresholds inside the router range: some edges really close."""
    m = _model(eval_gate="hard").eval()
    x = torch.randn(4, 3, 32, 32)
    with dynwire.record_adjacency(m) as rec:
        m(x)
    raw = rec.router["layer3"]
    stage = m.layer3
    with torch.no_grad():  # each threshold at the median of its node's incoming weights
        for j in range(1, stage.num_nodes):
            stage.edges.tau[j - 1] = raw[:, j, :j].median()
    with dynwire.record_adjacency(m) as rec:
        out = m(x)
    adj, raw = rec["layer3"], rec.router["layer3"]
    exists = torch.tril(torch.ones(4, 4), -1).bool().expand(4, -1, -1)
    open_, removed = _expected_open(raw, stage.edges.tau.detach())
    assert (exists & ~open_).any() and open_.any()
    assert torch.equal(adj > 0, open_)
    assert torch.equal(rec.removed["layer3"], removed)
    torch.testing.assert_close(adj[open_], raw[open_])  # hard: open edges pass alpha
    m.set_eval_gate("soft")
    assert not torch.allclose(out, m(x))


def _networkx_reference(kind: str, n: int, seed: int) -> set[tuple[int, int]]:
    """RandWire's construction written out: the undirected generator graph oriented low -> high,
    sources fed by the input node 0, sinks feeding the output node n."""
    import networkx as nx

    gen = {
        "random-er": lambda: nx.erdos_renyi_graph(n, 0.2, seed=seed),
        "random-ba": lambda: nx.barabasi_albert_graph(n, 5, seed=seed),
        "random-ws": lambda: nx.watts_strogatz_graph(n, 4, 0.75, seed=seed),
    }[kind]()
    edges = {(min(u, v), max(u, v)) for u, v in gen.edges()}
    for j in range(1, n):
        if all(b != j for _, b in edges):
            edges.add((0, j))
    for i in range(n):
        if all(a != i for a, _ in edges):
            edges.add((i, n))
    return edges


@pytest.mark.parametrize("kind", ["random-er", "random-ba", "random-ws"])
def test_random_masks_equal_the_networkx_graph(kind):
    m = dynwire.create_model("cifar_resnet56", wiring=kind, graph_seed=4)  # 9-block stages: non-trivial
    for k, (_, s) in enumerate(m.graph_stages()):
        got = {(i, j) for j in range(1, s.num_nodes) for i in s.edges.predecessors(j)}
        assert got == _networkx_reference(kind, 9, seed=4 + k)
        assert len(got) < 9 * 10 // 2, "not the complete DAG"


def test_collapsed_random_stage_warns_once_and_is_reported():
    from dynwire.graph import edges as edges_mod
    from dynwire.graph.edges import graph_stats

    edges_mod._WARNED.clear()
    with pytest.warns(UserWarning, match="stage 'layer1'.*same graph for every graph_seed"):
        m = dynwire.create_model("resnet18", wiring="random-ba")
    stats = graph_stats(m.layer1.edges)
    assert stats == dict(kind="random-ba", nodes=3, edges=2, possible_edges=3, depth=2, seed_independent=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dynwire.create_model("resnet18", wiring="random-ba")  # once per stage, not per model
        big = dynwire.create_model("cifar_resnet56", wiring="random-er")
    assert not graph_stats(big.layer1.edges)["seed_independent"]


def test_graphs_command_reports_collapsed_stages(capsys):
    from dynwire.cli import main

    assert main(["graphs", "resnet50", "--wiring", "random-ba", "random-er", "--seeds", "4"]) == 0
    out = capsys.readouterr().out
    ba, er = out.split("resnet50, random-er")
    assert ba.count("| no |") == 4  # BA with M=5 on 3-6 blocks: one star graph whatever the seed
    assert "| layer3 | random-er | 7 |" in er and "| yes |" in er


@pytest.mark.parametrize("shape", [(3, 5, 4, 6), (2, 4, 7), (3, 5)])
def test_router_pooling_gradient_matches_autograd_mean_and_stays_a_broadcast_view(shape):
    """The router's global mean (layers.router.global_mean) against ``x.mean`` of plain autograd, in float64."""
    from dynwire.layers.router import global_mean

    torch.manual_seed(0)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    g = torch.randn(shape[:2], dtype=torch.float64)
    (ours,) = torch.autograd.grad(global_mean(x), x, g)
    ref_out = x.mean(dim=tuple(range(2, x.ndim))) if x.ndim > 2 else x
    (ref,) = torch.autograd.grad(ref_out, x, g)
    torch.testing.assert_close(global_mean(x), ref_out)
    torch.testing.assert_close(ours, ref)
    if x.ndim > 2:
        assert 0 in ours.stride()[2:]  # not materialised: the consumer adds the broadcast view
    assert torch.autograd.gradcheck(global_mean, (x[:2, :3].detach().clone().requires_grad_(),))


def test_keep_freed_memory_applies_once_and_can_be_switched_off(tmp_path):
    """dynwire.keep_freed_memory (what the CLI calls): applied on glibc, skipped with DYNWIRE_MALLOC_TUNING=0."""
    import os
    import platform
    import subprocess
    import sys

    code = "import dynwire; print(dynwire.keep_freed_memory(), dynwire.keep_freed_memory())"
    run = lambda env: subprocess.run(  # noqa: E731
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env={**os.environ, **env}
    ).stdout.split()
    if platform.libc_ver()[0] == "glibc":
        assert run({"DYNWIRE_MALLOC_TUNING": "1"}) == ["True", "True"]
    assert run({"DYNWIRE_MALLOC_TUNING": "0"}) == ["False", "False"]


def test_cli_keeps_freed_memory_for_the_commands_that_run_models(tmp_path, monkeypatch):
    from dynwire import cli

    calls = []
    monkeypatch.setattr(cli, "keep_freed_memory", lambda: calls.append(1) or True)
    assert cli.main(["models", "cifar_resnet2*"]) == 0 and calls == []
    assert cli.main(["eval", "--checkpoint", str(tmp_path / "missing.pt")]) == 2  # a clear error, after the heap call
    assert calls == [1]
    assert cli.main(["train", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert calls == [1, 1]


@pytest.mark.parametrize("gate", ["masked", "hard", "soft"])
def test_edge_gate_on_python_numbers_equals_the_tensor_gate(gate):
    """The batch-1 path's gate (edge_gate_floats) against edge_gate, on the same float32 numbers."""
    from dynwire.layers.router import edge_gate, edge_gate_floats

    torch.manual_seed(0)
    alpha, tau = torch.rand(40), torch.rand(40)
    alpha[:5] = tau[:5]  # ties: open, as alpha >= tau
    value, open_ = edge_gate(alpha, tau, training=False, eval_gate=gate)
    v, o = edge_gate_floats(alpha.tolist(), tau.tolist(), gate)
    torch.testing.assert_close(torch.tensor(v, dtype=torch.float32), value)
    assert o == ([True] * 40 if open_ is None else open_.tolist())


def test_router_weight_std_is_a_wiring_option():
    """``router_weight_std`` sets the routers' initial weight spread (issue 17) and is validated."""
    torch.manual_seed(0)
    wide = dynwire.create_model("cifar_resnet20", num_classes=10, router_weight_std=0.5)
    torch.manual_seed(0)
    base = dynwire.create_model("cifar_resnet20", num_classes=10)
    w_wide = torch.cat([r.fc.weight.detach().flatten() for r in wide.layer2.edges.routers])
    w_base = torch.cat([r.fc.weight.detach().flatten() for r in base.layer2.edges.routers])
    assert 0.4 < float(w_wide.std()) < 0.6 and 0.005 < float(w_base.std()) < 0.02
    assert wide.build_config["wiring_kwargs"]["router_weight_std"] == 0.5
    with pytest.raises(ValueError, match="router_weight_std=-1.*>= 0"):
        WiringConfig(router_weight_std=-1.0)

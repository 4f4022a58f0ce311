"""Evaluation that removes closed nodes (Sec. 3.3): semantics, pruned executor, executed MACs."""

import pytest
import torch
from conftest import set_thresholds_at_quantile, small_size

import dynwire
from dynwire.analysis.profile import count_macs

MODELS = dynwire.list_models()


def _executor(model, kind: str) -> None:
    for _, s in model.graph_stages():
        s.executor = kind


@pytest.mark.parametrize(
    "name,node",
    [(m, "block") for m in MODELS] + [(m, "branch") for m in ("cifar_resnet20", "mobilenet_v2", "regnet_x_600mf")],
)
def test_pruned_executor_equals_dense_reference(name, node):
    torch.manual_seed(0)
    model = dynwire.create_model(name, num_classes=10, wiring="dynamic", node=node).eval()
    x = torch.randn(6, *small_size(name))
    set_thresholds_at_quantile(model, x, 0.6)
    with torch.no_grad(), dynwire.record_adjacency(model) as rec:
        pruned = model(x)
    removed = torch.cat([r[:, 1:-1].flatten() for r in rec.removed.values()])
    assert removed.any(), "the thresholds remove some nodes"
    _executor(model, "dense")
    with torch.no_grad(), dynwire.record_adjacency(model) as rec_dense:
        dense = model(x)
    assert (pruned - dense).abs().max() <= 1e-5
    for k in rec.removed:
        assert torch.equal(rec.removed[k], rec_dense.removed[k])
    # the dense reference executes every block: more multiply-adds for samples with removals
    assert torch.all(rec.macs <= rec_dense.macs) and torch.any(rec.macs < rec_dense.macs)


def test_removed_node_is_not_computed_and_outputs_zero():
    m = dynwire.create_model("cifar_resnet20", num_classes=10).eval()
    stage = m.layer2
    calls = []
    stage.blocks()[1].register_forward_hook(lambda mod, a, out: calls.append(a[0].shape[0]))
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        stage.edges.tau[0] = 2.0  # node 1's only input edge (from node 0) closes: alpha < 1 < 2
        with dynwire.record_adjacency(m) as rec:
            m(x)
    assert calls == [], "the removed block never runs"
    assert rec.removed["layer2"][:, 1].all() and not rec.removed["layer2"][:, [0, 2, 3]].any()
    adj = rec["layer2"]
    assert torch.all(adj[:, 1, :] == 0) and torch.all(adj[:, :, 1] == 0), "its input and output edges are closed"


def test_partial_removal_runs_the_block_on_the_live_samples_only():
    m = dynwire.create_model("cifar_resnet20", num_classes=10).eval()
    x = torch.randn(8, 3, 32, 32)
    with dynwire.record_adjacency(m) as rec:
        m(x)
    raw = rec.router["layer2"][:, 1, 0]
    with torch.no_grad():
        m.layer2.edges.tau[0] = raw.median()
    calls = []
    m.layer2.blocks()[1].register_forward_hook(lambda mod, a, out: calls.append(a[0].shape[0]))
    with torch.no_grad(), dynwire.record_adjacency(m) as rec:
        m(x)
    live = int((raw >= raw.median()).sum())
    assert 0 < live < 8 and calls == [live]
    assert torch.equal(rec.removed["layer2"][:, 1], raw < raw.median())


def test_output_node_keeps_its_strongest_edge_when_all_are_closed():
    m = dynwire.create_model("cifar_resnet20", num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        m.layer3.edges.tau[-1] = 2.0  # every input edge of layer3's output node is closed
        with dynwire.record_adjacency(m) as rec:
            out = m(x)
    adj, raw = rec["layer3"][:, -1, :-1], rec.router["layer3"][:, -1, :-1]
    assert torch.isfinite(out).all()
    assert torch.equal((adj > 0).sum(1), torch.ones(2, dtype=torch.long))
    assert torch.equal(adj.argmax(1), raw.argmax(1))


def test_executed_macs_count_what_ran():
    m = dynwire.create_model("cifar_resnet56", num_classes=10).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad(), dynwire.record_adjacency(m) as rec:
        m(x)
    dense = count_macs(m, (3, 32, 32))
    assert torch.all(rec.macs == dense), "nothing closed at init: every sample runs the dense model"
    # remove layer1's node 1 for every sample: each sample saves that block (and the
    # aggregations that no longer read it), counted with torch's FLOP counter
    blk = m.layer1.blocks()[1]
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        blk(torch.zeros(1, 16, 32, 32))
    block_macs = fc.get_total_flops() // 2
    with torch.no_grad():
        m.layer1.edges.tau[0] = 2.0
        with dynwire.record_adjacency(m) as rec:
            m(x)
    saved = dense - rec.macs
    assert torch.all(saved >= block_macs) and torch.all(saved < 1.2 * block_macs)


def test_batch_of_one_skips_removed_nodes_outright():
    m = dynwire.create_model("cifar_resnet20", num_classes=10).eval()
    with torch.no_grad():
        m.layer1.edges.tau[0] = 2.0
    calls = []
    m.layer1.blocks()[1].register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        m(torch.randn(1, 3, 32, 32))
    assert not calls


def test_hard_train_gate_matches_evaluation_forward_and_trains_thresholds():
    """train_gate='hard': closed edges exactly 0 and removed nodes output 0 in training too."""
    torch.manual_seed(0)
    m = dynwire.create_model("cifar_resnet20", num_classes=10, train_gate="hard")
    x = torch.randn(8, 3, 32, 32)
    set_thresholds_at_quantile(m.eval(), x, 0.5)
    m.train()
    with dynwire.record_adjacency(m) as rec:
        out = m(x)
    for name, stage in m.graph_stages():
        open_ = rec[name] > 0
        raw = rec.router[name]
        exists = torch.tril(torch.ones_like(raw[0]), -1).bool()
        closed = exists & ~open_
        assert torch.all(rec[name][closed] == 0)
        out_edges = rec[name].transpose(1, 2)  # [b, i, :] = output edges of node i
        assert torch.all(out_edges[rec.removed[name]] == 0), "a removed node's output edges are closed"
    assert any(r.any() for r in rec.removed.values()), "some nodes removed in training"
    out.square().mean().backward()
    taus = [s.edges.tau.grad for _, s in m.graph_stages()]
    assert all(t is not None and torch.isfinite(t).all() for t in taus)
    assert any(t.abs().sum() > 0 for t in taus), "straight-through: thresholds get a gradient"


def test_soft_eval_gate_removes_nothing():
    m = dynwire.create_model("cifar_resnet20", num_classes=10, eval_gate="soft").eval()
    with torch.no_grad():
        m.layer1.edges.tau[:] = 2.0
        with dynwire.record_adjacency(m) as rec:
            m(torch.randn(2, 3, 32, 32))
    assert not any(r.any() for r in rec.removed.values())


@pytest.mark.parametrize("wiring", ["sequential", "random-ws"])
def test_every_wiring_reports_executed_macs(wiring):
    m = dynwire.create_model("cifar_resnet20", num_classes=10, wiring=wiring).eval()
    with torch.no_grad(), dynwire.record_adjacency(m) as rec:
        m(torch.randn(2, 3, 32, 32))
    assert torch.all(rec.macs == count_macs(m, (3, 32, 32)))
    assert set(rec.removed) == {"layer1", "layer2", "layer3"} and not any(r.any() for r in rec.removed.values())


@pytest.mark.parametrize(
    "name,wiring,node",
    [(m, "dynamic", "block") for m in MODELS]
    + [(m, w, "block") for m in ("cifar_resnet20", "mobilenet_v2") for w in ("static", "random-ws")]
    + [(m, w, "branch") for m in ("cifar_resnet20", "mobilenet_v2", "regnet_x_600mf") for w in ("dynamic", "static")],
)
def test_inference_fast_path_equals_dense_reference(name, wiring, node):
    # inference without recording takes graph._inference; the reference is the stage's general loop
    torch.manual_seed(0)
    model = dynwire.create_model(name, num_classes=10, wiring=wiring, node=node).eval()
    x = torch.randn(5, *small_size(name))
    if wiring == "dynamic":
        set_thresholds_at_quantile(model, x, 0.6)
    elif wiring == "static":  # some static edges close: thresholds between the edge weights
        with torch.no_grad():
            for _, s in model.graph_stages():
                s.edges.edge_logits.normal_(0, 2)
                s.edges.tau.fill_(0.5)
                s.edges.tau[0] = 1.0  # block 1 (when there is one) is removed: every alpha < 1
    calls = []
    for _, s in model.graph_stages():
        for b in s.blocks():
            b.register_forward_hook(lambda mod, a, out: calls.append(a[0].shape[0]))
    with torch.no_grad():
        fast = model(x)
        one = torch.cat([model(x[i : i + 1]) for i in range(len(x))])
    fast_calls = list(calls)
    _executor(model, "dense")
    with torch.no_grad(), dynwire.record_adjacency(model) as rec:
        dense = model(x)
    assert (fast - dense).abs().max() <= 1e-5
    # batch 1 skips removed nodes; another batch size may pick other conv kernels: relative to the
    # logits' scale (untrained random wirings reach |logit| ~ 1e4)
    assert (one - dense).abs().max() <= 1e-5 * max(1.0, dense.abs().max().item())
    removed = int(sum(r[:, 1:-1].sum() for r in rec.removed.values()))
    if wiring == "random-ws":
        assert removed == 0
    else:
        assert removed > 0, "the thresholds remove some nodes"
    # blocks ran on exactly the live samples: every (sample, block) pair not removed, once
    blocks = sum(s.num_blocks for _, s in model.graph_stages())
    assert sum(fast_calls) == 2 * (len(x) * blocks - removed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("eval_gate", ["masked", "hard", "soft"])
@pytest.mark.parametrize(
    "name,pruned,node,threads,channels_last",
    [
        ("cifar_resnet20", True, "branch", 1, False),
        ("cifar_resnet20", False, "branch", 2, False),
        ("cifar_resnet20", True, "block", 2, False),
        # 7 block nodes per stage: nodes 5 and 7 (the output) read partial sums
        ("cifar_resnet44", True, "branch", 1, False),
        ("cifar_resnet44", True, "branch", 2, False),
        ("cifar_resnet44", False, "block", 1, False),
        ("cifar_resnet44", True, "branch", 2, True),
        ("cifar_resnet20", False, "block", 1, True),
    ],
)
def test_batch_stage_kernels_equal_tensor_ops(
    dtype, eval_gate, name, pruned, node, threads, channels_last, monkeypatch
):
    # the batch path's one C call per node against its tensor ops (the C library off) and the
    # stage's general loop (the reference), with partial removal, in both executors, on one
    # thread (router and sum sample by sample) and two (the parallel loops), in both layouts
    torch.manual_seed(0)
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    monkeypatch.setattr("dynwire.layers._fused._PARALLEL_MIN_NUMEL", 1024)  # the later stages too
    try:
        _check_batch_stage_kernels(name, dtype, eval_gate, pruned, node, monkeypatch, channels_last)
    finally:
        torch.set_num_threads(prev)


def _check_batch_stage_kernels(name, dtype, eval_gate, pruned, node, monkeypatch, channels_last=False):
    from dynwire.graph._inference import forward_inference
    from dynwire.layers._fused import fused_aggregation
    from dynwire.layers._fused_glue import SampleKernels

    model = dynwire.create_model(name, num_classes=10, wiring="dynamic", node=node).eval().to(dtype)
    x = torch.randn(7, 3, 24, 24, dtype=dtype)
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
    set_thresholds_at_quantile(model, x, 0.6)
    model.set_eval_gate(eval_gate)
    inputs = {}
    for stage_name, s in model.graph_stages():
        s.register_forward_pre_hook(lambda mod, a, n=stage_name: inputs.setdefault(n, a[0]))
    with torch.no_grad(), dynwire.record_adjacency(model) as rec:
        model(x)
    removed = int(sum(r[:, 1:-1].sum() for r in rec.removed.values()))
    assert removed == 0 if eval_gate == "soft" else removed > 0, "the thresholds remove some nodes"
    ran = []
    real = SampleKernels.run_batch
    monkeypatch.setattr(SampleKernels, "run_batch", lambda *a, **k: ran.append(real(*a, **k)) or ran[-1])
    calls = []
    for stage_name, s in model.graph_stages():
        for b in s.blocks():
            b.register_forward_hook(lambda mod, a, out: calls.append(a[0].shape[0]))
        h, blocks = inputs[stage_name], s.blocks()
        with torch.no_grad():
            fast = forward_inference(s, h, blocks, pruned, s.output_act)
            fast_calls, calls[:] = list(calls), []
            with fused_aggregation("off"):
                plain = forward_inference(s, h, blocks, pruned, s.output_act)
            assert calls == fast_calls, "the same blocks ran on the same numbers of samples"
            ref = s._forward_graph(h, blocks, s.output_act)
            calls[:] = []
        assert ran and ran[-1] is not None, "the stage took the C calls"
        assert fast.is_contiguous(memory_format=torch.channels_last) == channels_last or fast.shape[-1] == 1
        tol = 1e-4 if dtype == torch.float32 else 1e-10
        assert (fast - plain).abs().max() <= tol * max(1.0, plain.abs().max().item())
        assert (fast - ref).abs().max() <= tol * max(1.0, ref.abs().max().item())
        dead = int(rec.removed[stage_name][:, 1:-1].sum())
        live = len(x) * s.num_blocks - dead if pruned else len(x) * s.num_blocks
        assert sum(fast_calls) == live, "blocks ran on exactly the live samples (all of them when not pruned)"


@pytest.mark.parametrize("case", ["open", "quantile", "output-fallback"])
@pytest.mark.parametrize("threads", [1, 2])
def test_batch_step_partial_sums_give_the_same_bits_as_the_full_sums(case, threads, monkeypatch):
    # nodes 5 and 7 of a 7-block stage read the partial sums that the calls of nodes 4 and 6 wrote
    # (the line kernels' sums of up to LINES_MAX_K inputs keep their order: the same bits); "output-fallback": every
    # edge into the output node closed, which then sums its strongest edge from xs, not the partial sum
    import dynwire.layers._fused_glue as glue

    assert glue._partial_sum_steps(7) == {4, 6} and glue._partial_sum_steps(3) == set()
    torch.manual_seed(0)
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    monkeypatch.setattr("dynwire.layers._fused._PARALLEL_MIN_NUMEL", 1024)
    model = dynwire.create_model("cifar_resnet44", num_classes=10, wiring="dynamic", node="branch").eval()
    x = torch.randn(6, 3, 16, 16)
    if case == "quantile":
        set_thresholds_at_quantile(model, x, 0.5)
    elif case == "output-fallback":
        with torch.no_grad():
            for _, s in model.graph_stages():
                s.edges.tau[-1] = 2.0  # alpha < 1 <= 2: no edge into the output node is open
    pins = []
    kerns = []
    try:
        with torch.no_grad():
            model(x)  # builds the stages' kernels
            for _, s in model.graph_stages():
                kern = glue._STAGES[s.edges.routers]
                kerns.append((kern, kern._batch_step))
                kern._batch_step = lambda *a, real=kern._batch_step: pins.append(a[-2] is not None) or real(*a)
            with_partial = model(x)
            monkeypatch.setattr(glue, "_partial_sum_steps", lambda n: frozenset())
            without = model(x)
            with dynwire.layers._fused.fused_aggregation("off"):
                plain = model(x)
    finally:
        torch.set_num_threads(prev)
        for kern, real in kerns:
            kern._batch_step = real
    stages = len(list(model.graph_stages()))
    assert sum(pins) == 2 * stages, "nodes 5 and 7 of every stage read a partial sum (in the forward with them)"
    # up to 7 inputs per sum: the line kernels' order (a build without them sums four inputs at a time)
    if dynwire.layers._fused._BACKENDS["cpu"].lines_max_k >= 7:
        assert torch.equal(with_partial, without)
    assert (with_partial - without).abs().max() <= 1e-5 * max(1.0, without.abs().max().item())
    assert (with_partial - plain).abs().max() <= 1e-4 * max(1.0, plain.abs().max().item())


def test_batch_stage_kernels_decline_a_strided_map_and_the_tensor_ops_take_over(monkeypatch):
    # a block output dense in neither layout (here block 0's, transposed by a hook) does not fit the C
    # call: the stage goes on from that output with the tensor ops, with the general loop's result
    from dynwire.layers._fused_glue import SampleKernels

    torch.manual_seed(0)
    model = dynwire.create_model("cifar_resnet20", num_classes=10, wiring="dynamic", node="branch").eval()
    x = torch.randn(5, 3, 24, 24)
    set_thresholds_at_quantile(model, x, 0.5)
    for _, s in model.graph_stages():
        s.blocks()[0].register_forward_hook(lambda mod, a, out: out.transpose(2, 3))
    ran = []
    real = SampleKernels.run_batch
    monkeypatch.setattr(SampleKernels, "run_batch", lambda *a, **k: ran.append(real(*a, **k)) or ran[-1])
    with torch.no_grad():
        fast = model(x)
        with dynwire.record_adjacency(model) as rec:
            ref = model(x)
    assert ran and all(r is None for r in ran), "the C call declined every stage"
    assert sum(int(r[:, 1:-1].sum()) for r in rec.removed.values()) > 0
    assert (fast - ref).abs().max() <= 1e-4


@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.parametrize("node", ["branch", "block"])
def test_stage_kernels_take_channels_last_maps(batch, node, monkeypatch):
    # a model in channels_last: the C calls read its maps in that layout (the routers pool a sample's
    # (H, W, C) map) and write the stage's output in it, with the general loop's result and the
    # result of the same model in the default layout
    from dynwire.layers._fused_glue import SampleKernels

    torch.manual_seed(0)
    model = dynwire.create_model("cifar_resnet20", num_classes=10, wiring="dynamic", node=node).eval()
    with torch.no_grad():
        for _, s in model.graph_stages():
            for r in s.edges.routers:
                r.fc.weight.normal_(0, 0.5)
    x = torch.randn(batch, 3, 24, 24)
    set_thresholds_at_quantile(model, torch.randn(5, 3, 24, 24), 0.5)
    with torch.no_grad():
        default = model(x)
    model = model.to(memory_format=torch.channels_last)
    x = x.to(memory_format=torch.channels_last)
    ran, outs = [], []
    name = "run" if batch == 1 else "run_batch"
    real = getattr(SampleKernels, name)
    monkeypatch.setattr(SampleKernels, name, lambda *a, **k: ran.append(real(*a, **k)) or ran[-1])
    for _, s in model.graph_stages():
        s.register_forward_hook(lambda mod, a, out: outs.append(out))
    with torch.no_grad():
        fast = model(x)
        with dynwire.record_adjacency(model) as rec:
            ref = model(x)
    assert len(ran) == 3 and all(r is not None for r in ran), "every stage took the C calls"
    assert all(o.is_contiguous(memory_format=torch.channels_last) for o in outs[:3]), "outputs stay channels_last"
    if batch > 1:
        assert sum(int(r[:, 1:-1].sum()) for r in rec.removed.values()) > 0, "some nodes removed"
    assert (fast - ref).abs().max() <= 1e-4 * max(1.0, ref.abs().max().item())
    assert (fast - default).abs().max() <= 1e-4 * max(1.0, default.abs().max().item())


def _fast_and_reference(model, x):
    with torch.no_grad():
        fast = model(x)
        with dynwire.record_adjacency(model):  # recording takes the stage's general loop
            ref = model(x)
    return fast, ref


def _varied_cifar_resnet20():
    """DG-Net-20 (eval) whose branches matter (the last norm of each starts at zero), whose routers
    differ, and whose thresholds sit at the median of their weights: nodes are removed."""
    torch.manual_seed(0)
    model = dynwire.create_model("cifar_resnet20", num_classes=10, wiring="dynamic").eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.normal_(1.0, 0.1)
        for _, s in model.graph_stages():
            for r in s.edges.routers:
                r.fc.weight.normal_(0, 0.5)
    set_thresholds_at_quantile(model, torch.randn(5, 3, 24, 24), 0.5)
    return model


@pytest.mark.parametrize("batch", [1, 5])
def test_stage_kernels_are_reused_while_the_routers_stay_as_checked(batch):
    # the C calls' per-stage setup is kept between forwards (SampleKernels.for_stage) and checked
    # again each time: a hook, replaced or converted parameters and a copied model are seen
    import copy
    import pickle

    from dynwire.layers._fused_glue import SampleKernels

    model = _varied_cifar_resnet20()
    x = torch.randn(batch, 3, 24, 24)
    stage = model.layer2
    h = torch.randn(batch, 32, 12, 12)

    def kernels(s=stage, like=h):
        with torch.no_grad():
            return SampleKernels.for_stage(s.edges.routers, s.edges.tau, like)

    def check(m):
        fast, ref = _fast_and_reference(m, x.to(next(m.parameters()).dtype))
        assert (fast - ref).abs().max() <= 1e-4 * max(1.0, ref.abs().max().item())
        return fast

    k = kernels()
    assert k is not None and kernels() is k, "reused"
    base = check(model)
    router = stage.edges.routers[1]
    with torch.no_grad():
        router.fc.weight.mul_(3.0)  # in place: same tensor, same address; the C calls read it live
    assert kernels() is k
    changed = check(model)
    assert (changed - base).abs().max() > 1e-4
    handle = router.register_forward_hook(lambda mod, a, out: out * 0.5)
    assert kernels() is None, "a hooked router takes the tensor ops"
    check(model)
    handle.remove()
    with torch.no_grad():
        router.fc.weight.data = router.fc.weight.data * 0.5  # new storage under the same parameter
    k2 = kernels()
    assert k2 is not None and k2 is not k
    check(model)
    with torch.no_grad():
        router.fc = torch.nn.Linear(router.fc.in_features, router.fc.out_features)
        router.fc.bias.fill_(-20.0)  # every edge of this router closes: fewer nodes run
    assert kernels() is not k2
    check(model)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.layer2.edges.routers[0].fc.bias.fill_(20.0)
    assert (check(twin) - check(model)).abs().max() > 1e-4, "the copy runs on its own parameters"
    pickle.loads(pickle.dumps(model))  # nothing of the C calls' state travels with a model
    model.double()
    assert kernels(like=h.double()) is not None and kernels(like=h.double())._dtype == torch.float64
    check(model)


def test_batch_one_keeps_its_path_while_the_stage_stays_as_checked(monkeypatch):
    # after a batch-1 CPU forward each stage keeps its C-call path (graph._inference._OneSample) and
    # checks per forward what it was built on: a change is seen at the next forward, which takes the
    # stage's full decision (and keeps a new path where the C calls still apply); the outputs stay
    # the general loop's throughout
    import copy
    import pickle

    from torch.onnx._internal.exporter import _flags
    from torch.utils.flop_counter import FlopCounterMode

    from dynwire.graph import _inference
    from dynwire.graph.stage import BranchNode
    from dynwire.layers.aggregation import fused_aggregation

    ran = []
    real = _inference._OneSample.__call__
    monkeypatch.setattr(_inference._OneSample, "__call__", lambda self, h: ran.append(self) or real(self, h))
    model = _varied_cifar_resnet20()
    x = torch.randn(1, 3, 24, 24)
    every = {"layer1", "layer2", "layer3"}

    def kept(m=model, xx=x, grad=False):
        """The stages whose kept path ran in one forward, checked against the general loop."""
        ran.clear()
        with torch.set_grad_enabled(grad):
            fast = m(xx)
        took = {name for name, s in m.graph_stages() if any(k is _inference._ONE.get(s) for k in ran)}
        assert len(ran) == len(took), "each stage ran its own kept path, once"
        with torch.no_grad(), dynwire.record_adjacency(m):  # the general loop, never the kept path
            ref = m(xx)
        assert (fast - ref).abs().max() <= 1e-4 * max(1.0, ref.abs().max().item())
        return took, fast.detach()

    assert kept()[0] == set(), "the first forward builds the paths"
    took, base = kept()
    assert took == every
    assert torch.equal(kept()[1], base), "the same computation"

    # what the stage's own decision reads per forward: never kept while it holds
    model.train()
    assert kept()[0] == set(), "training mode"
    model.eval()
    with fused_aggregation("off"):
        assert kept()[0] == set(), "the C library switched off"
    with FlopCounterMode(display=False):
        assert kept()[0] == set(), "a dispatch mode"
    with monkeypatch.context() as mp:
        mp.setattr(_flags, "_is_onnx_exporting", True)
        assert kept()[0] == set(), "an ONNX export"
    assert kept(grad=True)[0] == set(), "autograd"
    assert kept(xx=torch.randn(2, 3, 24, 24))[0] == set(), "a batch of 2"
    assert kept()[0] == every, "unchanged paths run again"
    model.layer2.executor = "dense"
    assert kept()[0] == every - {"layer2"}
    model.layer2.executor = "pruned"
    assert kept()[0] == every

    # what a stage's path was built on: seen once, then a new path where the C calls still apply
    def seen_then_rebuilt(stage: str, why: str) -> torch.Tensor:
        assert kept()[0] == every - {stage}, why
        took, out = kept()
        assert took == every, why
        return out

    model.layer2.set_eval_gate("hard")
    seen_then_rebuilt("layer2", "the gate")
    model.layer2.set_eval_gate("masked")
    seen_then_rebuilt("layer2", "the gate back")
    node = model.layer1.blocks()[1]
    assert isinstance(node, BranchNode)
    handle = node.register_forward_hook(lambda mod, a, out: out * 0.5)
    seen_then_rebuilt("layer1", "a hook on a branch node: kept with its module call")
    handle.remove()
    assert kept()[0] == every, "the hook removed: the path with the module call still fits"
    node = model.layer1.blocks()[2]  # still called without its module call
    node.forward = lambda h, act=True: BranchNode.forward(node, h, act) * 2.0
    seen_then_rebuilt("layer1", "a forward replaced on the instance")
    del node.forward
    assert kept()[0] == every, "the forward back: the path with the module call still fits"
    model.layer3.output_act = torch.nn.LeakyReLU(0.1)
    seen_then_rebuilt("layer3", "the stage's output activation")
    edges = copy.deepcopy(model.layer2.edges)
    with torch.no_grad():
        edges.routers[0].fc.bias.add_(1.0)
    model.layer2.edges = edges
    seen_then_rebuilt("layer2", "the edges replaced")
    router = model.layer2.edges.routers[1]
    with torch.no_grad():
        router.fc.weight.data = router.fc.weight.data * 0.5  # new storage under the same parameter
    seen_then_rebuilt("layer2", "a router's parameter moved")
    handle = router.register_forward_pre_hook(lambda mod, a: None)
    assert kept()[0] == every - {"layer2"} and kept()[0] == every - {"layer2"}, "a hooked router: never kept"
    handle.remove()
    assert kept()[0] == every
    handle = torch.nn.modules.module.register_module_forward_hook(lambda mod, a, out: None)
    try:
        assert kept()[0] == set(), "a global hook: seen"
    finally:
        handle.remove()
    assert kept()[0] == every
    model.double()
    assert kept(xx=x.double())[0] == set() and kept(xx=x.double())[0] == every, "converted, then kept again"

    twin = copy.deepcopy(model)
    assert kept(m=twin, xx=x.double())[0] == set(), "nothing of the kept paths travels with a copy"
    pickle.loads(pickle.dumps(model))
    with monkeypatch.context() as mp:
        mp.setattr(torch.jit, "is_tracing", lambda: True)
        assert kept(xx=x.double())[0] == set(), "not while tracing"


def test_a_kept_batch_one_path_does_not_keep_its_model_alive():
    import gc
    import weakref

    from dynwire.graph import _inference

    model = dynwire.create_model("cifar_resnet20", num_classes=10, wiring="dynamic").eval()
    with torch.no_grad():
        model(torch.randn(1, 3, 24, 24))
    assert _inference._ONE.get(model.layer1) is not None
    stage = weakref.ref(model.layer1)
    del model
    gc.collect()
    assert stage() is None


def test_in_onnx_export_reads_the_flags_torch_reads(monkeypatch):
    from torch.onnx._internal.exporter import _flags
    from torch.onnx._internal.torchscript_exporter._globals import GLOBALS

    from dynwire.graph._inference import in_onnx_export

    assert not in_onnx_export() and not torch.onnx.is_in_onnx_export()
    with monkeypatch.context() as mp:
        mp.setattr(_flags, "_is_onnx_exporting", True)
        assert in_onnx_export() and torch.onnx.is_in_onnx_export()
    GLOBALS.in_onnx_export = True
    try:
        assert in_onnx_export() and torch.onnx.is_in_onnx_export()
    finally:
        GLOBALS.in_onnx_export = False
    assert not in_onnx_export()


def test_branch_nodes_skip_their_module_call_only_when_it_would_do_nothing():
    from dynwire.graph.stage import BranchNode

    torch.manual_seed(0)
    model = dynwire.create_model("cifar_resnet20", num_classes=10, wiring="dynamic").eval()
    x = torch.randn(2, 3, 24, 24)
    node = model.layer1.blocks()[1]
    assert isinstance(node, BranchNode) and node.relu_input
    h = torch.randn(2, 16, 24, 24)
    with torch.no_grad():
        want = node(h, act=False)
        assert torch.equal(node.without_act()(h), want)
        assert node.without_act().func == node.block.forward_branch, "the branch itself"
    seen = []
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda mod, a, out: seen.append(mod) if isinstance(mod, BranchNode) else None
    )
    try:
        assert node.without_act().func is node, "a global hook keeps the module call"
        for batch in (1, 2):
            seen.clear()
            with torch.no_grad():
                model(x[:batch])
            assert len(seen) == sum(s.num_blocks - 1 for _, s in model.graph_stages()), "every branch node's hook ran"
    finally:
        handle.remove()
    node.forward = lambda h, act=True: BranchNode.forward(node, h, act) * 2.0
    assert node.without_act().func is node, "a forward replaced on the instance is called"
    fast, ref = _fast_and_reference(model, x)
    assert (fast - ref).abs().max() <= 1e-4 * max(1.0, ref.abs().max().item())


def test_batch_step_refuses_a_partial_sum_past_the_output_node(monkeypatch):
    # the C call checks what it is asked to write: a partial sum for a node after the output is
    # refused (-1), and the stage says so instead of running on
    import dynwire.layers._fused_glue as glue

    model = dynwire.create_model("cifar_resnet20", num_classes=10, wiring="dynamic").eval()
    monkeypatch.setattr(glue, "_partial_sum_steps", lambda n: frozenset({n}))
    with torch.no_grad(), pytest.raises(RuntimeError, match="refused node 3's partial sums"):
        model(torch.randn(4, 3, 16, 16))

"""Branch nodes (``WiringConfig.node = "branch"``): the unrolled ResNet of the paper's footnote 1.

With every edge weight fixed to 1 a branch-form stage is the residual network
``s_j = s_(j-1) + F_j(act(s_(j-1)))`` of the same branches, returning ``act(s_(n-1))``; written
out by hand below from the blocks' layers. MobileNetV2's linear bottlenecks then equal
torchvision's network exactly.
"""

import pytest
import torch
import torch.nn.functional as F
from conftest import small_size
from torch import nn

import dynwire
from dynwire.analysis.scale import stage_output_stds
from dynwire.graph.edges import EdgeWeights
from dynwire.graph.stage import BranchNode
from dynwire.models import load_torchvision_state_dict, torchvision_reference

MODELS = dynwire.list_models()


def _unit_weights(model, monkeypatch) -> None:
    """Every edge weight exactly 1, nothing closed (general loop and inference fast path)."""
    for _, stage in model.graph_stages():
        g = stage.edges

        def node_weights(state, j, g=g):
            k = len(g.predecessors(j))
            ones = torch.ones(state.batch, k, dtype=torch.float64)
            return ones, ones, None

        monkeypatch.setattr(g, "node_weights", node_weights)
        monkeypatch.setattr(g, "can_close", lambda: False)
        # the inference fast path reads the same weights as matrices, routers not consulted
        monkeypatch.setattr(g, "data_dependent", False)
        monkeypatch.setattr(g, "begin_matrices", EdgeWeights.begin_matrices.__get__(g))
        monkeypatch.setattr(g, "observe_matrices", lambda *a: None)
        monkeypatch.setattr(g, "observe", lambda *a: None)


def _basic_branch(b, x):
    y = F.relu(x)
    y = F.relu(b.bn1(F.conv2d(y, b.conv1.weight, padding=1)))
    return b.bn2(F.conv2d(y, b.conv2.weight, padding=1))


def _bottleneck_branch(b, x):
    y = F.relu(x)
    y = F.relu(b.bn1(F.conv2d(y, b.conv1.weight)))
    y = F.relu(b.bn2(F.conv2d(y, b.conv2.weight, padding=1, groups=b.conv2.groups)))
    return b.bn3(F.conv2d(y, b.conv3.weight))


def _regnet_branch(b, x):
    return b.f(F.relu(x))  # torchvision's BottleneckTransform: the branch F itself


BRANCHES = {
    "cifar_resnet20": _basic_branch,
    "resnext50_32x4d": _bottleneck_branch,
    "regnet_x_600mf": _regnet_branch,
}


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("name", list(BRANCHES))
def test_branch_stage_is_the_unrolled_residual_network(name, train, monkeypatch):
    torch.manual_seed(0)
    model = dynwire.create_model(name, num_classes=5, wiring="static", node="branch").double()
    model.train(train)
    _unit_weights(model, monkeypatch)
    x = torch.randn(2, *small_size(name), dtype=torch.float64)
    branch = BRANCHES[name]
    with torch.no_grad():
        h = model.forward_stem(x)
        for _, stage in model.graph_stages():
            blocks = [stage._modules[str(i)] for i in range(stage.num_blocks)]
            state = {k: v.clone() for k, v in stage.state_dict().items()}
            got = stage(h)
            stage.load_state_dict(state)  # the reference sees the same BatchNorm statistics
            s = blocks[0](h)  # block 0 stays whole: its projection shortcut is the stage's entry
            for b in blocks[1:]:
                s = s + branch(b, s)
            want = F.relu(s) if stage.num_blocks > 1 else s
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
            h = got


def test_mobilenet_v2_branch_form_with_unit_weights_is_torchvision(monkeypatch):
    tv = torchvision_reference("mobilenet_v2", num_classes=10).eval()
    ours = dynwire.create_model("mobilenet_v2", num_classes=10, wiring="dynamic", node="branch").eval()
    load_torchvision_state_dict(ours, tv.state_dict())
    forms = [f for _, s in ours.graph_stages() for f in s.node_form]
    assert forms.count("branch") == 10  # the stride-1 inverted residuals with a shortcut
    _unit_weights(ours, monkeypatch)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), tv(x), rtol=0, atol=0)


@pytest.mark.parametrize("name", MODELS)
def test_node_form_keeps_parameter_names_and_says_what_it_built(name):
    block = dynwire.create_model(name, num_classes=3, wiring="dynamic", node="block")
    branch = dynwire.create_model(name, num_classes=3, wiring="dynamic", node="branch")
    assert list(block.state_dict()) == list(branch.state_dict())
    branch.load_state_dict(block.state_dict())
    for (_, a), (_, b) in zip(block.graph_stages(), branch.graph_stages()):
        assert a.node_form == ["block"] * a.num_blocks
        assert b.node_form[0] == "block"  # block 0 stays whole
        for blk, view in zip(b._modules.values(), b.blocks()):
            if isinstance(view, BranchNode):
                assert view.block is blk and blk.has_residual_branch
    n_branch = sum(f == "branch" for _, s in branch.graph_stages() for f in s.node_form)
    if dynwire.get_model_cfg(name).family == "randwire":
        assert n_branch == 0  # RandWire's nodes have no shortcut: both forms are the same network
    else:
        assert n_branch > 0
    # sequential ignores the option: torchvision's network either way
    seq = dynwire.create_model(name, num_classes=3, wiring="sequential", node="branch")
    assert all(f == "block" for _, s in seq.graph_stages() for f in s.node_form)


def test_bad_node_form_is_refused():
    with pytest.raises(ValueError, match="node='stem'.*block, branch"):
        dynwire.create_model("cifar_resnet20", node="stem")


@pytest.mark.slow
@pytest.mark.parametrize(
    "name,size", [("resnet101", 160), ("cifar_resnet56", 32), ("regnet_x_600mf", 160), ("mobilenet_v2", 160)]
)
def test_branch_form_keeps_the_chains_scale_at_initialisation(name, size):
    """Every stage's output std within 3x of ``sequential`` (block form: up to ~20,000x)."""
    x = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(0))
    stds = {}
    for wiring, node in [("sequential", "block"), ("dynamic", "branch"), ("static", "branch")]:
        torch.manual_seed(0)
        m = dynwire.create_model(name, num_classes=10, wiring=wiring, node=node).train()
        stds[wiring] = stage_output_stds(m, x)
    for wiring in ("dynamic", "static"):
        for stage, base in stds["sequential"].items():
            if stage == "logits":
                continue
            ratio = stds[wiring][stage] / base
            assert 1 / 3 <= ratio <= 3, f"{wiring} {stage}: std {stds[wiring][stage]:.3g} vs {base:.3g}"


def test_block_form_explodes_where_branch_form_does_not():
    """The measured cause: whole blocks summed by a complete DAG grow with the stage's length."""
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    seq = stage_output_stds(dynwire.create_model("cifar_resnet56", wiring="sequential").train(), x)
    torch.manual_seed(0)
    blk = stage_output_stds(dynwire.create_model("cifar_resnet56", wiring="static", node="block").train(), x)
    assert blk["layer3"] > 10 * seq["layer3"]


def test_removed_branch_contributes_nothing():
    """Closing every input edge of node 2 removes it: the stage equals the one without its branch."""
    torch.manual_seed(0)
    m = dynwire.create_model("cifar_resnet20", num_classes=3, wiring="static", node="branch").eval()
    stage = m.layer2
    x = torch.randn(3, 16, 32, 32)
    with torch.no_grad():
        stage.edges.tau.fill_(-1.0)
        stage.edges.tau[1] = 2.0  # node 2's inputs: every alpha < 1 < tau, so it is removed
        with dynwire.record_adjacency(m) as rec:
            m(torch.randn(1, 3, 32, 32))
        assert rec.removed["layer2"][:, 2].all()
        got = stage(x)
        # the reference: node 2 dropped from every sum
        g = stage.edges
        blocks = [stage._modules[str(i)] for i in range(3)]
        w = {j: dict(zip(g.predecessors(j), g.node_weights(g.begin(1), j)[1][0].tolist())) for j in (1, 2, 3)}
        x0 = blocks[0](x)
        x1 = blocks[1].forward_branch(w[1][0] * x0)
        out = w[3][0] * x0 + w[3][1] * x1
        torch.testing.assert_close(got, F.relu(out), rtol=1e-5, atol=1e-5)


def test_branch_form_file_loads_as_branch_form(tmp_path):
    torch.manual_seed(0)
    m = dynwire.create_model("cifar_resnet20", num_classes=4, wiring="dynamic", node="branch").eval()
    dynwire.deploy.export_safetensors(m, tmp_path / "m.safetensors")
    back = dynwire.load_model(tmp_path / "m.safetensors")
    assert back.wiring.node == "branch" and back.layer1.node_form == ["block", "branch", "branch"]
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(back(x), m(x))


def test_branch_form_trains_with_every_mechanism():
    """Hard train gate (nodes removed in training), recomputation and taps in one step."""
    torch.manual_seed(0)
    m = dynwire.create_model("cifar_resnet20", num_classes=3, wiring="dynamic", node="branch", train_gate="hard")
    for _, s in m.graph_stages():
        nn.init.constant_(s.edges.tau, 0.9)  # some edges closed
    x = torch.randn(4, 3, 16, 16)
    out = m(x)
    out.logsumexp(1).mean().backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in m.parameters())
    assert m.layer3.edges.tau.grad is not None


class _OwnBlock(nn.Module):
    """A user's residual block: ``forward_branch`` with or without the optional ``act`` argument."""

    def __init__(self, c: int, takes_act: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.branch_act = nn.ReLU()
        self.has_residual_branch = True
        if takes_act:
            self.forward_branch = lambda x, act=True: self.conv(self.branch_act(x) if act else x)
        else:
            self.forward_branch = lambda x: self.conv(self.branch_act(x))

    def forward(self, x):
        return torch.relu(x + self.conv(x))


@pytest.mark.parametrize("takes_act", [True, False])
def test_own_blocks_with_or_without_the_act_argument(takes_act):
    """The stage applies the branch's ReLU itself only where ``forward_branch`` accepts ``act``;
    both kinds give the general loop's outputs in inference and train."""
    from dynwire.graph.stage import GraphStage
    from dynwire.graph.wiring import WiringConfig

    torch.manual_seed(0)
    stage = GraphStage([_OwnBlock(4, takes_act) for _ in range(4)], 4, WiringConfig(kind="dynamic", node="branch"))
    assert [getattr(b, "relu_input", False) for b in stage.blocks()] == [False] + [takes_act] * 3
    x = torch.randn(3, 4, 6, 6)
    stage.eval()
    with torch.no_grad():
        fast = stage(x)
        with dynwire.record_adjacency(stage):  # the general loop
            ref = stage(x)
    assert (fast - ref).abs().max() <= 1e-6
    stage.train()
    stage(x).square().sum().backward()
    assert all(p.grad is not None for p in stage.parameters() if p.requires_grad)

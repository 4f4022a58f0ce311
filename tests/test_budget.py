"""Compute budget: the expected executed-MAC fraction tracks what the executor runs, and trains."""

import pytest
import torch

import dynwire
from dynwire.analysis.profile import count_macs
from dynwire.graph.budget import ComputeBudget


def _thresholds_at_quantile(model, x, q):
    with dynwire.record_adjacency(model.eval()) as rec:
        model(x)
    with torch.no_grad():
        for name, stage in model.graph_stages():
            for j in range(1, stage.num_nodes):
                # off every recorded weight by a little, so that no edge sits exactly on its threshold
                stage.edges.tau[j - 1] = torch.quantile(rec.router[name][:, j, :j].flatten(), q) + 1e-5


@pytest.mark.parametrize("node", ["block", "branch"])
@pytest.mark.parametrize("q", [0.0, 0.5, 0.8])
def test_expected_fraction_matches_the_executor_when_gates_are_sharp(q, node):
    torch.manual_seed(0)
    # training forward = eval's
    m = dynwire.create_model("cifar_resnet56", num_classes=10, train_gate="hard", node=node)
    x = torch.randn(16, 3, 32, 32)
    _thresholds_at_quantile(m, x, q)
    budget = ComputeBudget(m, target=0.5, temperature=1e-7)
    # training mode for the stages, evaluation statistics for BatchNorm: the same router outputs
    m.train()
    for mod in m.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.eval()
    m(x)
    expected = budget.expected_fraction((3, 32, 32)).detach()
    m.eval()
    with torch.no_grad(), dynwire.record_adjacency(m) as rec:
        m(x)
    measured = rec.macs / count_macs(m, (3, 32, 32))
    # the estimate counts the aggregations of removed nodes (~1% of the MACs); a near-tie between
    # the training and evaluation forwards may flip one block (~4%) for a sample
    diff = (expected.double() - measured).abs()
    assert diff.mean() < 0.015 and diff.max() < 0.05
    if q > 0:
        assert measured.min() < 0.95, "some blocks are removed at this threshold"


def test_budget_term_raises_thresholds_toward_the_target():
    torch.manual_seed(0)
    m = dynwire.create_model("cifar_resnet20", num_classes=10, train_gate="hard").train()
    budget = ComputeBudget(m, target=0.3, weight=1.0)
    taus = [s.edges.tau for _, s in m.graph_stages()]
    before = torch.cat([t.detach().clone() for t in taus])
    opt = torch.optim.SGD(taus, lr=5.0)
    x = torch.randn(8, 3, 32, 32)
    fracs = []
    for _ in range(30):
        m(x)
        loss, frac = budget.loss((3, 32, 32))
        fracs.append(frac)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.cat([t.detach() for t in taus]).mean() > before.mean()
    assert fracs[-1] < fracs[0] - 0.05


def test_budget_needs_thresholds_and_a_valid_target():
    with pytest.raises(ValueError, match="thresholded wirings"):
        ComputeBudget(dynwire.create_model("cifar_resnet20", wiring="random-er"), target=0.5)
    with pytest.raises(ValueError, match="target"):
        ComputeBudget(dynwire.create_model("cifar_resnet20"), target=1.5)


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.budget.tagret=0.5", "unknown key"),
        ("train.budget.weight=2", "needs a target"),
        ("train.budget.target=0", "must be in"),
        ("train.budget.target=oops", "must be a number"),
    ],
)
def test_budget_config_errors(override, message):
    from dynwire.engine import load_config

    with pytest.raises(ValueError, match=message):
        load_config("fmnist_resnet20", [override])
    with pytest.raises(ValueError, match="has none"):
        load_config("fmnist_resnet20", ["model.wiring=random-er", "train.budget.target=0.5"])


def test_evaluate_model_reports_executed_macs_and_removed_share():
    from dynwire.engine import evaluate_model

    torch.manual_seed(0)
    m = dynwire.create_model("cifar_resnet20", num_classes=10)
    x = torch.randn(12, 3, 32, 32)
    y = torch.randint(0, 10, (12,))
    loader = [(x[:6], y[:6]), (x[6:], y[6:])]
    dense = count_macs(m, (3, 32, 32))
    r = evaluate_model(m, loader, device=torch.device("cpu"), executed_macs=True)
    assert r["macs"] == pytest.approx(dense) and all(v == 0 for v in r["removed"].values())
    with torch.no_grad():
        m.layer2.edges.tau[0] = 2.0  # layer2's node 1 removed for every sample: 1 of its 2 removable blocks
    r2 = evaluate_model(m, loader, device=torch.device("cpu"), executed_macs=True)
    assert r2["removed"] == {"layer1": 0.0, "layer2": 0.5, "layer3": 0.0}
    assert r2["macs"] < dense

"""Compute budget: the expected executed-MAC fraction tracks what the executor runs, and trains."""

import json

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


def test_difficulty_targets_follow_the_loss_rank_and_keep_the_mean():
    m = dynwire.create_model("cifar_resnet20", num_classes=10, train_gate="hard")
    budget = ComputeBudget(m, target=0.4, difficulty=0.5)
    losses = torch.tensor([2.0, 0.1, 0.7, 5.0, 0.3])
    t = budget.sample_targets(losses)
    # ranks 3, 0, 2, 4, 1 of 4: 0.4 * (1 + 0.5 * (2 r / 4 - 1))
    want = torch.tensor([0.5, 0.2, 0.4, 0.6, 0.3])
    torch.testing.assert_close(t, want)
    assert float(t.mean()) == pytest.approx(0.4)
    assert torch.equal(ComputeBudget(m, target=0.4).sample_targets(losses), torch.full((5,), 0.4))
    assert float(ComputeBudget(m, target=0.9, difficulty=1.0).sample_targets(losses).max()) == 1.0  # clipped


def test_difficulty_term_is_the_mean_squared_gap_to_the_per_sample_targets():
    torch.manual_seed(0)
    m = dynwire.create_model("cifar_resnet20", num_classes=10, train_gate="hard").train()
    budget = ComputeBudget(m, target=0.5, difficulty=1.0, weight=3.0)
    x = torch.randn(4, 3, 32, 32)
    m(x)
    losses = torch.tensor([0.5, 0.1, 0.9, 0.3])
    term, frac = budget.loss((3, 32, 32), losses)
    fr = budget.expected_fraction((3, 32, 32))
    targets = torch.tensor([2 / 3, 0.0, 1.0, 1 / 3])  # ranks 2, 0, 3, 1 of 3
    assert float(term.detach()) == pytest.approx(3.0 * float(((fr.detach() - targets) ** 2).mean()), rel=1e-5)
    assert frac == pytest.approx(float(fr.detach().mean()), rel=1e-6)
    with pytest.raises(ValueError, match="per-sample loss"):
        budget.loss((3, 32, 32))
    # at equal expected fractions the gradient asks the easiest sample to spend less, the hardest more
    leaf = torch.full((4,), 0.5, requires_grad=True)
    budget.expected_fraction = lambda shape: leaf
    (grad,) = torch.autograd.grad(budget.loss((3, 32, 32), losses)[0], leaf)
    assert grad[1] > 0 > grad[2]


def test_per_stage_term_is_the_weighted_gap_of_each_stage_to_the_removable_target():
    torch.manual_seed(0)
    m = dynwire.create_model("cifar_resnet20", num_classes=10, train_gate="hard").train()
    budget = ComputeBudget(m, target=0.5, weight=2.0, per_stage=True)
    m(torch.randn(4, 3, 32, 32))
    shape = (3, 32, 32)
    dense = budget.dense_macs(shape)
    removable = [sum(s.block_macs[1:]) for s in budget.stages]
    r = sum(removable)
    t_r = (0.5 * dense - (dense - r)) / r  # the share of the removable MACs a 0.5 target leaves
    want = 0.0
    for s, w in zip(budget.stages, removable):  # one target: on each stage's batch-mean fraction
        f = float(s.expected_block_macs.detach().mean()) / w
        want = want + (w / r) * (f - t_r) ** 2
    want = 2.0 * (r / dense) ** 2 * want
    term, frac = budget.loss(shape)
    assert float(term.detach()) == pytest.approx(float(want), rel=1e-5)
    assert frac == pytest.approx(float(budget.expected_fraction(shape).detach().mean()), rel=1e-6)
    # one stage emptied to pay for the others: the whole-model term is 0, the per-stage term is not,
    # and its gradient asks the emptied stage to spend more, the overfull ones less
    w0 = removable[0] / r
    x = t_r / (1 - w0)  # stages 2 and 3 spend more so that the whole model meets its target
    leaves = [torch.full((4,), v, requires_grad=True) for v in (0.0, x, x)]
    mean_share = sum(w / r * float(f[0].detach()) for w, f in zip(removable, leaves))
    assert mean_share == pytest.approx(t_r)
    budget.stage_fractions = lambda: leaves
    per_stage = budget._per_stage_term(shape, torch.full((4,), 0.5))
    assert float(per_stage.detach()) > 1e-3
    grads = torch.autograd.grad(per_stage, leaves)
    assert grads[0][0] < 0 < grads[1][0] and grads[2][0] > 0
    with pytest.raises(ValueError, match="per_stage"):
        ComputeBudget(m, target=0.5, per_stage=2)
    from dynwire.engine import load_config

    with pytest.raises(ValueError, match="per_stage"):
        load_config("fmnist_resnet20", ["train.budget.target=0.5", "train.budget.per_stage=0.5"])


def test_per_stage_equals_the_whole_model_term_when_every_stage_spends_the_same_share():
    torch.manual_seed(0)
    m = dynwire.create_model("cifar_resnet20", num_classes=10, train_gate="hard").train()
    shape = (3, 32, 32)
    # targets 0.49..0.91, above the fixed part (stem, node 0s, head), so no target is clipped
    whole = ComputeBudget(m, target=0.7, difficulty=0.3)
    split = ComputeBudget(m, target=0.7, difficulty=0.3, per_stage=True)
    m(torch.randn(4, *shape))
    share = torch.tensor([0.1, 0.5, 0.7, 0.9])
    for s in split.stages:  # every stage at the same per-sample share of its removable MACs
        s.expected_block_macs = share * sum(s.block_macs[1:])
    losses = torch.tensor([0.3, 0.1, 2.0, 0.9])
    a, _ = whole.loss(shape, losses)
    b, _ = split.loss(shape, losses)
    assert float(a) == pytest.approx(float(b), rel=1e-5) and float(a) > 0
    # one target for the batch: both terms on batch means
    whole, split = ComputeBudget(m, target=0.7), ComputeBudget(m, target=0.7, per_stage=True)
    assert float(whole.loss(shape)[0]) == pytest.approx(float(split.loss(shape)[0]), rel=1e-4)


@pytest.mark.parametrize("extra", [[], ["train.budget.per_stage=1"]])
def test_difficulty_is_validated_and_trains(tmp_path, extra):
    from dynwire.engine import load_config, train

    with pytest.raises(ValueError, match="difficulty"):
        load_config("fmnist_resnet20", ["train.budget.target=0.5", "train.budget.difficulty=2"])
    with pytest.raises(ValueError, match="difficulty"):
        ComputeBudget(dynwire.create_model("cifar_resnet20"), target=0.5, difficulty=-0.1)
    from conftest import write_fmnist_fixture

    data = write_fmnist_fixture(tmp_path / "fmnist", n_train=32, n_test=16)
    sets = ["data.image_size=12", "data.batch_size=16", "data.subset=null", "data.val_subset=null"]
    sets += ["schedule.epochs=1", "schedule.warmup_epochs=0", "model.wiring_kwargs.train_gate=hard"]
    sets += [
        "train.budget.target=0.5",
        "train.budget.difficulty=1",
        "train.budget.warmup_epochs=0.5",
        *extra,
        f"data.root={data}",
        f"output.dir={tmp_path}",
    ]
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        final = train(load_config("fmnist_resnet20", [*sets, "output.name=d"]))
    finally:
        torch.set_num_threads(before)
    rows = [json.loads(line) for line in (tmp_path / "d" / "metrics.jsonl").read_text().splitlines()]
    fracs = [r["expected_mac_fraction"] for r in rows if "expected_mac_fraction" in r]
    assert fracs and all(0 < f <= 1 for f in fracs) and final is not None


def test_warmup_ramps_the_budget_weight_linearly():
    torch.manual_seed(0)
    m = dynwire.create_model("cifar_resnet20", num_classes=10, train_gate="hard").train()
    budget = ComputeBudget(m, target=0.3, weight=4.0, warmup_epochs=2.0)
    assert [budget.weight_at(e) for e in (0.0, 0.5, 2.0, 3.0, None)] == [0.0, 1.0, 4.0, 4.0, 4.0]
    m(torch.randn(4, 3, 32, 32))
    full, _ = ComputeBudget(m, target=0.3, weight=4.0).loss((3, 32, 32))
    half, _ = budget.loss((3, 32, 32), epoch=1.0)
    assert float(half.detach()) == pytest.approx(0.5 * float(full.detach()), rel=1e-6)
    with pytest.raises(ValueError, match="warmup_epochs"):
        ComputeBudget(m, target=0.3, warmup_epochs=-1)
    from dynwire.engine import load_config

    with pytest.raises(ValueError, match="warmup_epochs"):
        load_config("fmnist_resnet20", ["train.budget.target=0.5", "train.budget.warmup_epochs=-1"])

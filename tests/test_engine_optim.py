"""Parameter groups, the warm-up + cosine LR schedule, EMA math, samplers."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

import dynwire
from dynwire.data import EpochBatchSampler, ShardSampler
from dynwire.engine.ema import ModelEma
from dynwire.engine.optim import WarmupCosineSchedule, build_optimizer, lr_factor, param_groups


@pytest.fixture(scope="module")
def model() -> nn.Module:
    torch.manual_seed(0)
    return dynwire.create_model("cifar_resnet20", num_classes=10, in_chans=1, wiring="dynamic")


def test_no_weight_decay_on_1d_params(model: nn.Module) -> None:
    groups = param_groups(model, 1e-4)
    by_wd = {g["weight_decay"]: g for g in groups}
    assert set(by_wd) == {1e-4, 0.0}
    named = dict(model.named_parameters())
    decayed = set(by_wd[1e-4]["param_names"])
    free = set(by_wd[0.0]["param_names"])
    assert decayed | free == set(named) and not decayed & free
    assert all(named[n].ndim <= 1 for n in free) and all(named[n].ndim > 1 for n in decayed)
    graph_1d = {n for n in free if ".edges." in n}
    assert graph_1d, "the dynamic wiring's 1-D parameters (router biases, tau) must be decay-free"
    assert any(".edges." in n and n.endswith("weight") for n in decayed)  # router weights are decayed
    assert any(n.endswith("bn1.weight") for n in free) and any(n.endswith("fc.bias") or "bias" in n for n in free)
    # every group holds the same tensors as the names say
    for g in groups:
        assert all(p is named[n] for p, n in zip(g["params"], g["param_names"]))


def test_no_decay_switch_off_gives_one_group(model: nn.Module) -> None:
    groups = param_groups(model, 1e-4, no_decay_norm_bias=False)
    assert len(groups) == 1 and groups[0]["weight_decay"] == 1e-4


def test_optimizer_really_skips_decay_for_1d_params() -> None:
    net = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    opt = build_optimizer(net, lr=0.1, weight_decay=0.5, momentum=0.9)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for n, p in net.named_parameters():
        if p.ndim <= 1:
            assert torch.equal(p, before[n]), n
        else:
            assert torch.allclose(p, before[n] * (1 - 0.1 * 0.5)), n


def test_lr_factor_warmup_then_cosine() -> None:
    total, warm = 110, 10
    assert lr_factor(0, total, warm) == pytest.approx(0.1)
    assert lr_factor(4, total, warm) == pytest.approx(0.5)
    assert lr_factor(9, total, warm) == pytest.approx(1.0)
    assert lr_factor(10, total, warm) == pytest.approx(1.0)
    assert lr_factor(60, total, warm) == pytest.approx(0.5)
    assert lr_factor(35, total, warm) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.25)))
    assert lr_factor(110, total, warm) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(50, total, warm, cosine=False) == 1.0
    assert lr_factor(0, 10, 0) == 1.0  # no warm-up: starts at the peak


def test_schedule_sets_per_step_lr_and_resumes_from_state_dict() -> None:
    net = nn.Linear(2, 2)
    opt = build_optimizer(net, lr=0.4, weight_decay=1e-4)
    sched = WarmupCosineSchedule(opt, total_steps=20, warmup_steps=4)
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:4] == pytest.approx([0.1, 0.2, 0.3, 0.4])
    assert lrs[4] == pytest.approx(0.4) and lrs[-1] < 0.01
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))
    assert all(g["lr"] == pytest.approx(0.0, abs=1e-12) for g in opt.param_groups)

    # resume after step 7
    opt2 = build_optimizer(net, lr=0.4, weight_decay=1e-4)
    s2 = WarmupCosineSchedule(opt2, total_steps=20, warmup_steps=4)
    for _ in range(7):
        s2.step()
    opt3 = build_optimizer(net, lr=0.4, weight_decay=1e-4)
    s3 = WarmupCosineSchedule(opt3, total_steps=20, warmup_steps=4)
    s3.load_state_dict(s2.state_dict())
    assert [g["lr"] for g in opt3.param_groups] == pytest.approx([lrs[7]] * 2)
    with pytest.raises(ValueError, match="schedule mismatch"):
        WarmupCosineSchedule(opt3, total_steps=30, warmup_steps=4).load_state_dict(s2.state_dict())


def test_ema_math_and_buffers_copied() -> None:
    net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    ema = ModelEma(net, decay=0.9)
    e0 = {n: p.detach().clone() for n, p in ema.module.named_parameters()}
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
        net[1].running_mean.fill_(3.0)
    ema.update(net)
    for n, p in net.named_parameters():
        assert torch.allclose(ema.module.get_parameter(n), 0.9 * e0[n] + 0.1 * p), n
    assert torch.equal(ema.module[1].running_mean, torch.full((2,), 3.0))
    assert not any(p.requires_grad for p in ema.module.parameters())
    ema.train()
    assert not ema.module.training
    # two updates compound: e2 = d^2 e0 + (1 - d^2) p when p is constant
    ema.update(net)
    for n, p in net.named_parameters():
        assert torch.allclose(ema.module.get_parameter(n), 0.81 * e0[n] + 0.19 * p, atol=1e-6), n
    state = ema.ema_state_dict()
    other = ModelEma(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)), decay=0.5)
    other.load_ema_state_dict(state)
    assert other.decay == 0.9 and other.num_updates == 2
    assert torch.equal(other.module[0].weight, ema.module[0].weight)
    with pytest.raises(ValueError, match="must be in"):
        ModelEma(net, decay=1.0)


def test_ema_warmup_decay() -> None:
    ema = ModelEma(nn.Linear(1, 1), decay=0.999, warmup=True)
    assert ema.current_decay() == pytest.approx(1 / 10)
    ema.num_updates = 10_000
    assert ema.current_decay() == 0.999


def test_sampler_ranks_partition_the_global_batches() -> None:
    single = EpochBatchSampler(50, 8, seed=3)
    single.set_epoch(2)
    ranks = [EpochBatchSampler(50, 8, world_size=2, rank=r, seed=3) for r in range(2)]
    for s in ranks:
        s.set_epoch(2)
    batches = list(single)
    per_rank = [list(s) for s in ranks]
    assert len(batches) == 6 == len(per_rank[0]) == len(per_rank[1])  # 50 // 8, last partial dropped
    for k, b in enumerate(batches):
        assert sorted(per_rank[0][k] + per_rank[1][k]) == sorted(b)
        assert len(per_rank[0][k]) == 4
    # pure function of (seed, epoch); another epoch differs
    again = EpochBatchSampler(50, 8, seed=3)
    again.set_epoch(2)
    assert list(again) == batches
    again.set_epoch(3)
    assert list(again) != batches
    # resuming skips exactly the batches already seen
    again.set_epoch(2)
    again.set_start(4)
    assert list(again) == batches[4:] and len(again) == 2
    with pytest.raises(ValueError, match="multiple of world size"):
        EpochBatchSampler(50, 9, world_size=2)
    with pytest.raises(ValueError, match="larger than the training set"):
        EpochBatchSampler(5, 8)


def test_shard_sampler_counts_every_image_once() -> None:
    shards = [list(ShardSampler(11, world_size=3, rank=r)) for r in range(3)]
    assert sorted(sum(shards, [])) == list(range(11))

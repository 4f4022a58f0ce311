"""The CUDA paths against plain references: the CPU result, plain autograd, float32.

Skipped without a GPU (CI has none). On a GPU machine (``scripts/gpu_check.sh``) every test
here runs the library on CUDA and compares it with something that is not the CUDA code itself:
the same model on the CPU, the plain-autograd reference of ``test_gradients``, the dense
executor, the eager model (for ``torch.compile``), the float32 step (for bf16 autocast).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import set_thresholds_at_quantile, small_size, write_fmnist_fixture
from test_gradients import FAMILIES, INPUT, _grads, _small, reference_forward

import dynwire
from dynwire.engine import evaluate, load_checkpoint

# DYNWIRE_TEST_DEVICE=cpu runs this file on the CPU against itself: a smoke test of the tests
CUDA = torch.device(os.environ.get("DYNWIRE_TEST_DEVICE", "cuda"))
pytestmark = pytest.mark.skipif(CUDA.type == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def _exact_float32():
    """No TF32 in float32 comparisons (cuDNN allows it by default: 1e-3 relative error)."""
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.mark.parametrize("node", ["block", "branch"])
@pytest.mark.parametrize("wiring", ["dynamic", "static", "random-er"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_cuda_matches_plain_autograd_reference_in_float64(family, wiring, node):
    if node == "branch" and family == "randwire":
        pytest.skip("RandWire's nodes have no shortcut: the same network in both forms")
    model = _small(family, wiring, node=node, act_layer=torch.nn.SiLU).to(CUDA).train()
    b, size = INPUT[family]
    x = torch.randn(b, 3, size, size, dtype=torch.float64, device=CUDA)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    out, gx, grads = _grads(model, x, model)
    model.load_state_dict(state)
    ref, rgx, rgrads = _grads(model, x, lambda t: reference_forward(model, t))
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(gx, rgx, rtol=1e-8, atol=1e-11)
    for n in grads:
        torch.testing.assert_close(grads[n], rgrads[n], rtol=1e-7, atol=1e-10, msg=lambda m, n=n: f"{n}: {m}")
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference_forward(model, x), rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("node", ["block", "branch"])
@pytest.mark.parametrize("name", dynwire.list_models())
def test_every_model_on_cuda_equals_the_cpu(name, node):
    """Train-mode logits and every gradient, and eval-mode logits, CUDA against CPU (float64)."""
    torch.manual_seed(0)
    cpu = dynwire.create_model(name, num_classes=10, wiring="dynamic", node=node, drop_rate=0.0).double().train()
    gpu = dynwire.create_model(name, num_classes=10, wiring="dynamic", node=node, drop_rate=0.0).double().train()
    gpu.load_state_dict(cpu.state_dict())
    gpu.to(CUDA)
    x = torch.randn(2, *small_size(name), dtype=torch.float64)
    for m, xi in ((cpu, x), (gpu, x.to(CUDA))):
        m.zero_grad(set_to_none=True)
        m._out = m(xi)
        (
            m._out * torch.linspace(-1, 1, m._out.numel(), dtype=xi.dtype, device=xi.device).view_as(m._out)
        ).sum().backward()
    assert _rel(gpu._out, cpu._out) < 1e-9
    gp = dict(gpu.named_parameters())
    for n, p in cpu.named_parameters():
        if p.grad is not None:
            assert _rel(gp[n].grad, p.grad) < 1e-7, n
    cpu.eval(), gpu.eval()
    with torch.no_grad():
        assert _rel(gpu(x.to(CUDA)), cpu(x)) < 1e-9


@pytest.mark.parametrize("node", ["block", "branch"])
def test_pruned_executor_on_cuda_equals_dense_and_the_cpu(node):
    torch.manual_seed(0)
    model = dynwire.create_model("cifar_resnet56", num_classes=10, wiring="dynamic", node=node).eval()
    x = torch.randn(8, 3, 32, 32)
    for _, s in model.graph_stages():  # routers that vary per sample, so removal does too
        for r in s.edges.routers:
            torch.nn.init.normal_(r.fc.weight, std=0.5)
    set_thresholds_at_quantile(model, x, 0.5)
    with torch.no_grad(), dynwire.record_adjacency(model) as rec_cpu:
        cpu = model(x)
    model.to(CUDA)
    with torch.no_grad(), dynwire.record_adjacency(model) as rec:
        pruned = model(x.to(CUDA))
    removed = torch.cat([r[:, 1:-1].flatten() for r in rec.removed.values()])
    assert removed.any() and not removed.all(), "some (sample, node) pairs are removed, not all"
    for k in rec.removed:
        assert torch.equal(rec.removed[k].cpu(), rec_cpu.removed[k].cpu())
    assert torch.equal(rec.macs.cpu(), rec_cpu.macs.cpu())
    for _, s in model.graph_stages():
        s.executor = "dense"
    with torch.no_grad():
        dense = model(x.to(CUDA))
        for _, s in model.graph_stages():
            s.executor = "pruned"
        fast = model(x.to(CUDA))  # the inference fast path (nothing recorded)
        one = torch.cat([model(x[i : i + 1].to(CUDA)) for i in range(len(x))])  # batch-1 gates
    assert _rel(pruned, dense) < 1e-5 and _rel(fast, dense) < 1e-5 and _rel(one, dense) < 1e-5
    assert _rel(pruned, cpu) < 1e-4


def test_budget_training_step_on_cuda_matches_the_cpu():
    """Hard gate and the compute budget: loss, budget term and gradients as on the CPU (float64)."""
    from dynwire.graph.budget import ComputeBudget

    torch.manual_seed(0)
    kw = dict(num_classes=10, wiring="dynamic", node="branch", train_gate="hard", router_weight_std=0.2, router_bias=0)
    cpu = dynwire.create_model("cifar_resnet20", **kw).double().train()
    gpu = dynwire.create_model("cifar_resnet20", **kw).double().train()
    gpu.load_state_dict(cpu.state_dict())
    gpu.to(CUDA)
    x, y = torch.randn(8, 3, 32, 32, dtype=torch.float64), torch.arange(8) % 10
    res = []
    for m, dev in ((cpu, "cpu"), (gpu, CUDA)):
        budget = ComputeBudget(m, target=0.5, weight=10.0)
        loss = F.cross_entropy(m(x.to(dev)), y.to(dev))
        term, frac = budget.loss(tuple(x.shape[1:]))
        (loss + term).backward()
        res.append((loss, term, frac, {n: p.grad for n, p in m.named_parameters() if p.grad is not None}))
    (l0, t0, f0, g0), (l1, t1, f1, g1) = res
    assert abs(float(l0) - float(l1)) < 1e-9 and abs(float(t0) - float(t1)) < 1e-9 and abs(float(f0) - float(f1)) < 1e-9
    assert 0 < float(f1) < 1 and g0.keys() == g1.keys()
    for n in g0:
        assert _rel(g1[n], g0[n]) < 1e-6, n


@pytest.mark.parametrize("node", ["block", "branch"])
@pytest.mark.parametrize("name", ["cifar_resnet20", "resnet18", "mobilenet_v2", "regnet_x_600mf"])
def test_bf16_channels_last_step_follows_the_float32_step(name, node):
    """bf16 autocast with channels_last: the loss of the float32 step, float32 gradients, and a few
    steps on one batch lower the loss as float32 steps do."""
    torch.manual_seed(0)
    ref = dynwire.create_model(name, num_classes=10, wiring="dynamic", node=node, drop_rate=0.0).to(CUDA).train()
    amp = dynwire.create_model(name, num_classes=10, wiring="dynamic", node=node, drop_rate=0.0).to(CUDA).train()
    amp.load_state_dict(ref.state_dict())
    amp.to(memory_format=torch.channels_last)
    x = torch.randn(16, *small_size(name), device=CUDA)
    y = torch.arange(16, device=CUDA) % 10
    losses = {}
    for key, m, xi, on in (
        ("fp32", ref, x, False),
        ("bf16", amp, x.contiguous(memory_format=torch.channels_last), True),
    ):
        opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
        losses[key] = []
        for _ in range(6):
            opt.zero_grad(set_to_none=True)
            with torch.autocast(CUDA.type, dtype=torch.bfloat16, enabled=on):
                out = m(xi)
                loss = F.cross_entropy(out, y)
            assert out.dtype == (torch.bfloat16 if on else torch.float32)
            loss.backward()
            grads = [p.grad for p in m.parameters() if p.grad is not None]
            assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
            opt.step()
            losses[key].append(loss.item())
    assert abs(losses["bf16"][0] - losses["fp32"][0]) < 0.05 * losses["fp32"][0]
    assert losses["bf16"][-1] < 0.8 * losses["bf16"][0], losses  # it learns the batch
    assert abs(losses["bf16"][-1] - losses["fp32"][-1]) < 0.5 * losses["fp32"][0], losses


@pytest.mark.parametrize("node", ["block", "branch"])
def test_compiled_model_on_cuda_equals_eager(node):
    """``torch.compile(fullgraph=True)`` in float64: logits and every gradient as in eager mode."""
    torch.manual_seed(0)
    model = dynwire.create_model("cifar_resnet20", num_classes=10, wiring="dynamic", node=node, drop_rate=0.0)
    model = model.double().to(CUDA).train()
    x = torch.randn(4, 3, 32, 32, device=CUDA, dtype=torch.float64)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    eager, _, g_eager = _grads(model, x, model)
    model.load_state_dict(state)
    compiled = torch.compile(model, fullgraph=True)
    out, _, g = _grads(model, x, compiled)
    assert _rel(out, eager) < 1e-9
    for n in g:
        assert _rel(g[n], g_eager[n]) < 1e-7, n
    model.eval()
    with torch.no_grad():
        assert _rel(compiled(x), model(x)) < 1e-9
    torch._dynamo.reset()


def test_detector_with_a_dynamic_backbone_trains_and_detects_on_cuda():
    from dynwire.detection import fasterrcnn_fpn

    torch.manual_seed(0)
    model = fasterrcnn_fpn("resnet18", "dynamic", num_classes=3, min_size=64, max_size=64, fpn_channels=16).to(CUDA)
    images = [torch.rand(3, 64, 64, device=CUDA), torch.rand(3, 48, 64, device=CUDA)]
    targets = [
        {"boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0]], device=CUDA), "labels": torch.tensor([1], device=CUDA)},
        {"boxes": torch.zeros(0, 4, device=CUDA), "labels": torch.zeros(0, dtype=torch.int64, device=CUDA)},
    ]
    model.train()
    loss = sum(model(images, targets).values())
    assert torch.isfinite(loss)
    loss.backward()
    model.eval()
    with torch.no_grad():
        gpu_out = model(images)
        cpu_out = model.cpu()([im.cpu() for im in images])
    assert len(gpu_out) == 2 and gpu_out[0]["boxes"].device.type == CUDA.type
    for g, c in zip(gpu_out, cpu_out):  # the same detections as on the CPU
        n = min(len(g["scores"]), len(c["scores"]), 5)
        assert torch.allclose(g["scores"][:n].cpu(), c["scores"][:n], atol=1e-3)


def test_cli_trains_on_cuda_in_bf16_and_the_checkpoint_evaluates_on_the_cpu(tmp_path: Path):
    from dynwire.cli import main as cli_main

    data = write_fmnist_fixture(tmp_path / "fmnist")
    argv = ["train", "--config", "fmnist_resnet20", "--data-dir", str(data), "--output-dir", str(tmp_path)]
    argv += ["--set", "data.image_size=16", "data.batch_size=16", "data.subset=null", "data.val_subset=null"]
    argv += [
        "schedule.epochs=2",
        f"train.device={CUDA.type}",
        "train.amp=bf16",
        "train.channels_last=true",
        "output.name=gpu",
    ]
    assert cli_main(argv) == 0
    run = tmp_path / "gpu"
    final = json.loads((run / "final.json").read_text())
    ckpt = load_checkpoint(run / "last.pt")  # weights only, mapped to the CPU
    assert all(v.device.type == "cpu" and v.dtype != torch.bfloat16 for v in ckpt["model"].values())
    res = evaluate(
        run / "last.pt", data_dir=str(data), device=CUDA.type
    )  # the same device and precision reproduce the log
    assert abs(res["top1"] - final["val"]["top1"]) < 1e-6
    cpu = evaluate(run / "last.pt", data_dir=str(data), device="cpu")
    assert abs(cpu["top1"] - final["val"]["top1"]) <= 100 * 2 / 48  # bf16 on CUDA vs the CPU: at most 2 of 48 flip


def test_cli_trains_compiled_with_cuda_graphs(tmp_path: Path):
    """``train.compile_mode=reduce-overhead`` on CUDA (CUDA graphs): the run finishes and its
    checkpoint evaluates eagerly to the logged loss."""
    from dynwire.cli import main as cli_main

    data = write_fmnist_fixture(tmp_path / "fmnist")
    argv = ["train", "--config", "fmnist_resnet20", "--data-dir", str(data), "--output-dir", str(tmp_path)]
    argv += ["--set", "data.image_size=16", "data.batch_size=16", "data.subset=null", "data.val_subset=null"]
    argv += ["schedule.epochs=2", f"train.device={CUDA.type}", "train.compile=true"]
    argv += ["train.compile_mode=reduce-overhead", "output.name=graphs"]
    assert cli_main(argv) == 0
    final = json.loads((tmp_path / "graphs" / "final.json").read_text())
    res = evaluate(tmp_path / "graphs" / "last.pt", data_dir=str(data), device=CUDA.type)
    assert abs(res["loss"] - final["val"]["loss"]) < 1e-3 * final["val"]["loss"]
    torch._dynamo.reset()

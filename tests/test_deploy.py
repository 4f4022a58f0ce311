"""Deployment: load_model / checkpoint_path, self-describing safetensors, ONNX export, torch.compile."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import set_thresholds_at_quantile, small_size, write_fmnist_fixture

import dynwire
from dynwire.cli import main as cli_main
from dynwire.deploy import (
    BUILD_KEY,
    NoBuildInfoError,
    export_onnx,
    export_safetensors,
    onnx_max_abs_diff,
    read_build_info,
    resolve_model_file,
)
from dynwire.engine import build_model, config_from_dict, load_checkpoint
from dynwire.engine import export_safetensors as export_weights_only

MODELS = dynwire.list_models()
# RandWire's stages have 32 (16) nodes, 528 (136) edges: exporting them to ONNX takes many minutes on
# 2 cores, so the family is exported once, with 4-node stages (the same stage code, a smaller graph)
ONNX_MODELS = [n for n in MODELS if n != "randwire_small"]
ONNX_KWARGS = {"cifar_randwire_small": dict(nodes=4)}


@pytest.fixture(autouse=True)
def _threads():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real (tiny) training run: cifar_resnet20 on a 1-channel 12x12 Fashion-MNIST fixture, with EMA."""
    data = write_fmnist_fixture(tmp_path_factory.mktemp("fmnist"), n_train=64, n_test=32)
    out = tmp_path_factory.mktemp("runs")
    argv = ["train", "--config", "fmnist_resnet20", "--data-dir", str(data), "--output-dir", str(out), "--set"]
    argv += ["data.image_size=12", "data.batch_size=16", "data.subset=null", "data.val_subset=null"]
    argv += ["schedule.epochs=1", "schedule.warmup_epochs=0", "train.ema_decay=0.9", "output.name=r"]
    argv += ["model.wiring_kwargs.graph_seed=3", "model.drop_rate=0.1"]
    assert cli_main(argv) == 0
    return out / "r"


def _x(c: int = 1, n: int = 3, s: int = 12) -> torch.Tensor:
    return torch.randn(n, c, s, s, generator=torch.Generator().manual_seed(1))


def _logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


# --------------------------------------------------------------------------- load_model
def test_load_model_rebuilds_the_run_like_eval_does(run_dir: Path) -> None:
    assert resolve_model_file(run_dir).name == "best.pt"
    model = dynwire.load_model(run_dir)
    assert not model.training and next(model.parameters()).device.type == "cpu"
    # what `dynwire eval` builds from the same checkpoint
    ckpt = load_checkpoint(run_dir / "best.pt")
    ref = build_model(config_from_dict(ckpt["config"]), type("I", (), ckpt["data_info"])).eval()
    ref.load_state_dict(ckpt["model"])
    x = _x()
    assert torch.equal(_logits(model, x), _logits(ref, x))
    cfg = model.build_config
    assert cfg["name"] == "cifar_resnet20" and cfg["wiring"] == "dynamic" and cfg["num_classes"] == 10
    assert cfg["in_chans"] == 1 and cfg["input_size"] == [1, 12, 12] and len(cfg["classes"]) == 10
    assert cfg["wiring_kwargs"] == {"graph_seed": 3, "node": "branch"} and model.drop_rate == 0.1
    last = dynwire.load_model(run_dir / "last.pt")
    assert torch.equal(_logits(last, x), _logits(model, x))  # one epoch: best.pt is last.pt
    ema = dynwire.load_model(run_dir, use_ema=True)
    ema_ref = copy.deepcopy(ref)
    ema_ref.load_state_dict(ckpt["ema"]["weights"])
    assert torch.equal(_logits(ema, x), _logits(ema_ref, x))


def test_safetensors_export_is_self_describing(run_dir: Path, tmp_path: Path, capsys) -> None:
    from safetensors import safe_open

    out = tmp_path / "m.safetensors"
    assert cli_main(["export", "--checkpoint", str(run_dir), "--out", str(out)]) == 0
    with safe_open(str(out), framework="pt") as f:
        meta = json.loads(f.metadata()[BUILD_KEY])
    assert (
        meta["name"] == "cifar_resnet20"
        and meta["in_chans"] == 1
        and meta["wiring_kwargs"] == {"graph_seed": 3, "node": "branch"}
    )
    model, ref = dynwire.load_model(out), dynwire.load_model(run_dir)
    x = _x()
    assert torch.equal(_logits(model, x), _logits(ref, x))
    assert model.build_config["classes"] == ref.build_config["classes"]
    assert read_build_info(out)["input_size"] == [1, 12, 12]
    # EMA export, and export from an in-memory model round-trips too
    export_safetensors(run_dir, tmp_path / "ema.safetensors", use_ema=True)
    assert torch.equal(
        _logits(dynwire.load_model(tmp_path / "ema.safetensors"), x),
        _logits(dynwire.load_model(run_dir, use_ema=True), x),
    )
    m = dynwire.create_model("cifar_resnet20", num_classes=7, wiring="static", in_chans=2).eval()
    export_safetensors(m, tmp_path / "mem.safetensors")
    back = dynwire.load_model(tmp_path / "mem.safetensors")
    assert back.build_config["wiring"] == "static" and back.num_classes == 7
    assert torch.equal(_logits(back, _x(2)), _logits(m, _x(2)))


def _without_node(ckpt: dict) -> dict:
    cfg = copy.deepcopy(ckpt["config"])
    del cfg["model"]["wiring_kwargs"]["node"]
    return cfg


def test_files_written_before_the_node_form_was_recorded_load_as_block(run_dir: Path, tmp_path: Path, capsys) -> None:
    """dynwire 0.1 files (training checkpoints and build info of version 1) did not store the node
    form: they were all built with node="block" and load as that, whatever the default is now."""
    from safetensors.torch import save_file

    from dynwire.engine.checkpoint import stored_config

    ckpt = load_checkpoint(run_dir / "best.pt")
    assert ckpt["version"] == 2 and ckpt["config"]["model"]["wiring_kwargs"]["node"] == "branch"  # explicit now
    x = _x()
    # the same weights in block form: what a 0.1 file holding them was
    ref = build_model(
        config_from_dict(stored_config({**ckpt, "version": 1, "config": _without_node(ckpt)})),
        type("I", (), ckpt["data_info"]),
    ).eval()
    ref.load_state_dict(ckpt["model"])
    ref.build_config = dynwire.load_model(run_dir).build_config
    old = copy.deepcopy(ckpt)
    old["version"] = 1
    del old["config"]["model"]["wiring_kwargs"]["node"]
    assert stored_config(old)["model"]["wiring_kwargs"] == {"graph_seed": 3, "node": "block"}
    assert "node" not in old["config"]["model"]["wiring_kwargs"]  # a copy: the checkpoint is not changed
    torch.save(old, tmp_path / "v1.pt")
    m = dynwire.load_model(tmp_path / "v1.pt")
    assert all(f == "block" for _, st in m.graph_stages() for f in st.node_form)
    assert torch.equal(_logits(m, x), _logits(ref, x))
    assert not torch.allclose(_logits(m, x), _logits(dynwire.load_model(run_dir), x))  # the forms differ
    # a version-1 file that names its form keeps it
    old["config"]["model"]["wiring_kwargs"]["node"] = "branch"
    torch.save(old, tmp_path / "v1_branch.pt")
    b = dynwire.load_model(tmp_path / "v1_branch.pt")
    assert any(f == "branch" for _, st in b.graph_stages() for f in st.node_form)
    # build info of version 1 (safetensors metadata) without node
    meta = dict(ref.build_config, version=1, wiring_kwargs={"graph_seed": 3})
    meta = {
        k: v
        for k, v in meta.items()
        if k in ("name", "num_classes", "in_chans", "wiring", "wiring_kwargs", "model_kwargs", "version")
    }
    save_file(
        {k: v.contiguous() for k, v in ref.state_dict().items()},
        str(tmp_path / "v1.safetensors"),
        metadata={BUILD_KEY: json.dumps(meta)},
    )
    s = dynwire.load_model(tmp_path / "v1.safetensors")
    assert s.build_config["wiring_kwargs"]["node"] == "block" and torch.equal(_logits(s, x), _logits(ref, x))
    # resuming a run in the other form is refused before anything is written
    import shutil

    shutil.copytree(run_dir, tmp_path / "r")
    argv = ["train", "--config", str(tmp_path / "r" / "config.yaml"), "--resume", "--output-dir", str(tmp_path)]
    assert cli_main([*argv, "--set", "output.name=r", "model.wiring_kwargs.node=block"]) == 2
    assert "trained with node='branch'" in capsys.readouterr().err


def test_create_model_checkpoint_path(run_dir: Path, tmp_path: Path) -> None:
    x = _x()
    ref = _logits(dynwire.load_model(run_dir), x)
    m = dynwire.create_model("cifar_resnet20", num_classes=10, in_chans=1, checkpoint_path=run_dir, graph_seed=3)
    assert m.training  # like any new model; load_model gives eval()
    assert torch.equal(_logits(m.eval(), x), ref)
    export_safetensors(run_dir, tmp_path / "m.safetensors")
    torch.save(dynwire.load_model(run_dir).state_dict(), tmp_path / "sd.pt")
    for f in (run_dir / "last.pt", tmp_path / "m.safetensors", tmp_path / "sd.pt"):
        m = dynwire.create_model("cifar_resnet20", num_classes=10, in_chans=1, checkpoint_path=f).eval()
        assert torch.equal(_logits(m, x), ref), f


@pytest.mark.parametrize(
    "kwargs, says",
    [
        (dict(name="resnet18"), "name 'cifar_resnet20' in the file, 'resnet18' requested"),
        (dict(num_classes=100), "num_classes 10 in the file, 100 requested"),
        (dict(in_chans=3), "in_chans 1 in the file, 3 requested"),
        (dict(wiring="static"), "wiring 'dynamic' in the file, 'static' requested"),
    ],
)
def test_checkpoint_path_mismatch_names_file_and_difference(run_dir: Path, tmp_path: Path, kwargs, says) -> None:
    args = dict(name="cifar_resnet20", num_classes=10, in_chans=1, wiring="dynamic") | kwargs
    export_safetensors(run_dir, tmp_path / "m.safetensors")
    for f in (run_dir / "best.pt", tmp_path / "m.safetensors"):
        with pytest.raises(ValueError, match=str(f)) as e:
            dynwire.create_model(**args, checkpoint_path=f)
        assert says in str(e.value)


def test_bare_weights_fit_or_fail_clearly(tmp_path: Path) -> None:
    m = dynwire.create_model("cifar_resnet20", num_classes=10)
    torch.save(m.state_dict(), tmp_path / "sd.pt")
    export_weights_only(m, tmp_path / "w.safetensors")  # no build info in its metadata
    for f in (tmp_path / "sd.pt", tmp_path / "w.safetensors"):
        with pytest.raises(NoBuildInfoError, match="does not say which model it holds"):
            dynwire.load_model(f)
        back = dynwire.create_model("cifar_resnet20", num_classes=10, checkpoint_path=f)
        assert torch.equal(back.fc.weight, m.fc.weight)
        with pytest.raises(ValueError, match=r"does not fit model 'cifar_resnet20'.*num_classes 100.*fc.weight"):
            dynwire.create_model("cifar_resnet20", num_classes=100, checkpoint_path=f)
        with pytest.raises(ValueError, match=r"does not fit model 'cifar_resnet56'.*Missing key"):
            dynwire.create_model("cifar_resnet56", num_classes=10, checkpoint_path=f)


def test_files_that_are_not_dynwire_models(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello, not weights")
    with pytest.raises(ValueError, match=r"notes.txt' is not a dynwire file"):
        dynwire.load_model(tmp_path / "notes.txt")
    torch.save({"step": 3, "lr": 0.1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match=r"other.pt' is not a dynwire file"):
        dynwire.load_model(tmp_path / "other.pt")
    torch.save({"model": {"w": torch.ones(1)}, "config": {"bogus": {}}}, tmp_path / "cfg.pt")
    with pytest.raises(ValueError, match=r"cfg.pt': its stored config is not a dynwire classification config"):
        dynwire.load_model(tmp_path / "cfg.pt")
    torch.save({"model": {"w": torch.ones(1)}, "config": {"model": {"fpn_channels": 256}}}, tmp_path / "det.pt")
    with pytest.raises(ValueError, match=r"det.pt' is a detection checkpoint"):
        dynwire.load_model(tmp_path / "det.pt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds neither best.pt nor last.pt"):
        dynwire.load_model(tmp_path / "empty")
    with pytest.raises(FileNotFoundError):
        dynwire.load_model(tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="has no EMA weights"):
        m = dynwire.create_model("cifar_resnet20", num_classes=10)
        torch.save({"model": m.state_dict(), "ema": None}, tmp_path / "noema.pt")
        dynwire.load_model(tmp_path / "noema.pt", use_ema=True)
    assert cli_main(["export", "--checkpoint", str(tmp_path / "notes.txt"), "--out", str(tmp_path / "x.onnx")]) == 2


def test_custom_layers_cannot_be_described(tmp_path: Path) -> None:
    m = dynwire.create_model("cifar_resnet20", num_classes=10, norm_layer=torch.nn.BatchNorm2d)
    with pytest.raises(ValueError, match="norm_layer=<object>"):
        export_safetensors(m, tmp_path / "m.safetensors")


# --------------------------------------------------------------------------- ONNX
def _removing_model(name: str, x: torch.Tensor, **kw) -> torch.nn.Module:
    """A model whose thresholds (0.6-quantile of the router weights) remove nodes for some samples."""
    torch.manual_seed(0)
    model = dynwire.create_model(name, num_classes=10, **kw).eval()
    set_thresholds_at_quantile(model, x, 0.6)
    if kw.get("wiring") == "static":  # weights shared by all samples: remove node 1 of every stage
        with torch.no_grad():
            for _, stage in model.graph_stages():
                stage.edges.tau[0] = 2.0  # above its only input weight, sigmoid(.) < 1
    with torch.no_grad(), dynwire.record_adjacency(model) as rec:
        model(x)
    removed = torch.cat([r[:, 1:-1] for r in rec.removed.values()], 1)
    assert removed.any() and not removed.all(), "some nodes are removed for some samples"
    return model


def _check_onnx(name: str, tmp_path: Path, **kw) -> None:
    x = torch.randn(5, *small_size(name), generator=torch.Generator().manual_seed(0))
    model = _removing_model(name, x, **kw)
    out = export_onnx(model, tmp_path / f"{name}.onnx", input_size=small_size(name), batch_size=2)
    assert all(s.executor == "pruned" for _, s in model.graph_stages()), "executors restored"
    # batch 5 at inference (exported with batch 2), against the pruned executor
    assert onnx_max_abs_diff(model, out, x) <= 1e-4
    assert onnx_max_abs_diff(model, out, x[:1]) <= 1e-4


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=[] if n == "cifar_resnet20" else pytest.mark.slow) for n in ONNX_MODELS]
)
def test_onnx_matches_pruned_executor(name: str, tmp_path: Path) -> None:
    _check_onnx(name, tmp_path, **ONNX_KWARGS.get(name, {}))


def test_onnx_branch_form(tmp_path: Path) -> None:
    _check_onnx("cifar_resnet20", tmp_path, node="branch")


@pytest.mark.slow
@pytest.mark.parametrize("wiring", ["static", "random-er"])
def test_onnx_other_wirings(wiring: str, tmp_path: Path) -> None:
    if wiring == "static":
        _check_onnx("cifar_resnet20", tmp_path, wiring=wiring)
    else:  # RandWire graphs have no thresholds: nothing removed, still exact
        model = dynwire.create_model("cifar_resnet20", num_classes=10, wiring=wiring).eval()
        out = export_onnx(model, tmp_path / "m.onnx", input_size=(3, 32, 32))
        assert onnx_max_abs_diff(model, out, torch.randn(3, 3, 32, 32)) <= 1e-4


def test_cli_export_onnx(run_dir: Path, tmp_path: Path, capsys) -> None:
    import onnx
    import onnxruntime as ort

    out = tmp_path / "m.onnx"
    assert cli_main(["export", "--checkpoint", str(run_dir), "--format", "onnx", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "input 1x12x12" in printed and "max abs diff" in printed
    proto = onnx.load(str(out))
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta[BUILD_KEY])["name"] == "cifar_resnet20"
    dim0 = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert dim0.dim_param and not dim0.dim_value, "dynamic batch axis"
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = _x(n=4)
    got = torch.from_numpy(sess.run(None, {"input": x.numpy()})[0])
    assert got.shape == (4, 10)
    assert (got - _logits(dynwire.load_model(run_dir), x)).abs().max() <= 1e-4


@pytest.mark.parametrize(
    "extra, says",
    [
        (["--format", "onnx", "--opset", "13"], "opset 13 is not supported"),
        (["--format", "onnx", "--input-size", "3", "12", "12"], "the model takes 1 channels, not 3"),
        (["--format", "safetensors", "--opset", "18"], "apply to --format onnx only"),
        (["--format", "onnx", "--ema", "--input-size", "1", "0", "12"], "three positive ints"),
    ],
)
def test_cli_export_rejects_unsupported_options(run_dir: Path, tmp_path: Path, capsys, extra, says) -> None:
    assert cli_main(["export", "--checkpoint", str(run_dir), "--out", str(tmp_path / "m.onnx"), *extra]) == 2
    err = capsys.readouterr().err
    assert "dynwire export: error:" in err and says in err
    assert not (tmp_path / "m.onnx").exists()


# --------------------------------------------------------------------------- torch.compile
def _train_step(model, params, x, y):
    for p in params:
        p.grad = None
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    return loss.detach(), [torch.zeros_like(p) if p.grad is None else p.grad for p in params]


def _check_compile(name: str, backend: str, train_gate: str = "soft", node: str = "block") -> None:
    x = torch.randn(4, *small_size(name), generator=torch.Generator().manual_seed(0))
    model = _removing_model(name, x, train_gate=train_gate, drop_rate=0.0, node=node)  # no dropout: same RNG draws
    torch._dynamo.reset()
    with torch.no_grad():
        ref = model(x)  # eager: pruned executor
        got = torch.compile(model, fullgraph=True, backend=backend)(x)  # compiled: dense masks
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    # one training step: loss and every gradient (an unused parameter: None eager, 0 compiled).
    # With train_gate="hard" nodes are removed in training too; BatchNorm's batch statistics then
    # differ between the pruned executor (statistics of the live samples) and the dense one that
    # compile runs (all samples, removed ones zeroed afterwards), so the reference is eager dense.
    model.train()
    twin = copy.deepcopy(model)
    if train_gate == "hard":
        for _, s in model.graph_stages():
            s.executor = "dense"
        with torch.no_grad(), dynwire.record_adjacency(twin) as rec:
            twin(x)
        assert any(r[:, 1:-1].any() for r in rec.removed.values()), "nodes are removed in training too"
    y = torch.arange(4) % 10
    l0, g0 = _train_step(model, list(model.parameters()), x, y)
    l1, g1 = _train_step(torch.compile(twin, fullgraph=True, backend=backend), list(twin.parameters()), x, y)
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-5)
    for (n, _), a, b in zip(model.named_parameters(), g0, g1):
        # float32 sums in another order through a deep network: absolute tolerance relative to the
        # gradient's own scale (ResNeXt-50's stem: 1.2e-5 apart on an element of 7e-3, largest 7.8)
        atol = 1e-5 * max(1.0, float(a.abs().max()))
        torch.testing.assert_close(b, a, rtol=1e-4, atol=atol, msg=lambda m, n=n: f"{n}: {m}")
    torch._dynamo.reset()


@pytest.mark.parametrize("train_gate", ["soft", "hard"])
def test_compile_fullgraph_traces_eval_and_training(train_gate: str) -> None:
    """No graph break (fullgraph=True) in evaluation or in a training step; aot_eager keeps it fast."""
    _check_compile("cifar_resnet20", "aot_eager", train_gate)


def test_compile_fullgraph_branch_form() -> None:
    _check_compile("cifar_resnet20", "aot_eager", "hard", node="branch")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mobilenet_v2", "regnet_y_600mf", "resnext50_32x4d"])
def test_compile_fullgraph_other_families(name: str) -> None:
    _check_compile(name, "aot_eager")


@pytest.mark.slow
def test_compile_inductor_equals_eager() -> None:
    """The default backend (inductor, C++ kernels on CPU): minutes to compile on 2 cores."""
    _check_compile("cifar_resnet20", "inductor")

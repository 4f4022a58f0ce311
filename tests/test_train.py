"""End-to-end training in-process: the CLI writes every run-dir artefact; NaN handling; eval."""

from __future__ import annotations

import csv
import json
import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from conftest import write_fmnist_fixture

import dynwire
from dynwire.cli import main as cli_main
from dynwire.engine import TrainingDiverged, evaluate, load_checkpoint, load_config, train


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread: fast and steady on a small shared CPU (spinning OpenMP threads stall)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


TINY = [
    "data.image_size=12",
    "data.batch_size=16",
    "data.subset=null",
    "data.val_subset=null",
    "schedule.epochs=2",
    "schedule.warmup_epochs=0.5",
    "train.log_every=2",
    "train.ckpt_every_steps=4",
]


@pytest.fixture(scope="module")
def fmnist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_fmnist_fixture(tmp_path_factory.mktemp("fmnist"))


@pytest.fixture(scope="module")
def cli_run(fmnist: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """One `dynwire train` run through the lead's CLI entry point (2 epochs x 6 steps)."""
    import dynwire.cli

    out = tmp_path_factory.mktemp("runs")
    argv = ["train", "--config", "fmnist_resnet20", "--data-dir", str(fmnist), "--output-dir", str(out)]
    argv += ["--set", *TINY, "train.ema_decay=0.9", "output.name=e2e"]
    rc = dynwire.cli.main(argv)
    assert rc == 0
    run_dir = out / "e2e"
    return run_dir, json.loads((run_dir / "final.json").read_text())


def test_cli_train_writes_all_run_dir_artefacts(cli_run: tuple[Path, dict]) -> None:
    run_dir, final = cli_run
    names = {p.name for p in run_dir.iterdir()}
    assert {
        "config.yaml",
        "run.json",
        "metrics.csv",
        "metrics.jsonl",
        "tb",
        "last.pt",
        "best.pt",
        "final.json",
    } <= names
    assert not [n for n in names if n.endswith((".partial", ".tmp"))]

    cfg = load_config(run_dir / "config.yaml")  # the resolved config is a valid config
    assert cfg.data.image_size == 12 and cfg.train.ema_decay == 0.9 and cfg.data.batch_size == 16

    run = json.loads((run_dir / "run.json").read_text())
    assert run["seed"] == 0 and run["world_size"] == 1 and run["hostname"]
    assert run["command"] == sys.argv and run["start_time"]
    assert {"torch", "torchvision", "dynwire", "python"} <= set(run["versions"])
    assert run["steps_per_epoch"] == 96 // 16 and run["lr"] == pytest.approx(0.1 * 16 / 128)

    rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
    epochs = [r for r in rows if r["kind"] == "epoch"]
    assert [int(r["epoch"]) for r in epochs] == [1, 2]
    assert all(r["val_top1"] and r["val_top5"] and r["val_loss"] and r["ema_val_top1"] for r in epochs)
    assert any(r["kind"] == "train" and float(r["img_per_s"]) > 0 for r in rows)
    jsonl = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(jsonl) == len(rows) and [r["step"] for r in jsonl] == [int(r["step"]) for r in rows]
    assert list((run_dir / "tb").glob("events.out.tfevents.*"))

    from dynwire.analysis.profile import count_params

    model = dynwire.create_model("cifar_resnet20", num_classes=10, in_chans=1, wiring="dynamic")
    assert final["params"] == count_params(model)
    assert isinstance(final["macs"], int) and final["macs"] > 0 and final["input_size"] == [1, 12, 12]
    assert final["train_images_per_s"] > 0 and final["global_step"] == 12
    assert final["val"]["images"] == 48 and (final["val"]["top1"] * 48 / 100) == pytest.approx(
        round(final["val"]["top1"] * 48 / 100)
    )
    assert final["val"]["top5"] >= final["val"]["top1"]
    assert "ema_val" in final


def test_checkpoints_load_weights_only_and_hold_the_training_state(cli_run: tuple[Path, dict]) -> None:
    run_dir, final = cli_run
    ckpt = torch.load(run_dir / "last.pt", weights_only=True, map_location="cpu")
    assert ckpt["epoch"] == 2 and ckpt["step_in_epoch"] == 0 and ckpt["global_step"] == 12
    assert {"model", "optimizer", "scheduler", "ema", "rng", "config", "best_metric"} <= set(ckpt)
    assert {"python", "numpy", "torch"} <= set(ckpt["rng"][0])
    assert ckpt["scheduler"]["last_step"] == 12
    assert ckpt["config"]["data"]["image_size"] == 12
    best = torch.load(run_dir / "best.pt", weights_only=True)
    assert best["best_metric"] == pytest.approx(final["best_val_top1"])


def test_eval_command_reproduces_the_logged_metrics(cli_run: tuple[Path, dict], capsys) -> None:
    run_dir, final = cli_run
    assert cli_main(["eval", "--checkpoint", str(run_dir / "last.pt"), "--device", "cpu"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["images"] == 48
    assert got["top1"] == pytest.approx(final["val"]["top1"]) and got["loss"] == pytest.approx(
        final["val"]["loss"], rel=1e-5
    )
    ema = evaluate(run_dir / "last.pt", use_ema=True)
    assert ema["top1"] == pytest.approx(final["ema_val"]["top1"])
    soft = evaluate(run_dir / "last.pt", overrides=["model.wiring_kwargs.eval_gate=soft"], subset=20)
    assert soft["images"] == 20
    with pytest.raises(ValueError, match=r"model\.wirng: unknown key"):
        evaluate(run_dir / "last.pt", overrides=["model.wirng=static"])


def test_existing_run_needs_resume_and_finished_run_resumes_to_same_result(cli_run: tuple[Path, dict], capsys) -> None:
    run_dir, final = cli_run
    base = ["train", "--config", str(run_dir / "config.yaml"), "--output-dir", str(run_dir.parent)]
    assert cli_main(base) == 2
    err = capsys.readouterr().err
    assert err.startswith("dynwire train: error: run directory") and "already holds last.pt" in err
    assert cli_main(base + ["--resume"]) == 0  # nothing left to train: evaluates and rewrites final.json
    again = json.loads((run_dir / "final.json").read_text())
    assert again["val"] == final["val"] and again["global_step"] == final["global_step"]


def test_bad_config_value_fails_fast_with_message(fmnist: Path, tmp_path: Path, capsys) -> None:
    assert (
        cli_main(["train", "--config", "fmnist_resnet20", "--output-dir", str(tmp_path), "--set", "optim.lr=-1"]) == 2
    )
    assert capsys.readouterr().err == "dynwire train: error: optim.lr=-1: must be > 0\n"
    assert not any(tmp_path.iterdir())


class _NaNAfter(nn.Module):
    """Wraps a model; training forward number ``at`` returns NaN logits."""

    def __init__(self, inner: nn.Module, at: int) -> None:
        super().__init__()
        self.inner = inner
        self.at = at
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.inner(x)
        if self.training:
            self.calls += 1
            if self.calls == self.at:
                out = out * float("nan")
        return out


def test_nan_loss_stops_with_clear_error_and_keeps_last_checkpoint(fmnist: Path, tmp_path: Path) -> None:
    cfg = load_config(
        "fmnist_resnet20",
        TINY + [f"data.root={fmnist}", f"output.dir={tmp_path}", "output.name=nan", "train.ckpt_every_steps=3"],
    )

    def model_fn(cfg, info):
        m = dynwire.create_model(
            "cifar_resnet20", num_classes=info.num_classes, in_chans=info.in_chans, wiring="dynamic"
        )
        return _NaNAfter(m, at=5)

    with pytest.raises(TrainingDiverged) as exc:
        train(cfg, model_fn=model_fn)
    msg = str(exc.value)
    assert isinstance(exc.value, FloatingPointError)
    assert "global step 5" in msg and "epoch 1, step 5/6" in msg
    assert "last.pt was not overwritten" in msg and "optim.lr" in msg and "clip_grad_norm" in msg
    ckpt = load_checkpoint(tmp_path / "nan" / "last.pt")
    assert ckpt["global_step"] == 3  # the last good state, saved before the NaN step
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert not (tmp_path / "nan" / "final.json").exists()


def test_bf16_channels_last_clip_and_label_smoothing_run(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 1, 8, 8, generator=g)
    y = torch.arange(32) % 10
    ds = torch.utils.data.TensorDataset(x, y)
    info = types.SimpleNamespace(num_classes=10, in_chans=1, input_size=(1, 8, 8))
    cfg = load_config(
        None,
        [f"output.dir={tmp_path}", "output.name=bf16", "data.batch_size=8", "schedule.epochs=2", "train.eval_every=2",
         "train.amp=bf16", "train.channels_last=true", "optim.clip_grad_norm=1.0", "optim.label_smoothing=0.1",
         "optim.nesterov=true", "model.wiring=static", "train.device=cpu"],
    )  # fmt: skip
    final = train(cfg, datasets=(ds, ds, info))
    rows = [json.loads(line) for line in (tmp_path / "bf16" / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in rows if r["kind"] == "epoch"]
    assert len(epochs) == 2 and "val_top1" not in epochs[0] and "val_top1" in epochs[1]  # eval_every=2
    assert np.isfinite(final["val"]["loss"]) and final["global_step"] == 8
    ckpt = load_checkpoint(tmp_path / "bf16" / "last.pt")
    assert all(v.dtype != torch.bfloat16 for v in ckpt["model"].values())  # autocast keeps fp32 weights
    assert any(".edges.edge_logits" in k for k in ckpt["model"])


def test_shipped_cifar_config_trains_on_pickle_layout(tmp_path: Path) -> None:
    """The CPU-sized CIFAR-10 recipe runs end to end on a fixture in the real pickle layout."""
    from test_data import make_cifar10

    make_cifar10(tmp_path / "cifar", per_batch=8)
    cfg = load_config(
        "cifar10_resnet20",
        [
            f"data.root={tmp_path / 'cifar'}",
            f"output.dir={tmp_path}",
            "output.name=c10",
            "data.subset=null",
            "data.batch_size=8",
            "schedule.epochs=1",
            "train.num_threads=1",
        ],
    )
    assert cfg.data.name == "cifar10" and cfg.model.name == "cifar_resnet20"
    final = train(cfg)
    assert final["global_step"] == 5 and final["val"]["images"] == 5
    assert final["input_size"] == [3, 32, 32]


class _NaNGradAt(nn.Module):
    """Training forward number ``at`` has finite logits but NaN gradients (0 * sqrt(0) in the graph)."""

    def __init__(self, inner: nn.Module, at: int) -> None:
        super().__init__()
        self.inner = inner
        self.at = at
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.inner(x)
        if self.training:
            self.calls += 1
            if self.calls == self.at:
                out = out + 0.0 * torch.sqrt(out.sum() * 0.0)  # value unchanged, d/dx = 0 * inf = NaN
        return out


def test_nan_gradient_stops_training_without_clipping(fmnist: Path, tmp_path: Path) -> None:
    """#7: a NaN/Inf gradient stops training even when optim.clip_grad_norm is off."""
    cfg = load_config(
        "fmnist_resnet20",
        TINY + [f"data.root={fmnist}", f"output.dir={tmp_path}", "output.name=nangrad", "train.ckpt_every_steps=4"],
    )
    assert cfg.optim.clip_grad_norm is None

    def model_fn(cfg, info):
        m = dynwire.create_model("cifar_resnet20", num_classes=info.num_classes, in_chans=info.in_chans)
        return _NaNGradAt(m, at=5)

    with pytest.raises(TrainingDiverged) as exc:
        train(cfg, model_fn=model_fn)
    msg = str(exc.value)
    assert "the gradient norm is nan at global step 5" in msg and "last.pt was not overwritten" in msg
    ckpt = load_checkpoint(tmp_path / "nangrad" / "last.pt")
    assert ckpt["global_step"] == 4
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


PROGRESS_LINE = re.compile(
    r"^\[dynwire\] epoch (\d+)/2 step (\d+)/4 loss \d+\.\d{4} acc \d+\.\d% \d+ img/s eta \d+:\d\d:\d\d$"
)


def test_non_tty_training_writes_periodic_progress_lines(tmp_path: Path, capsys) -> None:
    """#9: with stderr not a terminal, every train.log_every steps gives one plain progress line."""
    g = torch.Generator().manual_seed(0)
    ds = torch.utils.data.TensorDataset(torch.randn(32, 1, 8, 8, generator=g), torch.arange(32) % 10)
    info = types.SimpleNamespace(num_classes=10, in_chans=1, input_size=(1, 8, 8))
    cfg = load_config(
        None,
        [f"output.dir={tmp_path}", "data.batch_size=8", "schedule.epochs=2", "train.log_every=2",
         "model.wiring=static", "train.device=cpu"],
    )  # fmt: skip
    train(cfg, datasets=(ds, ds, info))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if PROGRESS_LINE.match(line)]
    assert [PROGRESS_LINE.match(line).groups() for line in lines] == [
        ("1", "2"),
        ("1", "4"),
        ("2", "2"),
        ("2", "4"),
    ]
    from dynwire.engine.logging import parse_progress

    rec = parse_progress(lines[-1])
    assert rec["epoch"] == 2 and rec["epochs"] == 2 and rec["step"] == 4 and rec["steps"] == 4
    assert rec["eta_s"] == 0 and rec["img_per_s"] > 0 and rec["loss"] > 0
    assert parse_progress("[dynwire] epoch 1/2: train_loss=2.3") is None


def test_wiring_option_typo_fails_before_a_run_folder_exists(fmnist: Path, tmp_path: Path, capsys) -> None:
    """#8: a misspelt model.wiring_kwargs key is refused at config load, with the CLI's one error format."""
    import dynwire.cli

    argv = ["train", "--config", "fmnist_resnet20", "--data-dir", str(fmnist), "--output-dir", str(tmp_path)]
    assert dynwire.cli.main(argv + ["--set", "model.wiring_kwargs.tau_int=0.5"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dynwire train: error: model.wiring_kwargs.tau_int: unknown wiring option")
    assert "did you mean 'tau_init'" in err
    assert not any(tmp_path.iterdir())


def test_demo_draws_one_live_bar_per_run_from_the_progress_lines(tmp_path: Path) -> None:
    """#9: scripts/demo.py follows each child's output: log file, bar (terminal) or prefixed lines."""
    import importlib.util
    import io

    spec = importlib.util.spec_from_file_location("demo", Path(__file__).parents[1] / "scripts" / "demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    lines = [
        "[dynwire] epoch 1/2 step 2/4 loss 2.3000 acc 10.0% 300 img/s eta 0:01:05\n",
        "some other output\n",
        "[dynwire] epoch 1/2: train_loss=2.1, val_top1=30.5\n",
        "[dynwire] epoch 2/2 step 2/4 loss 1.5000 acc 40.0% 310 img/s eta 0:00:07\n",
    ]
    term, log = io.StringIO(), io.StringIO()
    mon = demo.RunMonitor("dynamic", log, position=0, tty=True, stream=term)
    mon.follow(lines)
    assert log.getvalue() == "".join(lines)
    assert (mon.bar.n, mon.bar.total) == (6, 8)
    assert mon.bar.postfix == "epoch 2/2 step 2/4 loss 1.500 310 img/s eta 0:00:07"
    assert "dynamic: [dynwire] epoch 1/2: train_loss=2.1" in term.getvalue()
    mon.close()

    plain, log = io.StringIO(), io.StringIO()
    demo.RunMonitor("sequential", log, position=1, tty=False, stream=plain).follow(lines)
    assert plain.getvalue().splitlines() == ["[sequential] " + line.rstrip() for line in lines if "other" not in line]


@pytest.mark.slow
def test_compiled_training_runs_and_saves_plain_weights(fmnist: Path, tmp_path: Path) -> None:
    """``train.compile`` with ``compile_mode=reduce-overhead`` (CUDA graphs where there is a GPU):
    the run finishes, its checkpoint holds the model's own names, and eager evaluation of it
    gives the logged validation loss."""
    argv = ["train", "--config", "fmnist_resnet20", "--data-dir", str(fmnist), "--output-dir", str(tmp_path)]
    argv += ["--set", *TINY, "schedule.epochs=1", "train.compile=true", "train.compile_mode=reduce-overhead"]
    argv += ["train.device=cpu", "output.name=compiled"]
    assert cli_main(argv) == 0
    run = tmp_path / "compiled"
    final = json.loads((run / "final.json").read_text())
    assert final["global_step"] == 6 and np.isfinite(final["val"]["loss"])
    ckpt = load_checkpoint(run / "last.pt")
    assert ckpt["config"]["train"]["compile_mode"] == "reduce-overhead"
    assert not any("_orig_mod" in k for k in ckpt["model"]) and any(".edges.tau" in k for k in ckpt["model"])
    eager = evaluate(run / "last.pt", data_dir=str(fmnist), device="cpu")
    assert eager["loss"] == pytest.approx(final["val"]["loss"], rel=1e-3)

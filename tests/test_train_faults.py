"""Process-level faults: SIGTERM saves and exits; SIGKILL + --resume gives the uninterrupted result."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from conftest import write_fmnist_fixture

from dynwire.engine import load_checkpoint

pytestmark = pytest.mark.slow

# Single-threaded children: identical float reduction order in every run (and kind to 2 cores).
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
CHILD = [
    sys.executable,
    "-c",
    "import sys, torch; torch.set_num_threads(1); from dynwire.cli import main; sys.exit(main())",
]


def train_cmd(data: Path, out: Path, *extra: str) -> list[str]:
    # Augmentation stays on (random crop + flip from the global torch RNG), so exact resume
    # also covers the restored RNG state. 64 images / batch 8 = 8 steps per epoch.
    return CHILD + [
        "train", "--config", "fmnist_resnet20", "--data-dir", str(data), "--output-dir", str(out),
        "--set", "data.image_size=8", "data.batch_size=8", "data.subset=null", "data.val_subset=null",
        "optim.lr=0.05", "optim.reference_batch=8", "schedule.warmup_epochs=1", "train.log_every=4",
        "train.ema_decay=0.9", "model.drop_rate=0.2", "output.name=run", *extra,
    ]  # fmt: skip


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    t0 = time.monotonic()
    while not path.exists():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"child exited early with {proc.returncode}:\n{err[-3000:]}")
        if time.monotonic() - t0 > timeout:
            proc.kill()
            pytest.fail(f"{path} did not appear within {timeout}s")
        time.sleep(0.005)


def test_sigterm_saves_last_checkpoint_and_exits(tmp_path: Path) -> None:
    data = write_fmnist_fixture(tmp_path / "data", n_train=64, n_test=16)
    cmd = train_cmd(data, tmp_path / "out", "schedule.epochs=200", "train.ckpt_every_steps=2")
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    last = tmp_path / "out" / "run" / "last.pt"
    wait_for(last, proc)
    first = load_checkpoint(last)["global_step"]
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "received SIGTERM" in err and "training interrupted by SIGTERM" in err and "--resume" in err
    ckpt = load_checkpoint(last)
    assert ckpt["global_step"] >= first
    assert ckpt["global_step"] == ckpt["epoch"] * 8 + ckpt["step_in_epoch"]
    assert ckpt["global_step"] < 200 * 8
    assert not (tmp_path / "out" / "run" / "final.json").exists()


def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path: Path) -> None:
    data = write_fmnist_fixture(tmp_path / "data", n_train=64, n_test=16)
    extra = ("schedule.epochs=3", "train.ckpt_every_steps=3")  # 24 steps; checkpoints at 3, 6, 8, 9, ...
    # Reference run, uninterrupted (runs while the other child is started and killed).
    ref = subprocess.Popen(
        train_cmd(data, tmp_path / "ref", *extra), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )

    killed = subprocess.Popen(
        train_cmd(data, tmp_path / "kill", *extra), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    run_dir = tmp_path / "kill" / "run"
    wait_for(run_dir / "last.pt", killed)
    killed.kill()  # SIGKILL: no handler runs, nothing is flushed
    killed.communicate()
    assert killed.returncode == -signal.SIGKILL
    assert not (run_dir / "final.json").exists(), "the run finished before it could be killed"
    at_kill = load_checkpoint(run_dir / "last.pt")
    assert 0 < at_kill["global_step"] < 24

    cmd = train_cmd(data, tmp_path / "kill", *extra) + ["--resume"]
    resumed = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {run_dir / 'last.pt'}" in resumed.stderr
    out, err = ref.communicate(timeout=300)
    assert ref.returncode == 0, err[-3000:]

    a = load_checkpoint(tmp_path / "ref" / "run" / "last.pt")
    b = load_checkpoint(run_dir / "last.pt")
    assert a["global_step"] == b["global_step"] == 24
    for part in ("model",):
        for k, v in a[part].items():
            torch.testing.assert_close(b[part][k], v, rtol=0, atol=1e-6, msg=f"{part}.{k}")
    for k, v in a["ema"]["weights"].items():
        torch.testing.assert_close(b["ema"]["weights"][k], v, rtol=0, atol=1e-6, msg=f"ema.{k}")
    # momentum buffers too: the optimizer continued exactly
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        torch.testing.assert_close(sb["momentum_buffer"], sa["momentum_buffer"], rtol=0, atol=1e-6)
    # the resumed run's metrics have no duplicated steps
    import json

    steps = [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    kinds = [json.loads(x)["kind"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    epoch_steps = [s for s, k in zip(steps, kinds) if k == "epoch"]
    assert epoch_steps == [8, 16, 24]
    assert len([s for s, k in zip(steps, kinds) if k == "train"]) == len(
        set(s for s, k in zip(steps, kinds) if k == "train")
    )


class _StopAt(nn.Module):
    """Sends this process SIGTERM during training forward number ``at`` (None: never)."""

    def __init__(self, inner: nn.Module, at: int | None) -> None:
        super().__init__()
        self.inner = inner
        self.at = at
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.calls += 1
            if self.calls == self.at:
                os.kill(os.getpid(), signal.SIGTERM)
        return self.inner(x)


def test_mid_epoch_resume_with_two_workers_is_bit_exact(tmp_path: Path) -> None:
    """#6: augmentation is a function of (seed, epoch, sample index), so resuming mid-epoch with
    data.num_workers=2 gives bit-identical weights to an uninterrupted run."""
    import dynwire
    from dynwire.engine import TrainingInterrupted, load_config, train

    data = write_fmnist_fixture(tmp_path / "data", n_train=64, n_test=16)
    base = [
        f"data.root={data}", f"output.dir={tmp_path}", "data.image_size=8", "data.batch_size=8", "data.subset=null",
        "data.val_subset=null", "data.num_workers=2", "optim.lr=0.05", "optim.reference_batch=8", "schedule.epochs=2",
        "schedule.warmup_epochs=0.5", "model.drop_rate=0.2", "train.ckpt_every_steps=100", "train.num_threads=1",
    ]  # fmt: skip

    def model_fn(at):
        def build(cfg, info):
            inner = dynwire.create_model("cifar_resnet20", num_classes=10, in_chans=1, drop_rate=cfg.model.drop_rate)
            return _StopAt(inner, at)

        return build

    train(load_config("fmnist_resnet20", base + ["output.name=ref"]), model_fn=model_fn(None))
    cfg = load_config("fmnist_resnet20", base + ["output.name=cut"])
    with pytest.raises(TrainingInterrupted):
        train(cfg, model_fn=model_fn(11))  # epoch 2, step 3 of 8
    cut = load_checkpoint(tmp_path / "cut" / "last.pt")
    assert (cut["epoch"], cut["step_in_epoch"]) == (1, 3)
    train(load_config("fmnist_resnet20", base + ["output.name=cut", "train.resume=auto"]), model_fn=model_fn(None))

    a = load_checkpoint(tmp_path / "ref" / "last.pt")
    b = load_checkpoint(tmp_path / "cut" / "last.pt")
    assert a["global_step"] == b["global_step"] == 16
    for k, v in a["model"].items():
        assert torch.equal(b["model"][k], v), k
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])

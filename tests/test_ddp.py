"""Two-process DDP (gloo, CPU) via torchrun: ranks stay identical and match one process."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import dynwire
from dynwire.engine import load_checkpoint, seed_everything, state_dict_sha256

pytestmark = pytest.mark.slow

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}

# BatchNorm normalises with per-rank batch statistics under DDP, so 2 ranks x 8 images are
# not the same computation as 1 process x 16 images, and SyncBatchNorm needs CUDA. The child
# therefore builds cifar_resnet20 with GroupNorm (per-sample statistics): then DDP with a
# global batch of 16 must reproduce the single-process run up to float summation order.
# And with SiLU, not ReLU: the two runs' weights differ by float rounding after every step,
# and ReLU's gradient jumps where an activation crosses 0. Once one activation of a step lies
# within that rounding of 0, its gradient flips between the runs, and the remaining steps
# carry the difference far beyond the tolerance below (on some seeds, with any aggregation
# kernel). SiLU is smooth, so the difference stays at rounding level.
CHILD = textwrap.dedent(
    """
    import functools, sys, types
    import torch, torch.nn as nn
    import dynwire
    from dynwire.engine import load_config, train

    torch.set_num_threads(1)
    out = sys.argv[1]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1, 8, 8, generator=g)
    y = torch.arange(64) % 10
    x[torch.arange(64), 0, y % 8, y // 2] += 3.0  # a learnable class signal
    ds = torch.utils.data.TensorDataset(x, y)
    info = types.SimpleNamespace(num_classes=10, in_chans=1, input_size=(1, 8, 8))

    def model_fn(cfg, info):
        return dynwire.create_model("cifar_resnet20", num_classes=info.num_classes, in_chans=info.in_chans,
                                    wiring=cfg.model.wiring, norm_layer=functools.partial(nn.GroupNorm, 4),
                                    act_layer=nn.SiLU)

    cfg = load_config(None, [f"output.dir={out}", "output.name=run", "data.batch_size=16", "optim.lr=0.05",
                             "optim.reference_batch=16", "optim.weight_decay=1e-4", "schedule.epochs=2",
                             "schedule.warmup_epochs=0.5", "train.log_every=2", "train.device=cpu",
                             "train.ema_decay=0.9", "model.wiring=dynamic"])
    train(cfg, datasets=(ds, ds, info), model_fn=model_fn)
    """
)


def test_ddp_two_ranks_match_single_process(tmp_path: Path) -> None:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    ddp = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), str(tmp_path / "ddp")],
        env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    single = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "single")], env=ENV, capture_output=True, text=True, timeout=300
    )
    out, err = ddp.communicate(timeout=300)
    assert ddp.returncode == 0, err[-4000:]
    assert single.returncode == 0, single.stderr[-4000:]

    fd = json.loads((tmp_path / "ddp" / "run" / "final.json").read_text())
    fs = json.loads((tmp_path / "single" / "run" / "final.json").read_text())
    run = json.loads((tmp_path / "ddp" / "run" / "run.json").read_text())
    assert run["world_size"] == fd["world_size"] == 2 and run["per_rank_batch"] == 8 and run["global_batch"] == 16
    assert run["backend"] == "gloo"

    # Both ranks hold bit-identical weights (params and buffers) ...
    digests = fd["rank_weights_sha256"]
    assert len(digests) == 2 and digests[0] == digests[1]
    a = load_checkpoint(tmp_path / "ddp" / "run" / "last.pt")
    b = load_checkpoint(tmp_path / "single" / "run" / "last.pt")
    assert state_dict_sha256(a["model"]) == digests[0]  # ... and rank 0 saved exactly those
    assert a["global_step"] == b["global_step"] == 8
    assert len(a["rng"]) == 2  # every rank's RNG state is in the checkpoint

    # ... which match the single-process run with the same global batch.
    for k, v in b["model"].items():
        if v.is_floating_point():
            torch.testing.assert_close(a["model"][k], v, rtol=1e-4, atol=2e-5, msg=f"model.{k}")
    for k, v in b["ema"]["weights"].items():
        if v.is_floating_point():
            torch.testing.assert_close(a["ema"]["weights"][k], v, rtol=1e-4, atol=2e-5, msg=f"ema.{k}")
    # Training moved the weights far more than the DDP/single difference (not trivially equal).
    seed_everything(0)
    init = dynwire.create_model(
        "cifar_resnet20", num_classes=10, in_chans=1, norm_layer=functools.partial(nn.GroupNorm, 4), act_layer=nn.SiLU
    ).state_dict()
    moved = max((b["model"][k] - init[k]).abs().max().item() for k in init if init[k].is_floating_point())
    assert moved > 1e-2
    # Sharded evaluation counts every image exactly once and agrees with one process.
    assert fd["val"]["images"] == fs["val"]["images"] == 64
    assert fd["val"]["loss"] == pytest.approx(fs["val"]["loss"], rel=1e-3)


def test_ddp_agreement_script_runs_this_child_with_either_activation() -> None:
    """scripts/ddp_agreement.py reads CHILD from this file and swaps its activation: keep them in step."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import ddp_agreement

    relu, silu = ddp_agreement._child_source("relu"), ddp_agreement._child_source("silu")
    assert "act_layer=nn.ReLU" in relu and "act_layer=nn.SiLU" not in relu
    assert silu == relu.replace("act_layer=nn.ReLU", "act_layer=nn.SiLU")
    assert '"model.wiring=dynamic"] + sys.argv[2:]' in silu  # the script's per-run overrides
    compile(silu, "child.py", "exec")

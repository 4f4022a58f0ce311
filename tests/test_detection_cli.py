"""Detection through the ``dynwire`` command and the engine: run files, CLI commands, signals, resume, DDP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import write_fmnist_fixture
from PIL import Image
from test_detection import _recipe

import dynwire
import dynwire.detection.train as det_train
from dynwire.cli import main
from dynwire.detection import make_scenes, train_detector
from dynwire.engine import TrainingInterrupted, load_checkpoint, state_dict_sha256
from dynwire.engine.distributed import DistInfo
from dynwire.engine.logging import parse_progress

pytestmark = pytest.mark.filterwarnings("ignore:fasterrcnn_fpn. norm='frozen_bn' without backbone_weights")

SRC = str(Path(dynwire.__file__).resolve().parents[1])
# Single-threaded children (identical float reduction order; kind to 2 cores), importing this checkout.
ENV = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "PYTHONUNBUFFERED": "1",
    "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")]),
}
CLI = [sys.executable, "-m", "dynwire.cli"]


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    fm = write_fmnist_fixture(tmp_path_factory.mktemp("fm"), n_train=60, n_test=30)
    root = tmp_path_factory.mktemp("scenes")
    make_scenes(root, "train", 8, image_size=64, seed=0, fmnist_root=fm)
    make_scenes(root, "val", 4, image_size=64, seed=0, fmnist_root=fm)
    return root


def _write_recipe(path: Path, root: Path, iters: int, **extra) -> Path:
    cfg = {"task": "detection", **_recipe(root, iters, **extra)}
    cfg["data"].pop("root")  # given with --data-dir
    cfg["output"] = {"name": "run"}
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# --------------------------------------------------------------------------- in-process CLI
def test_make_scenes_command(tmp_path, capsys):
    fm = write_fmnist_fixture(tmp_path / "fm", n_train=20, n_test=10)
    code, out, _ = _cli(
        capsys, "make-scenes", str(tmp_path / "s"), "--train-images", "2", "--val-images", "1",
        "--image-size", "64", "--fmnist-root", str(fm),
    )  # fmt: skip
    assert code == 0 and "train: 2 images" in out and "val: 1 images" in out
    assert json.loads((tmp_path / "s" / "annotations" / "instances_val.json").read_text())["images"][0]["id"] == 1
    code, _, err = _cli(capsys, "make-scenes", str(tmp_path / "t"), "--image-size", "8", "--fmnist-root", str(fm))
    assert code == 2 and err.startswith("dynwire make-scenes: error: image_size=8")


def test_train_eval_detect_through_the_cli(tmp_path, scenes, capsys):
    recipe = _write_recipe(tmp_path / "det.yaml", scenes, 3, train={"progress": True, "tensorboard": True})
    args = ["train", "--config", str(recipe), "--data-dir", str(scenes), "--output-dir", str(tmp_path / "runs")]
    code, out, err = _cli(capsys, *args, "--set", "train.log_every=2")
    assert code == 0, err
    summary = json.loads(out)
    run = tmp_path / "runs" / "run"
    assert summary["run_dir"] == str(run) and summary["iters"] == 3 and summary["completed"]
    assert set(summary["eval"]) >= {"AP", "AP50", "AP75", "APs", "APm", "APl", "AR100"}
    # the run folder of a classification run: run.json, the resolved config.yaml, metrics, TensorBoard
    info = json.loads((run / "run.json").read_text())
    assert info["seed"] == 0 and info["task"] == "detection" and info["world_size"] == 1
    assert info["command"] == sys.argv and set(info["versions"]) >= {"torch", "torchvision", "python"}
    assert info["global_batch"] == 2 and info["data"]["train_images"] == 8 and info["data"]["num_classes"] == 11
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["task"] == "detection" and resolved["data"]["root"] == str(scenes)
    assert resolved["train"]["log_every"] == 2
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["iter"]) for r in recs] == [("train", 2), ("train", 3), ("eval", 3)]
    assert recs[-1]["eval"]["images"] == 4 and "val_AP" in recs[-1]
    assert (run / "metrics.csv").is_file() and any((run / "tb").iterdir())
    assert (run / "final.json").is_file() and not list(run.glob(".*.partial"))
    # progress on a non-terminal: plain lines in the engine's format, without an accuracy
    lines = [parse_progress(x) for x in err.splitlines() if parse_progress(x)]
    assert [(p["step"], p["steps"], p["acc"]) for p in lines] == [(2, 3, None), (3, 3, None)]
    assert "[dynwire] iteration 3/3: AP=" in err
    # the same command again refuses to overwrite the run (one error format, exit 2)
    code, _, err = _cli(capsys, *args)
    assert code == 2 and err.startswith("dynwire train: error: run directory") and "--resume" in err
    # --resume of a finished run: nothing to train, the final evaluation is reused
    code, out, err = _cli(capsys, *args, "--resume")
    assert code == 0 and json.loads(out)["eval"]["AP"] == summary["eval"]["AP"]
    assert "resumed from" in err

    # eval: Table 2 columns, detections in COCO results format beside the checkpoint
    code, out, err = _cli(capsys, "eval", "--checkpoint", str(run / "last.pt"), "--device", "cpu")
    assert code == 0, err
    assert "| AP | AP50 | AP75 | APs | APm | APl | AR100 |" in out and "iteration 3" in out
    dets = json.loads((run / "last_detections.json").read_text())
    assert isinstance(dets, list) and all(set(d) == {"image_id", "category_id", "bbox", "score"} for d in dets)
    ev = json.loads((run / "last_eval.json").read_text())
    assert ev["AP"] == pytest.approx(summary["eval"]["AP"]) and ev["images"] == 4
    code, out, _ = _cli(
        capsys, "eval", "--checkpoint", str(run / "last.pt"), "--subset", "2", "--out", str(tmp_path / "d.json"),
        "--set", "model.wiring_kwargs.eval_gate=soft",
    )  # fmt: skip
    assert code == 0 and "2 images" in out and (tmp_path / "d.json").is_file()
    code, _, err = _cli(capsys, "eval", "--checkpoint", str(run / "last.pt"), "--ema")
    assert code == 2 and err.startswith("dynwire eval: error: --ema: detection checkpoints have no EMA")

    # detect: PNGs with the boxes drawn
    img = scenes / "val" / "000001.png"
    code, out, err = _cli(
        capsys, "detect", "--checkpoint", str(run / "last.pt"), str(img), "--out", str(tmp_path / "drawn"),
        "--score-thresh", "0",
    )  # fmt: skip
    assert code == 0, err
    assert Image.open(tmp_path / "drawn" / "000001.png").size == (64, 64) and "000001.png" in out
    code, _, err = _cli(capsys, "detect", "--checkpoint", str(run / "last.pt"), "nope.png", "--out", str(tmp_path))
    assert code == 2 and err.startswith("dynwire detect: error: image 'nope.png': file not found")
    code, _, err = _cli(capsys, "detect", "--checkpoint", str(recipe), str(img), "--out", str(tmp_path))
    assert code == 2 and err.startswith(f"dynwire detect: error: {str(recipe)!r} is not a dynwire file")


def test_detection_recipe_errors_use_the_cli_format(tmp_path, scenes, capsys):
    recipe = _write_recipe(tmp_path / "det.yaml", scenes, 3)
    base = ["train", "--config", str(recipe), "--output-dir", str(tmp_path / "runs")]
    code, _, err = _cli(capsys, *base, "--data-dir", str(scenes), "--set", "schedule.iter=3")
    assert code == 2 and "unknown config key 'schedule.iter'" in err and err.startswith("dynwire train: error:")
    code, _, err = _cli(capsys, *base, "--data-dir", str(tmp_path / "nothing"))
    assert code == 2 and "instances_train.json" in err and "make-scenes" in err
    assert not (tmp_path / "runs").exists()  # nothing is written before data and model are in hand


def test_diverged_loss_exits_3_without_a_checkpoint(tmp_path, scenes, capsys, monkeypatch):
    real = det_train.build_detector

    def nan_detector(*a, **k):
        model = real(*a, **k)
        model.register_forward_hook(lambda m, i, o: {k: v * float("nan") for k, v in o.items()} if m.training else o)
        return model

    monkeypatch.setattr(det_train, "build_detector", nan_detector)
    recipe = _write_recipe(tmp_path / "det.yaml", scenes, 3)
    code, _, err = _cli(
        capsys, "train", "--config", str(recipe), "--data-dir", str(scenes), "--output-dir", str(tmp_path)
    )
    assert code == 3 and "training diverged: the loss is non-finite" in err and "iteration 1" in err
    assert not (tmp_path / "run" / "last.pt").exists()


def test_distributed_settings_are_checked_before_anything_runs(tmp_path, scenes):
    from dynwire.detection.config import detection_config_from_dict
    from dynwire.detection.train import _DetectionRun, build_detection_datasets

    two = DistInfo(rank=0, world_size=2)
    cfg = detection_config_from_dict(_recipe(scenes, 3, model={"norm": "sync_bn"}, data={"batch_size": 4}))
    with pytest.raises(ValueError, match="sync_bn: SyncBatchNorm needs CUDA"):
        _DetectionRun(cfg, tmp_path, two, True, None).setup(build_detection_datasets(cfg))
    cfg = detection_config_from_dict(_recipe(scenes, 3, data={"batch_size": 3}))
    with pytest.raises(ValueError, match="divisible by the world size"):
        _DetectionRun(cfg, tmp_path, two, True, None).setup(None)


def test_sigterm_at_an_evaluation_resumes_with_it_and_ends_identical(tmp_path, scenes, monkeypatch):
    """A SIGTERM during the iteration an evaluation is due: last.pt marks the evaluation pending;
    --resume runs it first and then ends with the uninterrupted run's weights."""
    cfg = _recipe(scenes, 4, train={"eval_every_iters": 2, "ckpt_every_iters": 3})
    full = train_detector(cfg, tmp_path / "full")
    real = det_train.build_detector
    calls = []

    def signalling_detector(*a, **k):
        model = real(*a, **k)

        def pre(m, args):
            if m.training:
                calls.append(1)
                if len(calls) == 2:
                    os.kill(os.getpid(), signal.SIGTERM)

        model.register_forward_pre_hook(pre)
        return model

    monkeypatch.setattr(det_train, "build_detector", signalling_detector)
    with pytest.raises(TrainingInterrupted) as exc:
        train_detector(cfg, tmp_path / "split")
    assert exc.value.exit_code == 128 + signal.SIGTERM and "at iteration 2/4" in str(exc.value)
    ckpt = load_checkpoint(tmp_path / "split" / "last.pt")
    assert ckpt["iter"] == 2 and ckpt["pending_eval"]
    monkeypatch.setattr(det_train, "build_detector", real)
    split = train_detector(cfg, tmp_path / "split")
    assert split["weights_sha256"] == full["weights_sha256"] and split["eval"]["AP"] == full["eval"]["AP"]
    recs = [json.loads(x) for x in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in recs if r["kind"] == "eval"] == [2, 4]
    assert [r["iter"] for r in recs if r["kind"] == "train"] == [1, 2, 3, 4]


def test_profile_detector_command(tmp_path, capsys):
    js = tmp_path / "p.json"
    code, out, err = _cli(capsys, "profile", "--detector", "cifar_resnet20", "--size", "64", "64", "--json", str(js))
    assert code == 0, err
    rows = json.loads(js.read_text())
    assert [r["wiring"] for r in rows] == ["sequential", "dynamic"] and rows[1]["detector_gmacs"] > 0
    rows = [line for line in out.splitlines() if line.startswith(("| sequential", "| dynamic"))]
    assert len(rows) == 2 and "%)" in rows[1] and "backbone GFLOPs" in out and "detector GFLOPs" in out
    code, _, err = _cli(capsys, "profile", "--detector", "resnet5")
    assert code == 2 and err.startswith("dynwire profile: error:")


# --------------------------------------------------------------------------- processes
def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    t0 = time.monotonic()
    while not path.exists():
        if proc.poll() is not None:
            pytest.fail(f"child exited early with {proc.returncode}:\n{proc.communicate()[1][-3000:]}")
        if time.monotonic() - t0 > timeout:
            proc.kill()
            pytest.fail(f"{path} did not appear within {timeout}s")
        time.sleep(0.005)


@pytest.mark.slow
def test_sigterm_then_resume_through_the_cli_matches_the_uninterrupted_run(tmp_path, scenes):
    recipe = _write_recipe(tmp_path / "det.yaml", scenes, 6, schedule={"steps": [4]})

    def cmd(out: str, *extra: str) -> list[str]:
        return CLI + ["train", "--config", str(recipe), "--data-dir", str(scenes), "--output-dir", out, *extra]

    kw = dict(env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ref = subprocess.Popen(cmd(str(tmp_path / "ref")), **kw)
    stopped = subprocess.Popen(cmd(str(tmp_path / "int")), **kw)
    run = tmp_path / "int" / "run"
    _wait_for(run / "last.pt", stopped)
    stopped.send_signal(signal.SIGTERM)
    _, err = stopped.communicate(timeout=120)
    assert stopped.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "received SIGTERM" in err and "training interrupted by SIGTERM" in err and "--resume" in err
    at_stop = load_checkpoint(run / "last.pt")["iter"]
    assert 1 <= at_stop < 6 and not (run / "final.json").exists()

    resumed = subprocess.run(cmd(str(tmp_path / "int"), "--resume"), timeout=300, **kw)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {run / 'last.pt'} at iteration {at_stop}/6" in resumed.stderr
    _, err = ref.communicate(timeout=300)
    assert ref.returncode == 0, err[-3000:]
    a, b = load_checkpoint(tmp_path / "ref" / "run" / "last.pt"), load_checkpoint(run / "last.pt")
    assert a["iter"] == b["iter"] == 6
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in recs if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]  # none twice
    info = json.loads((run / "run.json").read_text())
    assert info["command"][-2:] == ["--output-dir", str(tmp_path / "int")]  # the command line of the run
    assert len(info["resumes"]) == 1 and info["resumes"][0]["command"][-1] == "--resume"


@pytest.mark.slow
def test_ddp_two_ranks_on_gloo(tmp_path, scenes):
    """torchrun, 2 CPU processes: global batch split over ranks, identical weights, one gathered COCOeval."""
    recipe = _write_recipe(tmp_path / "det.yaml", scenes, 3, data={"batch_size": 4, "eval_batch_size": 1})
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "dynwire.cli",
         "train", "--config", str(recipe), "--data-dir", str(scenes), "--output-dir", str(tmp_path)],
        env=ENV, capture_output=True, text=True, timeout=400,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    run = tmp_path / "run"
    final = json.loads((run / "final.json").read_text())
    info = json.loads((run / "run.json").read_text())
    assert final["world_size"] == info["world_size"] == 2 and info["backend"] == "gloo"
    assert info["global_batch"] == 4 and info["per_rank_batch"] == 2
    digests = final["rank_weights_sha256"]
    assert len(digests) == 2 and digests[0] == digests[1]  # the ranks hold identical weights (and BN buffers)
    ckpt = load_checkpoint(run / "last.pt")
    assert state_dict_sha256(ckpt["model"]) == digests[0] and ckpt["world_size"] == 2 and ckpt["iter"] == 3
    # every val image evaluated once: the two shards' detections were gathered for COCOeval
    assert final["eval"]["images"] == 4 and final["eval"]["AP"] is not None
    dets = json.loads((run / "detections_val.json").read_text())
    assert {d["image_id"] for d in dets} <= {1, 2, 3, 4}
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["iter"]) for r in recs] == [("train", 1), ("train", 2), ("train", 3), ("eval", 3)]
    assert proc.stdout.count('"run_dir"') == 1  # the summary is printed by rank 0 only


def test_detection_recipes_are_shipped_apart_from_classification_ones():
    from dynwire.detection import is_detection_recipe, load_detection_config
    from dynwire.engine import shipped_configs

    det = shipped_configs(task="detection")
    assert det == [
        "coco_fasterrcnn_r101_fpn_1x",
        "coco_fasterrcnn_r50_fpn_1x",
        "coco_fasterrcnn_x50_fpn_1x",
        "det_fmnist_scenes",
    ]
    assert not set(det) & set(shipped_configs()) and set(det) < set(shipped_configs(task=None))
    assert all(is_detection_recipe(n) and load_detection_config(n).task == "detection" for n in det)
    assert not is_detection_recipe("fmnist_resnet20")
    with pytest.raises(ValueError, match="did you mean 'det_fmnist_scenes'"):
        is_detection_recipe("det_fmnist_scene")

"""The package as users get it: a wheel built with ``python -m build``, installed with its declared
dependencies into a fresh virtual environment, and its commands run from outside the checkout.

The fresh environment gets the pinned ``torch`` / ``torchvision`` of ``constraints.txt`` first
(pip takes them from the machine's local wheels, never a newer torch from the network), then the
wheel with nothing else: no dev extra, no onnx extra, no system site-packages. One run takes a
few minutes, most of them installing torch.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
import venv
import zipfile
from pathlib import Path

import pytest
from conftest import write_fmnist_fixture

ROOT = Path(__file__).resolve().parents[1]
KERNEL_SRC = "dynwire/layers/_aggkernel.c"


def _pins() -> list[str]:
    """``torch==X`` and ``torchvision==Y`` from constraints.txt."""
    pins = [ln.split("#")[0].strip() for ln in (ROOT / "constraints.txt").read_text().splitlines()]
    pins = [p for p in pins if p.startswith(("torch==", "torchvision=="))]
    assert len(pins) == 2, f"constraints.txt pins {pins}, expected torch and torchvision"
    return pins


def _run(cmd: list[str], *, env: dict[str, str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )


def _ok(res: subprocess.CompletedProcess, what: str) -> str:
    assert res.returncode == 0, (
        f"{what}: exit {res.returncode}\n--- stdout\n{res.stdout[-4000:]}\n--- stderr\n{res.stderr[-4000:]}"
    )
    return res.stdout


@pytest.mark.slow
def test_wheel_in_a_fresh_venv_runs_every_command(tmp_path: Path) -> None:
    times: dict[str, float] = {}
    t_all = t = time.monotonic()

    def lap(name: str) -> None:
        nonlocal t
        now = time.monotonic()
        times[name], t = round(now - t, 1), now

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update(PIP_NO_INPUT="1", PIP_DISABLE_PIP_VERSION_CHECK="1")

    # --- build: the sdist, then the wheel from the unpacked sdist (what `python -m build` does)
    dist = tmp_path / "dist"
    _ok(
        _run([sys.executable, "-m", "build", "--outdir", str(dist), str(ROOT)], env=env, cwd=tmp_path),
        "python -m build",
    )
    (sdist,) = dist.glob("dynwire-*.tar.gz")
    (wheel,) = dist.glob("dynwire-*.whl")
    with tarfile.open(sdist) as tf:
        sdist_names = tf.getnames()
    assert any(n.endswith("src/" + KERNEL_SRC) for n in sdist_names), "the sdist lacks the kernel source"
    assert any(n.endswith("src/dynwire/configs/fmnist_resnet20.yaml") for n in sdist_names)
    with zipfile.ZipFile(wheel) as zf:
        wheel_names = zf.namelist()
    assert KERNEL_SRC in wheel_names, "the wheel lacks the kernel source"
    built = [n for n in wheel_names if n.startswith("dynwire/layers/_aggkernel") and n.endswith((".so", ".pyd"))]
    has_cc = any(shutil.which(c) for c in ("cc", "gcc", "clang"))
    if has_cc and sys.platform.startswith("linux"):
        assert built, "a C compiler is here, but the wheel carries no built kernel"
    assert "dynwire/configs/fmnist_resnet20.yaml" in wheel_names
    lap("build")

    # --- a fresh environment: pinned torch first, then the wheel and its declared dependencies
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True, system_site_packages=False)
    bindir = env_dir / ("Scripts" if os.name == "nt" else "bin")
    py = str(bindir / "python")
    pip = [py, "-m", "pip", "install", "-q", "--no-compile", "-c", str(ROOT / "constraints.txt")]
    _ok(_run(pip + _pins(), env=env, cwd=tmp_path, timeout=900), "pip install torch torchvision")
    lap("install torch")
    _ok(_run(pip + [str(wheel)], env=env, cwd=tmp_path), "pip install the wheel")
    lap("install wheel")

    env["PATH"] = str(bindir) + os.pathsep + env["PATH"]
    env["OMP_NUM_THREADS"] = "1"
    dynwire = str(bindir / "dynwire")
    where = _ok(
        _run(
            [
                py,
                "-c",
                "import dynwire, sys; from dynwire.layers.aggregation import fused_available; "
                "print(dynwire.__file__); print(fused_available()); print(sys.prefix)",
            ],
            env=env,
            cwd=tmp_path,
        ),
        "import dynwire",
    ).split()
    assert Path(where[0]).resolve().is_relative_to(env_dir.resolve()), f"imported {where[0]}, not the installed wheel"
    assert where[1] == str(bool(built)), f"fused kernels available: {where[1]}, wheel built them: {bool(built)}"
    lap("import")

    out = _ok(_run([dynwire, "models"], env=env, cwd=tmp_path), "dynwire models")
    assert "cifar_resnet20" in out and "resnet50" in out
    out = _ok(_run([dynwire, "profile", "cifar_resnet20"], env=env, cwd=tmp_path), "dynwire profile")
    assert "cifar_resnet20" in out
    lap("models + profile")

    # --- two training steps on generated data, then every command that reads the run
    data = write_fmnist_fixture(tmp_path / "fmnist", n_train=64, n_test=32)
    train = [dynwire, "train", "--config", "fmnist_resnet20", "--data-dir", str(data), "--output-dir", "runs"]
    train += ["--set", "data.image_size=12", "data.batch_size=32", "data.subset=null", "data.val_subset=null"]
    train += ["schedule.epochs=1", "schedule.warmup_epochs=0", "train.log_every=1", "output.name=user"]
    res = _run(train, env=env, cwd=tmp_path)
    _ok(res, "dynwire train")
    run_dir = tmp_path / "runs" / "user"
    assert (run_dir / "best.pt").is_file() and (run_dir / "final.json").is_file()
    assert "step 2/2" in res.stdout + res.stderr
    assert ("note: dynwire's fused aggregation kernels" in res.stderr) == (not built)
    assert res.stderr.count("fused aggregation kernels") <= 1
    lap("train")

    out = _ok(_run([dynwire, "eval", "--checkpoint", str(run_dir / "best.pt")], env=env, cwd=tmp_path), "dynwire eval")
    assert 0.0 <= json.loads(out)["top1"] <= 100.0
    lap("eval")

    analysis = tmp_path / "analysis"
    an = [
        dynwire,
        "analyze",
        str(run_dir / "best.pt"),
        "--out",
        str(analysis),
        "--max-images",
        "16",
        "--per-class",
        "0",
        "--top-k",
        "1",
    ]
    out = _ok(_run(an, env=env, cwd=tmp_path), "dynwire analyze")
    assert "analyzed 16 images" in out
    assert (analysis / "analysis.md").is_file() and (analysis / "fig5_mean.png").is_file()  # matplotlib is there
    lap("analyze")

    _ok(
        _run([dynwire, "export", "--checkpoint", str(run_dir), "--out", "m.safetensors"], env=env, cwd=tmp_path),
        "export",
    )
    assert (tmp_path / "m.safetensors").is_file()
    # ONNX is the onnx extra, not installed here: one line naming it, before any work, no file
    t_onnx = time.monotonic()
    res = _run(
        [dynwire, "export", "--checkpoint", str(run_dir), "--format", "onnx", "--out", "m.onnx"], env=env, cwd=tmp_path
    )
    assert res.returncode == 2, res.stdout + res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dynwire export: error: ") and "dynwire[onnx]" in lines[0], (
        res.stderr
    )
    assert "Traceback" not in res.stderr and not (tmp_path / "m.onnx").exists()
    assert time.monotonic() - t_onnx < 300  # a hang guard (a loaded 2-core machine takes ~100 s)
    lap("export")

    times["total"] = round(time.monotonic() - t_all, 1)
    print(f"\nwheel test times (s): {times}")


def test_missing_kernels_are_announced_once(monkeypatch, capsys) -> None:
    """Without the built C kernels, the commands that run models say so once per process."""
    import dynwire.cli as cli
    from dynwire.layers import aggregation

    monkeypatch.setattr(cli, "_announced", False)
    monkeypatch.setattr(aggregation, "fused_available", lambda device="cpu": False)
    assert cli.main(["models"]) == 0
    assert "fused aggregation kernels" not in capsys.readouterr().err  # `models` runs no model
    for _ in range(2):
        assert cli.main(["eval", "--checkpoint", "no-such-file.pt"]) == 2
    err = capsys.readouterr().err
    assert err.count("note: dynwire's fused aggregation kernels") == 1 and err.count("file not found") == 2
    monkeypatch.setattr(aggregation, "fused_available", lambda device="cpu": True)
    monkeypatch.setattr(cli, "_announced", False)
    assert not cli.announce_kernel_fallback()


def test_onnx_export_without_the_extra_names_it_before_any_work(monkeypatch, tmp_path: Path, capsys) -> None:
    import importlib.util

    import dynwire.cli as cli
    import dynwire.deploy

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "onnxruntime" else real(n, *a))

    def no_work(*args, **kwargs):
        raise AssertionError("the model was loaded before the extra was checked")

    monkeypatch.setattr(dynwire.deploy, "load_model", no_work)
    out = tmp_path / "m.onnx"
    assert cli.main(["export", "--checkpoint", str(tmp_path), "--format", "onnx", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "dynwire export: error: ONNX export needs the onnx extra (onnxruntime not installed): pip install 'dynwire[onnx]'"
    ]
    assert not out.exists()

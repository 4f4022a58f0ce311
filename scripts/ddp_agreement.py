"""Two-process DDP against one process, over seeds and activations: the largest weight difference.

``tests/test_ddp.py`` trains ``cifar_resnet20`` (GroupNorm) for 8 steps with 2 ranks x 8 images
and with 1 process x 16 images and asserts that the weights agree to float summation order. The
two runs' weights differ by rounding after every step; with ReLU, an activation that lies within
that rounding of 0 gets a gradient of 0 in one run and not in the other, and the rest of the run
carries the difference far beyond rounding. This script runs the test's child script for each
seed with ReLU and with SiLU (the test's choice) and prints, per run, the largest absolute
difference between the two final models' weights and the tolerance check of the test.

    python scripts/ddp_agreement.py --seeds 0 1 2 3 4 5 6 7 --acts relu silu
    python scripts/ddp_agreement.py --seeds 0 --acts relu -- optim.lr=0.08   # extra config overrides
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from dynwire.engine import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
ACTS = {"relu": "nn.ReLU", "silu": "nn.SiLU"}


def _child_source(act: str) -> str:
    spec = importlib.util.spec_from_file_location("_test_ddp", ROOT / "tests" / "test_ddp.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    src = mod.CHILD
    if "act_layer=nn.SiLU" not in src or '"model.wiring=dynamic"]' not in src:
        raise ValueError("tests/test_ddp.py's CHILD changed: update scripts/ddp_agreement.py's substitutions")
    src = src.replace("act_layer=nn.SiLU", f"act_layer={ACTS[act]}")
    return src.replace('"model.wiring=dynamic"]', '"model.wiring=dynamic"] + sys.argv[2:]')


def _run(script: Path, out: Path, overrides: list[str]) -> tuple[float, str, bool]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    ddp = subprocess.Popen([*cmd, str(script), str(out / "ddp"), *overrides], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    single = subprocess.run([sys.executable, str(script), str(out / "single"), *overrides], env=env,
                            capture_output=True, text=True, timeout=600)  # fmt: skip
    _, err = ddp.communicate(timeout=600)
    if ddp.returncode or single.returncode:
        raise RuntimeError(f"a child failed:\n{err[-2000:]}\n{single.stderr[-2000:]}")
    a = load_checkpoint(out / "ddp" / "run" / "last.pt")["model"]
    b = load_checkpoint(out / "single" / "run" / "last.pt")["model"]
    diff, name, ok = 0.0, "", True
    for k, v in b.items():
        if not v.is_floating_point():
            continue
        d = (a[k] - v).abs().max().item()
        if d > diff:
            diff, name = d, k
        ok &= bool(torch.allclose(a[k], v, rtol=1e-4, atol=2e-5))
    return diff, name, ok


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=list(range(8)))
    p.add_argument("--acts", nargs="+", choices=sorted(ACTS), default=["relu", "silu"])
    p.add_argument("overrides", nargs="*", help="config overrides for both runs (after --)")
    args = p.parse_args(argv)
    print(f"{'act':5} {'seed':>4} {'max |ddp - single|':>18}  {'within tol':10} weight")
    failed = {a: 0 for a in args.acts}
    with tempfile.TemporaryDirectory() as tmp:
        for act in args.acts:
            script = Path(tmp) / f"child_{act}.py"
            script.write_text(_child_source(act))
            for seed in args.seeds:
                out = Path(tmp) / f"{act}_{seed}"
                diff, name, ok = _run(script, out, [f"train.seed={seed}", *args.overrides])
                failed[act] += not ok
                print(f"{act:5} {seed:>4} {diff:>18.2e}  {str(ok):10} {name}", flush=True)
    for act, n in failed.items():
        print(f"{act}: {n} of {len(args.seeds)} seeds outside the test's tolerance (rtol 1e-4, atol 2e-5)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

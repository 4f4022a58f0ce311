"""Where DG-Net's evaluation time above the chain goes, by aten operator (issue 19), in one process.

``torch.profiler`` over ``--iters`` evaluations at batch ``--batch`` (28x28, one channel, one
thread, freed memory kept in the heap as ``dynwire eval`` does) of ``sequential`` and DG-Net
(``dynamic``, branch nodes) of each model; per operator the self CPU time per forward of both, the
difference, and the convolutions by input shape (the same convolutions run inside and outside a
graph stage). The C library's calls (aggregation, router and gate, node weights) are not aten
operators: they are the profiled forward's wall time minus the operators' sum (``outside aten``).

    python bench/eval_profile.py                                  # cifar_resnet20 and cifar_resnet56
    python bench/eval_profile.py --models cifar_resnet56 --out /tmp/x.json

Writes ``bench/results/eval_profile.json`` (``--out``) and prints the largest differences.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
from torch.profiler import profile

import dynwire


def _profile(model: torch.nn.Module, x: torch.Tensor, iters: int) -> tuple[dict, dict, float]:
    with torch.no_grad():
        for _ in range(3):
            model(x)
        with profile(record_shapes=True) as p:
            t0 = time.perf_counter()
            for _ in range(iters):
                model(x)
            wall = (time.perf_counter() - t0) / iters
    ops = {e.key: (e.self_cpu_time_total / iters / 1e3, e.count / iters) for e in p.key_averages()}
    convs = {
        str(e.input_shapes[:2]): e.self_cpu_time_total / iters / 1e3
        for e in p.key_averages(group_by_input_shape=True)
        if e.key in ("aten::mkldnn_convolution", "aten::_slow_conv2d_forward", "aten::thnn_conv2d")
    }
    return ops, convs, wall * 1e3


def measure(name: str, batch: int, iters: int) -> dict:
    torch.manual_seed(0)
    models = {
        "sequential": dynwire.create_model(name, num_classes=10, in_chans=1, wiring="sequential").eval(),
        "dynamic": dynwire.create_model(name, num_classes=10, in_chans=1, wiring="dynamic", node="branch").eval(),
    }
    x = torch.randn(batch, 1, 28, 28)
    res = {k: _profile(m, x, iters) for k, m in models.items()}
    (so, sc, sw), (do, dc, dw) = res["sequential"], res["dynamic"]
    keys = sorted(set(so) | set(do), key=lambda k: -abs(do.get(k, (0, 0))[0] - so.get(k, (0, 0))[0]))
    rows = [
        dict(
            op=k,
            sequential_ms=round(so.get(k, (0, 0))[0], 4),
            dynamic_ms=round(do.get(k, (0, 0))[0], 4),
            calls_sequential=so.get(k, (0, 0))[1],
            calls_dynamic=do.get(k, (0, 0))[1],
        )
        for k in keys
    ]
    aten = {k: sum(v[0] for v in o.values()) for k, o in (("sequential", so), ("dynamic", do))}
    return dict(
        model=name,
        batch=batch,
        iters=iters,
        forward_ms={"sequential": round(sw, 3), "dynamic": round(dw, 3)},
        aten_ms={k: round(v, 3) for k, v in aten.items()},
        outside_aten_ms={"sequential": round(sw - aten["sequential"], 3), "dynamic": round(dw - aten["dynamic"], 3)},
        convolutions_ms={s: dict(sequential=round(t, 3), dynamic=round(dc.get(s, 0.0), 3)) for s, t in sc.items()},
        ops=rows[:25],
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["cifar_resnet20", "cifar_resnet56"])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "eval_profile.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    dynwire.keep_freed_memory()
    out = dict(
        command=" ".join(["python bench/eval_profile.py", *sys.argv[1:]]),
        torch=torch.__version__,
        machine=platform.machine(),
        threads=1,
        results=[measure(m, args.batch, args.iters) for m in args.models],
    )
    for r in out["results"]:
        print(
            f"\n{r['model']} batch {r['batch']}: forward {r['forward_ms']} ms, outside aten {r['outside_aten_ms']} ms"
        )
        conv_s = sum(v["sequential"] for v in r["convolutions_ms"].values())
        conv_d = sum(v["dynamic"] for v in r["convolutions_ms"].values())
        print(f"convolutions: {conv_s:.2f} ms (sequential) {conv_d:.2f} ms (dynamic), {conv_d / conv_s:.3f}x")
        for row in r["ops"][:10]:
            print(f"  {row['op'][:40]:40s} {row['sequential_ms']:9.3f} {row['dynamic_ms']:9.3f}")
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(out, indent=1))
    tmp.replace(path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

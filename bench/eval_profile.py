"""Where DG-Net's evaluation time above the chain goes, by aten operator (issue 19), in one process.

``torch.profiler`` over ``--iters`` evaluations at batch ``--batch`` (28x28, one channel, one
thread, freed memory kept in the heap as ``dynwire eval`` does) of ``sequential`` and DG-Net
(``dynamic``, branch nodes) of each model; per operator the self CPU time per forward of both, the
difference, and the convolutions by input shape (the same convolutions run inside and outside a
graph stage). The C library's calls (aggregation, router and gate, node weights) are not aten
operators: they are the profiled forward's wall time minus the operators' sum (``outside aten``).

    python bench/eval_profile.py                                  # cifar_resnet20 and cifar_resnet56
    python bench/eval_profile.py --models cifar_resnet56 --out /tmp/x.json

``pollution``: the chain's blocks (``sequential``, no profiler) timed per stage with and without
streaming ``--pollute-mib`` MiB (one ``sum`` over a tensor that does not fit the last-level cache
with the blocks' data) right before each block, in alternating rounds: the slowdown a block gets
when other data has passed through the cache since its input was written, as in a graph stage,
where each node's aggregation reads every earlier output of the stage first.

Writes ``bench/results/eval_profile.json`` (``--out``) and prints the largest differences.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from _machine import cpu_info
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


def pollution(name: str, batch: int, mib: int, rounds: int = 6, iters: int = 4) -> dict:
    """Per-stage block time of ``sequential`` with and without ``mib`` MiB streamed before each block."""
    torch.manual_seed(0)
    model = dynwire.create_model(name, num_classes=10, in_chans=1, wiring="sequential").eval()
    x = torch.randn(batch, 1, 28, 28)
    big = torch.randn(mib * 2**20 // 4)
    on = [False]
    t: dict[int, float] = {}

    def wrap(block, stage):
        fwd = block.forward

        def wrapped(*a, **kw):
            if on[0]:
                big.sum()
            t0 = time.perf_counter()
            out = fwd(*a, **kw)
            t[stage] = t.get(stage, 0.0) + time.perf_counter() - t0
            return out

        block.forward = wrapped

    for si, (_, stage) in enumerate(model.graph_stages()):
        for b in stage.blocks():
            wrap(b, si)
    runs: dict[bool, list[dict[int, float]]] = {False: [], True: []}
    with torch.no_grad():
        model(x)
        for r in range(2 * rounds):
            on[0] = bool(r % 2)
            t.clear()
            for _ in range(iters):
                model(x)
            runs[on[0]].append({k: v / iters for k, v in t.items()})
    stages = sorted(runs[False][0])
    med = {p: {s: statistics.median(r[s] for r in runs[p]) for s in stages} for p in runs}
    return dict(
        model=name,
        batch=batch,
        pollute_mib=mib,
        rounds=rounds,
        blocks_ms={
            f"stage{s + 1}": dict(clean=round(med[False][s] * 1e3, 3), polluted=round(med[True][s] * 1e3, 3))
            for s in stages
        },
        ratio={f"stage{s + 1}": round(med[True][s] / med[False][s], 3) for s in stages},
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["cifar_resnet20", "cifar_resnet56"])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--pollute-mib", type=int, default=24, help="MiB streamed before each block (0: skip)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "eval_profile.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    dynwire.keep_freed_memory()
    out = dict(
        command=" ".join(["python bench/eval_profile.py", *sys.argv[1:]]),
        torch=torch.__version__,
        machine=platform.machine(),
        cpu=cpu_info(),
        threads=1,
        results=[measure(m, args.batch, args.iters) for m in args.models],
        pollution=[pollution(m, args.batch, args.pollute_mib) for m in args.models] if args.pollute_mib else [],
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
    for r in out["pollution"]:
        print(f"{r['model']}: the chain's blocks with {r['pollute_mib']} MiB streamed before each: {r['ratio']}")
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(out, indent=1))
    tmp.replace(path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

"""Inference speed of DG-Net against the static backbone, in one run (ratios, not absolute times).

For each model: batch-1 latency (median of many calls) and batch-N throughput of ``sequential``,
dense ``dynamic`` and ``static`` (every block executed), and of ``dynamic`` with thresholds set so
that a given share of its blocks is removed, run by the pruned executor and by the dense
reference. Variants are measured interleaved, round by round, in one process per thread count,
so machine load hits all of them alike; each ratio is against ``sequential`` of the same round.

    python bench/inference.py                     # the full set (slow on a small CPU)
    python bench/inference.py --quick             # cifar_resnet56 + mobilenet_v2, fewer rounds

Writes ``bench/results/inference.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import dynwire
from dynwire.analysis.profile import count_macs

SHARES = (0.0, 0.2, 0.4, 0.5, 0.6, 0.8)


def _set_removed_share(model, x, share: float) -> float:
    """Raise thresholds until about ``share`` of the removable blocks are removed on ``x``."""
    if share == 0:
        return 0.0
    with torch.no_grad():
        for _, s in model.graph_stages():
            s.edges.tau.fill_(0.0)
        lo, hi = 0.0, 1.0
        for _ in range(20):  # bisection on one global threshold offset
            mid = (lo + hi) / 2
            for _, s in model.graph_stages():
                s.edges.tau.fill_(mid)
            with dynwire.record_adjacency(model) as rec:
                model(x)
            got = torch.cat([r[:, 1:-1].flatten() for r in rec.removed.values()]).float().mean().item()
            lo, hi = (mid, hi) if got < share else (lo, mid)
        return got


def _time(fn, reps: int) -> float:
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def bench_model(name: str, size: int, batch: int, rounds: int, reps1: int, repsn: int) -> dict:
    torch.manual_seed(0)
    c = dynwire.get_model_cfg(name).input_size[0]
    x1, xn = torch.randn(1, c, size, size), torch.randn(batch, c, size, size)
    variants = {
        w: dynwire.create_model(name, num_classes=10, wiring=w).eval() for w in ("sequential", "dynamic", "static")
    }
    removal = {}
    probe = torch.randn(64, c, size, size)
    for share in SHARES[1:]:
        m = dynwire.create_model(name, num_classes=10, wiring="dynamic").eval()
        m.load_state_dict(variants["dynamic"].state_dict())
        got = _set_removed_share(m, probe, share)
        with torch.no_grad(), dynwire.record_adjacency(m) as rec:
            m(xn)
        removal[share] = dict(
            model=m, removed=got, mac_fraction=float(rec.macs.mean()) / count_macs(m, (c, size, size))
        )
    rows: dict[str, list] = {}

    def run(key, m, executor="pruned"):
        for _, s in m.graph_stages():
            s.executor = executor
        with torch.inference_mode():
            m(x1)
            t1 = _time(lambda: m(x1), reps1)
            tn = _time(lambda: m(xn), repsn)
        rows.setdefault(key, []).append((t1, batch / tn))

    for _ in range(rounds):
        for w, m in variants.items():
            run(w, m)
        for share, r in removal.items():
            run(f"dynamic-pruned-{share:.1f}", r["model"], "pruned")
            run(f"dynamic-dense-{share:.1f}", r["model"], "dense")
    out = {}
    for key, vals in rows.items():
        lat = [v[0] / s[0] for v, s in zip(vals, rows["sequential"])]
        thr = [v[1] / s[1] for v, s in zip(vals, rows["sequential"])]
        out[key] = dict(
            latency_b1_ms=1e3 * statistics.median(v[0] for v in vals),
            throughput_img_s=statistics.median(v[1] for v in vals),
            latency_vs_sequential=statistics.median(lat),
            latency_vs_sequential_range=[min(lat), max(lat)],
            throughput_vs_sequential=statistics.median(thr),
        )
        if key.startswith("dynamic-pruned-"):
            share = float(key.rsplit("-", 1)[1])
            dense = rows[f"dynamic-dense-{share:.1f}"]
            out[key]["throughput_vs_dense_dynamic"] = statistics.median(v[1] / d[1] for v, d in zip(vals, dense))
            out[key]["removed_share"] = removal[share]["removed"]
            out[key]["executed_mac_fraction"] = removal[share]["mac_fraction"]
    return dict(model=name, input=[c, size, size], batch=batch, rounds=rounds, variants=out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, nargs="+", default=[2, 1])
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "inference.json"))
    args = p.parse_args(argv)
    if args.quick:
        plan = [("cifar_resnet56", 32, 64, 3, 30, 3), ("mobilenet_v2", 224, 16, 2, 10, 2)]
    else:
        plan = [
            ("cifar_resnet56", 32, 64, 5, 50, 5),
            ("mobilenet_v2", 224, 64, 3, 20, 3),
            ("resnet50", 224, 64, 3, 10, 2),
        ]
    results = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for name, size, batch, rounds, r1, rn in plan:
            t0 = time.time()
            r = bench_model(name, size, batch, rounds, r1, rn)
            r["threads"] = threads
            results.append(r)
            v = r["variants"]
            print(
                f"{name} {threads}t: dynamic b1 {v['dynamic']['latency_vs_sequential']:.2f}x, "
                f"b{batch} {1 / v['dynamic']['throughput_vs_sequential']:.2f}x time; pruned@0.5 "
                f"{v['dynamic-pruned-0.5']['throughput_vs_dense_dynamic']:.2f}x dense ({time.time() - t0:.0f} s)",
                file=sys.stderr,
            )
    meta = dict(
        command=" ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        torch=torch.__version__,
        machine=platform.machine(),
        cpus=os.cpu_count(),
        load_avg_at_start=os.getloadavg(),
        note="ratios are medians over interleaved rounds; absolute times depend on machine load",
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(dict(meta=meta, results=results), indent=1))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

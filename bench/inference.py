"""Inference speed of DG-Net against the static backbone, in one run (ratios, not absolute times).

Three parts, each measured in interleaved rounds in one process per thread count, so machine
load hits all variants alike; every ratio is against a reference of the same round.

* ``dense``: batch-1 latency (median of many calls) and batch-N throughput of ``sequential``,
  ``dynamic`` and ``static`` (nothing removed at initialisation), plus ``dynamic-reference``
  (the stage's general loop, what ran before the inference fast path), against ``sequential``.
* ``small``: ``cifar_resnet20`` and ``cifar_resnet56`` as the studies run them (1 x 28 x 28), both
  node forms (``dynamic``: branch nodes, ``dynamic-block``: whole blocks), against ``sequential``,
  and ``dynamic-full-sums``: the branch form with every node summing all of its inputs (no partial
  sums, ``layers._fused_glue._partial_sum_steps``), that change's A/B in the same rounds.
* ``channels_last``: the ``small`` models converted to channels_last (as ``train.channels_last``
  runs them), both node forms against ``sequential`` in channels_last; ``dynamic-tensor-ops``: the
  branch form with the C calls declining channels_last maps (the path before they read them), and
  ``sequential-nchw`` / ``dynamic-nchw`` in the default layout.
* ``removal`` (``cifar_resnet56``): routers re-drawn so that edge weights differ between
  samples, one threshold for all nodes raised until a given share of (sample, block) pairs is
  removed; the pruned executor against the same model with nothing removed (thresholds 0) and
  against the dense executor (every block computed, removed samples zeroed): speed-up next to
  the executed-MAC ratio.
* ``trained`` (``--runs DIR ...``): trained checkpoints (e.g. ``scripts/budget_experiment.py``'s
  budget runs) on real test images, against the sequential run among them: executed MACs,
  batch-1 latency and batch-N throughput.
* ``frontier`` (``--runs DIR ...``): budget-trained DG-Nets (``experiments/frontier``) against dense
  ``cifar_resnet56`` and against the static CIFAR ResNet of the nearest MACs, same rounds;
  batch-1 latency is the mean over the first 16 test images (compute varies per image).
* ``compile`` (``--compile``): ``torch.compile`` (dense executor, ``fullgraph=True``) of
  ``sequential`` and ``dynamic`` against eager ``sequential``.

    python bench/inference.py                          # dense + removal, 2 and 1 threads
    python bench/inference.py --quick                  # cifar_resnet56 and mobilenet_v2, fewer rounds
    python bench/inference.py --parts trained --runs runs/budget/resnet56_*
    python bench/inference.py --parts frontier --runs runs/study/cifar_resnet56__dynamic__*target=*
    python bench/inference.py --parts compile --threads 1
    python bench/inference.py --parts small --threads 1 2      # the small models, both node forms
    python bench/inference.py --parts small --threads 1 --rounds 31   # more rounds: tighter intervals
    python bench/inference.py --parts small --threads 1 2 --rounds 11 --processes 6   # across processes
    python bench/inference.py --parts small --threads 1 --malloc default --out /tmp/x.json
    python bench/inference.py --parts channels_last --threads 1 --rounds 11 --processes 6

Every part runs on the heap ``dynwire eval`` uses (``--malloc kept``: ``dynwire.keep_freed_memory()``)
unless ``--malloc default`` keeps glibc's own; an evaluation-only process on glibc's default heap
unmaps freed feature maps and faults them in again on every forward, which costs the graph stages
(more maps per forward) more than the chain.

``--processes K`` runs the parts in K fresh processes, one after another, and reports for every
ratio the median of the processes' medians, with the range and the 95% interval over those K
medians (null below 6): a process's rounds share its memory layout and the machine's load of its
minutes, which the interval over its own rounds does not cover (on a shared 2-core VM the same
code moved by more than that interval between runs). Each process's medians are kept
(``per_process``).

Writes ``bench/results/inference.json`` (``--out``); parts not run are kept from the existing file.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from _machine import ci95, cpu_info
from torch import nn

import dynwire
import dynwire.layers._fused_glue as _glue
from dynwire.analysis.profile import count_macs
from dynwire.engine.files import atomic_write

SHARES = (0.2, 0.4, 0.5, 0.6, 0.8)


def _timer(fn: Callable[[], object], reps: int) -> float:
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def _measure(
    models: dict[str, nn.Module],
    x1,
    xn,
    rounds: int,
    reps1: int,
    repsn: int,
    ref: str,
    pairs: dict[str, str] | None = None,
) -> dict:
    """Interleaved rounds; per variant the median latency, throughput and ratios against ``ref``
    (and, for the variants in ``pairs``, against their own reference ``pairs[k]``, same rounds),
    with the per-round ratios' range and a 95% interval of their median (``*_ci95``: order
    statistics, no assumption on the distribution; null below 6 rounds).
    Latency is per image of ``x1``, each image a batch-1 call (several images: their mean, for
    models whose compute varies per image)."""
    rows: dict[str, list[tuple[float, float]]] = {k: [] for k in models}
    ones = [x1[i : i + 1] for i in range(x1.shape[0])]

    def one_by_one(m: nn.Module) -> None:
        for x in ones:
            m(x)

    with torch.inference_mode():
        for m in models.values():
            one_by_one(m), m(xn)  # warm-up
        for _ in range(rounds):
            for k, m in models.items():
                t1 = _timer(functools.partial(one_by_one, m), reps1) / len(ones)
                rows[k].append((t1, xn.shape[0] / _timer(functools.partial(m, xn), repsn)))
    out = {}
    for k, vals in rows.items():
        lat = [v[0] / r[0] for v, r in zip(vals, rows[ref])]
        thr = [v[1] / r[1] for v, r in zip(vals, rows[ref])]
        out[k] = dict(
            latency_b1_ms=round(1e3 * statistics.median(v[0] for v in vals), 3),
            throughput_img_s=round(statistics.median(v[1] for v in vals), 2),
            latency_ratio=round(statistics.median(lat), 4),
            latency_ratio_range=[round(min(lat), 4), round(max(lat), 4)],
            latency_ratio_ci95=ci95(lat, 4),
            throughput_ratio=round(statistics.median(thr), 4),
            throughput_ratio_range=[round(min(thr), 4), round(max(thr), 4)],
            throughput_ratio_ci95=ci95(thr, 4),
        )
    for k, other in (pairs or {}).items():
        lat = [v[0] / r[0] for v, r in zip(rows[k], rows[other])]
        thr = [v[1] / r[1] for v, r in zip(rows[k], rows[other])]
        out[k].update(
            equal_cost=other,
            latency_ratio_vs_equal=round(statistics.median(lat), 4),
            latency_ratio_vs_equal_range=[round(min(lat), 4), round(max(lat), 4)],
            throughput_ratio_vs_equal=round(statistics.median(thr), 4),
            throughput_ratio_vs_equal_range=[round(min(thr), 4), round(max(thr), 4)],
        )
    return out


def _executor(model: nn.Module, kind: str) -> nn.Module:
    for _, s in model.graph_stages():
        s.executor = kind
    return model


def _like(model: nn.Module, name: str, wiring: str, **kwargs) -> nn.Module:
    m = dynwire.create_model(name, num_classes=10, wiring=wiring, **kwargs).eval()
    m.load_state_dict(model.state_dict())
    return m


def _bench_variants(
    name: str, size: int, batch: int, rounds: int, reps1: int, repsn: int, in_chans: int, variants: dict[str, dict]
) -> tuple[dict[str, nn.Module], Callable[[dict[str, nn.Module]], dict]]:
    """Seeded inputs and one model per variant (``create_model`` keyword arguments); returns the
    models and a function that measures them against ``sequential`` (so callers can add variants)."""
    torch.manual_seed(0)
    x1, xn = torch.randn(1, in_chans, size, size), torch.randn(batch, in_chans, size, size)
    models = {k: dynwire.create_model(name, num_classes=10, **kw).eval() for k, kw in variants.items()}

    def measure(models: dict[str, nn.Module]) -> dict:
        res = _measure(models, x1, xn, rounds, reps1, repsn, ref="sequential")
        return dict(model=name, input=[in_chans, size, size], batch=batch, rounds=rounds, vs="sequential", variants=res)

    return models, measure


def bench_dense(name: str, size: int, batch: int, rounds: int, reps1: int, repsn: int) -> dict:
    c = dynwire.get_model_cfg(name).input_size[0]
    variants = {w: dict(wiring=w) for w in ("sequential", "dynamic", "static")}
    models, measure = _bench_variants(name, size, batch, rounds, reps1, repsn, c, variants)
    models["dynamic-reference"] = _executor(_like(models["dynamic"], name, "dynamic"), "dense")
    return measure(models)


class _FullSums(nn.Module):
    """``model`` run with every node summing all of its inputs: the inference batch path's partial
    sums (``_fused_glue._partial_sum_steps``) switched off for its calls only."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x):
        steps = _glue._partial_sum_steps
        _glue._partial_sum_steps = lambda n: frozenset()
        try:
            return self.model(x)
        finally:
            _glue._partial_sum_steps = steps


def bench_small(name: str, size: int, batch: int, rounds: int, reps1: int, repsn: int) -> dict:
    """The small models as the studies run them (Fashion-MNIST: 1 channel, 28x28), both node forms:
    ``dynamic`` (branch nodes, the default) and ``dynamic-block`` (whole blocks), and the branch form
    without partial sums (``dynamic-full-sums``, the same weights as ``dynamic``), against ``sequential``."""
    variants = {
        "sequential": dict(wiring="sequential", in_chans=1),
        "dynamic": dict(wiring="dynamic", in_chans=1),
        "dynamic-block": dict(wiring="dynamic", node="block", in_chans=1),
    }
    models, measure = _bench_variants(name, size, batch, rounds, reps1, repsn, 1, variants)
    models["dynamic-full-sums"] = _FullSums(_like(models["dynamic"], name, "dynamic", in_chans=1))
    return measure(models)


class _ChannelsLast(nn.Module):
    """``model`` converted to channels_last, its input too (as ``train.channels_last`` runs them);
    ``declined``: the C calls take only the default layout, as before they read channels_last maps
    (``_fused_glue._layout``), so the stages run their tensor ops."""

    def __init__(self, model: nn.Module, declined: bool = False) -> None:
        super().__init__()
        self.model = model.to(memory_format=torch.channels_last)
        self.declined = declined

    def forward(self, x):
        x = x.contiguous(memory_format=torch.channels_last)
        if not self.declined:
            return self.model(x)
        layout = _glue._layout
        _glue._layout = lambda y: 0 if y.is_contiguous() else None
        try:
            return self.model(x)
        finally:
            _glue._layout = layout


def bench_channels_last(name: str, size: int, batch: int, rounds: int, reps1: int, repsn: int) -> dict:
    """The small models (as in ``small``) in channels_last, against ``sequential`` in channels_last:
    both node forms, the branch form with the C calls declined (``dynamic-tensor-ops``, the path
    channels_last maps took before the C calls read them), and ``sequential`` and ``dynamic`` in the
    default layout (``-nchw``: what the layout itself buys)."""
    variants = {
        "sequential": dict(wiring="sequential", in_chans=1),
        "dynamic": dict(wiring="dynamic", in_chans=1),
        "dynamic-block": dict(wiring="dynamic", node="block", in_chans=1),
    }
    models, measure = _bench_variants(name, size, batch, rounds, reps1, repsn, 1, variants)
    nchw = {f"{k}-nchw": _like(models[k], name, variants[k]["wiring"], in_chans=1) for k in ("sequential", "dynamic")}
    declined = _ChannelsLast(_like(models["dynamic"], name, "dynamic", in_chans=1), declined=True)
    models = {k: _ChannelsLast(m) for k, m in models.items()}
    return measure({**models, "dynamic-tensor-ops": declined, **nchw})


def _blocks_run(model: nn.Module, x) -> tuple[float, dict]:
    """Share of (sample, block) pairs removed, from what the pruned fast path ran (block hooks)."""
    seen = []
    hooks = [
        b.register_forward_hook(lambda m, a, o: seen.append(a[0].shape[0]))
        for _, s in model.graph_stages()
        for b in s.blocks()[1:]
    ]
    try:
        with torch.inference_mode():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    total = x.shape[0] * sum(s.num_blocks - 1 for _, s in model.graph_stages())
    return 1 - sum(seen) / total


def _set_removed_share(model: nn.Module, x, share: float) -> float:
    """One threshold for every node, bisected until about ``share`` of (sample, block) pairs is removed."""
    lo, hi, got = 0.0, 1.0, 0.0
    with torch.no_grad():
        for _ in range(14):
            mid = (lo + hi) / 2
            for _, s in model.graph_stages():
                s.edges.tau.fill_(mid)
            got = _blocks_run(model, x)
            lo, hi = (mid, hi) if got < share else (lo, mid)
    return got


def bench_removal(name: str, size: int, batch: int, rounds: int, reps1: int, repsn: int) -> dict:
    torch.manual_seed(0)
    c = dynwire.get_model_cfg(name).input_size[0]
    x1, xn = torch.randn(1, c, size, size), torch.randn(batch, c, size, size)
    base = dynwire.create_model(name, num_classes=10, wiring="dynamic").eval()
    with torch.no_grad():  # edge weights that differ between samples (trained routers do; fresh ones barely)
        for _, s in base.graph_stages():
            for r in s.edges.routers:
                r.fc.weight.normal_(0, 0.5)
                r.fc.bias.normal_(0, 1)
    dense_macs = count_macs(base, (c, size, size))
    out = {}
    for share in SHARES:
        m = _like(base, name, "dynamic")
        got = _set_removed_share(m, xn, share)
        with torch.no_grad(), dynwire.record_adjacency(m) as rec:
            m(xn)
        models = {"pruned": m, "dense": _executor(_like(m, name, "dynamic"), "dense"), "none-removed": base}
        r = _measure(models, x1, xn, rounds, reps1, repsn, ref="none-removed")
        out[f"{share:.1f}"] = dict(
            removed_share=round(got, 4),
            executed_mac_fraction=round(float(rec.macs.mean()) / dense_macs, 4),
            throughput_vs_none_removed=r["pruned"]["throughput_ratio"],
            throughput_vs_none_removed_range=r["pruned"]["throughput_ratio_range"],
            latency_b1_vs_none_removed=r["pruned"]["latency_ratio"],
            throughput_vs_dense_executor=round(r["pruned"]["throughput_ratio"] / r["dense"]["throughput_ratio"], 4),
            latency_b1_vs_dense_executor=round(r["pruned"]["latency_ratio"] / r["dense"]["latency_ratio"], 4),
        )
        print(f"  removal {share:.1f}: {out[f'{share:.1f}']}", file=sys.stderr)
    return dict(model=name, input=[c, size, size], batch=batch, rounds=rounds, vs="dense executor", shares=out)


def _test_images(run: Path, n: int):
    from dynwire.engine.builders import build_split
    from dynwire.engine.config import load_config

    cfg = load_config(run / "config.yaml")
    ds, _ = build_split(cfg, "val", train=False)
    return torch.stack([ds[i][0] for i in range(n)])


def bench_trained(runs: list[Path], batch: int, rounds: int, reps1: int, repsn: int) -> dict:
    models, info = {}, {}
    for run in runs:
        m = dynwire.load_model(run)
        models[run.name] = m
    ref = next((k for k in models if "sequential" in k), None)
    if ref is None:
        raise SystemExit("--runs needs a sequential run among them (the reference)")
    xn = _test_images(runs[0], batch)
    x1 = xn[:1]
    seq_macs = count_macs(models[ref], tuple(xn.shape[1:]))
    for k, m in models.items():
        with torch.no_grad(), dynwire.record_adjacency(m) as rec:
            m(xn)
        macs = float(rec.macs.mean()) if rec.macs is not None else seq_macs
        final = json.loads((Path([r for r in runs if r.name == k][0]) / "final.json").read_text())
        info[k] = dict(executed_mac_fraction=round(macs / seq_macs, 4), top1=final["val"]["top1"])
    res = _measure(models, x1, xn, rounds, reps1, repsn, ref=ref)
    for k in res:
        res[k].update(info[k])
    return dict(input=list(xn.shape[1:]), batch=batch, rounds=rounds, vs=ref, images="test split", variants=res)


FRONTIER_SERIES = ("cifar_resnet20", "cifar_resnet32", "cifar_resnet44", "cifar_resnet56")
FRONTIER_LATENCY_IMAGES = 16


def bench_frontier(runs: list[Path], batch: int, rounds: int, reps1: int, repsn: int) -> dict:
    """Budget-trained DG-Nets against the static CIFAR ResNets: each against dense ``cifar_resnet56``
    and against the static network whose MACs are nearest its executed MACs (issue 17's "equal
    cost"). The static networks are built untrained: their speed does not depend on their weights."""
    if not runs:
        raise SystemExit("--parts frontier needs --runs (budget-trained run directories)")
    xn = _test_images(runs[0], batch)
    x1 = xn[:FRONTIER_LATENCY_IMAGES]  # per-sample compute: latency over several images, not one
    shape = tuple(xn.shape[1:])
    models: dict[str, nn.Module] = {}
    info: dict[str, dict] = {}
    for name in FRONTIER_SERIES:
        k = f"{name} sequential"
        models[k] = dynwire.create_model(name, num_classes=10, in_chans=shape[0], wiring="sequential").eval()
        info[k] = dict(macs=count_macs(models[k], shape))
    dense = info["cifar_resnet56 sequential"]["macs"]
    pairs = {}
    for run in runs:
        m = dynwire.load_model(run)
        with torch.no_grad(), dynwire.record_adjacency(m) as rec:
            m(xn)
        macs = float(rec.macs.mean())
        final = json.loads((run / "final.json").read_text())
        models[run.name] = m
        info[run.name] = dict(macs=macs, top1=final["val"]["top1"])
        pairs[run.name] = min((abs(info[k]["macs"] - macs), k) for k in info if k.endswith(" sequential"))[1]
    for k in info:
        info[k]["mac_fraction_of_resnet56"] = round(info[k]["macs"] / dense, 4)
    res = _measure(models, x1, xn, rounds, reps1, repsn, ref="cifar_resnet56 sequential", pairs=pairs)
    for k in res:
        res[k].update(info[k])
    return dict(
        input=list(shape), batch=batch, rounds=rounds, vs="cifar_resnet56 sequential", images="test split", variants=res
    )


def bench_compile(name: str, size: int, batch: int, rounds: int, reps1: int, repsn: int) -> dict:
    torch.manual_seed(0)
    c = dynwire.get_model_cfg(name).input_size[0]
    x1, xn = torch.randn(1, c, size, size), torch.randn(batch, c, size, size)
    models, seconds = {}, {}
    for w in ("sequential", "dynamic"):
        m = _executor(dynwire.create_model(name, num_classes=10, wiring=w).eval(), "dense")
        models[w] = m
        t = time.perf_counter()
        cm = torch.compile(m, fullgraph=True, dynamic=False)
        with torch.inference_mode():
            d = max((cm(x) - m(x)).abs().max().item() / max(1.0, m(x).abs().max().item()) for x in (x1, xn))
        seconds[w] = round(time.perf_counter() - t, 1)
        models[f"{w}-compiled"] = cm
        print(f"  compiled {w} in {seconds[w]} s (max rel. diff to eager {d:.2g})", file=sys.stderr)
    res = _measure(models, x1, xn, rounds, reps1, repsn, ref="sequential")
    return dict(
        model=name,
        input=[c, size, size],
        batch=batch,
        rounds=rounds,
        vs="eager sequential",
        compile_seconds=seconds,
        variants=res,
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, nargs="+", default=[2, 1])
    p.add_argument(
        "--parts",
        nargs="+",
        default=["dense", "removal"],
        choices=["dense", "small", "channels_last", "removal", "trained", "frontier", "compile"],
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="interleaved rounds of the dense, small, channels_last, removal and compile parts",
    )
    p.add_argument("--runs", nargs="*", type=Path, default=[], help="run directories for --parts trained")
    p.add_argument(
        "--malloc",
        choices=["kept", "default"],
        default="kept",
        help="glibc heap: 'kept' = dynwire.keep_freed_memory() (what `dynwire eval` and `analyze` use), "
        "'default' = glibc's own (freed feature maps unmapped and faulted in again)",
    )
    p.add_argument(
        "--processes",
        type=int,
        default=1,
        help="run the parts in this many fresh processes, one after another; ratios: the median of their "
        "medians, intervals over the processes (6 or more for the 95%% intervals)",
    )
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "inference.json"))
    args = p.parse_args(argv)
    if args.processes < 1:
        raise SystemExit(f"--processes {args.processes}: give at least 1")
    if args.processes > 1:
        return _across_processes(args, list(argv if argv is not None else sys.argv[1:]))
    if args.malloc == "kept" and not dynwire.keep_freed_memory():
        raise SystemExit("--malloc kept: glibc mallopt is unavailable here; use --malloc default")
    if args.rounds is not None and args.rounds < 1:
        raise SystemExit(f"--rounds {args.rounds}: give at least 1 (6 or more for the ratios' 95% intervals)")
    q = args.quick
    small = [(m, 28, 64, 3 if q else 7, 30 if q else 60, 3 if q else 5) for m in ("cifar_resnet20", "cifar_resnet56")]
    plans = {
        "dense": [
            ("cifar_resnet56", 32, 64, 3 if q else 5, 30 if q else 60, 3 if q else 5),
            ("mobilenet_v2", 224, 16, 2 if q else 3, 10 if q else 20, 2 if q else 3),
        ]
        + ([] if q else [("resnet50", 224, 16, 3, 10, 2)]),
        "small": small,
        "channels_last": small,  # the same models and rounds, in channels_last
        "removal": [("cifar_resnet56", 32, 64, 2 if q else 3, 20 if q else 40, 3)],
        "compile": [("cifar_resnet56", 32, 64, 3, 40, 3)],
    }
    path = Path(args.out)
    results = json.loads(path.read_text()) if path.is_file() else {}
    results.setdefault("parts", {})
    for part in args.parts:
        out = []
        for threads in args.threads:
            torch.set_num_threads(threads)
            t0 = time.time()
            if part in ("trained", "frontier"):
                fn = bench_trained if part == "trained" else bench_frontier
                # frontier: each latency repetition is FRONTIER_LATENCY_IMAGES batch-1 calls
                r = fn(args.runs, 64, 3, 40, 3) if part == "trained" else fn(args.runs, 64, 5, 10, 3)
                out.append(dict(threads=threads, **r))
            else:
                for plan in plans[part]:
                    if args.rounds is not None:
                        plan = (*plan[:3], args.rounds, *plan[4:])
                    fn = {
                        "dense": bench_dense,
                        "small": bench_small,
                        "channels_last": bench_channels_last,
                        "removal": bench_removal,
                        "compile": bench_compile,
                    }[part]
                    r = dict(threads=threads, **fn(*plan))
                    out.append(r)
                    print(f"{part} {plan[0]} {threads}t: {time.time() - t0:.0f} s", file=sys.stderr)
        results["parts"][part] = dict(
            command=" ".join(["python bench/inference.py", *(argv if argv is not None else sys.argv[1:])]),
            load_avg_at_start=[round(v, 2) for v in os.getloadavg()],
            cpu=cpu_info(),  # per part: a run of some parts keeps the others, maybe from another machine
            malloc=args.malloc,
            results=out,
        )
    results["meta"] = dict(
        torch=torch.__version__,
        machine=platform.machine(),
        processor=platform.processor(),
        cpus=os.cpu_count(),
        note="ratios are medians over interleaved rounds; absolute times depend on machine load",
    )
    return _save(path, results)


def _save(path: Path, results: dict) -> int:
    """Write ``results`` to ``path`` atomically (the parts not run this time are in it already)."""
    atomic_write(path, json.dumps(results, indent=1))
    print(f"wrote {path}", file=sys.stderr)
    return 0


def _without_option(argv: list[str], name: str) -> list[str]:
    """``argv`` without ``name`` and its value (``--name V`` or ``--name=V``)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == name:
            skip = True
        elif not a.startswith(name + "="):
            out.append(a)
    return out


def _pooled(variants: list[dict]) -> dict:
    """One variant's results from several processes: each ratio the median of the processes'
    medians, its range and 95% interval over them; each process's medians under ``per_process``."""
    first = variants[0]
    out: dict = {}
    keys = [k for k, v in first.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    for k in keys:
        vals = [v[k] for v in variants]
        out[k] = round(statistics.median(vals), 4)
        if k.endswith("_ratio") or k.endswith("_vs_equal"):
            out[f"{k}_range"] = [round(min(vals), 4), round(max(vals), 4)]
            if f"{k}_ci95" in first:
                out[f"{k}_ci95"] = ci95(vals, 4)
    for k, v in first.items():
        out.setdefault(k, v)
    out["per_process"] = {k: [v[k] for v in variants] for k in keys}
    return out


def _across_processes(args: argparse.Namespace, argv: list[str]) -> int:
    """``--processes K``: the same parts in K fresh processes, pooled by :func:`_pooled`."""
    import subprocess
    import tempfile

    base = _without_option(_without_option(argv, "--processes"), "--out")
    docs = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.processes):
            out = Path(tmp) / f"p{i}.json"
            print(f"process {i + 1}/{args.processes}", file=sys.stderr, flush=True)
            subprocess.run([sys.executable, __file__, *base, "--out", str(out)], check=True)
            docs.append(json.loads(out.read_text()))
    path = Path(args.out)
    results = json.loads(path.read_text()) if path.is_file() else {}
    results.setdefault("parts", {})
    for part in args.parts:
        runs = [d["parts"][part] for d in docs]
        pooled = []
        for rs in zip(*(r["results"] for r in runs)):
            r0 = dict(rs[0])
            if "variants" in r0:
                r0["variants"] = {k: _pooled([r["variants"][k] for r in rs]) for k in r0["variants"]}
            pooled.append(r0)
        results["parts"][part] = dict(
            runs[0],
            command=" ".join(["python bench/inference.py", *argv]),
            processes=args.processes,
            load_avg_at_start=[r["load_avg_at_start"] for r in runs],
            results=pooled,
        )
    results["meta"] = docs[-1]["meta"]
    return _save(path, results)


if __name__ == "__main__":
    sys.exit(main())

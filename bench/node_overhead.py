"""Where DG-Net's time above the chain goes on the small models (issue 19), measured in one run.

For each model (``cifar_resnet20``, ``cifar_resnet56`` by default; batch 64, 28x28, one channel,
the study's inputs) one process holds ``sequential`` and DG-Net (``dynamic``) in both node forms,
plus ablations of DG-Net that each switch one part of its machinery off:

* ``norecompute``: node inputs stored instead of recomputed in backward (``recompute=False``);
* ``notaps``: no gradient taps (``GraphStage.fused_grad = False``: autograd sums the edges' gradients);
* ``norouters``: the routers are not run (every edge weight a constant, no router forward or backward).

and the design before this one, timed in the same rounds (``ratio_receivers``, not a part of the
overhead): ``receivers`` gates each node's input edges per receiver, and the aggregations' backward
computes their weights' gradients (where the shipped stage gates per sender and its taps compute them).

Times are this thread's CPU time (one torch thread). Every variant runs one training step per round, the order rotated each round (after a warm-up
step each); each round's time is divided by the ``sequential`` step of the same round, the median
over rounds reported, with a 95% interval of that median (``*_ci95``, order statistics). A part's cost is the median over rounds of ``dynamic - ablation`` (seconds,
and as a share of the sequential step). The aggregation's own kernels (forward sums, their
recomputation, backward dot products and the taps' sums) are timed inside the shipped variant by
wrapping them; ``rest`` is what is left of the overhead: the per-node glue (gates, stacking of edge
weights, op dispatch, Python). ``ops`` counts the aten operators one step dispatches (profiler).

Evaluation (``torch.no_grad``, eval mode): batch 64 and batch 1, same interleaving. One extra
pass after the timed rounds splits the batch-64 evaluation of every variant: time inside the graph
stages' blocks (the chain's blocks include their shortcut add and ReLU; DG-Net's branches do not),
and in the stages outside them (DG-Net: the routers, gates, removal and aggregations, one C call
per node on the CPU). ``agg_traffic_share``: the least memory traffic of DG-Net's aggregations in
inference (``K`` reads + 1 write per node, every node alive; 2 reads for a node that starts from a
partial sum, and 1 write of that sum by the node before it) at the bandwidth of an out-of-cache
``torch.add(a, b, out=c)`` measured in the same process, as a share of the chain's evaluation;
``chain_add_traffic_share``: the same for the chain's shortcut adds with their ReLU (2 reads + 1
write per block), which DG-Net's aggregations replace and which the chain's blocks include.
``removed_share``: the share of (sample, block node) pairs removed (Sec. 3.3) in that evaluation;
the timed training steps move the routers and thresholds, so a form that removes nodes runs less
than the chain's work there (the models of ``bench/inference.py`` are untrained).

Each model runs in a fresh process per heap policy: ``default`` (glibc's own, which unmaps freed
maps above its mmap threshold) and ``kept`` (``dynwire.keep_freed_memory()``, opt-in: freed
feature maps stay in the heap).

    python bench/node_overhead.py                         # both models, 1 thread
    python bench/node_overhead.py --models cifar_resnet20 --rounds 5 --out /tmp/x.json

Writes ``bench/results/node_overhead.json`` (``--out``) and prints the tables.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from unittest import mock

import torch
from torch.nn import functional as F

import dynwire
from dynwire.analysis._stats import median_ci
from dynwire.graph.stage import GraphStage
from dynwire.layers import aggregation as agg
from dynwire.layers._fused_glue import _partial_sum_steps
from dynwire.layers.router import Router

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _machine import cpu_info
from train_overhead import _bandwidth_gbs, _stage_map_bytes  # noqa: E402  (the training floor's probe and sizes)

FORMS = ("block", "branch")
ABLATIONS = ("norecompute", "notaps", "norouters")
#: earlier designs, timed in the same rounds (not parts of the overhead): ``receivers`` gates each
#: node's input edges per receiver and computes their weights' gradients in the aggregations'
#: backward (the design before the taps computed them, ``stage._gates_per_sender`` off)
DESIGNS = ("receivers",)


def _clock() -> float:
    """Thread CPU time: with one torch thread all work is on this thread, and time the machine gives
    other processes does not count (wall time on a shared 2-core machine jitters by several %)."""
    return time.thread_time()


def _build(name: str, variant: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if variant == "sequential":
        return dynwire.create_model(name, num_classes=10, in_chans=1, wiring="sequential")
    form, _, ablation = variant.partition("-")
    m = dynwire.create_model(
        name, num_classes=10, in_chans=1, wiring="dynamic", node=form, recompute=ablation != "norecompute"
    )
    if ablation == "notaps":
        for s in m.modules():
            if isinstance(s, GraphStage):
                s.fused_grad = False
    return m


def _context(variant: str):
    if variant.endswith("receivers"):
        from dynwire.graph import stage

        return mock.patch.object(stage, "_gates_per_sender", lambda g: False)
    if not variant.endswith("norouters"):
        return contextlib.nullcontext()

    def forward(self, y):  # every output edge at sigmoid(3), no router work (the gates still run)
        return y.new_full((y.shape[0], self.fc.out_features), 0.95)

    return mock.patch.object(Router, "forward", forward)


class _Kernels:
    """Wall time inside the aggregation's kernels (forward, recomputation, backward, taps' sums)."""

    def __init__(self) -> None:
        self.t = 0.0
        self.depth = 0  # the taps' sums call _aggregate_impl: count the outermost call only

    def wrap(self, fn):
        def wrapped(*a, **kw):
            self.depth += 1
            t0 = _clock()
            try:
                return fn(*a, **kw)
            finally:
                self.depth -= 1
                if self.depth == 0:
                    self.t += _clock() - t0

        return wrapped

    @contextlib.contextmanager
    def active(self):
        with (
            mock.patch.object(agg, "_aggregate_impl", self.wrap(agg._aggregate_impl)),
            mock.patch.object(agg, "_fused_backward_tapped", self.wrap(agg._fused_backward_tapped)),
            mock.patch.object(agg, "_plain_backward_tapped", self.wrap(agg._plain_backward_tapped)),
            # the taps' sums with their output edges' dot products (Eq. 9-10, per sender)
            mock.patch.object(agg.GradSlot, "take_edges", self.wrap(agg.GradSlot.take_edges)),
        ):
            yield


def _ops(fn) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as p:
        fn()
    return sum(e.count for e in p.key_averages() if e.key.startswith("aten::"))


def _eval_split(model: torch.nn.Module, x: torch.Tensor, reps: int = 5) -> dict:
    """Batch evaluation time (median of ``reps``) and its part inside the graph stages' blocks and
    in the stages outside the blocks, by wrapping their forwards for one timed pass each."""
    stages = [m for m in model.modules() if isinstance(m, GraphStage)]
    t = {"blocks": 0.0, "stages": 0.0}

    def timed(mod, key):
        fwd = mod.forward

        def wrapped(*a, **kw):
            t0 = _clock()
            try:
                return fwd(*a, **kw)
            finally:
                t[key] += _clock() - t0

        mod.forward = wrapped

    mods = [(s, "stages") for s in stages] + [(b, "blocks") for s in stages for b in s.blocks()]
    for mod, key in mods:
        timed(mod, key)
    runs = []
    try:
        with torch.no_grad():
            for _ in range(reps):
                t["blocks"] = t["stages"] = 0.0
                t0 = _clock()
                model(x)
                runs.append((_clock() - t0, t["blocks"], t["stages"] - t["blocks"]))
    finally:
        for mod, _ in mods:
            del mod.forward
    total, blocks, rest = (statistics.median(r[i] for r in runs) for i in range(3))
    return {"total_s": round(total, 6), "in_blocks_s": round(blocks, 6), "stages_outside_blocks_s": round(rest, 6)}


def _eval_agg_bytes(model: torch.nn.Module, x: torch.Tensor) -> int:
    """The least memory traffic of one evaluation's aggregations (bytes) as the batch path runs them,
    every node alive: ``K`` reads + 1 write per node with ``K`` inputs, except that a node whose
    input starts from a partial sum (``_fused_glue._partial_sum_steps``) reads that sum and its
    newest input (2 reads), and the node before it writes the sum (1 write; its second pass over
    inputs still in cache is not counted); feature-map sizes from one forward with hooks."""
    total = 0
    for st, size in _stage_map_bytes(model, x).items():
        emits = _partial_sum_steps(st.num_blocks)
        for j in range(1, st.num_nodes):
            reads = 2 if j - 1 in emits else len(st.edges.predecessors(j))
            total += (reads + 1 + (j in emits)) * size * x.shape[0]
    return total


def _chain_add_bytes(model: torch.nn.Module, x: torch.Tensor) -> int:
    """The least memory traffic of the chain's shortcut adds with their ReLU in the stages of
    ``model`` (bytes): 2 reads + 1 write of a map per block."""
    return sum(3 * len(st.blocks()) * size * x.shape[0] for st, size in _stage_map_bytes(model, x).items())


def _ci(ratios: list[float]) -> list[float] | None:
    """95% interval of the per-round ratios' median (order statistics); None below 6 rounds."""
    lo, hi = median_ci(ratios)
    return None if lo != lo else [round(lo, 3), round(hi, 3)]


def measure(name: str, batch: int, size: int, rounds: int, eval_reps: int) -> dict:
    variants = ["sequential"] + [f"{f}{'-' + a if a else ''}" for f in FORMS for a in ("", *ABLATIONS, *DESIGNS)]
    models = {v: _build(name, v).train() for v in variants}
    opts = {v: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for v, m in models.items()}
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 1, size, size, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)

    def step(v: str) -> None:
        with _context(v):
            opts[v].zero_grad(set_to_none=True)
            F.cross_entropy(models[v](x), y).backward()
            opts[v].step()

    for v in variants:
        step(v)
    wall: dict[str, list[float]] = {v: [] for v in variants}
    for r in range(rounds):
        for v in variants[r % len(variants) :] + variants[: r % len(variants)]:
            t0 = _clock()
            step(v)
            wall[v].append(_clock() - t0)
    seq = wall["sequential"]
    kernels = {}
    for f in FORMS:
        k = _Kernels()
        with k.active():
            step(f)
        kernels[f] = k.t
    ops = {v: _ops(lambda v=v: step(v)) for v in ["sequential", *FORMS]}

    train = {}
    for f in FORMS:
        over = [a - b for a, b in zip(wall[f], seq)]
        parts = {a: statistics.median([d - e for d, e in zip(wall[f], wall[f"{f}-{a}"])]) for a in ABLATIONS}
        parts["aggregation kernels"] = kernels[f]
        rest = statistics.median(over) - parts["norecompute"] - parts["notaps"] - parts["norouters"] - kernels[f]
        train[f] = {
            "ratio": round(statistics.median([a / b for a, b in zip(wall[f], seq)]), 3),
            "ratio_ci95": _ci([a / b for a, b in zip(wall[f], seq)]),
            "overhead_s": round(statistics.median(over), 5),
            "parts_s": {k: round(t, 5) for k, t in parts.items()},
            "parts_share_of_sequential": {k: round(t / statistics.median(seq), 4) for k, t in parts.items()},
            "rest_s": round(rest, 5),
            "ops": ops[f],
        }
        for a in ABLATIONS + DESIGNS:
            train[f][f"ratio_{a}"] = round(statistics.median([p / q for p, q in zip(wall[f"{f}-{a}"], seq)]), 3)

    # evaluation, batch 64 and batch 1
    for m in models.values():
        m.eval()
    ev = ["sequential", *FORMS]
    x1 = x[:1].contiguous()
    ev_t: dict[tuple[str, int], list[float]] = {(v, b): [] for v in ev for b in (batch, 1)}
    with torch.no_grad():
        for v in ev:
            models[v](x)
        for r in range(rounds):
            for v in ev[r % len(ev) :] + ev[: r % len(ev)]:
                t0 = _clock()
                models[v](x)
                ev_t[(v, batch)].append(_clock() - t0)
                ts = []
                for _ in range(eval_reps):
                    t0 = _clock()
                    models[v](x1)
                    ts.append(_clock() - t0)
                ev_t[(v, 1)].append(statistics.median(ts))
    evaluation = {}
    for f in FORMS:
        evaluation[f] = {}
        for b in (batch, 1):
            per_round = [p / q for p, q in zip(ev_t[(f, b)], ev_t[("sequential", b)])]
            evaluation[f][f"b{b}_ratio"] = round(statistics.median(per_round), 3)
            evaluation[f][f"b{b}_ratio_ci95"] = _ci(per_round)
    split = {v: _eval_split(models[v], x) for v in ev}
    bw = _bandwidth_gbs()
    seq_b = statistics.median(ev_t[("sequential", batch)])
    for f in FORMS:
        evaluation[f]["removed_share"] = _removed_share(models[f], x)
        evaluation[f]["agg_traffic_share"] = round(_eval_agg_bytes(models[f], x) / bw / 1e9 / seq_b, 4)
        evaluation[f]["chain_add_traffic_share"] = round(_chain_add_bytes(models[f], x) / bw / 1e9 / seq_b, 4)
    return {
        "model": name,
        "batch": batch,
        "input": size,
        "sequential_step_s": round(statistics.median(seq), 5),
        "sequential_ops": ops["sequential"],
        "train": train,
        "eval": evaluation,
        "eval_sequential_s": {f"b{b}": round(statistics.median(ev_t[("sequential", b)]), 6) for b in (batch, 1)},
        "eval_split": split,
        "bandwidth_gbs": round(bw, 2),
    }


def _removed_share(model: torch.nn.Module, x: torch.Tensor) -> float:
    """Share of (sample, block node) pairs removed (Sec. 3.3) when ``model`` evaluates ``x``. The
    timed training steps move the routers and thresholds, so the forms' evaluations may not run the
    same blocks: a form that removes more runs less than the chain's work."""
    with torch.no_grad(), dynwire.record_adjacency(model) as rec:
        model(x)
    removed = [v[:, 1:-1] for v in rec.removed.values()]
    return round(sum(int(v.sum()) for v in removed) / sum(v.numel() for v in removed), 4)


def table(doc: dict) -> str:
    lines = [
        "| model | form | train step | of which: recompute | taps | routers | aggregation kernels | rest "
        "| aten ops (chain) | gates per receiver | eval b64 | eval b1 | removed at eval |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in doc["results"]:
        for f, t in r["train"].items():
            sh = t["parts_share_of_sequential"]
            rest = t["rest_s"] / r["sequential_step_s"]
            lines.append(
                f"| {r['model']} | {f} | {t['ratio']:.2f}x | {sh['norecompute']:+.1%} | {sh['notaps']:+.1%} "
                f"| {sh['norouters']:+.1%} | {sh['aggregation kernels']:+.1%} | {rest:+.1%} "
                f"| {t['ops']} ({r['sequential_ops']}) | {t['ratio_receivers']:.2f}x "
                f"| {r['eval'][f]['b64_ratio']:.2f}x | {r['eval'][f]['b1_ratio']:.2f}x "
                f"| {r['eval'][f].get('removed_share', float('nan')):.1%} |"
            )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["cifar_resnet20", "cifar_resnet56"])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--size", type=int, default=28)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--eval-reps", type=int, default=5, help="batch-1 calls per round (their median)")
    ap.add_argument(
        "--malloc",
        nargs="+",
        default=["default", "kept"],
        choices=["kept", "default"],
        help="glibc heap: 'default' = glibc's own, 'kept' = dynwire.keep_freed_memory() (opt-in); "
        "each runs in its own process",
    )
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "node_overhead.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:  # one model, one heap policy, in this process: JSON on stdout
        if args.malloc == ["kept"]:
            assert dynwire.keep_freed_memory(), "glibc mallopt unavailable"
        r = measure(args.worker, args.batch, args.size, args.rounds, args.eval_reps)
        print(json.dumps({**r, "malloc": args.malloc[0]}))
        return
    by_policy: dict[str, list[dict]] = {m: [] for m in args.malloc}
    for policy in args.malloc:
        for name in args.models:
            t0 = time.perf_counter()
            cmd = [sys.executable, __file__, "--worker", name, "--malloc", policy]
            cmd += ["--batch", str(args.batch), "--size", str(args.size), "--threads", str(args.threads)]
            cmd += ["--rounds", str(args.rounds), "--eval-reps", str(args.eval_reps)]
            env = {**os.environ, "DYNWIRE_MALLOC_TUNING": "1" if policy == "kept" else "0"}
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
            by_policy[policy].append(json.loads(out.strip().splitlines()[-1]))
            print(f"{name} ({policy} heap): {time.perf_counter() - t0:.0f}s", file=sys.stderr, flush=True)
    results = by_policy.get("default") or by_policy["kept"]
    doc = {
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": args.threads, **cpu_info()},
        "torch": torch.__version__,
        "loadavg_after": list(os.getloadavg()),
        "notes": __doc__.split("\n\n")[1:4],
        "malloc": "results: " + ("glibc's default heap" if "default" in by_policy else "kept"),
        "results": results,
        "results_kept_malloc": by_policy.get("kept") if "default" in by_policy else None,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(tmp, args.out)
    print(table(doc))
    if doc["results_kept_malloc"]:
        print("\nwith dynwire.keep_freed_memory() (freed maps kept in the heap):")
        print(table({"results": doc["results_kept_malloc"]}))


if __name__ == "__main__":
    main()

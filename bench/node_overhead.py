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

Evaluation (``torch.no_grad``, eval mode) of copies of the models taken before the training
steps, so that no form removes nodes the other runs (``removed_share`` checks it): batch 64 and
batch 1, same interleaving. Extra passes after the timed rounds split the batch-64 evaluation of
every variant (``eval_split``, medians of 15 interleaved passes): the graph stages' blocks (the
chain's blocks include their shortcut add and ReLU; DG-Net's branch nodes do not), of which the
residual branches every form runs (``branches_s``), and the stages outside the blocks, of which
DG-Net's C calls (``c_steps_s``: the routers, gates, removal and the next node's input, one call
per node on the CPU). ``agg_traffic_share``: the least memory traffic of DG-Net's aggregations in
inference (``K`` reads + 1 write per node, every node alive; 2 reads for a node that starts from a
partial sum, and 1 write of that sum by the node before it) at the bandwidth of an out-of-cache
``torch.add(a, b, out=c)`` measured in the same process (``bandwidth_gbs``), as a share of the
chain's evaluation; ``c_steps_gbs``: that traffic over the C calls' time, the rate they move it at;
``chain_add_traffic_share``: the same share for the chain's shortcut adds with their ReLU (2 reads
+ 1 write per block), which DG-Net's aggregations replace. ``bandwidth_in_cache_gbs``: the same
``torch.add`` on 3 MiB tensors that stay in the cache, the speed of a pass over maps written just
before (as the chain's adds read them).

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
import copy
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
from dynwire.engine.files import atomic_write
from dynwire.graph.stage import GraphStage
from dynwire.layers import _fused_glue as _glue
from dynwire.layers import aggregation as agg
from dynwire.layers._fused_glue import _partial_sum_steps
from dynwire.layers.router import Router

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _machine import ci95, cpu_info
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


def _eval_split(models: dict[str, torch.nn.Module], x: torch.Tensor, rounds: int = 15) -> dict[str, dict]:
    """Each model's batch evaluation time and its parts (medians over ``rounds`` passes, one pass of
    every model per round, the order rotated each round), by wrapping for those passes:

    * ``in_blocks_s``: the graph stages' blocks (the chain's blocks with their shortcut add and ReLU;
      DG-Net's branch nodes without them);
    * ``branches_s``: the blocks' residual branches (``_branch``: the convolutions and norms that
      every form runs), so ``in_blocks_s - branches_s`` is the shortcuts (adds, ReLUs and the
      downsampling convolutions; DG-Net's branch form runs them in block 0 of each stage only);
    * ``stages_outside_blocks_s``: the stages outside their blocks;
    * ``c_steps_s``: of that, the batch path's C calls (one per node after block 0: router, gate and
      the next node's input, ``SampleKernels.run_batch``).
    """
    keys = ("blocks", "branches", "stages", "c_steps")
    t = dict.fromkeys(keys, 0.0)

    def timed(fn, key):
        def wrapped(*a, **kw):
            t0 = _clock()
            try:
                return fn(*a, **kw)
            finally:
                t[key] += _clock() - t0

        return wrapped

    mods = []
    for model in models.values():
        stages = [m for m in model.modules() if isinstance(m, GraphStage)]
        blocks = [b for s in stages for b in s.blocks()]
        mods += [(s, "forward", "stages") for s in stages] + [(b, "forward", "blocks") for b in blocks]
        mods += [(m, "_branch", "branches") for b in blocks for m in b.modules() if "_branch" in type(m).__dict__]
    for mod, attr, key in mods:
        setattr(mod, attr, timed(getattr(mod, attr), key))
    run_batch = _glue.SampleKernels.run_batch

    def run_batch_timed(self, *a, **kw):  # the instance's C step, timed for this call
        step = self._batch_step
        self._batch_step = timed(step, "c_steps")
        try:
            return run_batch(self, *a, **kw)
        finally:
            self._batch_step = step

    order = list(models)
    runs: dict[str, list[tuple[float, ...]]] = {v: [] for v in order}
    try:
        with torch.no_grad(), mock.patch.object(_glue.SampleKernels, "run_batch", run_batch_timed):
            for v in order:
                models[v](x)
            for r in range(rounds):
                for v in order[r % len(order) :] + order[: r % len(order)]:
                    t.update(dict.fromkeys(keys, 0.0))
                    t0 = _clock()
                    models[v](x)
                    total = _clock() - t0
                    runs[v].append((total, t["blocks"], t["branches"], t["stages"] - t["blocks"], t["c_steps"]))
    finally:
        for mod, attr, _ in mods:
            delattr(mod, attr)
    names = ("total_s", "in_blocks_s", "branches_s", "stages_outside_blocks_s", "c_steps_s")
    return {
        v: {k: round(statistics.median(r[i] for r in rs), 6) for i, k in enumerate(names)} for v, rs in runs.items()
    }


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


def measure(name: str, batch: int, size: int, rounds: int, eval_reps: int) -> dict:
    variants = ["sequential"] + [f"{f}{'-' + a if a else ''}" for f in FORMS for a in ("", *ABLATIONS, *DESIGNS)]
    models = {v: _build(name, v).train() for v in variants}
    # evaluation on the untrained models: the timed steps move routers and thresholds, and a form
    # that then removes nodes would run less than the chain's work
    ev = ["sequential", *FORMS]
    ev_models = {v: copy.deepcopy(models[v]).eval() for v in ev}
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
            "ratio_ci95": ci95([a / b for a, b in zip(wall[f], seq)]),
            "overhead_s": round(statistics.median(over), 5),
            "parts_s": {k: round(t, 5) for k, t in parts.items()},
            "parts_share_of_sequential": {k: round(t / statistics.median(seq), 4) for k, t in parts.items()},
            "rest_s": round(rest, 5),
            "ops": ops[f],
        }
        for a in ABLATIONS + DESIGNS:
            train[f][f"ratio_{a}"] = round(statistics.median([p / q for p, q in zip(wall[f"{f}-{a}"], seq)]), 3)

    # evaluation, batch 64 and batch 1
    models = ev_models
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
            evaluation[f][f"b{b}_ratio_ci95"] = ci95(per_round)
    split = _eval_split({v: models[v] for v in ev}, x)
    bw = _bandwidth_gbs()
    # one map of cifar_resnet56's first stage at batch 64 is 3.1 MiB: a, b and c stay in the L3
    bw_cached = _bandwidth_gbs(mib=3, repeats=21)
    seq_b = statistics.median(ev_t[("sequential", batch)])
    for f in FORMS:
        agg_bytes = _eval_agg_bytes(models[f], x)
        evaluation[f]["removed_share"] = _removed_share(models[f], x)
        evaluation[f]["agg_traffic_share"] = round(agg_bytes / bw / 1e9 / seq_b, 4)
        steps = split[f]["c_steps_s"]
        evaluation[f]["c_steps_gbs"] = round(agg_bytes / steps / 1e9, 2) if steps else None
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
        "bandwidth_in_cache_gbs": round(bw_cached, 2),
    }


def _removed_share(model: torch.nn.Module, x: torch.Tensor) -> float:
    """Share of (sample, block node) pairs removed (Sec. 3.3) when ``model`` evaluates ``x``: a form
    that removes nodes runs less than the chain's work."""
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
    atomic_write(args.out, json.dumps(doc, indent=1))
    print(table(doc))
    if doc["results_kept_malloc"]:
        print("\nwith dynwire.keep_freed_memory() (freed maps kept in the heap):")
        print(table({"results": doc["results_kept_malloc"]}))


if __name__ == "__main__":
    main()

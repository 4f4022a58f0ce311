"""Training-step time and peak memory of DG-Net (``dynamic``) vs the static backbone, and a
micro-benchmark of one node's aggregation against the machine's memory bandwidth.

**Steps** (``--parts steps``). Time: one process per model holds every variant and runs one
training step of each per round, the order rotated every round (after a warm-up step each), so
that each round's ratio to ``sequential`` compares steps taken seconds apart in the same process
under the same machine load; wall time and process CPU time are both recorded. Memory: each
variant alone in fresh processes, peak RSS (``VmHWM``). One extra instrumented step per
variant splits the time into forward, backward and optimizer, and the aggregation's share of
each (forward sum, recomputation in backward, backward: dot products and the gradient sums).

Variants: ``sequential`` (torchvision's network), ``dynamic`` (DG-Net as shipped: fused
aggregation kernels, every node input recomputed), ``dynamic-plain`` (the same with the plain, one
edge at a time kernels: what shipped before the fused ones), ``dynamic-push`` (fused kernels, but
backward adds ``w * g`` into each predecessor's gradient slot per edge, as the first fused
version did, instead of deferring to the taps), ``dynamic-maxin8`` (only the inputs of
nodes with at most 8 predecessors recomputed: ``recompute_max_inputs=8``),
``dynamic-norecompute`` (fused kernels, node inputs stored) and ``dynamic-stack`` (naive
``torch.stack`` aggregation).

**Micro** (``--parts micro``). One graph node of ResNet-101's layer3 at batch 4 (and of
ResNet-50's stages at batch 8): ``K`` predecessors of shape ``(B, C, H, W)``, forward sum (which
is also the recomputation in backward) and backward, plain and fused kernels, caches flushed
before each call. Backward is one node's share in a complete DAG, where a node has as many
consumers as inputs: the ``grad_w`` dot products of its ``K`` input edges and the gradient of its
output from ``K`` consumers. Plain: dots, then ``slot_k += w_k * g`` into ``K`` slots that already
hold a gradient (push). Fused: dots in one pass (``g`` once, each ``x_k`` once), and the tap's sum
of ``K`` deferred ``w * g_j`` terms in one pass (pull, ``GradSlot.take``). Each is compared with the
least memory traffic the operation needs (forward: ``K`` reads + 1 write; backward: ``g`` and
each ``x_k`` once, each ``g_j`` once and the sum written once, ``2K + 2``) moved at the bandwidth
of a large out-of-cache ``torch.add(a, b, out=c)`` measured in the same rounds: ``of_bound`` =
that time / the measured time.

**Stage** (``--parts stage``). The aggregation's whole backward through ResNet-101's layer3 (23
blocks, 276 edges; block backward left out) with every tensor allocated as in a step: ``plain``,
``push`` (the first fused version: each edge's ``w * g`` added into the predecessor's slot in the
dots pass) and ``pull`` (shipped: dots, then one sum per tap). The fair A/B of the two fused
designs, which the node-level micro-benchmark (pre-allocated slots) is not.

    python bench/train_overhead.py                       # micro, stage, then resnet50 b8 + resnet101 b4, 224x224
    python bench/train_overhead.py --parts micro stage
    python bench/train_overhead.py --parts steps --threads 1 --rounds 9
    python bench/train_overhead.py --parts steps --models resnet18:8 --rounds 2 --out /tmp/x.json
    python bench/train_overhead.py --parts steps --models cifar_resnet20:64 cifar_resnet56:64 --size 28 \
        --threads 1 --variants sequential dynamic dynamic-block --rounds 9     # small models, both node forms

Step workers run on the heap ``dynwire train`` uses (``--malloc kept``: ``dynwire.keep_freed_memory()``)
unless ``--malloc default`` keeps glibc's own (which unmaps freed maps above its mmap threshold);
each variant's page faults per step (``ru_minflt``, median over rounds) are recorded with its time:

    python bench/train_overhead.py --parts steps --models cifar_resnet20:64 cifar_resnet56:64 --size 28 \
        --threads 1 --variants sequential dynamic dynamic-block --rounds 9 --malloc default \
        --out bench/results/train_overhead_default_heap.json

A run keeps the parts of an existing ``--out`` file that it does not redo; step results are
stored per thread count (``steps_t2``, ``steps_t1``) and input size when not 224 (``steps_t1_s28``).
``dynamic`` is the default node form (branch since 0.2.0), ``dynamic-block`` the block form.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from functools import partial
from unittest import mock

from _machine import cpu_info

VARIANTS = (
    "sequential",
    "dynamic",
    "dynamic-block",
    "dynamic-push",
    "dynamic-plain",
    "dynamic-maxin8",
    "dynamic-norecompute",
    "dynamic-stack",
)
DEFAULT_VARIANTS = ("sequential", "dynamic", "dynamic-push", "dynamic-plain")

# (label, shape, ks) of the micro-benchmark; resnet101 layer3 at batch 4 has nodes with 1..23 inputs
MICRO_SHAPES = (
    ("resnet101.layer3 b4", (4, 1024, 14, 14), (2, 4, 8, 12, 16, 20, 24)),
    ("resnet50.layer1 b8", (8, 256, 56, 56), (2, 3)),
    ("resnet50.layer2 b8", (8, 512, 28, 28), (2, 4)),
    ("resnet50.layer3 b8", (8, 1024, 14, 14), (2, 6)),
)


def _loadavg() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def _autogroup() -> str | None:
    """With autogroup scheduling on, ``nice`` acts only within a session: a niced background job in
    another session still gets an equal share of the CPUs (recorded because it shapes the timings)."""
    try:
        with open("/proc/sys/kernel/sched_autogroup_enabled") as f:
            return "enabled" if f.read().strip() == "1" else "disabled"
    except OSError:
        return None


# ----------------------------------------------------------------------------------------- steps


class _Timer:
    """Accumulates wall and process CPU time of the aggregation's entry points during one step."""

    def __init__(self) -> None:
        self.t = {f"agg_{p}_{c}": 0.0 for p in ("forward", "recompute", "backward") for c in ("s", "cpu_s")}
        self.phase = "forward"
        self.depth = 0  # a wrapped call inside another (the taps' sum calls the forward kernel) counts once

    def wrap(self, fn, phase=None):
        def wrapped(*a, **kw):
            t0, c0 = time.perf_counter(), time.process_time()
            self.depth += 1
            try:
                return fn(*a, **kw)
            finally:
                self.depth -= 1
                if self.depth == 0:
                    ph = phase or ("forward" if self.phase == "forward" else "recompute")
                    self.t[f"agg_{ph}_s"] += time.perf_counter() - t0
                    self.t[f"agg_{ph}_cpu_s"] += time.process_time() - c0

        return wrapped


def _push_backward():
    """The first fused backward, for comparison: ``slot_k (+)= w_k * g`` per edge in the same pass as
    the dot products (the slot is read and written once per edge), nothing deferred to the taps."""

    import torch

    from dynwire.layers import aggregation as agg

    def push(weights, grad, xs, slots, need_w, cols=None, xs_checked=False):
        backend = agg._fused_backend([grad, *xs])
        if backend is None or len({id(s) for s in slots}) != len(slots):
            return False
        task = torch._C._current_graph_task_id()
        fresh = [s.grad is None or s.task != task for s in slots]
        if any(not f and (s.grad.stride(), s.grad.dtype) != (grad.stride(), grad.dtype) for s, f in zip(slots, fresh)):
            return False
        targets = [torch.empty_like(grad) if f else s.grad for s, f in zip(slots, fresh)]
        flat = [agg._flat(t) for t in targets]
        grad_w = backend.backward(weights.detach(), agg._flat(grad), [agg._flat(x) for x in xs], flat, fresh, need_w)
        for s, t, f in zip(slots, targets, fresh):
            if f:
                s.grad, s.task, s.pending = t, task, []
        return None if grad_w is None else grad_w.to(weights.dtype)

    return mock.patch.object(agg, "_fused_backward_tapped", push)


class _Variant:
    """One variant's model and optimizer, and the context its steps run in."""

    def __init__(self, model_name: str, variant: str) -> None:
        import torch

        import dynwire

        torch.manual_seed(0)
        wiring = "sequential" if variant == "sequential" else "dynamic"
        kw: dict = {"recompute_max_inputs": 8} if variant == "dynamic-maxin8" else {}
        if variant == "dynamic-block":  # 0.1's node form (the whole residual block); the others: the default
            kw["node"] = "block"
        recompute = variant in ("dynamic", "dynamic-block", "dynamic-push", "dynamic-plain", "dynamic-maxin8")
        self.name = variant
        self.model = dynwire.create_model(model_name, wiring=wiring, recompute=recompute, **kw).train()
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)

    def context(self):
        import contextlib

        import torch

        from dynwire.graph import stage as stage_mod
        from dynwire.layers.aggregation import fused_aggregation

        if self.name == "dynamic-plain":
            return fused_aggregation("off")
        if self.name == "dynamic-push":
            return _push_backward()
        if self.name != "dynamic-stack":
            return contextlib.nullcontext()

        def naive(w, xs, slots=None):
            s = torch.stack(list(xs), 1)
            return (s * w.to(s.dtype).view(*w.shape, *([1] * (s.ndim - 2)))).sum(1)

        return mock.patch.object(stage_mod, "aggregate", naive)

    def step(self, x, y) -> tuple[float, float]:
        import torch

        with self.context():
            t0, c0 = time.perf_counter(), time.process_time()
            self.opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(self.model(x), y).backward()
            self.opt.step()
            return time.perf_counter() - t0, time.process_time() - c0

    def instrumented_step(self, x, y) -> dict:
        """One step split into forward, backward and optimizer, and the aggregation's share."""
        import torch

        from dynwire.layers import aggregation as agg

        timer = _Timer()
        saved = (agg._aggregate_impl, agg._AggregateTapped.backward, agg.GradSlot.take)
        agg._aggregate_impl = timer.wrap(saved[0])
        agg._AggregateTapped.backward = staticmethod(timer.wrap(saved[1], "backward"))
        agg.GradSlot.take = timer.wrap(saved[2], "backward")  # the taps' sums of deferred gradients
        try:
            with self.context():
                t0 = time.perf_counter()
                self.opt.zero_grad(set_to_none=True)
                loss = torch.nn.functional.cross_entropy(self.model(x), y)
                t1 = time.perf_counter()
                timer.phase = "backward"
                loss.backward()
                t2 = time.perf_counter()
                self.opt.step()
                t3 = time.perf_counter()
        finally:
            agg._aggregate_impl = saved[0]
            agg._AggregateTapped.backward = staticmethod(saved[1])
            agg.GradSlot.take = saved[2]
        return {"forward_s": t1 - t0, "backward_s": t2 - t1, "optimizer_s": t3 - t2, **timer.t}


def _stage_map_bytes(model, x) -> dict:
    """Bytes of one feature map of each graph stage that is not a chain, per sample of ``x``
    (block 0's output, from one evaluation forward with hooks; the model is left in eval mode)."""
    import torch

    from dynwire.graph.stage import GraphStage

    sizes, hooks = {}, []
    stages = [m for m in model.modules() if isinstance(m, GraphStage) and not m.edges.is_chain]
    for st in stages:
        hooks.append(
            st.blocks()[0].register_forward_hook(lambda m, i, o, st=st: sizes.__setitem__(st, o.nbytes // o.shape[0]))
        )
    with torch.no_grad():
        model.eval()(x)
    for h in hooks:
        h.remove()
    return sizes


def _agg_min_bytes(model, x) -> int:
    """The least memory traffic of one training step's aggregations (bytes), from the model's graph.

    Per node ``j`` with ``K`` inputs: forward ``K`` reads + 1 write; the recomputation in backward
    the same again (block inputs only, where the variant recomputes); backward ``K + 2``: each input
    edge's ``g`` is read once, by the tap of the node it comes from, which sums its consumers'
    ``w * g`` and computes their edge weights' dot products with its output in the same pass (one
    read of the output, one write of its gradient; ``2K + 2`` before the dot products moved to the
    taps). Feature-map sizes come from one forward with hooks."""
    sizes = _stage_map_bytes(model, x[:1])
    model.train()
    total = 0
    for st in sizes:
        limit = st.wiring.recompute_max_inputs
        for j in range(1, st.num_nodes):
            k = len(st.edges.predecessors(j))
            recompute = st.wiring.recompute and j < st.num_blocks and (limit is None or k <= limit)
            total += ((k + 1) * (2 if recompute else 1) + k + 2) * sizes[st] * x.shape[0]
    return total


def _bandwidth_gbs(mib: int = 256, repeats: int = 5) -> float:
    """Best ``torch.add(a, b, out=c)`` bandwidth over out-of-cache tensors, with this process's threads."""
    import torch

    n = mib * 2**20 // 4
    a, b, c = torch.randn(n), torch.randn(n), torch.empty(n)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.add(a, b, out=c)
        best = min(best, time.perf_counter() - t0)
    return 3 * n * 4 / best / 1e9


def timing_worker(model_name: str, variants: list[str], batch: int, size: int, rounds: int) -> dict:
    """Every variant in this one process, one step each per round, the order rotated each round."""
    import torch

    load0 = _loadavg()
    runs = {v: _Variant(model_name, v) for v in variants}
    torch.manual_seed(0)
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, 1000, (batch,))
    for r in runs.values():  # warm-up: allocator, kernels, the aggregation library
        r.step(x, y)
    wall: dict[str, list[float]] = {v: [] for v in variants}
    cpu: dict[str, list[float]] = {v: [] for v in variants}
    faults: dict[str, list[int]] = {v: [] for v in variants}
    for i in range(rounds):
        for v in variants[i % len(variants) :] + variants[: i % len(variants)]:
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            w, c = runs[v].step(x, y)
            faults[v].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
            wall[v].append(w)
            cpu[v].append(c)
    split = {v: runs[v].instrumented_step(x, y) for v in variants}
    min_bytes = {v: _agg_min_bytes(runs[v].model, x) for v in variants if v != "dynamic-stack"}
    bw = _bandwidth_gbs()
    return {
        "wall_s": wall,
        "cpu_s": cpu,
        "page_faults": faults,
        "split": split,
        "agg_min_bytes": min_bytes,
        "bandwidth_gbs": bw,
        "loadavg": [load0, _loadavg()],
    }


def _peak_rss_kb() -> int:
    """This process image's peak RSS. Linux carries ``ru_maxrss`` over ``execve`` from the parent
    (a bench process that ran the micro-benchmark first would set every worker's peak), so the
    per-image ``VmHWM`` of ``/proc/self/status`` is read where it exists."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def memory_worker(model_name: str, variant: str, batch: int, size: int, steps: int) -> dict:
    """Peak RSS of one variant alone in a fresh process (``VmHWM`` covers the whole process)."""
    import torch

    run = _Variant(model_name, variant)
    torch.manual_seed(0)
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, 1000, (batch,))
    # RSS of the runtime + model + data before any training step: subtracted to get the
    # memory that training itself adds (activations, gradients, optimizer state).
    base_kb = _peak_rss_kb()
    times = [run.step(x, y)[0] for _ in range(steps)]
    rss_kb = _peak_rss_kb()
    return {"peak_rss_bytes": rss_kb * 1024, "pre_train_rss_bytes": base_kb * 1024, "step_s": times}


def _subprocess(args, *worker_args: str) -> dict:
    cmd = [sys.executable, __file__, "--size", str(args.size), "--malloc", args.malloc]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    out = subprocess.run([*cmd, *worker_args], check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _bound(min_bytes: int | None, bw: float, seq_step: float) -> dict | None:
    if min_bytes is None:
        return None
    agg_s = min_bytes / bw / 1e9
    return {
        "agg_min_gb": round(min_bytes / 1e9, 3),
        "bandwidth_gbs": round(bw, 2),
        "agg_bound_s": round(agg_s, 4),
        "time_ratio_floor": round((seq_step + agg_s) / seq_step, 3),
    }


def _spread(values: list[float]) -> dict:
    return {
        "median": round(statistics.median(values), 3),
        "min": round(min(values), 3),
        "max": round(max(values), 3),
        "all": [round(v, 3) for v in values],
    }


def run_steps(args) -> dict:
    results = []
    variants = list(args.variants)
    for spec in args.models:
        name, batch = spec.split(":")
        timing = [
            _subprocess(args, "--timing-worker", name, batch, str(args.rounds), ",".join(variants))
            for _ in range(args.timing_processes)
        ]
        wall = {v: [t for tw in timing for t in tw["wall_s"][v]] for v in variants}
        cpu = {v: [t for tw in timing for t in tw["cpu_s"][v]] for v in variants}
        print(f"{name} b{batch}: timing done, load {[tw['loadavg'] for tw in timing]}", flush=True)
        mem: dict[str, list[dict]] = {v: [] for v in variants}
        for _ in range(args.memory_repeats):
            for v in variants:
                mem[v].append(_subprocess(args, "--memory-worker", name, v, batch, str(args.memory_steps)))
        print(f"{name} b{batch}: memory done", flush=True)
        peak = {v: min(r["peak_rss_bytes"] for r in mem[v]) for v in variants}
        bw = max(tw["bandwidth_gbs"] for tw in timing)
        seq_step = statistics.median(wall["sequential"])
        train = {v: min(r["peak_rss_bytes"] - r["pre_train_rss_bytes"] for r in mem[v]) for v in variants}
        seq = "sequential"
        for v in variants:
            results.append(
                {
                    "model": name,
                    "batch": int(batch),
                    "input": args.size,
                    "variant": v,
                    "step_s_best": round(min(wall[v]), 4),
                    "step_s_median": round(statistics.median(wall[v]), 4),
                    "cpu_s_best": round(min(cpu[v]), 4),
                    # minor page faults per step (median over rounds and processes): freed maps faulted in again
                    "page_faults": int(statistics.median([f for tw in timing for f in tw["page_faults"][v]])),
                    # each round's step against the sequential step of the same round (same process)
                    "time_ratio": _spread([a / b for a, b in zip(wall[v], wall[seq])]),
                    "cpu_ratio": _spread([a / b for a, b in zip(cpu[v], cpu[seq])]),
                    "time_ratio_of_best": round(min(wall[v]) / min(wall[seq]), 3),
                    "peak_rss_gib": round(peak[v] / 2**30, 3),
                    "memory_ratio": round(peak[v] / peak[seq], 3),
                    "memory_ratio_per_repeat": [
                        round(a["peak_rss_bytes"] / b["peak_rss_bytes"], 3) for a, b in zip(mem[v], mem[seq])
                    ],
                    "train_rss_gib": round(train[v] / 2**30, 3),
                    # None when the sequential process never grew past its pre-training peak (a
                    # transient at start-up can set the peak): then only memory_ratio is meaningful
                    "train_memory_ratio": round(train[v] / train[seq], 3) if train[seq] > 0 else None,
                    "split_s": {k: round(t, 4) for k, t in timing[0]["split"][v].items()},
                    # the aggregation's least traffic at the measured bandwidth, added to the sequential step:
                    # the best this variant's design can do on this machine
                    "bound": _bound(timing[0]["agg_min_bytes"].get(v), bw, seq_step),
                    "raw_memory": mem[v],
                }
            )
    return {
        "notes": "Time: one process per model runs every variant, one training step each per round with the order "
        "rotated every round, after one warm-up step each; time_ratio / cpu_ratio: each round's step (wall / process "
        "CPU time, all threads) divided by the sequential step of the same round: median, min, max over rounds and "
        "processes. A busy machine inflates wall time far more than CPU time. Memory: fresh process per variant, "
        "peak RSS (VmHWM) after memory_steps steps, best of memory_repeats; memory_ratio on whole-process peak "
        "RSS, train_memory_ratio on peak RSS minus the RSS before the first step (runtime, model, batch). split_s: "
        "one instrumented step after the timed rounds (first timing process): forward, backward, optimizer wall "
        "time, and the aggregation's forward sum, recomputation in backward and backward (dot products, slot "
        "updates, the taps' sums; wall and process CPU time). bound: the aggregation's least memory traffic per "
        "step (forward K reads + 1 write per node, the same again where recomputed, backward K + 2: the taps read each "
        "edge's g once and their node's output once, for the sums and the edge weights' dot products) at the "
        "bandwidth of torch.add(a, b, out=c) over 3 x 256 MiB measured in the timing process; time_ratio_floor = "
        "(median sequential step + that time) / median sequential step. The floor counts what the operation needs "
        "under the variant's recomputation policy, whatever its kernels move.",
        "rounds": args.rounds,
        "timing_processes": args.timing_processes,
        "memory_repeats": args.memory_repeats,
        "memory_steps": args.memory_steps,
        "results": results,
    }


def print_steps(doc: dict) -> None:
    print(
        f"\n{'model':<10} {'variant':<20} {'step s':>7} {'x time (median, min..max)':>27} {'x cpu':>6} "
        f"{'x mem':>6} {'x train mem':>12} {'agg f/r/b cpu s':>18} {'floor':>6} {'faults':>7}"
    )
    for r in doc["results"]:
        s, t = r["split_s"], r["time_ratio"]
        spread = f"{t['median']:.3f} ({t['min']:.3f}..{t['max']:.3f})"
        print(
            f"{r['model']:<10} {r['variant']:<20} {r['step_s_best']:>7.3f} "
            f"{spread:>27} {r['cpu_ratio']['median']:>6.3f} "
            f"{r['memory_ratio']:>6.3f} {r['train_memory_ratio'] or float('nan'):>12.3f} "
            f"{s['agg_forward_cpu_s']:>6.3f}/{s['agg_recompute_cpu_s']:.3f}/{s['agg_backward_cpu_s']:.3f} "
            f"{(r.get('bound') or {}).get('time_ratio_floor', float('nan')):>6.3f} {r.get('page_faults', -1):>7d}"
        )


# ----------------------------------------------------------------------------------------- micro


def run_micro(args) -> dict:
    import torch

    from dynwire.layers import aggregation as agg

    torch.manual_seed(0)
    n = args.bound_mib * 2**20 // 4
    a, b, c = torch.randn(n), torch.randn(n), torch.empty(n)
    flush = torch.ones(n)
    threads0 = torch.get_num_threads()
    rows = []
    bound = {}
    for threads in args.micro_threads:
        torch.set_num_threads(threads)
        # one thread: CPU time of this thread (what the call costs, whatever else the machine runs);
        # more: wall time (a busy machine shows up here; hence best of the rounds as well)
        clock = time.thread_time if threads == 1 else time.perf_counter

        def timed(fn, clock=clock) -> float:
            flush.sum()  # evict the operands of the previous call from every cache level
            t0 = clock()
            fn()
            return clock() - t0

        bounds = []
        trows = []
        for label, shape, ks in MICRO_SHAPES:
            for k in ks:
                if args.micro_ks and k not in args.micro_ks:
                    continue
                xs = [torch.randn(shape) for _ in range(k)]
                w = torch.rand(shape[0], k) + 0.1  # no closed edges: every input is read
                g = torch.randn(shape)
                slots = []
                for _ in range(k):
                    slot = agg.GradSlot()
                    slot.grad, slot.task = torch.randn(shape), torch._C._current_graph_task_id()
                    slots.append(slot)
                gs = [torch.randn(shape) for _ in range(k)]  # the gradients of the node's K consumers
                assert agg._fused_backend([g, *xs]) is not None, f"{label}: the fused kernels do not apply"

                def fused_backward(w=w, g=g, xs=xs, gs=gs, k=k):
                    agg._fused_backward_tapped(w, g, xs, [agg.GradSlot() for _ in range(k)], True)  # dots, defer
                    out = agg.GradSlot()
                    for j in range(k):
                        out.defer(gs[j], w[:, j])
                    return out.take()  # the node output's gradient from its K consumers, one pass

                fns = {
                    ("plain", "forward"): partial(agg._aggregate_plain, w, xs),
                    ("fused", "forward"): partial(agg._aggregate_impl, w, xs),
                    ("plain", "backward"): partial(agg._plain_backward_tapped, w, g, xs, slots, True),
                    ("fused", "backward"): fused_backward,
                }
                for fn in fns.values():
                    fn()
                times: dict = {key: [] for key in fns}
                for _ in range(args.micro_rounds):
                    bounds.append(3 * n * 4 / timed(partial(torch.add, a, b, out=c)) / 1e9)
                    for key, fn in fns.items():
                        times[key].append(timed(fn))
                tensor_bytes = xs[0].numel() * xs[0].element_size()
                ideal = {"forward": (k + 1) * tensor_bytes, "backward": (2 * k + 2) * tensor_bytes}
                for (path, phase), ts in times.items():
                    row = {
                        "threads": threads,
                        "node": label,
                        "shape": list(shape),
                        "k": k,
                        "phase": phase,
                        "path": path,
                        "ms_best": round(min(ts) * 1e3, 3),
                        "ms_median": round(statistics.median(ts) * 1e3, 3),
                        "ideal_mb": round(ideal[phase] / 2**20, 1),
                        "gbs_best": round(ideal[phase] / min(ts) / 1e9, 2),
                        "gbs_median": round(ideal[phase] / statistics.median(ts) / 1e9, 2),
                    }
                    if path == "fused":
                        plain = times[("plain", phase)]
                        row["speedup_vs_plain"] = round(statistics.median(p / f for p, f in zip(plain, ts)), 2)
                    trows.append(row)
                print(f"{threads} thread(s) {label} k={k}: done", flush=True)
        bound[threads] = {
            "clock": "thread CPU time" if threads == 1 else "wall",
            "gbs_best": round(max(bounds), 2),
            "gbs_median": round(statistics.median(bounds), 2),
            "gbs_worst": round(min(bounds), 2),
        }
        for r in trows:
            r["of_bound"] = round(r["gbs_best"] / max(bounds), 2)
        rows += trows
    torch.set_num_threads(threads0)
    return {
        "notes": "Per node: forward = the K-input weighted sum (also what the recomputation in backward runs); "
        "backward = grad_w dot products of K input edges + the output's gradient from K consumers (plain: "
        "accumulation into K slots that already hold a gradient; fused: dots, then one pull sum of K deferred "
        "terms). ideal_mb: the least traffic (forward K reads + 1 write, backward 2K + 2 passes); gbs = ideal bytes / time, so a path "
        "that moves more than the minimum shows a lower figure; of_bound = gbs_best / best bound of the same "
        "thread count; speedup_vs_plain: median over rounds of plain time / fused time. Caches flushed (a read of "
        "a bound-sized buffer) before every call; rounds interleave the paths and the bound. One thread is timed "
        "with the thread's CPU time, more threads with wall time.",
        "bound_op": f"torch.add(a, b, out=c), 3 x {args.bound_mib} MiB float32",
        "bound": bound,
        "rows": rows,
    }


def print_micro(doc: dict) -> None:
    for threads, bd in doc["bound"].items():
        print(
            f"\n{threads} thread(s), {bd['clock']}: bandwidth bound {bd['gbs_best']:.2f} GB/s best, "
            f"{bd['gbs_median']:.2f} median ({doc['bound_op']})"
        )
        print(
            f"{'node':<22} {'k':>3} {'phase':<9} {'path':<6} {'ms best':>8} {'ms med':>8} {'GB/s':>6} "
            f"{'of bound':>9} {'speedup':>8}"
        )
        for r in doc["rows"]:
            if str(r["threads"]) != str(threads):
                continue
            sp = r.get("speedup_vs_plain")
            print(
                f"{r['node']:<22} {r['k']:>3} {r['phase']:<9} {r['path']:<6} {r['ms_best']:>8.2f} "
                f"{r['ms_median']:>8.2f} {r['gbs_best']:>6.2f} {r['of_bound']:>9.2f} "
                f"{'' if sp is None else f'{sp:.2f}x':>8}"
            )


# ----------------------------------------------------------------------------------------- stage


def run_stage(args) -> dict:
    """The aggregation's whole backward through one complete-DAG stage (ResNet-101's layer3 at batch
    4: 23 blocks and the output node, 276 edges), block backward left out: for node ``j = N..1``
    the dot products of its ``j`` input edges and its inputs' gradient terms, then node ``j - 1``'s
    tap takes its output gradient, which is the next ``g``. Paths: ``plain`` (one edge at a time into
    the slots), ``push`` (fused, ``slot += w * g`` per edge in the dots pass) and ``pull`` (fused, as
    shipped: dots, then each tap sums its deferred terms in one pass). Every tensor is allocated
    inside the timed region, as in a training step."""
    import torch

    from dynwire.layers import aggregation as agg

    n, shape = 23, (4, 1024, 14, 14)
    torch.manual_seed(0)
    ys = [torch.randn(shape) for _ in range(n)]
    g0 = torch.randn(shape)
    w = (torch.rand(shape[0], n + 1, n + 1) + 0.1) / 6  # keeps the chained sums of the order of g0
    with _push_backward():
        push = agg._fused_backward_tapped
    paths = {"plain": agg._plain_backward_tapped, "push": push, "pull": agg._fused_backward_tapped}

    def stage_backward(fn):
        slots = [agg.GradSlot() for _ in range(n)]
        g = g0
        for j in range(n, 0, -1):
            fn(w[:, j, :j].contiguous(), g, ys[:j], slots[:j], True)
            g = slots[j - 1].take(None)
        return g

    ref = stage_backward(paths["plain"])
    for name, fn in paths.items():  # the paths agree before they are timed
        err = ((stage_backward(fn) - ref).abs().max() / ref.abs().max()).item()
        if err > 1e-5:
            raise RuntimeError(f"stage backward: {name} differs from plain by {err:.2e}")
    threads0 = torch.get_num_threads()
    tensor_bytes = g0.numel() * g0.element_size()
    ideal = sum(2 * j + 2 for j in range(1, n + 1)) * tensor_bytes
    rows = []
    for threads in args.micro_threads:
        torch.set_num_threads(threads)
        clock = time.thread_time if threads == 1 else time.perf_counter
        times: dict[str, list[float]] = {k: [] for k in paths}
        names = list(paths)
        for r in range(args.micro_rounds):
            for name in names[r % 3 :] + names[: r % 3]:
                t0 = clock()
                stage_backward(paths[name])
                times[name].append(clock() - t0)
        for name, ts in times.items():
            rows.append(
                {
                    "threads": threads,
                    "path": name,
                    "ms_best": round(min(ts) * 1e3, 2),
                    "ms_median": round(statistics.median(ts) * 1e3, 2),
                    "gbs_best": round(ideal / min(ts) / 1e9, 2),
                    "speedup_vs_push": round(statistics.median(p / t for p, t in zip(times["push"], ts)), 3),
                }
            )
        print(f"{threads} thread(s) stage backward: done", flush=True)
    torch.set_num_threads(threads0)
    return {
        "node": "resnet101.layer3 b4, 23 blocks + output node (276 edges)",
        "ideal_mb": round(ideal / 2**20, 1),
        "notes": "One stage's aggregation backward (dots and gradient terms of every edge, the taps' sums), block "
        "backward left out; rounds rotate the paths; one thread timed with thread CPU time, more with wall time. "
        "speedup_vs_push: median over rounds of push time / this path's time. ideal_mb: sum over nodes of 2K + 2 "
        "passes; gbs_best = ideal / best time.",
        "rows": rows,
    }


def print_stage(doc: dict) -> None:
    print(f"\nstage backward, {doc['node']}: least traffic {doc['ideal_mb']} MiB")
    for r in doc["rows"]:
        print(
            f"{r['threads']} thread(s) {r['path']:<6} {r['ms_best']:>8.1f} ms best {r['ms_median']:>8.1f} median "
            f"{r['gbs_best']:>6.2f} GB/s  {r['speedup_vs_push']:.3f}x vs push"
        )


# ----------------------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", nargs="+", default=["micro", "stage", "steps"], choices=["micro", "stage", "steps"])
    ap.add_argument("--models", nargs="+", default=["resnet50:8", "resnet101:4"], help="name:batch pairs")
    ap.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), choices=VARIANTS)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--threads", type=int, help="torch threads of the step workers (default: torch's)")
    ap.add_argument(
        "--malloc",
        choices=["kept", "default"],
        default="kept",
        help="glibc heap of the step workers: 'kept' = dynwire.keep_freed_memory() (what `dynwire train` uses), "
        "'default' = glibc's own",
    )
    ap.add_argument("--rounds", type=int, default=11, help="timed steps per variant (one per round)")
    ap.add_argument("--timing-processes", type=int, default=1, help="timing processes per model (rounds each)")
    ap.add_argument("--memory-repeats", type=int, default=2, help="fresh processes per variant for peak RSS")
    ap.add_argument("--memory-steps", type=int, default=2, help="training steps of a memory process")
    ap.add_argument("--micro-rounds", type=int, default=7)
    ap.add_argument("--micro-ks", type=int, nargs="*", help="only these k (default: all of MICRO_SHAPES)")
    ap.add_argument("--micro-threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--bound-mib", type=int, default=256, help="size of each tensor of the bandwidth probe")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "train_overhead.json"))
    ap.add_argument("--timing-worker", nargs=4, help=argparse.SUPPRESS)
    ap.add_argument("--memory-worker", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.timing_worker or args.memory_worker:
        import torch

        if args.malloc == "kept":
            import dynwire

            if not dynwire.keep_freed_memory():
                raise SystemExit("--malloc kept: glibc mallopt is unavailable here; use --malloc default")

        if args.threads:
            torch.set_num_threads(args.threads)
        if args.timing_worker:
            m, b, r, vs = args.timing_worker
            print(json.dumps(timing_worker(m, vs.split(","), int(b), args.size, int(r))))
        else:
            m, v, b, s = args.memory_worker
            print(json.dumps(memory_worker(m, v, int(b), args.size, int(s))))
        return
    if "sequential" not in args.variants:
        args.variants.insert(0, "sequential")

    import torch

    doc: dict = {}
    if os.path.exists(args.out):
        with open(args.out) as f:
            old = json.load(f)
        doc = {
            k: v for k, v in old.items() if k in ("micro", "stage") or k.startswith("steps_")
        }  # parts not rerun are kept
    doc["goal"] = "dynamic <= 1.05x time and <= 1.10x peak memory of sequential"
    doc["machine"] = {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "sched_autogroup": _autogroup(),
        **cpu_info(),
    }
    command = " ".join([os.path.relpath(sys.executable), *sys.argv])
    env = {k: v for k, v in os.environ.items() if k.startswith(("OMP_", "MKL_", "KMP_", "GOMP_", "MALLOC_"))}
    # step results are kept per thread count: "steps_t2" (torch's default here), "steps_t1", ...
    # and per input size when it is not 224 ("steps_t1_s28": the small models on Fashion-MNIST's size)
    steps_key = f"steps_t{args.threads or torch.get_num_threads()}" + (f"_s{args.size}" if args.size != 224 else "")
    parts = (("micro", run_micro, print_micro), ("stage", run_stage, print_stage), (steps_key, run_steps, print_steps))
    for part, run, show in parts:
        if part.split("_")[0] not in args.parts:
            continue
        load0 = _loadavg()
        start = time.strftime("%Y-%m-%d %H:%M:%S")
        result = run(args)
        doc[part] = {
            "command": command,
            "date": start,
            "malloc": args.malloc,
            "env": env,
            "loadavg_start_end": [load0, _loadavg()],
            "cpu": cpu_info(),  # per part: the parts not rerun are kept, maybe from another machine
            **result,
        }
        show(doc[part])
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(doc, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

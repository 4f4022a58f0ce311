"""Training-step time and peak memory of DG-Net (``dynamic``) vs the static backbone, and a
micro-benchmark of one node's aggregation against the machine's memory bandwidth.

**Steps** (``--parts steps``). Each (model, variant) runs in its own process so that peak RSS
(``ru_maxrss``) belongs to that variant alone; variants are interleaved round by round and
repeated. Per process the best of ``--steps`` timed steps is kept; a variant's step time is the
best over its processes, and the spread is reported as the ratio to ``sequential`` of each
round (the same round's processes ran back to back, under the same machine load). One extra
instrumented step per process splits the time into forward, backward and optimizer, and the
aggregation's share of each (forward sum, recomputation in backward, backward into the slots).

Variants: ``sequential`` (torchvision's network), ``dynamic`` (DG-Net as shipped: fused
aggregation kernels, recomputed node inputs), ``dynamic-plain`` (the same with the plain, one
edge at a time kernels: what shipped before the fused ones), ``dynamic-maxin8`` (fused kernels,
only node inputs with at most 8 predecessors recomputed: ``recompute_max_inputs=8``),
``dynamic-norecompute`` (fused kernels, node inputs stored) and ``dynamic-stack`` (naive
``torch.stack`` aggregation).

**Micro** (``--parts micro``). One graph node of ResNet-101's layer3 at batch 4 (and of
ResNet-50's stages at batch 8): ``K`` predecessors of shape ``(B, C, H, W)``, forward sum (which
is also the recomputation in backward) and backward into ``K`` gradient slots that already hold
a gradient (``grad_w`` dot products plus ``slot_k += w_k * g``), plain and fused kernels,
caches flushed before each call. Each is compared with the least memory traffic the operation
needs (forward: ``K`` reads + 1 write; backward: ``g`` once, ``x_k`` once, each slot read and
written) moved at the bandwidth of a large out-of-cache ``torch.add(a, b, out=c)`` measured in
the same rounds: ``of_bound`` = that time / the measured time.

    python bench/train_overhead.py                       # micro, then resnet50 b8 + resnet101 b4, 224x224
    python bench/train_overhead.py --parts micro
    python bench/train_overhead.py --parts steps --models resnet18:8 --steps 2 --out /tmp/x.json

A run keeps the parts of an existing ``--out`` file that it does not redo; step results are
stored per thread count (``steps_t2``, ``steps_t1``).
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

VARIANTS = ("sequential", "dynamic", "dynamic-plain", "dynamic-maxin8", "dynamic-norecompute", "dynamic-stack")
DEFAULT_VARIANTS = ("sequential", "dynamic", "dynamic-plain")

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
    """Accumulates wall time of the aggregation's entry points during one instrumented step."""

    def __init__(self) -> None:
        self.t = {"agg_forward_s": 0.0, "agg_recompute_s": 0.0, "agg_backward_s": 0.0}
        self.phase = "forward"

    def wrap(self, fn, key=None):
        def wrapped(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                k = key or ("agg_forward_s" if self.phase == "forward" else "agg_recompute_s")
                self.t[k] += time.perf_counter() - t0

        return wrapped


def _instrumented_step(model, opt, x, y, dynamic: bool) -> dict:
    import torch

    from dynwire.layers import aggregation as agg

    timer = _Timer()
    saved = (agg._aggregate_impl, agg._AggregateTapped.backward)
    if dynamic:
        agg._aggregate_impl = timer.wrap(saved[0])
        agg._AggregateTapped.backward = staticmethod(timer.wrap(saved[1], "agg_backward_s"))
    try:
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        t1 = time.perf_counter()
        timer.phase = "backward"
        loss.backward()
        t2 = time.perf_counter()
        opt.step()
        t3 = time.perf_counter()
    finally:
        agg._aggregate_impl = saved[0]
        agg._AggregateTapped.backward = staticmethod(saved[1])
    return {"forward_s": t1 - t0, "backward_s": t2 - t1, "optimizer_s": t3 - t2, **timer.t}


def worker(model_name: str, variant: str, batch: int, size: int, steps: int, threads: int | None) -> dict:
    import contextlib

    import torch

    if threads:
        torch.set_num_threads(threads)

    import dynwire
    from dynwire.graph import stage as stage_mod
    from dynwire.layers.aggregation import fused_aggregation

    load0 = _loadavg()
    torch.manual_seed(0)
    if variant == "dynamic-stack":

        def naive(w, xs, slots=None):
            s = torch.stack(list(xs), 1)
            return (s * w.to(s.dtype).view(*w.shape, *([1] * (s.ndim - 2)))).sum(1)

        stage_mod.aggregate = naive
    wiring = "sequential" if variant == "sequential" else "dynamic"
    kw = {"recompute_max_inputs": 8} if variant == "dynamic-maxin8" else {}
    recompute = variant in ("dynamic", "dynamic-plain", "dynamic-maxin8")
    model = dynwire.create_model(model_name, wiring=wiring, recompute=recompute, **kw)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, 1000, (batch,))
    kernels = fused_aggregation("off") if variant == "dynamic-plain" else contextlib.nullcontext()
    # RSS of the runtime + model + data before any training step: subtracted to get the
    # memory that training itself adds (activations, gradients, optimizer state).
    base_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times, cpu = [], []
    with kernels:
        for i in range(steps + 1):
            t0, c0 = time.perf_counter(), time.process_time()
            opt.zero_grad(set_to_none=True)
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            if i > 0:  # the first step warms up allocators and kernels
                times.append(time.perf_counter() - t0)
                cpu.append(time.process_time() - c0)
        rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        split = _instrumented_step(
            model, opt, x, y, dynamic=variant.startswith("dynamic") and variant != "dynamic-stack"
        )
    return {
        "step_s": min(times),
        "step_s_all": times,
        "cpu_s": min(cpu),
        "cpu_s_all": cpu,
        "peak_rss_bytes": rss_kb * 1024,
        "pre_train_rss_bytes": base_kb * 1024,
        "split": split,
        "loadavg": [load0, _loadavg()],
    }


def run_steps(args) -> dict:
    results = []
    for spec in args.models:
        name, batch = spec.split(":")
        runs: dict[str, list[dict]] = {v: [] for v in args.variants}
        for rep in range(args.repeats):
            for v in args.variants:
                cmd = [sys.executable, __file__, "--size", str(args.size), "--worker", name, v, batch, str(args.steps)]
                if args.threads:
                    cmd += ["--threads", str(args.threads)]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
                r = json.loads(out.strip().splitlines()[-1])
                runs[v].append(r)
                print(
                    f"{name} b{batch} {v:<20} round {rep}: step {r['step_s']:.3f}s  "
                    f"peak RSS {r['peak_rss_bytes'] / 2**30:.2f} GiB  load {r['loadavg'][0][0]:.1f}",
                    flush=True,
                )
        base = runs["sequential"]
        base_t = min(r["step_s"] for r in base)
        base_m = min(r["peak_rss_bytes"] for r in base)
        base_train_mem = min(r["peak_rss_bytes"] - r["pre_train_rss_bytes"] for r in base)
        for v in args.variants:
            t = min(r["step_s"] for r in runs[v])
            mem = min(r["peak_rss_bytes"] for r in runs[v])
            train_mem = min(r["peak_rss_bytes"] - r["pre_train_rss_bytes"] for r in runs[v])
            per_round = sorted(r["step_s"] / b["step_s"] for r, b in zip(runs[v], base))
            cpu_t = min(r["cpu_s"] for r in runs[v])
            base_cpu = min(r["cpu_s"] for r in base)
            mem_round = sorted(r["peak_rss_bytes"] / b["peak_rss_bytes"] for r, b in zip(runs[v], base))
            best_split = min(runs[v], key=lambda r: r["split"]["forward_s"] + r["split"]["backward_s"])["split"]
            results.append(
                {
                    "model": name,
                    "batch": int(batch),
                    "input": args.size,
                    "variant": v,
                    "step_s": round(t, 4),
                    "peak_rss_gib": round(mem / 2**30, 3),
                    "time_ratio": round(t / base_t, 3),
                    "time_ratio_per_round": [round(q, 3) for q in per_round],
                    "time_ratio_median_round": round(statistics.median(per_round), 3),
                    "cpu_s": round(cpu_t, 4),
                    "cpu_ratio": round(cpu_t / base_cpu, 3),
                    "memory_ratio": round(mem / base_m, 3),
                    "memory_ratio_per_round": [round(q, 3) for q in mem_round],
                    "train_rss_gib": round(train_mem / 2**30, 3),
                    "train_memory_ratio": round(train_mem / base_train_mem, 3),
                    "split_s": {k: round(s, 4) for k, s in best_split.items()},
                    "raw": runs[v],
                }
            )
    return {
        "notes": "step_s: best timed step (wall) over all processes; time_ratio: best vs best of sequential; "
        "cpu_s / cpu_ratio: the same with the process's CPU time (both threads; a busy machine inflates wall time "
        "far more than CPU time); "
        "time_ratio_per_round: each round's dynamic process vs the sequential process of the same round "
        "(sorted; the spread); memory_ratio: whole-process peak RSS; train_memory_ratio: peak RSS minus the "
        "RSS before the first step (runtime, model and batch), i.e. what training adds. split_s: one extra "
        "instrumented step (the fastest of the processes): forward, backward, optimizer, and within them the "
        "aggregation's forward sum, its recomputation in backward and its backward into the slots.",
        "results": results,
    }


def print_steps(doc: dict) -> None:
    print(
        f"\n{'model':<10} {'variant':<20} {'step s':>7} {'x time':>7} {'rounds (min..max)':>18} {'x cpu':>6} {'x mem':>6} "
        f"{'x train mem':>12} {'fwd s':>6} {'bwd s':>6} {'agg f/r/b s':>16}"
    )
    for r in doc["results"]:
        s = r["split_s"]
        pr = r["time_ratio_per_round"]
        print(
            f"{r['model']:<10} {r['variant']:<20} {r['step_s']:>7.3f} {r['time_ratio']:>7.3f} "
            f"{f'{pr[0]:.3f}..{pr[-1]:.3f}':>18} {r['cpu_ratio']:>6.3f} {r['memory_ratio']:>6.3f} "
            f"{r['train_memory_ratio']:>12.3f} "
            f"{s['forward_s']:>6.3f} {s['backward_s']:>6.3f} "
            f"{s['agg_forward_s']:>5.3f}/{s['agg_recompute_s']:.3f}/{s['agg_backward_s']:.3f}"
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
                assert agg._fused_backend([g, *xs]) is not None, f"{label}: the fused kernels do not apply"
                fns = {
                    ("plain", "forward"): partial(agg._aggregate_plain, w, xs),
                    ("fused", "forward"): partial(agg._aggregate_impl, w, xs),
                    ("plain", "backward"): partial(agg._plain_backward_tapped, w, g, xs, slots, True),
                    ("fused", "backward"): partial(agg._fused_backward_tapped, w, g, xs, slots, True),
                }
                for fn in fns.values():
                    fn()
                times: dict = {key: [] for key in fns}
                for _ in range(args.micro_rounds):
                    bounds.append(3 * n * 4 / timed(partial(torch.add, a, b, out=c)) / 1e9)
                    for key, fn in fns.items():
                        times[key].append(timed(fn))
                tensor_bytes = xs[0].numel() * xs[0].element_size()
                ideal = {"forward": (k + 1) * tensor_bytes, "backward": (3 * k + 1) * tensor_bytes}
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
        "backward = grad_w dot products + accumulation into K slots that already hold a gradient. ideal_mb: the "
        "least traffic (forward K reads + 1 write, backward 1 + 3K passes); gbs = ideal bytes / time, so a path "
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


# ----------------------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", nargs="+", default=["micro", "steps"], choices=["micro", "steps"])
    ap.add_argument("--models", nargs="+", default=["resnet50:8", "resnet101:4"], help="name:batch pairs")
    ap.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), choices=VARIANTS)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--threads", type=int, help="torch threads of the step workers (default: torch's)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per process (after 1 warm-up step)")
    ap.add_argument("--repeats", type=int, default=3, help="rounds: processes per variant, interleaved")
    ap.add_argument("--micro-rounds", type=int, default=7)
    ap.add_argument("--micro-ks", type=int, nargs="*", help="only these k (default: all of MICRO_SHAPES)")
    ap.add_argument("--micro-threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--bound-mib", type=int, default=256, help="size of each tensor of the bandwidth probe")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "train_overhead.json"))
    ap.add_argument("--worker", nargs=4, metavar=("MODEL", "VARIANT", "BATCH", "STEPS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        m, v, b, s = args.worker
        print(json.dumps(worker(m, v, int(b), args.size, int(s), args.threads)))
        return
    if "sequential" not in args.variants:
        args.variants.insert(0, "sequential")

    import torch

    doc: dict = {}
    if os.path.exists(args.out):
        with open(args.out) as f:
            old = json.load(f)
        doc = {k: v for k, v in old.items() if k == "micro" or k.startswith("steps_")}  # parts not rerun are kept
    doc["goal"] = "dynamic <= 1.05x time and <= 1.10x peak memory of sequential"
    doc["machine"] = {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "sched_autogroup": _autogroup(),
    }
    command = " ".join([os.path.relpath(sys.executable), *sys.argv])
    env = {k: v for k, v in os.environ.items() if k.startswith(("OMP_", "MKL_", "KMP_", "GOMP_", "MALLOC_"))}
    # step results are kept per thread count: "steps_t2" (torch's default here), "steps_t1", ...
    steps_key = f"steps_t{args.threads or torch.get_num_threads()}"
    for part, run, show in (("micro", run_micro, print_micro), (steps_key, run_steps, print_steps)):
        if part.split("_")[0] not in args.parts:
            continue
        load0 = _loadavg()
        start = time.strftime("%Y-%m-%d %H:%M:%S")
        result = run(args)
        doc[part] = {"command": command, "date": start, "env": env, "loadavg_start_end": [load0, _loadavg()], **result}
        show(doc[part])
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(doc, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

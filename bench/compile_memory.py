"""Peak memory and time of one training step: eager vs ``torch.compile(fullgraph=True)``.

Under ``torch.compile`` a graph stage turns its memory mechanics off (gradient taps that
accumulate node-output gradients in place, and recomputation of aggregated node inputs in
backward): the compiler plans memory itself. This measures what that costs, per variant in its
own process:

* ``sequential`` / ``sequential-compiled``: the plain backbone, the floor;
* ``dynamic``: DG-Net eager as shipped (taps + recomputation on);
* ``dynamic-nomech``: eager with both mechanics off (what compile turns off, without compile);
* ``dynamic-compiled``: ``torch.compile(model, fullgraph=True)`` (inductor).

Memory: peak RSS during the measured steps minus the RSS just before them, i.e. what a training
step adds (activations, gradients; the optimizer state exists already). The peak is reset after
the warm-up steps (``/proc/self/clear_refs``), so compilation's own memory is not counted, and
workers run with glibc's mmap threshold fixed at 64 KiB so freed tensors go back to the system
and the RSS before a step does not keep the previous step's activations. Linux only.

    python bench/compile_memory.py                                  # resnet50, batch 8, 224x224
    python bench/compile_memory.py --model cifar_resnet20 --batch 8 --size 32 --out /tmp/x.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

VARIANTS = ("sequential", "dynamic", "dynamic-nomech", "sequential-compiled", "dynamic-compiled")


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM (peak RSS) to the current RSS


def worker(model_name: str, variant: str, batch: int, size: int, steps: int, warmup: int) -> dict:
    import torch

    import dynwire

    torch.manual_seed(0)
    wiring = "sequential" if variant.startswith("sequential") else "dynamic"
    mech = variant != "dynamic-nomech"
    model = dynwire.create_model(model_name, wiring=wiring, recompute=mech)
    for _, stage in model.graph_stages():
        stage.fused_grad = mech
    model.train()
    c = dynwire.get_model_cfg(model_name).input_size[0]
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    run = torch.compile(model, fullgraph=True) if variant.endswith("compiled") else model
    x = torch.randn(batch, c, size, size)
    y = torch.randint(0, max(model.num_classes, 1), (batch,))

    def step() -> float:
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(run(x), y)
        loss.backward()
        opt.step()
        return time.perf_counter() - t0

    first = [step() for _ in range(warmup)]  # compiles (compiled variants), creates momentum buffers
    before_kb = _status_kb("VmRSS")
    _reset_peak()
    times = [step() for _ in range(steps)]
    peak_kb = _status_kb("VmHWM")
    return {
        "step_s": min(times),
        "step_s_all": times,
        "first_step_s": first[0],
        "step_peak_rss_bytes": peak_kb * 1024,
        "pre_step_rss_bytes": before_kb * 1024,
        "step_added_bytes": (peak_kb - before_kb) * 1024,
        "process_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--steps", type=int, default=2, help="measured steps per process")
    ap.add_argument("--warmup", type=int, default=2, help="steps before measuring (the first one compiles)")
    ap.add_argument("--repeats", type=int, default=1, help="processes per variant, interleaved")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: steady on a shared machine)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "compile_memory.json"))
    ap.add_argument("--worker", metavar="VARIANT", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        import torch

        torch.set_num_threads(args.threads)
        r = worker(args.model, args.worker, args.batch, args.size, args.steps, args.warmup)
        print(json.dumps(r))
        return

    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}
    env["PYTHONPATH"] = os.pathsep.join(
        [os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"), env.get("PYTHONPATH", "")]
    )
    runs: dict[str, list[dict]] = {v: [] for v in args.variants}
    common = ["--model", args.model, "--batch", str(args.batch), "--size", str(args.size)]
    common += ["--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads)]
    for rep in range(args.repeats):
        for v in args.variants:
            cmd = [sys.executable, os.path.abspath(__file__), *common, "--worker", v]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
            r = json.loads(out.strip().splitlines()[-1])
            runs[v].append(r)
            print(
                f"{args.model} b{args.batch} {args.size}px {v:<20} rep {rep}: step {r['step_s']:.3f}s "
                f"(first {r['first_step_s']:.1f}s)  step adds {r['step_added_bytes'] / 2**20:.0f} MiB",
                flush=True,
            )
    results = []
    for v in args.variants:
        added = min(r["step_added_bytes"] for r in runs[v])
        results.append(
            {
                "variant": v,
                "step_s": round(min(r["step_s"] for r in runs[v]), 4),
                "first_step_s": round(min(r["first_step_s"] for r in runs[v]), 2),
                "step_added_mib": round(added / 2**20, 1),
                "step_peak_rss_mib": round(min(r["step_peak_rss_bytes"] for r in runs[v]) / 2**20, 1),
                "process_peak_rss_mib": round(min(r["process_peak_rss_bytes"] for r in runs[v]) / 2**20, 1),
                "raw": runs[v],
            }
        )
    ref = {r["variant"]: r for r in results}
    for r in results:
        for base in ("sequential", "dynamic"):
            if base in ref and ref[base]["step_added_mib"] > 0:
                r[f"memory_vs_{base}"] = round(r["step_added_mib"] / ref[base]["step_added_mib"], 3)
                r[f"time_vs_{base}"] = round(r["step_s"] / ref[base]["step_s"], 3)
    import torch

    doc = {
        "command": " ".join([os.path.relpath(sys.executable), *sys.argv]),
        "setup": {"model": args.model, "batch": args.batch, "input": args.size, "threads": args.threads},
        "notes": "step_added_mib: peak RSS during the measured training steps (SGD with momentum) minus the RSS "
        "just before them; compilation is excluded (peak reset after the warm-up). first_step_s includes "
        "compilation for the compiled variants. process_peak_rss_mib: whole process, compilation included.",
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "load_avg_at_end": os.getloadavg(),
        },
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "results": results,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=1)
    print(f"\n{'variant':<20} {'step s':>7} {'step adds MiB':>14} {'x dynamic':>10} {'x sequential':>13}")
    for r in results:
        print(
            f"{r['variant']:<20} {r['step_s']:>7.3f} {r['step_added_mib']:>14.0f} "
            f"{r.get('memory_vs_dynamic', float('nan')):>10.3f} {r.get('memory_vs_sequential', float('nan')):>13.3f}"
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

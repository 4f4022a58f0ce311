"""Training-step time and peak memory of DG-Net (``dynamic``) vs the static backbone.

Each (model, variant) runs in its own process so that peak RSS (``ru_maxrss``) belongs to that
variant alone; variants are interleaved and repeated, and the best step time per variant is
kept, so that a slow spell of the machine does not favour one side. Ratios are computed
against ``sequential`` measured in the same run.

Variants: ``sequential`` (torchvision's network), ``dynamic`` (DG-Net as shipped: custom
aggregation op + recomputed node inputs), ``dynamic-norecompute`` (custom op, node inputs
stored) and ``dynamic-stack`` (naive ``torch.stack`` aggregation, for reference).

    python bench/train_overhead.py                       # resnet50 b8 + resnet101 b4, 224x224
    python bench/train_overhead.py --models resnet18:8 --steps 2 --out /tmp/x.json
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

VARIANTS = ("sequential", "dynamic", "dynamic-norecompute", "dynamic-stack")


def worker(model_name: str, variant: str, batch: int, size: int, steps: int) -> dict:
    import torch

    import dynwire
    from dynwire.graph import stage as stage_mod

    torch.manual_seed(0)
    if variant == "dynamic-stack":

        def naive(w, xs, slots=None):
            s = torch.stack(list(xs), 1)
            return (s * w.to(s.dtype).view(*w.shape, *([1] * (s.ndim - 2)))).sum(1)

        stage_mod.aggregate = naive
    wiring = "sequential" if variant == "sequential" else "dynamic"
    model = dynwire.create_model(model_name, wiring=wiring, recompute=(variant == "dynamic"))
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, 1000, (batch,))
    # RSS of the runtime + model + data before any training step: subtracted to get the
    # memory that training itself adds (activations, gradients, optimizer state).
    base_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        if i > 0:  # the first step warms up allocators and kernels
            times.append(time.perf_counter() - t0)
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "step_s": min(times),
        "step_s_all": times,
        "peak_rss_bytes": rss_kb * 1024,
        "pre_train_rss_bytes": base_kb * 1024,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["resnet50:8", "resnet101:4"], help="name:batch pairs")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per process (after 1 warm-up step)")
    ap.add_argument("--repeats", type=int, default=2, help="processes per variant, interleaved")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "train_overhead.json"))
    ap.add_argument("--worker", nargs=4, metavar=("MODEL", "VARIANT", "BATCH", "STEPS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        m, v, b, s = args.worker
        print(json.dumps(worker(m, v, int(b), args.size, int(s))))
        return

    import torch

    results = []
    for spec in args.models:
        name, batch = spec.split(":")
        runs: dict[str, list[dict]] = {v: [] for v in args.variants}
        for rep in range(args.repeats):
            for v in args.variants:
                cmd = [sys.executable, __file__, "--size", str(args.size), "--worker", name, v, batch, str(args.steps)]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
                r = json.loads(out.strip().splitlines()[-1])
                runs[v].append(r)
                print(
                    f"{name} b{batch} {v:<20} rep {rep}: step {r['step_s']:.3f}s  peak RSS {r['peak_rss_bytes'] / 2**30:.2f} GiB",
                    flush=True,
                )
        base_t = min(r["step_s"] for r in runs["sequential"])
        base_m = min(r["peak_rss_bytes"] for r in runs["sequential"])
        for v in args.variants:
            t = min(r["step_s"] for r in runs[v])
            mem = min(r["peak_rss_bytes"] for r in runs[v])
            train_mem = min(r["peak_rss_bytes"] - r["pre_train_rss_bytes"] for r in runs[v])
            base_train_mem = min(r["peak_rss_bytes"] - r["pre_train_rss_bytes"] for r in runs["sequential"])
            results.append(
                {
                    "model": name,
                    "batch": int(batch),
                    "input": args.size,
                    "variant": v,
                    "step_s": round(t, 4),
                    "peak_rss_gib": round(mem / 2**30, 3),
                    "time_ratio": round(t / base_t, 3),
                    "memory_ratio": round(mem / base_m, 3),
                    "train_rss_gib": round(train_mem / 2**30, 3),
                    "train_memory_ratio": round(train_mem / base_train_mem, 3),
                    "raw": runs[v],
                }
            )
    doc = {
        "command": " ".join([os.path.relpath(sys.executable), *sys.argv]),
        "goal": "dynamic <= 1.05x time and <= 1.10x peak memory of sequential",
        "notes": "memory_ratio: whole-process peak RSS; train_memory_ratio: peak RSS minus the RSS before the "
        "first step (runtime, model and batch), i.e. what training adds. Step time: best of all timed steps.",
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "results": results,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=1)
    print(
        f"\n{'model':<10} {'variant':<20} {'step s':>7} {'x time':>7} {'peak GiB':>9} {'x mem':>6} {'train GiB':>10} {'x train mem':>12}"
    )
    for r in results:
        print(
            f"{r['model']:<10} {r['variant']:<20} {r['step_s']:>7.3f} {r['time_ratio']:>7.3f} {r['peak_rss_gib']:>9.3f} "
            f"{r['memory_ratio']:>6.3f} {r['train_rss_gib']:>10.3f} {r['train_memory_ratio']:>12.3f}"
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""DG-Net against the static network on a CUDA GPU, in one run (ratios, not absolute times).

Every number is a ratio to ``sequential`` (the torchvision-equivalent chain) of the same model,
measured in the same interleaved rounds, timed with CUDA events (median over rounds):

* ``train``: one training step (forward, cross-entropy, backward, SGD with momentum) in fp32 and
  in bf16 autocast with channels_last (``amp``), and the peak allocated memory of a step;
* ``eval``: throughput at batch N and latency at batch 1 (inference mode, pruned executor);
* ``compile``: ``torch.compile`` of the training step and of evaluation (the dense executor,
  the compiler plans memory), its compile time and steady time, against eager ``sequential``.

Variants: ``sequential``, ``dynamic`` (branch nodes, the default) and ``dynamic-block`` (whole
residual blocks as nodes, 0.1's form).

    python bench/gpu.py                 # the small models and ResNet-50, writes bench/results/gpu.json
    python bench/gpu.py --quick         # fewer rounds (a smoke run; also works with --device cpu)
    python bench/gpu.py --device cpu --threads 1 --parts compile --models cifar_resnet20 cifar_resnet56 \\
        --compile-variants sequential dynamic sequential-compiled dynamic-compiled dynamic-compiled-opaque \\
        --out bench/results/compile_cpu.json          # the compiled glue on the CPU

Writes ``bench/results/gpu.json`` (``--out``) with the GPU's name and the software versions.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import dynwire

VARIANTS = ("sequential", "dynamic", "dynamic-block")
# model, batch, input size (C, H, W): the studies' small models on Fashion-MNIST-sized inputs and
# the paper's ResNet-50 at ImageNet resolution
MODELS = (
    ("cifar_resnet20", 64, (1, 28, 28)),
    ("cifar_resnet56", 64, (1, 28, 28)),
    ("cifar_resnet20", 256, (1, 28, 28)),
    ("resnet50", 64, (3, 224, 224)),
)


def build(name: str, variant: str, in_chans: int, device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    wiring = "sequential" if variant == "sequential" else "dynamic"
    kw = {"node": "block"} if variant == "dynamic-block" else {}
    num_classes = 1000 if name == "resnet50" else 10
    return dynwire.create_model(name, num_classes=num_classes, wiring=wiring, in_chans=in_chans, **kw).to(device)


class Timer:
    """Seconds per call of ``fn``: CUDA events around ``reps`` calls (host clock on the CPU)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __call__(self, fn: Callable[[], object], reps: int) -> float:
        if not self.cuda:
            t = time.perf_counter()
            for _ in range(reps):
                fn()
            return (time.perf_counter() - t) / reps
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / reps


def train_step_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor, amp: bool) -> Callable[[], None]:
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()

    return step


def _ratios(times: dict[str, list[float]]) -> dict:
    """Median seconds per variant and the median of the per-round ratios to ``sequential``."""
    out = {}
    for k, ts in times.items():
        row = {"median_s": statistics.median(ts)}
        if k != "sequential" and "sequential" in times:
            row["ratio"] = statistics.median(t / s for t, s in zip(ts, times["sequential"]))
        out[k] = row
    return out


def bench_train(name: str, batch: int, size: tuple, device, rounds: int, reps: int, variants) -> dict:
    timer = Timer(device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *size, generator=g).to(device)
    y = torch.randint(0, 10, (batch,), generator=g).to(device)
    result = {}
    for mode in ("fp32", "amp"):
        amp = mode == "amp"
        xs = x.contiguous(memory_format=torch.channels_last) if amp else x
        steps, peaks = {}, {}
        for v in variants:
            m = build(name, v, size[0], device).train()
            if amp:
                m = m.to(memory_format=torch.channels_last)
            steps[v] = train_step_fn(m, xs, y, amp)
            steps[v]()  # warm-up (cuDNN autotune, allocator)
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                steps[v]()
                torch.cuda.synchronize()
                peaks[v] = torch.cuda.max_memory_allocated() - base
        times: dict[str, list[float]] = {v: [] for v in variants}
        for _ in range(rounds):
            for v in variants:
                times[v].append(timer(steps[v], reps))
        res = _ratios(times)
        for v in variants:
            res[v]["img_per_s"] = batch / res[v]["median_s"]
            if v in peaks:
                res[v]["peak_step_mib"] = peaks[v] / 2**20
                if v != "sequential":
                    res[v]["peak_ratio"] = peaks[v] / peaks["sequential"]
        result[mode] = res
        del steps
    return result


def bench_eval(name: str, batch: int, size: tuple, device, rounds: int, reps: int, variants) -> dict:
    timer = Timer(device)
    g = torch.Generator().manual_seed(1)
    xn = torch.randn(batch, *size, generator=g).to(device)
    x1 = xn[:1].clone()
    models = {v: build(name, v, size[0], device).eval() for v in variants}
    tn: dict[str, list[float]] = {v: [] for v in variants}
    t1: dict[str, list[float]] = {v: [] for v in variants}
    with torch.inference_mode():
        for m in models.values():
            m(xn), m(x1)
        for _ in range(rounds):
            for v, m in models.items():
                tn[v].append(timer(lambda m=m: m(xn), reps))
                t1[v].append(timer(lambda m=m: m(x1), reps * 2))
    bn, b1 = _ratios(tn), _ratios(t1)
    for v in variants:
        bn[v]["img_per_s"] = batch / bn[v]["median_s"]
    return {f"batch{batch}": bn, "batch1": b1}


def _opaque_aggregation():
    """Under compile, the aggregation as the opaque custom op (``dynwire::aggregate``) instead of
    the plain tensor ops the stage gives the compiler since 0.3: what that change bought."""
    from unittest import mock

    from dynwire.graph import stage as stage_mod

    return mock.patch.object(stage_mod, "aggregate_reference", lambda w, xs: torch.ops.dynwire.aggregate(w, list(xs)))


# variant: (wiring, compile mode or None for eager, aggregation as the opaque custom op)
COMPILE_VARIANTS = {
    "sequential": ("sequential", None, False),
    "dynamic": ("dynamic", None, False),
    "sequential-compiled": ("sequential", "default", False),
    "dynamic-compiled": ("dynamic", "default", False),
    "sequential-cudagraphs": ("sequential", "reduce-overhead", False),
    "dynamic-cudagraphs": ("dynamic", "reduce-overhead", False),
    # the aggregation as the opaque custom op under compile (what 0.2 compiled)
    "dynamic-compiled-opaque": ("dynamic", "default", "opaque"),
}


def bench_compile(name: str, batch: int, size: tuple, device, rounds: int, reps: int, variants) -> dict:
    """``torch.compile`` (default mode; ``reduce-overhead``: CUDA graphs) of the training step and of
    evaluation, against eager ``sequential``; compile time of the first call."""
    import contextlib

    timer = Timer(device)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(batch, *size, generator=g).to(device)
    y = torch.randint(0, 10, (batch,), generator=g).to(device)
    out: dict = {}
    for phase in ("train", "eval"):
        fns, compile_s = {}, {}
        for key in variants:
            wiring, mode, opaque = COMPILE_VARIANTS[key]
            m = build(name, wiring, size[0], device)
            m.train(phase == "train")
            mm = torch.compile(m, mode=mode) if mode else m
            ctx = _opaque_aggregation() if opaque else contextlib.nullcontext()
            if phase == "train":
                step = train_step_fn(mm, x, y, amp=False)
            else:

                def step(mm=mm):
                    with torch.inference_mode():
                        mm(x)

            def fn(step=step, ctx=ctx):
                with ctx:
                    step()

            t = time.perf_counter()
            try:
                fn()
                if device.type == "cuda":
                    torch.cuda.synchronize()
            except Exception as e:  # one variant failing to compile must not lose the others
                traceback.print_exc()
                out.setdefault("errors", {})[f"{phase} {key}"] = f"{type(e).__name__}: {e}"[:500]
                continue
            if mode:
                compile_s[key] = time.perf_counter() - t
            fn(), fn()  # cudagraph trees record on the later calls
            fns[key] = fn
        times: dict[str, list[float]] = {k: [] for k in fns}
        for _ in range(rounds):
            for k, fn in fns.items():
                times[k].append(timer(fn, reps))
        res = _ratios(times)
        for k, s in compile_s.items():
            res[k]["compile_s"] = s
        for k in res:
            base = {"dynamic": "sequential"}.get(k) or k.replace("dynamic", "sequential").replace("-opaque", "")
            if k.startswith("dynamic") and base in times and base != k:
                res[k]["ratio_to_same_mode_sequential"] = statistics.median(
                    a / b for a, b in zip(times[k], times[base])
                )
        out[phase] = res
        torch._dynamo.reset()
    return out


def _guard(fn: Callable[[], dict]) -> dict:
    """Run one part; a failure is recorded (with its message) instead of ending the run."""
    t = time.perf_counter()
    try:
        res = fn()
    except Exception as e:  # a failing part must not lose the others' results
        traceback.print_exc()
        res = {"error": f"{type(e).__name__}: {e}"}
    res["wall_s"] = round(time.perf_counter() - t, 1)
    return res


def _print(doc: dict) -> None:
    print(f"\n{doc['device']['name']}: ratios to sequential (median of per-round ratios)")
    for key, part in doc["parts"].items():
        if "error" in part:
            print(f"{key}: ERROR {part['error']}")
            continue
        for sub, rows in part.items():
            if not isinstance(rows, dict):
                continue
            for v, row in rows.items():
                if isinstance(row, dict) and "ratio" in row:
                    extra = f"  peak mem {row['peak_ratio']:.2f}x" if "peak_ratio" in row else ""
                    comp = f"  compile {row['compile_s']:.0f}s" if "compile_s" in row else ""
                    same = row.get("ratio_to_same_mode_sequential")
                    same = f"  vs same-mode sequential {same:.2f}x" if same else ""
                    print(f"{key:34s} {sub:9s} {v:26s} {row['ratio']:.2f}x{extra}{comp}{same}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="few rounds, small models only")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--parts", nargs="+", default=["train", "eval", "compile"], choices=["train", "eval", "compile"])
    ap.add_argument("--compile-variants", nargs="+", default=list(COMPILE_VARIANTS), choices=list(COMPILE_VARIANTS))
    ap.add_argument("--models", nargs="+", help="only these of the models (by name)")
    ap.add_argument("--threads", type=int, help="torch CPU threads (--device cpu; default: torch's)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "gpu.json"))
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench/gpu.py: CUDA is not available on this machine; run it on a GPU or pass --device cpu")
    rounds = 2 if args.quick else args.rounds
    models = MODELS[:1] if args.quick else MODELS
    if args.models:
        models = [m for m in MODELS if m[0] in args.models]
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        props = torch.cuda.get_device_properties(device)
        dev = {
            "name": props.name,
            "memory_gib": round(props.total_memory / 2**30, 1),
            "cc": f"{props.major}.{props.minor}",
        }
    else:
        dev = {"name": f"CPU ({platform.processor() or platform.machine()})"}
    doc = {
        "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "device": dev,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
        "tf32": {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32},
        "rounds": rounds,
        "parts": {},
    }
    for name, batch, size in models:
        big = name == "resnet50"
        reps = 3 if big else 10
        tag = f"{name} b{batch} {size[1]}px"
        if "train" in args.parts:
            doc["parts"][f"train {tag}"] = _guard(
                lambda: bench_train(name, batch, size, device, rounds, reps, VARIANTS)  # noqa: B023
            )
            print(json.dumps({f"train {tag}": doc["parts"][f"train {tag}"]})[:2000], flush=True)
        if "eval" in args.parts and batch != 256:
            doc["parts"][f"eval {tag}"] = _guard(
                lambda: bench_eval(name, batch, size, device, rounds, reps, VARIANTS)  # noqa: B023
            )
            print(json.dumps({f"eval {tag}": doc["parts"][f"eval {tag}"]})[:2000], flush=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")  # after every part: partial results survive
    if "compile" in args.parts:  # last: compiling takes the longest
        variants = args.compile_variants
        for name, batch, size in models if args.models else MODELS[:1]:
            if batch != 64 or name == "resnet50":
                continue
            tag = f"{name} b{batch} {size[1]}px"
            doc["parts"][f"compile {tag}"] = _guard(
                lambda: bench_compile(name, batch, size, device, rounds, 10, variants)  # noqa: B023
            )
            Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    _print(doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())

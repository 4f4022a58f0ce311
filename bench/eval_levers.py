"""What bounds DG-Net's evaluation at batch 64 on the CPU (issue 19): the levers on the traffic of the
batch path's C calls, each against the chain in the same rounds.

At batch 64 a node's C call (``layers._fused_glue.SampleKernels.run_batch``) reads its earlier inputs
from memory: a 9-block stage of 3.1 MiB maps does not stay in the cache between its convolutions
(``bench/node_overhead.py`` measures the calls' rate next to ``torch.add``'s). This script times the
ways around that, for ``cifar_resnet20`` and ``cifar_resnet56`` (branch form, batch 64, 1 x 28 x 28,
the studies' inputs, one thread, kept heap), in interleaved rounds (order rotated) of one forward per
variant, thread CPU time, each against ``sequential`` of the same round:

* ``dynamic``: the shipped build;
* ``prefetch``: the C library built with ``-DPF_BYTES=512``: every input of a node's sum prefetched
  512 bytes ahead, across the 4 KiB pages where the hardware prefetchers stop;
* ``stream``: built with ``-DNT_STORE=1``: node inputs written with non-temporal stores, which skip
  the read for ownership of lines not in cache (and leave the input out of the cache for the
  block that reads it next);
* ``full-sums``: no partial sums (``_fused_glue._partial_sum_steps``): every node reads all of its
  inputs;
* ``tiled``: the first stage (the largest maps) run on the two halves of the batch one after the
  other, so that a half's node outputs stay in the L3 between its convolutions; and
  ``sequential-tiled``, the chain run so, what the halves cost the convolutions.

The library variants are compiled from ``src/dynwire/layers/_aggkernel.c`` with ``setup.py``'s flags
(``bench/kernel_blocks.py``'s ``build``) and swapped in as the CPU backend for their model's forwards.
Every variant's logits are compared with ``dynamic``'s (``sequential-tiled``'s with
``sequential``'s): ``max_abs_diff``. ``c_calls_share``: the C
calls' time as a share of the chain's evaluation, timed in the same forwards.

``--processes K`` repeats the measurement in K fresh processes (memory layouts and minutes of the
host's load differ) and reports the median of their medians with the range.

    python bench/eval_levers.py                                   # writes bench/results/eval_levers.json
    python bench/eval_levers.py --models cifar_resnet20 --rounds 5 --processes 1 --out /tmp/x.json
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
import tempfile
import time
from pathlib import Path

import torch

import dynwire
from dynwire.engine.files import atomic_write
from dynwire.layers import _fused
from dynwire.layers import _fused_glue as _glue

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _machine import ci95, cpu_info  # noqa: E402
from kernel_blocks import build  # noqa: E402  (setup.py's compile flags)

ROOT = Path(__file__).resolve().parents[1]
#: C library variants: name -> -D flags
LIBRARIES = {"prefetch": ["-DPF_BYTES=512"], "stream": ["-DNT_STORE=1"]}
#: what a variant's logits are compared with (the others: ``dynamic``)
_BASE = {"sequential-tiled": "sequential"}


def _clock() -> float:
    return time.thread_time()


class _Variant:
    """A model and how its forward runs: on a C library build (``kernels``), without partial sums,
    or with its first graph stage on the halves of the batch."""

    def __init__(self, model: torch.nn.Module, kernels=None, full_sums: bool = False, tiled: bool = False) -> None:
        self.model, self.kernels, self.full_sums = model, kernels, full_sums
        if tiled:
            stage = next(s for _, s in model.graph_stages())
            forward = stage.forward
            stage.forward = lambda x: torch.cat([forward(h) for h in x.chunk(2)])

    @contextlib.contextmanager
    def context(self):
        saved = _fused._BACKENDS["cpu"], _glue._partial_sum_steps
        if self.kernels is not None:
            _fused._BACKENDS["cpu"] = self.kernels
        if self.full_sums:
            _glue._partial_sum_steps = lambda n: frozenset()
        try:
            yield
        finally:
            _fused._BACKENDS["cpu"], _glue._partial_sum_steps = saved


def _timed_steps(kernels, acc: list[float]) -> None:
    """Wrap ``kernels``' batch steps so that their time adds up in ``acc[0]``."""
    for dt, fn in list(kernels._batch_step.items()):

        def timed(*a, _fn=fn):
            t0 = _clock()
            try:
                return _fn(*a)
            finally:
                acc[0] += _clock() - t0

        kernels._batch_step[dt] = timed


def measure(name: str, rounds: int, batch: int, size: int, libs: dict) -> dict:
    torch.manual_seed(0)
    x = torch.randn(batch, 1, size, size)
    seq = dynwire.create_model(name, num_classes=10, in_chans=1, wiring="sequential").eval()
    dyn = dynwire.create_model(name, num_classes=10, in_chans=1, wiring="dynamic", node="branch").eval()
    shipped = _fused._BACKENDS["cpu"]
    if not isinstance(shipped, _fused._CpuKernels):
        raise SystemExit("eval_levers.py needs the C kernels: run `make kernels`")
    kernels = {"dynamic": copy.copy(shipped), **{k: _fused._CpuKernels(lib) for k, lib in libs.items()}}
    for k in kernels.values():
        k._batch_step = dict(k._batch_step)  # a copy.copy shares the dict with the package's backend
    acc = [0.0]
    for k in kernels.values():
        _timed_steps(k, acc)
    variants = {
        "sequential": _Variant(seq),
        "dynamic": _Variant(dyn, kernels["dynamic"]),
        **{k: _Variant(copy.deepcopy(dyn), kernels[k]) for k in libs},
        "full-sums": _Variant(copy.deepcopy(dyn), kernels["dynamic"], full_sums=True),
        "tiled": _Variant(copy.deepcopy(dyn), kernels["dynamic"], tiled=True),
        "sequential-tiled": _Variant(copy.deepcopy(seq), tiled=True),
    }
    order = list(variants)
    times: dict[str, list[float]] = {v: [] for v in order}
    calls: dict[str, list[float]] = {v: [] for v in order}
    logits = {}
    with torch.inference_mode():
        for v in order:
            with variants[v].context():
                logits[v] = variants[v].model(x)
        for r in range(rounds):
            for v in order[r % len(order) :] + order[: r % len(order)]:
                with variants[v].context():
                    acc[0] = 0.0
                    t0 = _clock()
                    variants[v].model(x)
                    times[v].append(_clock() - t0)
                    calls[v].append(acc[0])
    seq_t = times["sequential"]
    out = {}
    for v in order[1:]:
        ratios = [a / b for a, b in zip(times[v], seq_t)]
        out[v] = {
            "ratio": round(statistics.median(ratios), 4),
            "ratio_ci95": ci95(ratios, 4),
            "c_calls_share": round(statistics.median(c / b for c, b in zip(calls[v], seq_t)), 4),
            "max_abs_diff": float((logits[v] - logits[_BASE.get(v, "dynamic")]).abs().max()),
        }
    return {
        "model": name,
        "batch": batch,
        "input": size,
        "sequential_s": round(statistics.median(seq_t), 5),
        "variants": out,
    }


def _worker(args) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        libs = {k: build(k, flags, Path(tmp)) for k, flags in LIBRARIES.items()}
        res = [measure(m, args.rounds, args.batch, args.size, libs) for m in args.models]
    print(json.dumps(res))


def _combine(per_process: list[list[dict]]) -> list[dict]:
    """Per model and variant: the median of the processes' medians, with their range."""
    out = []
    for i, first in enumerate(per_process[0]):
        row = {k: first[k] for k in ("model", "batch", "input")}
        row["variants"] = {}
        for v in first["variants"]:
            got = [p[i]["variants"][v] for p in per_process]
            row["variants"][v] = {
                "ratio": round(statistics.median(g["ratio"] for g in got), 4),
                "ratio_range": [min(g["ratio"] for g in got), max(g["ratio"] for g in got)],
                "c_calls_share": round(statistics.median(g["c_calls_share"] for g in got), 4),
                "max_abs_diff": max(g["max_abs_diff"] for g in got),
            }
        out.append(row)
    return out


def table(doc: dict) -> str:
    lines = [
        "| model | variant | time / chain (range over processes) | C calls / chain | max abs diff of logits |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for r in doc["results"]:
        for v, d in r["variants"].items():
            lo, hi = d["ratio_range"]
            calls = f"{d['c_calls_share']:.1%}" if d["c_calls_share"] else "—"
            lines.append(
                f"| `{r['model']}` | {v} | {d['ratio']:.3f}x ({lo:.3f}-{hi:.3f}) | {calls} | {d['max_abs_diff']:.1e} |"
            )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["cifar_resnet20", "cifar_resnet56"])
    ap.add_argument("--rounds", type=int, default=31)
    ap.add_argument("--processes", type=int, default=6)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--size", type=int, default=28)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "eval_levers.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.worker:
        if not dynwire.keep_freed_memory():
            raise SystemExit("glibc mallopt unavailable: the kept heap cannot be set")
        _worker(args)
        return
    per_process = []
    for p in range(args.processes):
        t0 = time.perf_counter()
        cmd = [sys.executable, __file__, "--worker", "--models", *args.models, "--rounds", str(args.rounds)]
        cmd += ["--batch", str(args.batch), "--size", str(args.size)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        per_process.append(json.loads(out.strip().splitlines()[-1]))
        print(f"process {p + 1}/{args.processes}: {time.perf_counter() - t0:.0f}s", file=sys.stderr, flush=True)
    doc = {
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": 1, **cpu_info()},
        "torch": torch.__version__,
        "loadavg_after": list(os.getloadavg()),
        "rounds": args.rounds,
        "processes": args.processes,
        "results": _combine(per_process),
        "per_process": per_process,
    }
    atomic_write(args.out, json.dumps(doc, indent=1))
    print(table(doc))


if __name__ == "__main__":
    main()

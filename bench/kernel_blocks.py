"""Read order of the fused aggregation kernels: bandwidth of one node's sum and tap per variant.

``src/dynwire/layers/_aggkernel.c``'s forward sum and tap read up to ``LINES_MAX_K`` (12) inputs of
a node together, line by line, with the sum in registers; more inputs are walked in blocks of
``BLK`` elements whose running sum stays in cache, the inputs read 12 at a time, line by line. The
block kernels read four inputs at a time per block. This script
compiles the same C file once per variant (``-D...``, the flags of ``setup.py``), loads each build
with ctypes and, in interleaved rounds, times on one thread:

* ``shipped``: the file's defaults: lines as wide as the CPU's vector registers (64 bytes with
  AVX-512, 32 with AVX2, else 16);
* ``lines16``, ``lines32``, ``lines64``: lines of that many bytes on every ISA
  (``-DLINES_BYTES=...``). ``lines64`` on an AVX2 CPU is the kernel before the line width
  followed the ISA: GCC keeps a vector wider than the registers on the stack;
* ``nogroups``: a node of more than 12 inputs read four at a time per block (``-DLINES_GROUPS=0``);
* ``blocks``: every node so, the forward in blocks of 8192, the tap in blocks of 8192 from 8
  inputs and 1024 below (``-DLINES_MAX_K=0``);
* ``blocks1024``: every forward and tap in blocks of 1024 (``-DLINES_MAX_K=0 -DBLK=1024``: the
  kernels before the line-by-line path and the larger blocks);

for

* ``forward``: ``out = sum_k w_k * x_k`` (``K`` reads + 1 write of a map);
* ``tap``: a node output's tap in backward, ``out = sum_k w_k * g_k`` and ``<g_k, x>`` for each
  ``k`` (``K + 1`` reads + 1 write);
* ``torch.add(a, b, out=c)`` over 3 x 256 MiB, the reference of the same round.

Each call's inputs are out of cache (a 256 MiB copy runs before it); a second part repeats
calls whose data stays in cache (one sample's sum, as inference runs it, and stage 3's small maps)
and compares the time per call with ``blocks1024``'s. ``gb_s``: the least traffic
divided by the time, median over rounds; ``of_add``: that over ``torch.add``'s of the same rounds.
Shapes: nodes of ResNet-101's layer3 at batch 4 (``K`` from 4 to 20), and stage-1 nodes of
``cifar_resnet56`` / ``cifar_resnet20`` at batch 64 (28 x 28 inputs).

    python bench/kernel_blocks.py                     # writes bench/results/kernel_blocks.json
    python bench/kernel_blocks.py --rounds 3 --out /tmp/x.json
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from _machine import cpu_info

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "src" / "dynwire" / "layers" / "_aggkernel.c"
# (label, shape, K)
CASES = [
    ("resnet101.layer3 b4", (4, 1024, 14, 14), 20),
    ("resnet101.layer3 b4", (4, 1024, 14, 14), 16),
    ("resnet101.layer3 b4", (4, 1024, 14, 14), 12),
    ("resnet101.layer3 b4", (4, 1024, 14, 14), 8),
    ("resnet101.layer3 b4", (4, 1024, 14, 14), 6),
    ("resnet101.layer3 b4", (4, 1024, 14, 14), 4),
    ("cifar_resnet56.stage1 b64", (64, 16, 28, 28), 9),
    ("cifar_resnet56.stage1 b64", (64, 16, 28, 28), 5),
    ("cifar_resnet20.stage1 b64", (64, 16, 28, 28), 3),
    ("cifar_resnet20.stage1 b64", (64, 16, 28, 28), 2),
]
# in cache (the same call repeated): one sample's sum as inference runs it, and a batch of small maps
HOT_CASES = [
    ("cifar_resnet56.stage1 sample", (1, 16, 28, 28), 3),
    ("cifar_resnet56.stage1 sample", (1, 16, 28, 28), 9),
    ("cifar_resnet56.stage3 b64", (64, 64, 7, 7), 9),
]
CHUNK = 16384  # dynwire.layers._fused.FUSED_CHUNK
VARIANTS = {
    "shipped": [],
    "lines16": ["-DLINES_BYTES=16"],
    "lines32": ["-DLINES_BYTES=32"],
    "lines64": ["-DLINES_BYTES=64"],
    "nogroups": ["-DLINES_GROUPS=0"],
    "blocks": ["-DLINES_MAX_K=0"],
    "blocks1024": ["-DLINES_MAX_K=0", "-DBLK=1024"],
}


def build(name: str, defines: list[str], where: Path) -> ctypes.CDLL:
    out = where / f"agg_{name}.so"
    inc = sysconfig.get_paths()["include"]
    cmd = ["gcc", "-O3", "-fopenmp", "-std=c11", "-shared", "-fPIC", f"-I{inc}", *defines, str(SOURCE)]
    subprocess.run([*cmd, "-o", str(out), "-lm"], check=True)
    lib = ctypes.CDLL(str(out))
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.dynwire_agg_forward_f32.argtypes = [i64, i64, i64, ptr, ptr, ptr, i64, ctypes.c_int, ctypes.c_int]
    lib.dynwire_agg_tap_f32.argtypes = [i64, i64, i64, i64, ptr, ptr, ptr, ptr, ptr, i64, ctypes.c_int]
    return lib


class _Node:
    """One node's tensors (``K`` inputs of ``shape``) and its kernel calls, per build."""

    def __init__(self, shape: tuple[int, ...], k: int) -> None:
        self.b, self.n, self.k = shape[0], shape[1] * shape[2] * shape[3], k
        self.xs = [torch.randn(shape) for _ in range(k)]
        self.ptrs = (ctypes.c_void_p * k)(*[x.data_ptr() for x in self.xs])
        self.w, self.x, self.out = torch.rand(self.b, k), torch.randn(shape), torch.empty(shape)
        self.dots = torch.empty(self.b * -(-self.n // CHUNK), k, dtype=torch.float64)

    def calls(self, lib: ctypes.CDLL, relu: int) -> dict[str, tuple[Callable[[], None], int]]:
        """``phase -> (call, least bytes moved)``."""
        b, n, k, w, o = self.b, self.n, self.k, self.w.data_ptr(), self.out.data_ptr()

        def forward() -> None:
            lib.dynwire_agg_forward_f32(b, n, k, self.ptrs, w, o, CHUNK, 1, relu)

        def tap() -> None:
            lib.dynwire_agg_tap_f32(b, n, k, k, self.ptrs, w, self.x.data_ptr(), o, self.dots.data_ptr(), CHUNK, 1)

        return {"forward": (forward, (k + 1) * b * n * 4), "tap": (tap, (k + 2) * b * n * 4)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "kernel_blocks.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    load = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        variants = {name: VARIANTS[name] for name in args.variants}
        libs = {name: build(name, d, Path(tmp)) for name, d in variants.items()}
        big = [torch.randn(64 * 2**20) for _ in range(3)]  # 3 x 256 MiB

        def flush() -> None:
            big[2].copy_(big[0])

        def add_gbs() -> float:
            t = time.perf_counter()
            torch.add(big[0], big[1], out=big[2])
            return 3 * big[0].numel() * 4 / (time.perf_counter() - t) / 1e9

        rows = []
        for label, shape, k in CASES:
            node = _Node(shape, k)
            gbs: dict[str, list[float]] = {"add": []}
            for r in range(args.rounds):
                gbs["add"].append(add_gbs())
                order = list(libs.items())
                order = order[r % len(order) :] + order[: r % len(order)]
                for blk, lib in order:
                    for phase, (call, nbytes) in node.calls(lib, relu=0).items():
                        flush()
                        t = time.perf_counter()
                        call()
                        gbs.setdefault(f"{phase} {blk}", []).append(nbytes / (time.perf_counter() - t) / 1e9)
            add = statistics.median(gbs["add"])
            for blk in libs:
                for phase in ("forward", "tap"):
                    v = gbs[f"{phase} {blk}"]
                    of_add = statistics.median(a / c for a, c in zip(v, gbs["add"]))
                    rows.append(
                        {
                            "node": label,
                            "shape": list(shape),
                            "k": k,
                            "phase": phase,
                            "variant": blk,
                            "cache": "cold",
                            "gb_s": round(statistics.median(v), 2),
                            "add_gb_s": round(add, 2),
                            "of_add": round(of_add, 3),
                        }
                    )
                    print(
                        f"{label:28s} K={k:<3d} {phase:8s} {blk:>8s} {rows[-1]['gb_s']:6.1f} GB/s  "
                        f"{rows[-1]['of_add']:.2f} of torch.add ({add:.1f})",
                        flush=True,
                    )
        for label, shape, k in HOT_CASES:
            node = _Node(shape, k)
            reps = max(20, 2_000_000 // (node.b * node.n * k))
            us: dict[str, list[float]] = {}
            for r in range(args.rounds):
                order = list(libs.items())
                order = order[r % len(order) :] + order[: r % len(order)]
                for name, lib in order:
                    for phase, (call, _) in node.calls(lib, relu=1).items():
                        t = time.perf_counter()
                        for _ in range(reps):
                            call()
                        us.setdefault(f"{phase} {name}", []).append((time.perf_counter() - t) / reps * 1e6)
            for name in libs:
                for phase in ("forward", "tap"):
                    ref = us.get(f"{phase} blocks1024")
                    v = us[f"{phase} {name}"]
                    rows.append(
                        {
                            "node": label,
                            "shape": list(shape),
                            "k": k,
                            "phase": phase,
                            "variant": name,
                            "cache": "hot",
                            "us": round(statistics.median(v), 2),
                            "vs_blocks1024": round(statistics.median(a / c for a, c in zip(v, ref)), 3)
                            if ref
                            else None,
                        }
                    )
                    print(
                        f"{label:28s} K={k:<3d} {phase:8s} {name:>10s} {rows[-1]['us']:8.2f} us in cache  "
                        f"{rows[-1]['vs_blocks1024']}x blocks1024",
                        flush=True,
                    )
    result = {
        "command": " ".join(["python", "bench/kernel_blocks.py", *(argv if argv is not None else sys.argv[1:])]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "loadavg_start_end": [list(load), list(os.getloadavg())],
        "machine": {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__, **cpu_info()},
        "notes": "one thread; float32. cache cold: each call after a 256 MiB copy (inputs out of cache); gb_s = "
        "least traffic / time (forward K reads + 1 write, tap K + 1 reads + 1 write), median over rounds; of_add = "
        "median over rounds of gb_s / torch.add(a, b, out=c) of the same round (3 x 256 MiB). cache hot: the same "
        "call repeated (forward with its ReLU); us per call, median over rounds; vs_blocks1024 = median over "
        "rounds of that time / the blocks1024 variant's (the kernels before the line-by-line path).",
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

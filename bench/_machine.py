"""What the benchmarks share: the CPU a benchmark ran on, for its results file (the same code runs at
different speeds on AVX-512 and AVX2 machines: the C kernels' line width follows the CPU), and the
interval they report for a median of ratios."""

from __future__ import annotations

import platform

from dynwire.analysis._stats import median_ci


def cpu_info() -> dict:
    """Model, family and the SIMD extensions that pick the C kernels' line width (Linux's
    ``/proc/cpuinfo``; elsewhere only ``platform``), with the line width the kernels use."""
    info: dict = {"machine": platform.machine(), "processor": platform.processor()}
    try:
        with open("/proc/cpuinfo") as f:
            fields = dict(line.split(":", 1) for line in f.read().split("\n\n")[0].splitlines() if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        info.update(
            model_name=fields.get("model name"),
            family=fields.get("cpu family"),
            model=fields.get("model"),
            simd=[
                x
                for x in ("avx512f", "avx2", "fma", "neon", "asimd")
                if x in fields.get("flags", fields.get("Features", "")).split()
            ],
        )
    except OSError:
        pass
    from dynwire.layers import _fused

    kern = _fused._BACKENDS["cpu"]
    # None: no C kernels, or a dynwire before the per-ISA line width (an A/B against an older build)
    line_bytes = getattr(kern, "line_bytes", None)
    info["kernel_line_bytes"] = line_bytes() if line_bytes is not None else None
    return info


def ci95(ratios: list[float], digits: int = 3) -> list[float] | None:
    """95% interval of the median of ``ratios`` (order statistics), rounded; None below 6 values."""
    lo, hi = median_ci(ratios)
    return None if lo != lo else [round(lo, digits), round(hi, digits)]

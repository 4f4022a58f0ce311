"""Keep freed feature maps in the heap (glibc): the allocator half of the per-node overhead (issue 19).

glibc serves allocations above its mmap threshold (dynamic, starting at 128 KiB) with fresh
``mmap`` pages and unmaps them on ``free``, so a feature map that is allocated again is faulted in
page by page. A graph stage allocates more maps per step than the chain (one node input per
aggregation), so it pays more. PyTorch's CPU performance guide recommends jemalloc or tcmalloc for
the same reason; this is the no-install version. ``dynwire eval``, ``detect`` and ``analyze`` call
it: in an evaluation-only process it made the chain 1.5x faster and DG-Net's time per image 1.1x
/ 1.15x of the chain's instead of 1.28x / 1.34x (``cifar_resnet20`` / ``cifar_resnet56``, batch 64,
``bench/inference.py --parts small --malloc kept|default``). ``dynwire train`` calls it too: on the
default heap a DG-Net training step faulted in 3,000-9,000 pages against 0-750 for the chain, and
none on the kept heap (``bench/train_overhead.py --malloc kept|default``, page faults per step).

:func:`keep_freed_memory` raises the mmap threshold to glibc's maximum (32 MiB on 64-bit) and the
trim threshold to 1 GiB: memory a process has freed (up to 1 GiB at the top of its heap) stays
reserved for its next allocation instead of going back to the system.
``DYNWIRE_MALLOC_TUNING=0`` makes it a no-op. Elsewhere than glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

__all__ = ["keep_freed_memory"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: glibc's largest mmap threshold on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX): maps above it stay mmapped
MMAP_THRESHOLD_MAX = 32 * 1024 * 1024
TRIM_THRESHOLD = 1024 * 1024 * 1024
_done: bool | None = None


def keep_freed_memory(threshold: int = MMAP_THRESHOLD_MAX) -> bool:
    """Keep freed blocks up to ``threshold`` bytes in the heap (glibc ``mallopt``); True when applied.

    Process-wide and irreversible for the process; idempotent. Skipped (False) on other C libraries
    and when the environment sets ``DYNWIRE_MALLOC_TUNING=0``.
    """
    global _done
    if _done is not None:
        return _done
    _done = False
    if os.environ.get("DYNWIRE_MALLOC_TUNING", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # trim first: setting the mmap threshold fixes it (glibc stops adjusting it dynamically)
    _done = bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)) and bool(mallopt(_M_MMAP_THRESHOLD, threshold))
    return _done

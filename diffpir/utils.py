"""Small process-level helpers."""

from __future__ import annotations

import ctypes
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def tune_malloc(mmap_threshold: int = 32 * 2**20, trim_threshold: int = 2**31 - 1) -> bool:
    """Make glibc keep freed large blocks for reuse instead of returning them to the kernel.

    PyTorch on the CPU allocates and frees activation-sized buffers on every network call; by default glibc serves
    blocks above its (adaptive) mmap threshold with fresh pages, which the kernel then has to fault in and zero.
    Raising the mmap threshold to its maximum (32 MB on 64-bit) and the trim threshold makes repeated calls reuse
    memory. On the 2-core development machine the bare network loop of bench/sampler_overhead.py ran in 15-16.5 s
    with it against 17-18 s without (noisy, shared machine; opt in with --tune-malloc). A no-op returning False on
    anything but glibc. Peak memory is unchanged; freed memory is only returned to the system later.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(mmap_threshold))
        ok &= libc.mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(trim_threshold))
    except (OSError, AttributeError):
        return False
    return bool(ok)


__all__ = ["tune_malloc"]

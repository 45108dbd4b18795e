"""Process memory habits of a merge, and its peak (no torch import: the command line calls this before parsing)."""
from __future__ import annotations

import os
import resource
import sys

#: Allocations at least this large get their own memory map (glibc), see bound_heap_growth.
MMAP_THRESHOLD = 128 << 10


def bound_heap_growth() -> None:
    """Serve every tensor of 128 KiB or more from a fresh memory map, returned to the OS when freed.

    glibc starts at this threshold but raises it (up to 32 MiB) as large blocks are freed; after that
    the layer slices of a merge come from the heap and its per-thread arenas (the read-ahead thread
    has its own), which fragment and are not given back. Measured through the API on a ViT-shaped
    model of width 256 (layer slices 0.25-1 MiB, T = 8, 8 MiB chunks): peak RSS growth 69-80 MiB
    with glibc's moving threshold, 36 MiB pinned here, i.e. the 19 MiB output plus two chunks
    (tests/test_streaming_memory.py). An explicit MALLOC_MMAP_THRESHOLD_ in the environment wins.
    Process-wide and idempotent; called by every run (API and command line).
    """
    if not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, MMAP_THRESHOLD)  # -3: M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


def peak_rss_bytes() -> int:
    """Peak resident memory of this process.

    On Linux VmHWM of /proc/self/status: ru_maxrss survives fork and exec, so a child started by a
    large parent would report the parent's size. Elsewhere getrusage (macOS reports bytes, others KiB).
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024

"""Small timing, memory and machine-speed helpers for the benchmarks (CPU and CUDA).

* ``time_call``: wall time of a callable, median and quantiles over ``runs`` after ``warmup`` calls,
  CUDA-synchronised around every call on a GPU.
* ``PeakMemory``: peak memory of a block of code above what was in use when it started:
  on CUDA ``torch.cuda.max_memory_allocated``; on CPU the peak resident set size (VmHWM of
  /proc/self/status, reset through /proc/self/clear_refs, after glibc malloc_trim so that freed
  pages of earlier runs do not hide the peak), falling back to a 1 ms RSS sampler thread.
* ``measure_machine``: copy bandwidth and fp32/fp64 GEMM rates measured in the same run, for floors.
"""
from __future__ import annotations

import ctypes
import gc
import os
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device, *, runs: int = 3, warmup: int = 1) -> dict:
    """Median, min, max and every sample (seconds) of ``fn()`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    samples = []
    for _ in range(runs):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        samples.append(time.perf_counter() - start)
    return {"median_s": statistics.median(samples), "min_s": min(samples), "max_s": max(samples),
            "samples_s": samples}


# ------------------------------------------------------------------------------------------------
# Peak memory
# ------------------------------------------------------------------------------------------------
_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kib(field: str) -> int:
    for line in _STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _malloc_trim() -> None:
    """glibc malloc_trim(0): without it pages freed by an earlier run stay resident and hide the peak."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_hwm() -> bool:
    """Reset the kernel's peak-RSS counter (Linux >= 4.0); False where that is not allowed."""
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Context manager: ``.peak_bytes`` = peak memory above the level at entry, ``.method`` says how."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_bytes = 0
        self.method = ""

    def __enter__(self):
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
            self.method = "cuda max_memory_allocated - allocated at start"
            return self
        gc.collect()
        _malloc_trim()  # hand freed heap pages back, so the RSS at start is what is really live
        self.start = _status_kib("VmRSS") * 1024
        self._sampler = None
        if _reset_hwm():
            self.method = "cpu peak RSS (VmHWM after malloc_trim + clear_refs) - RSS at start"
        else:  # sample RSS every millisecond instead
            self.method = "cpu peak RSS (1 ms sampler) - RSS at start"
            self._peak = self.start
            self._stop = threading.Event()
            self._sampler = threading.Thread(target=self._sample, daemon=True)
            self._sampler.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, _status_kib("VmRSS") * 1024)
            time.sleep(0.001)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self.start
        elif self._sampler is not None:
            self._stop.set()
            self._sampler.join()
            self.peak_bytes = self._peak - self.start
        else:
            self.peak_bytes = _status_kib("VmHWM") * 1024 - self.start
        return False


# ------------------------------------------------------------------------------------------------
# Machine speed, measured in the same run as the benchmark
# ------------------------------------------------------------------------------------------------
def measure_machine(device: torch.device, *, runs: int = 5) -> dict:
    """Copy bandwidth (bytes read + written per second) and fp64 / fp32 GEMM FLOP/s on ``device``.

    Under bench/gpu_check.sh's dry run (TSV_FAST_GPU_CHECK_DRYRUN=1) the sizes are tiny: its
    figures mean nothing anyway, and the rehearsal must stay quick.
    """
    gpu = device.type == "cuda"
    numel = (1 << 28) if gpu else (1 << 26)          # 1 GiB / 256 MiB of float32
    if os.environ.get("TSV_FAST_GPU_CHECK_DRYRUN", "0") == "1" and not gpu:
        numel, runs = 1 << 20, min(runs, 2)
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    copy = time_call(lambda: dst.copy_(src), device, runs=runs, warmup=1)
    bandwidth = 2 * src.numel() * src.element_size() / copy["median_s"]
    del src, dst
    out = {"copy_bytes": 2 * numel * 4, "bandwidth_Bps": bandwidth}
    size = 8192 if gpu else (256 if numel == 1 << 20 else 1536)
    for dtype, name in ((torch.float64, "fp64"), (torch.float32, "fp32")):
        a = torch.randn(size, size, device=device, dtype=dtype)
        b = torch.randn(size, size, device=device, dtype=dtype)
        gemm = time_call(lambda: a @ b, device, runs=runs, warmup=1)
        out[f"gemm_{name}_flops"] = 2 * size ** 3 / gemm["median_s"]
    out["gemm_size"] = size
    if gpu:
        out["tf32_allowed"] = bool(torch.backends.cuda.matmul.allow_tf32)
    return out

"""Peak host memory of a streamed merge stays far below loading every checkpoint.

A ViT-B/32-shaped set (all 12 blocks, fp32, 350 MB per model) with T = 4 fine-tunes is written to
safetensors; `tsv-fast merge` runs in a subprocess that reports its own peak RSS (VmHWM). To keep the
test quick, blocks 2-11 are excluded from TSV (they are averaged, which streams the same bytes
through the same sources and sink) while blocks 0-1 and the projection go through the SVD path.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tsv_fast import synthetic

ROOT = Path(__file__).resolve().parents[1]
NUM_TASKS = 4
EXCLUDE = [f"resblocks.{i}." for i in range(2, 12)]


def write_checkpoints(folder: Path) -> tuple[list[Path], int, int]:
    """Cheap ViT-B/32-shaped checkpoints: random weights, rank-8 matrix deltas, noisy vector deltas."""
    g = torch.Generator().manual_seed(0)
    shapes = synthetic.layout("vit-b-32")
    pre = {key: torch.randn(shape, generator=g) * 0.02 for key, shape in shapes.items()}
    save_file(pre, str(folder / "pre.safetensors"))
    paths = []
    for i in range(NUM_TASKS):
        ft = {}
        for key, base in pre.items():
            if base.ndim == 2:
                ft[key] = base + 1e-3 * torch.randn(base.shape[0], 8, generator=g) @ torch.randn(8, base.shape[1], generator=g)
            else:
                ft[key] = base + 1e-3 * torch.randn(base.shape, generator=g)
        paths.append(folder / f"ft{i}.safetensors")
        save_file(ft, str(paths[-1]))
        del ft
    model_bytes = sum(t.numel() * 4 for t in pre.values())
    largest = max(t.numel() * 4 for t in pre.values())
    return paths, model_bytes, largest


def measure(args: list[str]) -> tuple[str, int]:
    """Run ``python -m MODULE ARGS`` (or ``-c CODE``) in a child, as bench/bench_memory.py does:
    the tail of its output and its own peak RSS in bytes."""
    spec = importlib.util.spec_from_file_location("tsv_bench_memory", ROOT / "bench" / "bench_memory.py")
    bench_memory = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_memory)
    run = bench_memory.run_measured(args, dict(os.environ))
    return run["log_tail"], run["peak_rss_bytes"]


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc for VmHWM")
def test_streamed_merge_peak_memory(tmp_path):
    paths, model_bytes, largest = write_checkpoints(tmp_path)
    all_checkpoints = (NUM_TASKS + 1) * model_bytes
    _, baseline = measure(["-c", "import tsv_fast.cli, tsv_fast.io, tsv_fast.api, tsv_fast.backends, tqdm"])
    chunk = 64 << 20
    exclude = [arg for pattern in EXCLUDE for arg in ("--exclude", pattern)]
    out, peak = measure(["tsv_fast", "merge", "--base", str(tmp_path / "pre.safetensors"), *map(str, paths),
                         "-o", str(tmp_path / "merged.safetensors"), "--no-progress", "--max-chunk-size", "64MB",
                         *exclude])
    assert (tmp_path / "merged.safetensors").stat().st_size >= model_bytes
    merge_bytes = peak - baseline
    # The bound of the streaming design: one model's worth of slack (pretrained / output) plus the
    # working set of one chunk: T float32 slices and float64 Δ, Gram and product buffers of the
    # largest layer (24 bytes per element per task, as the engine budgets), or the chunk budget.
    bound = model_bytes + max(chunk, NUM_TASKS * largest * (4 + 24))
    print(f"\nmerge peak {peak / 2**20:.0f} MiB, baseline {baseline / 2**20:.0f} MiB, attributable "
          f"{merge_bytes / 2**20:.0f} MiB; bound {bound / 2**20:.0f} MiB; all checkpoints {all_checkpoints / 2**20:.0f} MiB")
    assert merge_bytes < bound, out
    assert merge_bytes < 0.35 * all_checkpoints, out


API_SCRIPT = r"""
import sys, torch, tsv_fast
from tsv_fast import io, synthetic

folder, budget = sys.argv[1], int(sys.argv[2])
paths = [f"{folder}/ft{i}.safetensors" for i in range(8)]
tsv_fast.tsv_merge({"w": torch.ones(4, 4)}, [{"w": 2 * torch.ones(4, 4)}])  # imports and one-time setup
def status(field):
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(field))
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
start = status("VmRSS")
out = tsv_fast.tsv_merge(f"{folder}/pre.safetensors", paths, max_chunk_bytes=budget)
print(status("VmHWM") - start, sum(t.numel() * t.element_size() for t in out.values()))
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc to reset the peak")
def test_api_merge_memory_is_the_output_plus_two_chunks(tmp_path):
    """tsv_merge through the API on files: the peak RSS growth around the call stays within the
    output it returns plus the two chunks the read-ahead holds (and allocator slack). Before the mmap
    threshold was pinned, glibc's heap and the read-ahead thread's arena fragmented: 69-80 MiB here."""
    import subprocess
    import sys

    from tsv_fast import io

    synthetic.LAYOUTS["_vit256"] = lambda: synthetic._vit_layout(256, 6, 16, 14, 256)
    try:
        pre, fts = synthetic.checkpoints("_vit256", 8, delta_rank=None)
    finally:
        del synthetic.LAYOUTS["_vit256"]
    io.save_checkpoint(pre, tmp_path / "pre.safetensors")
    for i, ft in enumerate(fts):
        io.save_checkpoint(ft, tmp_path / f"ft{i}.safetensors")
    budget = 8 << 20
    result = subprocess.run([sys.executable, "-c", API_SCRIPT, str(tmp_path), str(budget)], capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    growth, output = map(int, result.stdout.split())
    bound = output + 2 * budget + (16 << 20)
    print(f"\nAPI merge: peak growth {growth / 2**20:.1f} MiB, output {output / 2**20:.1f} MiB, bound {bound / 2**20:.1f} MiB")
    assert growth < bound

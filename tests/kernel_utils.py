"""Shared helpers of the Triton kernel tests: device choice, tolerance policy, NaN poisoning.

Import this module *first* in a kernel test module: without CUDA it sets ``TRITON_INTERPRET=1``
before triton is imported, so the kernels run on CPU tensors in Triton's interpreter. With CUDA
(and no explicit ``TRITON_INTERPRET``) the same tests run natively on the GPU.

Tolerance policy (one place, CONVENTIONS.md §3): a kernel is compared with the float64 twin; its
error may be at most ``FACTOR`` times the error of plain torch in the same dtype (the twin run in
that dtype) plus a floor for the dtype. Failures name the tensor and print both errors and the bound.
"""
from __future__ import annotations

import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0", "false", "False")
DEVICE = torch.device("cpu" if INTERPRET or not torch.cuda.is_available() else "cuda")
HAS_CUDA = torch.cuda.is_available() and not INTERPRET

#: A kernel may err at most this many times plain torch in the same dtype (flash-attention's rule).
FACTOR = 2.0
#: Error floors per accumulation / output dtype (a kernel that is exact where torch is exact still
#: may round differently once).
FLOOR = {torch.float64: 1e-13, torch.float32: 2e-7, torch.bfloat16: 8e-3, torch.float16: 1e-3}
#: 3xTF32 is close to, not equal to, IEEE fp32: a looser bound on the GPU.
TF32X3_FACTOR = 8.0



def gpu(test):
    """A native-GPU test: marked ``gpu`` (``pytest -m gpu`` selects it; bench/gpu_check.sh fails
    the run if it skips there) and skipped without CUDA."""
    return pytest.mark.gpu(pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device (and TRITON_INTERPRET unset)")(test))


def triton_or_skip() -> None:
    """Skip the calling module when triton is missing."""
    pytest.importorskip("triton", reason="the triton package is not installed")


def load_kernel(op: str):
    """``tsv_fast.kernels.<op>``, skipping the test module if its kernels were decorated in the
    wrong mode (triton imported before TRITON_INTERPRET was set, on a machine without CUDA)."""
    triton_or_skip()
    from tsv_fast.backends.triton import kernel_module

    module = kernel_module(op)
    if DEVICE.type == "cpu":
        from triton.runtime.interpreter import InterpretedFunction

        jitted = [v for k, v in vars(module).items() if k.startswith("_") and k.endswith("_kernel")]
        if jitted and not all(isinstance(f, InterpretedFunction) for f in jitted):
            pytest.skip(f"tsv_fast.kernels.{op} was imported before TRITON_INTERPRET=1 was set; "
                        f"run the kernel tests in a fresh process", allow_module_level=True)
    return module


# ------------------------------------------------------------------------------------------------
# Errors and bounds
# ------------------------------------------------------------------------------------------------
def rel_fro(got: torch.Tensor, want: torch.Tensor, scale: float | None = None) -> float:
    """‖got - want‖_F / max(‖want‖_F, scale) in float64 (absolute error when both are 0).

    ``scale`` is the size of the quantity when ``want`` is 0 by cancellation (e.g. STI of one task).
    """
    got, want = got.double().cpu(), want.double().cpu()
    scale = max(torch.linalg.vector_norm(want).item(), scale or 0.0)
    err = torch.linalg.vector_norm(got - want).item()
    return err / scale if scale > 0 else err


def bound_for(torch_error: float, dtype: torch.dtype, factor: float = FACTOR) -> float:
    """The bound for a kernel whose dtype-matched torch computation errs by ``torch_error``."""
    return factor * torch_error + FLOOR[dtype]


def assert_close(name: str, got: torch.Tensor, want: torch.Tensor, bound: float, *,
                 torch_error: float | None = None, scale: float | None = None) -> float:
    """Assert rel_fro(got, want) <= bound and a finite result of the expected shape; returns the error."""
    assert tuple(got.shape) == tuple(want.shape), f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert bool(torch.isfinite(got).all()), f"{name}: non-finite values (an unwritten NaN-poisoned element?)"
    err = rel_fro(got, want, scale)
    extra = f", torch in the same dtype: {torch_error:.3e}" if torch_error is not None else ""
    assert err <= bound, f"{name}: relative Frobenius error {err:.3e} > bound {bound:.3e}{extra}"
    record(" ".join(name.split()[:2]), err)
    return err


#: Worst error seen per kernel in this process (printed by the tests' summary, see report_worst).
WORST: dict[str, float] = {}


def record(kernel: str, err: float) -> None:
    WORST[kernel] = max(WORST.get(kernel, 0.0), err)


def report_worst() -> str:
    return ", ".join(f"{k}: {v:.2e}" for k, v in sorted(WORST.items()))


# ------------------------------------------------------------------------------------------------
# Poisoned outputs and strided inputs
# ------------------------------------------------------------------------------------------------
def poisoned(shape, dtype: torch.dtype, *, strided: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """A NaN-filled output ``(view, buffer)``; with ``strided`` the view takes every other element
    of the last dim of a larger buffer, so the gaps must still be NaN after the launch."""
    shape = tuple(shape)
    if not strided:
        buf = torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)
        return buf, buf
    buf = torch.full((*shape[:-1], 2 * shape[-1] + 1), float("nan"), dtype=dtype, device=DEVICE)
    return buf[..., 1::2], buf


def assert_gaps_untouched(name: str, view: torch.Tensor, buffer: torch.Tensor) -> None:
    """Every element of ``buffer`` outside ``view`` is still NaN (no out-of-bounds writes)."""
    if view.data_ptr() == buffer.data_ptr() and view.shape == buffer.shape:
        return
    mask = torch.ones_like(buffer, dtype=torch.bool)
    mask[..., 1::2] = False
    assert bool(torch.isnan(buffer[mask]).all()), f"{name}: the kernel wrote outside its output view"


def layout(t: torch.Tensor, kind: str) -> torch.Tensor:
    """``t`` (values unchanged) in a given memory layout, on DEVICE.

    contiguous; "strided": every other element of the last dim of a NaN-padded buffer (a kernel
    that ignores strides reads NaN); "transposed": column-major storage of the last two dims.
    """
    t = t.to(DEVICE)
    if kind == "contiguous":
        return t.contiguous()
    if kind == "strided":
        buf = torch.full((*t.shape[:-1], 2 * t.shape[-1]), float("nan"), dtype=t.dtype, device=DEVICE)
        buf[..., ::2] = t
        return buf[..., ::2]
    if kind == "transposed":
        return t.mT.contiguous().mT
    raise ValueError(kind)


def snapshot(*tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    return [None if t is None else t.clone() for t in tensors]


def assert_unmodified(before: list, after: list) -> None:
    for i, (b, a) in enumerate(zip(before, after)):
        if b is not None:
            assert torch.equal(torch.nan_to_num(b), torch.nan_to_num(a)), f"input {i} was modified by the kernel"


def real_shape_inputs(shape, num_tasks: int, dtype: torch.dtype, seed: int = 0):
    """Pretrained [m, n] and fine-tuned [T, m, n] weights at a real layer shape, built on DEVICE
    (random base, low-rank-ish synthetic deltas of scale 1e-2 as in real fine-tunes)."""
    generator = torch.Generator(device=DEVICE).manual_seed(seed)
    m, n = shape
    pre = torch.randn(m, n, generator=generator, device=DEVICE) * 0.02
    rank = min(m, n) // 4
    left = torch.randn(num_tasks, m, rank, generator=generator, device=DEVICE)
    right = torch.randn(num_tasks, rank, n, generator=generator, device=DEVICE)
    delta = (left @ right) * (1e-2 / rank)
    return pre.to(dtype), (pre + delta).to(dtype)





# ------------------------------------------------------------------------------------------------
# Ahead-of-time compilation for real GPUs, without one
# ------------------------------------------------------------------------------------------------
#: Shared memory per block available on each architecture (bytes): A100 (sm80), H100 (sm90).
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}

_COMPILE_SCRIPT = r"""
import json, os, re, sys
os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, {root!r})
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from tsv_fast.backends.triton import kernel_module

jobs = json.loads(sys.argv[1])
results = []
for job in jobs:
    fn = getattr(kernel_module(job["op"]), job["kernel"])
    constexprs = job["constexprs"]
    signature = {{}}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in job["pointers"]:
            signature[name] = "*" + job["pointers"][name]
        else:
            signature[name] = "i32"
    compiled = triton.compile(ASTSource(fn, signature, constexprs=constexprs),
                              target=GPUTarget("cuda", job["arch"], 32),
                              options={{"num_warps": job["num_warps"], "num_stages": job["num_stages"]}})
    ptx = compiled.asm["ptx"]
    results.append({{"shared": compiled.metadata.shared, "wgmma": len(re.findall(r"wgmma\.mma_async", ptx)),
                    "mma": len(re.findall(r"\bmma\.sync", ptx)), "fma_f32": len(re.findall(r"fma\.rn\.f32", ptx)),
                    "fma_f64": len(re.findall(r"fma\.rn\.f64", ptx)), "cubin": len(compiled.asm.get("cubin", b""))}})
print(json.dumps(results))
"""


def compile_for_gpu(jobs: list[dict], timeout: float = 600) -> list[dict]:
    """Compile kernels to cubin for real GPU architectures on a CPU-only machine (Triton ships
    ptxas), in a subprocess without TRITON_INTERPRET. Each job: op, kernel, pointers {arg: dtype},
    constexprs, arch (80 or 90), num_warps, num_stages. Returns per job the shared memory and the
    counts of wgmma / mma.sync / fp32 FMA / fp64 FMA instructions in the PTX."""
    import json
    import subprocess
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[1])
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT.format(root=root), json.dumps(jobs)],
                          capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        raise AssertionError(f"ahead-of-time compilation failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def config_jobs(op: str, kernel: str, pointers: dict, fixed: dict, configs, arch: int) -> list[dict]:
    """One compile job per triton.Config of an autotune list."""
    return [{"op": op, "kernel": kernel, "pointers": pointers, "constexprs": {**fixed, **c.kwargs}, "arch": arch,
             "num_warps": c.num_warps, "num_stages": c.num_stages} for c in configs]


#: The full ahead-of-time sweep (every autotune config, sm80 and sm90) takes minutes: opt-in.
SWEEP = os.environ.get("TSV_FAST_COMPILE_SWEEP", "0") == "1"
sweep = pytest.mark.skipif(not SWEEP, reason="set TSV_FAST_COMPILE_SWEEP=1 to compile every autotune config")


def assert_compiled(jobs: list[dict], results: list[dict], *, tensor_core: bool) -> None:
    """Each compiled job fits the shared memory of its arch and (if asked) uses tensor cores."""
    for job, res in zip(jobs, results):
        label = f"{job['kernel']} sm{job['arch']} {job['constexprs']}"
        assert res["cubin"] > 0, f"{label}: no cubin"
        assert res["shared"] <= SHARED_LIMIT[job["arch"]], f"{label}: {res['shared']} B of shared memory"
        if tensor_core:
            assert res["wgmma"] + res["mma"] > 0, f"{label}: no tensor-core instruction in the PTX"


def compile_jobs(op: str, arch: int, modes, *, sizes=(256, 4096), first_only: bool = False) -> list[dict]:
    """Compile jobs for ``op`` ("task_gram", "stack_gram", "sti", "reconstruct") on ``arch``: every
    config of its autotune list (or the first one) per accumulation mode, with the pointer dtypes
    the backend uses (bf16 weights for the task Gram and the reconstruction output)."""
    gen = arch // 10
    jobs = []
    for mode in modes:
        acc = "fp64" if mode == "fp64" else "fp32"
        flags = {"ACC_FP64": mode == "fp64"}
        if op in ("task_gram", "stack_gram"):
            x_dtype = "bf16" if op == "task_gram" else acc
            if mode == "fp64" and x_dtype == "bf16" and load_kernel("_common").needs_fp64_upcast():
                x_dtype = "fp32"  # what the launcher passes on Triton < 3.9 (host upcast)
            configs = load_kernel("task_gram")._gram_configs(gen, mode)
            jobs += config_jobs("task_gram", "_gram_kernel", {"x_ptr": x_dtype, "base_ptr": x_dtype, "out_ptr": acc},
                                {**flags, "HAS_BASE": op == "task_gram", "PRECISION": mode},
                                configs[:1] if first_only else configs, arch)
        elif op == "sti":
            module = load_kernel("sti")
            configs = [module._sti_config(gen, size, mode) for size in sizes]
            jobs += config_jobs("sti", "_sti_kernel", {"gu_ptr": acc, "s_ptr": acc, "gv_ptr": acc, "part_ptr": acc},
                                flags, configs[:1] if first_only else configs, arch)
        elif op == "reconstruct":
            configs = load_kernel("reconstruct")._reconstruct_configs(gen, mode)
            jobs += config_jobs("reconstruct", "_reconstruct_kernel",
                                {"a_ptr": acc, "b_ptr": acc, "base_ptr": "bf16", "alpha_ptr": acc, "out_ptr": "bf16"},
                                {**flags, "HAS_BASE": True, "PRECISION": mode},
                                configs[:1] if first_only else configs, arch)
        else:
            raise ValueError(op)
    return jobs


def check_compiles(op: str, arch: int) -> None:
    """Every config of every mode of ``op`` compiles for ``arch``; tensor-core modes use MMA."""
    for modes, tensor_core in [(["fp64", "tf32x3"], True), (["ieee"], False)]:
        if op == "sti":
            modes = [m for m in modes if m != "tf32x3"]
            tensor_core = modes == ["fp64"]
        jobs = compile_jobs(op, arch, modes)
        assert_compiled(jobs, compile_for_gpu(jobs), tensor_core=tensor_core)

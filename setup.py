"""Build script of tsv_fast: pure-Python packages plus, where possible, the CUDA extension.

The extension ``tsv_fast._C`` (csrc/, cuSOLVER batched SVD / eigh) is built only when
  * TSV_FAST_SKIP_CUDA_BUILD is not set to 1,
  * torch is importable in the build environment and is a CUDA build (torch.version.cuda),
  * nvcc is found (CUDA_HOME / CUDA_PATH / PATH), and
  * cusolverDn.h and cublas_v2.h are found (CUDA toolkit, or the nvidia-cusolver / nvidia-cublas
    wheels that CUDA builds of torch depend on).
Otherwise, or when the build fails, a pure-Python install still results, and the reason is
written to tsv_fast/_build_info.json, which tsv_fast.backends.cusolver reports.
TSV_FAST_FORCE_CUDA_BUILD=1 turns a skip or failure into an error.

Torch is imported lazily: with pip's default build isolation torch is absent from the build
environment and the extension is skipped; use ``pip install --no-build-isolation .`` to build it.

TORCH_CUDA_ARCH_LIST is honoured; when it is unset and no GPU is visible it defaults to
"8.0;9.0" (A100, H100). MAX_JOBS defaults to min(4, CPU count) and is capped at the CPU count.
"""

import json
import os
import shutil
import sys
import time
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_ext import build_ext as _setuptools_build_ext
from setuptools.command.build_py import build_py as _setuptools_build_py

ROOT = Path(__file__).resolve().parent
BUILD_INFO_NAME = "_build_info.json"
DEFAULT_ARCH_LIST = "8.0;9.0"


def _env_flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


SKIP = _env_flag("TSV_FAST_SKIP_CUDA_BUILD")
FORCE = _env_flag("TSV_FAST_FORCE_CUDA_BUILD")


def _site_dirs():
    """Directories where pip installs packages (the nvidia-* wheels live there)."""
    import site
    import sysconfig

    dirs = [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    try:
        dirs += site.getsitepackages() + [site.getusersitepackages()]
    except AttributeError:  # some virtualenvs lack these
        pass
    dirs += [p for p in sys.path if p.endswith("site-packages")]
    seen, out = set(), []
    for d in dirs:
        if d and d not in seen and os.path.isdir(d):
            seen.add(d)
            out.append(d)
    return out


def find_nvcc(cuda_home):
    candidates = []
    if cuda_home:
        candidates.append(os.path.join(cuda_home, "bin", "nvcc"))
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(os.path.join(os.environ[var], "bin", "nvcc"))
    which = shutil.which("nvcc")
    if which:
        candidates.append(which)
    candidates.append("/usr/local/cuda/bin/nvcc")
    for c in candidates:
        if os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def find_cusolver(cuda_home):
    """Return (include_dirs, library_dirs, link_args) for cuSOLVER, or None if its headers are
    missing. Looks in the toolkit first, then in the NVIDIA wheels: nvidia/cu13/{include,lib}
    (CUDA 13 wheels) or nvidia/{cusolver,cublas}/{include,lib} (CUDA 12 wheels)."""
    if cuda_home:
        inc = os.path.join(cuda_home, "include")
        if os.path.isfile(os.path.join(inc, "cusolverDn.h")) and os.path.isfile(
            os.path.join(inc, "cublas_v2.h")
        ):
            # The toolkit's lib64 holds libcusolver.so; CUDAExtension already links from it.
            return [inc], [], ["-lcusolver"]
    for site_dir in _site_dirs():
        nv = Path(site_dir) / "nvidia"
        layouts = [(nv / "cu13", nv / "cu13"), (nv / "cusolver", nv / "cublas")]
        for solver_root, blas_root in layouts:
            solver_inc, blas_inc = solver_root / "include", blas_root / "include"
            if (solver_inc / "cusolverDn.h").is_file() and (blas_inc / "cublas_v2.h").is_file():
                libdir = solver_root / "lib"
                libs = sorted(libdir.glob("libcusolver.so*"))
                # Wheels ship only the versioned soname: link it by file name, and add an rpath
                # (torch normally has loaded the same library already).
                real = [p for p in libs if p.name != "libcusolver.so"]
                if (libdir / "libcusolver.so").exists():
                    link = ["-lcusolver"]
                elif real:
                    link = ["-l:" + real[0].name]
                else:
                    continue
                link.append("-Wl,-rpath," + str(libdir))
                return sorted({str(solver_inc), str(blas_inc)}), [str(libdir)], link
    return None


def plan_cuda_build():
    """Decide whether to build tsv_fast._C. Returns (extension_kwargs or None, info dict)."""
    info = {"built": False, "reason": "", "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if SKIP:
        info["reason"] = "TSV_FAST_SKIP_CUDA_BUILD=1 was set at build time"
        return None, info
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME
    except Exception as exc:  # ImportError, or a broken torch
        info["reason"] = (
            f"torch was not importable in the build environment ({exc.__class__.__name__}: {exc}); "
            "with pip's build isolation use `pip install --no-build-isolation .`"
        )
        return None, info
    info["torch"] = torch.__version__
    info["torch_cuda"] = torch.version.cuda
    if torch.version.cuda is None:
        info["reason"] = f"torch {torch.__version__} is a CPU-only build (torch.version.cuda is None)"
        return None, info
    nvcc = find_nvcc(CUDA_HOME)
    if nvcc is None:
        info["reason"] = "nvcc was not found (set CUDA_HOME to a CUDA toolkit)"
        return None, info
    if not CUDA_HOME or not os.path.isfile(os.path.join(CUDA_HOME, "include", "cuda_runtime_api.h")):
        # torch derives CUDA_HOME from the nvcc on PATH; a wrapper script there (/usr/local/bin/nvcc)
        # gives a directory without the toolkit's headers, and the host compiler needs them.
        info["reason"] = (f"CUDA_HOME={CUDA_HOME} has no include/cuda_runtime_api.h; set CUDA_HOME to the CUDA "
                          "toolkit (e.g. /usr/local/cuda)")
        return None, info
    info["nvcc"] = nvcc
    found = find_cusolver(CUDA_HOME)
    if found is None:
        info["reason"] = (
            "cusolverDn.h / cublas_v2.h were found neither in the CUDA toolkit "
            f"({CUDA_HOME}) nor in an nvidia-cusolver / nvidia-cublas wheel"
        )
        return None, info
    include_dirs, library_dirs, link_args = found
    info["cusolver_include_dirs"] = include_dirs
    # A wheel's include dir (nvidia/cu13/include) also holds cuda_runtime.h and friends without
    # crt/host_config.h: searched first, it breaks the toolkit's headers. -idirafter puts it after
    # them, so it only supplies what the toolkit lacks (cusolverDn.h, cublas_v2.h). csrc/ has no
    # .cu files, so only the host compiler needs it.
    toolkit_include = os.path.join(CUDA_HOME, "include") if CUDA_HOME else None
    wheel_includes = [d for d in include_dirs if d != toolkit_include]
    include_dirs = [d for d in include_dirs if d == toolkit_include]
    after = [arg for d in wheel_includes for arg in ("-idirafter", d)]

    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        try:
            gpu_visible = torch.cuda.is_available() and torch.cuda.device_count() > 0
        except Exception:
            gpu_visible = False
        if not gpu_visible:
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCH_LIST
    info["arch_list"] = os.environ.get("TORCH_CUDA_ARCH_LIST", "<visible GPUs>")

    cpus = os.cpu_count() or 1
    try:
        jobs = int(os.environ.get("MAX_JOBS", min(4, cpus)))
    except ValueError:
        jobs = min(4, cpus)
    os.environ["MAX_JOBS"] = str(max(1, min(jobs, cpus)))

    kwargs = dict(
        name="tsv_fast._C",
        sources=sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.c[pu]*")
                       if p.suffix in (".cpp", ".cu")),
        include_dirs=[str(ROOT / "csrc")] + include_dirs,
        library_dirs=library_dirs,
        # -O2 -g0: the wrappers are not hot, and Python's default -O3 -g makes svd.cpp's template
        # instantiations 3.6x slower to compile (110 s vs 30 s on a 2-core CI machine).
        extra_compile_args={"cxx": ["-O2", "-g0", *after], "nvcc": ["-O3"]},
        extra_link_args=link_args,
    )
    return kwargs, info


def write_build_info(info, *dirs):
    """Write the build record into each given package directory (source tree, build dir)."""
    text = json.dumps(info, indent=2, sort_keys=True) + "\n"
    for d in dirs:
        try:
            Path(d).mkdir(parents=True, exist_ok=True)
            (Path(d) / BUILD_INFO_NAME).write_text(text)
        except OSError as exc:
            print(f"tsv_fast setup: could not write {BUILD_INFO_NAME} to {d}: {exc}", file=sys.stderr)


def make_build_ext(base, info):
    """A build_ext that records the outcome and, unless forced, survives a failed CUDA build."""

    class TsvBuildExt(base):
        def run(self):
            pkg_dirs = [ROOT / "tsv_fast", Path(self.build_lib) / "tsv_fast"]
            try:
                super().run()
            except Exception as exc:
                if FORCE:
                    raise
                info.update(built=False, reason=f"the CUDA build failed: {exc.__class__.__name__}: {exc}")
                write_build_info(info, *pkg_dirs)
                print(f"tsv_fast setup: WARNING: {info['reason']}; installing without tsv_fast._C",
                      file=sys.stderr)
                return
            info.update(built=True, reason="")
            write_build_info(info, *pkg_dirs)

    return TsvBuildExt


class build_py_with_kernels(_setuptools_build_py):
    """Copy the Triton kernel modules of the top-level kernels/ folder into tsv_fast/kernels/.

    kernels/ has no __init__.py, so that a clone root on sys.path never shadows Hugging Face's
    ``kernels`` package; the modules become ``tsv_fast.kernels.<op>`` only inside the package.
    """

    def run(self):
        super().run()
        target = Path(self.build_lib) / "tsv_fast" / "kernels"
        target.mkdir(parents=True, exist_ok=True)
        for module in sorted((ROOT / "kernels").glob("*.py")):
            self.copy_file(str(module), str(target / module.name))


def main():
    ext_kwargs, info = plan_cuda_build()
    if ext_kwargs is None and FORCE and not SKIP:
        raise RuntimeError(f"TSV_FAST_FORCE_CUDA_BUILD=1 but tsv_fast._C cannot be built: {info['reason']}")
    if ext_kwargs is None:
        print(f"tsv_fast setup: skipping the CUDA extension: {info['reason']}", file=sys.stderr)
    else:
        # Until build_ext reports back, record the attempt (read only if build_ext never runs).
        info["reason"] = "the CUDA build was planned but build_ext did not run"
    write_build_info(info, ROOT / "tsv_fast")

    ext_modules, cmdclass = [], {}
    if ext_kwargs is not None:
        from torch.utils.cpp_extension import BuildExtension, CUDAExtension

        ext_modules = [CUDAExtension(**ext_kwargs)]
        cmdclass["build_ext"] = make_build_ext(BuildExtension.with_options(use_ninja=True), info)
    else:
        cmdclass["build_ext"] = _setuptools_build_ext

    packages = find_packages(include=["tsv_fast", "tsv_fast.*"])
    cmdclass["build_py"] = build_py_with_kernels

    metadata = {}
    pyproject = ROOT / "pyproject.toml"
    has_project_table = False
    if pyproject.is_file():
        # A line "[project]" is all we need to know (tomllib is 3.11+ only).
        has_project_table = any(line.strip() == "[project]" for line in pyproject.read_text().splitlines())
    if not has_project_table:  # pyproject.toml owns the metadata when it declares [project]
        metadata = dict(name="tsv_fast", version="0.1.0", python_requires=">=3.9")

    setup(
        packages=packages,
        package_data={"tsv_fast": [BUILD_INFO_NAME]},
        ext_modules=ext_modules,
        cmdclass=cmdclass,
        **metadata,
    )


if __name__ == "__main__":
    main()

"""Two LAPACK/BLAS routines torch does not expose, callable without the GIL.

scipy's own wrappers (``scipy.linalg.eigh``, ``scipy.linalg.blas.dsyrk``) hold the GIL for the whole
call, so threads over them run one at a time (measured: two threads slower than one). The same
routines are published as C function pointers by ``scipy.linalg.cython_lapack`` / ``cython_blas``
(a public, stable API); calling those pointers through ctypes releases the GIL, so a thread pool over
tasks uses every core. Arrays are float64, C-contiguous and read as their Fortran transposes.
"""
from __future__ import annotations

import ctypes

import numpy as np

_D = ctypes.POINTER(ctypes.c_double)
_I = ctypes.POINTER(ctypes.c_int)
_C = ctypes.c_char_p


def _function(module, name: str, argtypes: list) -> ctypes._CFuncPtr:
    capsule = module.__pyx_capi__[name]
    get_name, get_pointer = ctypes.pythonapi.PyCapsule_GetName, ctypes.pythonapi.PyCapsule_GetPointer
    get_name.restype, get_name.argtypes = ctypes.c_char_p, [ctypes.py_object]
    get_pointer.restype, get_pointer.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
    pointer = get_pointer(capsule, get_name(capsule))
    return ctypes.CFUNCTYPE(None, *argtypes)(pointer)  # CFUNCTYPE calls release the GIL


try:
    from scipy.linalg import cython_blas, cython_lapack

    _dsyevr = _function(cython_lapack, "dsyevr", [_C, _C, _C, _I, _D, _I, _D, _D, _I, _I, _D, _I, _D, _D, _I, _I,
                                                  _D, _I, _I, _I, _I])
    _dsyrk = _function(cython_blas, "dsyrk", [_C, _C, _I, _I, _D, _D, _I, _D, _D, _I])
    AVAILABLE = True
except Exception:  # pragma: no cover - scipy is a declared dependency; torch ops are the fallback
    AVAILABLE = False


def _ptr(array: np.ndarray, kind=_D):
    return array.ctypes.data_as(kind)


def _int(value: int):
    return ctypes.byref(ctypes.c_int(value))


def gram(x: np.ndarray) -> np.ndarray:
    """XᵀX [n, n] of a C- or Fortran-ordered float64 [m, n] matrix by BLAS dsyrk (one triangle, half
    the flops of a GEMM: measured 0.067 s vs 0.117 s at 3072×768, one thread), then mirrored."""
    m, n = x.shape
    if not (x.flags.c_contiguous or x.flags.f_contiguous):
        x = np.ascontiguousarray(x)
    # Fortran reads C-ordered X as Xᵀ [n, m] (C = A Aᵀ, 'N') and F-ordered X as X (C = AᵀA, 'T')
    trans, lda = (b"N", n) if x.flags.c_contiguous else (b"T", m)
    out = np.zeros((n, n))
    one, zero = ctypes.c_double(1.0), ctypes.c_double(0.0)
    # Fortran-lower of the output is the row-major upper triangle
    _dsyrk(b"L", trans, _int(n), _int(m), ctypes.byref(one), _ptr(x), _int(max(lda, 1)), ctypes.byref(zero),
           _ptr(out), _int(max(n, 1)))
    out += np.triu(out, 1).T
    return out


def top_eigh(a: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k largest eigenvalues [k] and their eigenvectors [n, k] of a symmetric float64 [n, n],
    largest first: LAPACK's MRRR solver dsyevr computes only those k (about 2× faster than a full
    eigh at n = 768). ``a`` is overwritten."""
    n = a.shape[0]
    found = ctypes.c_int(0)
    info = ctypes.c_int(0)
    w = np.empty(n)
    z = np.empty((k, n))  # Fortran [n, k]: row i of z is eigenvector i
    isuppz = np.empty(2 * max(k, 1), dtype=np.intc)
    zero = ctypes.c_double(0.0)
    args = lambda work, lwork, iwork, liwork: (  # noqa: E731
        b"V", b"I", b"U", _int(n), _ptr(a), _int(max(n, 1)), ctypes.byref(zero), ctypes.byref(zero),
        _int(n - k + 1), _int(n), ctypes.byref(zero), ctypes.byref(found), _ptr(w), _ptr(z), _int(max(n, 1)),
        _ptr(isuppz, _I), _ptr(work), _int(lwork), _ptr(iwork, _I), _int(liwork), ctypes.byref(info))
    work_size, iwork_size = np.empty(1), np.empty(1, dtype=np.intc)
    _dsyevr(*args(work_size, -1, iwork_size, -1))  # workspace query
    work, iwork = np.empty(int(work_size[0])), np.empty(int(iwork_size[0]), dtype=np.intc)
    _dsyevr(*args(work, work.size, iwork, iwork.size))
    if info.value != 0 or found.value != k:
        raise RuntimeError(f"dsyevr failed (info={info.value}, found {found.value} of {k} eigenvalues)")
    return w[:k][::-1].copy(), np.ascontiguousarray(z[::-1].T)  # ascending -> largest first


def _thread_local_setter():
    """OpenBLAS's ``openblas_set_num_threads_local`` (>= 0.3.27) of the library behind scipy's LAPACK,
    found among the loaded libraries; None where that is not scipy's bundled OpenBLAS."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "openblas" in line and "scipy" in line.split()[-1]}
        paths = [p for p in paths if "scipy.libs" in p] or sorted(paths)
        setter = ctypes.CDLL(paths[0]).openblas_set_num_threads_local
        setter.restype, setter.argtypes = ctypes.c_int, [ctypes.c_int]
        return setter
    except (OSError, IndexError, AttributeError):
        return None


_SET_LOCAL_THREADS = _thread_local_setter() if AVAILABLE else None


def single_threaded_in_this_thread() -> bool:
    """Make this thread's OpenBLAS calls single-threaded (workers of a pool that already uses every
    core: OpenBLAS threads on top oversubscribe, measured 18x slower on a loaded 2-core machine).
    False where that cannot be done."""
    if _SET_LOCAL_THREADS is None:
        return False
    _SET_LOCAL_THREADS(1)
    return True

"""BLAS GEMM callable from numba-compiled code.

The CPU kernels multiply small tiles with the BLAS that SciPy ships
(``scipy.linalg.cython_blas``).  The function address is passed to the kernels
as an ordinary integer argument and called through :func:`gemm`, an LLVM
intrinsic, so the compiled kernels contain no process-specific constant and can
be cached on disk (a ``ctypes`` function object would make numba refuse to
cache).

All matrices are row-major tiles addressed by raw pointers: a tile starts at a
byte address and its rows are ``ld`` elements apart, with unit stride inside a
row.  That covers slices of arbitrarily strided arrays whose last axis is
contiguous, so no copy is needed for transposed (B, L, H, D) inputs.
"""

from __future__ import annotations

import functools

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import get_cython_function_address, intrinsic

from npsparseattn.cpu._threads import single_threaded_blas

__all__ = ["gemm_address", "gemm_nn", "gemm_nt", "gemm_tn", "single_threaded_blas", "small_matrix_kernels"]

# OpenBLAS cores with small-matrix kernels (products of m*n*k <= 10**6 without packing; OpenBLAS's
# GEMM_SMALL_MATRIX_PERMIT): its AVX-512 cores.  Its Haswell/Zen (AVX2) cores always pack.
SMALL_MATRIX_CORES = frozenset({"skylakex", "cooperlake", "sapphirerapids"})

_N = 78  # ord("N"): no transpose
_T = 84  # ord("T"): transpose


@intrinsic
def _fortran_gemm(typingctx, fn, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc):
    """Call the Fortran-convention ``?gemm`` at address ``fn``.

    ``ta``/``tb`` are character codes, ``a``/``b``/``c`` byte addresses, the
    rest values; every argument is passed by reference as Fortran expects.
    """
    sig = types.void(fn, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)

    def codegen(context, builder, signature, args):
        argtys = signature.args
        i8p = ir.IntType(8).as_pointer()

        def by_ref(pos, as_type):
            slot = cgutils.alloca_once(builder, context.get_value_type(as_type))
            builder.store(context.cast(builder, args[pos], argtys[pos], as_type), slot)
            return builder.bitcast(slot, i8p)

        def address(pos):
            return builder.inttoptr(args[pos], i8p)

        real = argtys[6]
        refs = [
            by_ref(1, types.int8),
            by_ref(2, types.int8),
            by_ref(3, types.int32),
            by_ref(4, types.int32),
            by_ref(5, types.int32),
            by_ref(6, real),
            address(7),
            by_ref(8, types.int32),
            address(9),
            by_ref(10, types.int32),
            by_ref(11, real),
            address(12),
            by_ref(13, types.int32),
        ]
        fnty = ir.FunctionType(ir.VoidType(), [i8p] * 13)
        builder.call(builder.inttoptr(args[0], fnty.as_pointer()), refs)
        return context.get_dummy_value()

    return sig, codegen


@njit(inline="always")
def gemm_nt(fn, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc):
    """Row-major ``C[m, n] = alpha * A[m, k] @ B[n, k].T + beta * C``."""
    _fortran_gemm(fn, _T, _N, n, m, k, alpha, b, ldb, a, lda, beta, c, ldc)


@njit(inline="always")
def gemm_nn(fn, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc):
    """Row-major ``C[m, n] = alpha * A[m, k] @ B[k, n] + beta * C``."""
    _fortran_gemm(fn, _N, _N, n, m, k, alpha, b, ldb, a, lda, beta, c, ldc)


@njit(inline="always")
def gemm_tn(fn, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc):
    """Row-major ``C[m, n] = alpha * A[k, m].T @ B[k, n] + beta * C``."""
    _fortran_gemm(fn, _N, _T, n, m, k, alpha, b, ldb, a, lda, beta, c, ldc)


@functools.cache
def small_matrix_kernels() -> bool:
    """True if the BLAS the kernels call is an OpenBLAS on one of :data:`SMALL_MATRIX_CORES`.

    It decides the tile shapes (:func:`npsparseattn.cpu.exact.tile_shape`):
    products kept under 10^6 multiply-adds run unpacked there, faster than
    any larger product; other BLAS builds and cores prefer larger tiles.
    The core is OpenBLAS's own choice (``OPENBLAS_CORETYPE`` overrides it),
    read through threadpoolctl from SciPy's BLAS, the one the kernels call.
    """
    import scipy.linalg.cython_blas  # noqa: F401  (load SciPy's BLAS, the one gemm_address points into)
    from threadpoolctl import threadpool_info

    blas = [info for info in threadpool_info() if info.get("user_api") == "blas"]
    scipy_first = sorted(blas, key=lambda info: "scipy.libs" not in str(info.get("filepath", "")))
    if not scipy_first or scipy_first[0].get("internal_api") != "openblas":
        return False
    return str(scipy_first[0].get("architecture") or "").lower() in SMALL_MATRIX_CORES


def gemm_address(dtype: np.dtype) -> int:
    """Address of SciPy's ``sgemm`` (float32) or ``dgemm`` (float64)."""
    name = {np.dtype(np.float32): "sgemm", np.dtype(np.float64): "dgemm"}[np.dtype(dtype)]
    return get_cython_function_address("scipy.linalg.cython_blas", name)

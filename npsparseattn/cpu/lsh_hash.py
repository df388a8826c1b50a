"""LSH hashing on the CPU (numba), backend ``"numba"`` of ``lsh_buckets``.

One parallel task per block of rows: the block is multiplied by the rotations
with one BLAS GEMM, then every factor's ``argmax(concat[xR, -xR])`` is found
without building the concatenation.  The buckets are those of the float64
product whatever the input dtype, so float32 and float64 copies of the same
values hash identically: float32 rows go through sgemm (2.4x faster than dgemm
on these skinny products), and the few rows whose argmax float32 rounding
could change are recomputed in float64.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from npsparseattn._dtypes import compute_dtype
from npsparseattn.cpu import DTYPES, KINDS
from npsparseattn.cpu._blas import gemm_address, gemm_nt, single_threaded_blas
from npsparseattn.cpu._tiles import FASTMATH
from npsparseattn.cpu._vecmath import maxnum

__all__ = ["DTYPES", "KINDS", "STRIDED_ROWS", "TOLERANCE", "buckets", "compute_dtype", "unsupported"]

STRIDED_ROWS = False
TOLERANCE = {"float16": 0.0, "bfloat16": 0.0, "float32": 0.0, "float64": 0.0}  # bucket ids: exact, ties included
_HASH_BLOCK = 256


def unsupported(problem) -> list[str]:
    """Every hashing problem on NumPy arrays is supported."""
    return []


@njit(inline="always")
def _row3(arr, m, i):
    """Byte address of ``arr[m, i, 0]`` for a C-contiguous 3-D array."""
    return arr.ctypes.data + m * arr.strides[0] + i * arr.strides[1]


@njit(inline="always")
def _bucket(y, factors, start):
    """``sum_f argmax(concat[y_f, -y_f]) * prod(previous factors)`` over the factor groups of ``y`` from ``start``.

    The argmax is that of NumPy on the concatenation: the first maximum wins.
    """
    bucket = 0
    product = 1
    for f in factors:
        half = f // 2
        seg = y[start : start + half]
        imax = 0
        imin = 0
        for c in range(1, half):
            if seg[c] > seg[imax]:
                imax = c
            if seg[c] < seg[imin]:
                imin = c
        index = imax if seg[imax] >= -seg[imin] else half + imin
        bucket += index * product
        product *= f
        start += half
    return bucket


@njit(inline="always", fastmath=FASTMATH)
def _block_buckets(yt, rows, factors, start, hi, lo, index, bucket):
    """``bucket[r] = _bucket(yt[:, r], factors, start)`` for ``rows`` rows of a column-major product, vectorised.

    ``yt`` is (columns, rows): each factor group takes the running maxima of
    ``y`` and ``-y`` across its columns, then finds the first column holding
    the winner (scanning backwards keeps the first occurrence); the loops run
    over rows, so they vectorise.
    """
    for r in range(rows):
        bucket[r] = 0
    product = 1
    for f in factors:
        half = f // 2
        first = yt[start, :rows]
        for r in range(rows):
            hi[r] = first[r]
            lo[r] = -first[r]
        for c in range(1, half):
            col = yt[start + c, :rows]
            for r in range(rows):
                hi[r] = maxnum(hi[r], col[r])
                lo[r] = maxnum(lo[r], -col[r])
        for r in range(rows):
            index[r] = 0
        for c in range(half - 1, -1, -1):
            col = yt[start + c, :rows]
            for r in range(rows):
                if hi[r] >= lo[r]:
                    index[r] = c if col[r] == hi[r] else index[r]
                else:
                    index[r] = half + c if -col[r] == lo[r] else index[r]
        for r in range(rows):
            bucket[r] += index[r] * product
        product *= f
        start += half


@njit(inline="always", fastmath=FASTMATH)
def _block_decided(yt, rows, factors, start, tol, top, second, decided):
    """Clear ``decided[r]`` where a factor group's two largest ``|y|`` (or the largest and 0) are within ``tol[r]``."""
    for f in factors:
        for r in range(rows):
            top[r] = 0
            second[r] = 0
        for c in range(start, start + f // 2):
            col = yt[c, :rows]
            for r in range(rows):
                a = abs(col[r])
                second[r] = maxnum(second[r], -maxnum(-top[r], -a))
                top[r] = maxnum(top[r], a)
        for r in range(rows):
            decided[r] = decided[r] and top[r] - second[r] > tol[r]
        start += f // 2


@njit(parallel=True, cache=True)
def _hash_kernel_f64(x, rot_t, factors, n_hashes, buckets, block, gemm):
    """Buckets of float64 rows: the rotation product with one dgemm per block of rows."""
    n_rows, length, d = x.shape
    width = rot_t.shape[0]
    cols = width // n_hashes
    n_blocks = (length + block - 1) // block
    for task in prange(n_rows * n_blocks):
        m = task // n_blocks
        i0 = (task % n_blocks) * block
        rows = min(block, length - i0)
        yt = np.empty((width, block), np.float64)
        hi = np.empty(block, np.float64)
        lo = np.empty(block, np.float64)
        index = np.empty(block, np.int32)
        bucket = np.empty(block, np.int32)
        gemm_nt(gemm, width, rows, d, 1.0, rot_t.ctypes.data, d, _row3(x, m, i0), d, 0.0, yt.ctypes.data, block)
        for hsh in range(n_hashes):
            _block_buckets(yt, rows, factors, hsh * cols, hi, lo, index, bucket)
            for r in range(rows):
                buckets[m, hsh, i0 + r] = bucket[r]


@njit(parallel=True, cache=True)
def _hash_kernel_f32(x, rot, rot_t32, bound, factors, n_hashes, buckets, block, gemm):
    """Buckets of float32 rows, equal to those of the float64 product.

    The product is taken with sgemm; its error on ``y_c`` is below
    ``(D + 2) * 2**-24 * |x| * |R_c|`` (``bound`` holds that factor times
    ``max_c |R_c|``, doubled, with a margin).  Where a group's two largest
    ``|y|`` (or the largest and zero) are closer than that, float32 cannot
    tell the float64 answer and the row is recomputed in float64.
    """
    n_rows, length, d = x.shape
    width = rot_t32.shape[0]
    cols = width // n_hashes
    n_blocks = (length + block - 1) // block
    for task in prange(n_rows * n_blocks):
        m = task // n_blocks
        i0 = (task % n_blocks) * block
        rows = min(block, length - i0)
        yt = np.empty((width, block), np.float32)
        hi = np.empty(block, np.float32)
        lo = np.empty(block, np.float32)
        index = np.empty(block, np.int32)
        bucket = np.empty((n_hashes, block), np.int32)
        tol = np.empty(block, np.float32)
        decided = np.ones(block, np.bool_)
        exact = np.empty(width, np.float64)
        one = np.float32(1.0)
        zero = np.float32(0.0)
        gemm_nt(gemm, width, rows, d, one, rot_t32.ctypes.data, d, _row3(x, m, i0), d, zero, yt.ctypes.data, block)
        for r in range(rows):
            src = x[m, i0 + r]
            norm = 0.0
            for c in range(d):
                norm += np.float64(src[c]) * np.float64(src[c])
            tol[r] = bound * np.sqrt(norm)
        for hsh in range(n_hashes):
            _block_buckets(yt, rows, factors, hsh * cols, hi, lo, index, bucket[hsh])
            _block_decided(yt, rows, factors, hsh * cols, tol, hi, lo, decided)
        for r in range(rows):
            if not decided[r]:
                src = x[m, i0 + r]
                for col in range(width):
                    total = 0.0
                    for c in range(d):
                        total += np.float64(src[c]) * rot[c, col]
                    exact[col] = total
                for hsh in range(n_hashes):
                    bucket[hsh, r] = _bucket(exact, factors, hsh * cols)
            for hsh in range(n_hashes):
                buckets[m, hsh, i0 + r] = bucket[hsh, r]


def buckets(x: np.ndarray, rotations: np.ndarray, factors: tuple[int, ...]) -> np.ndarray:
    """Random-rotation buckets of the rows of ``x``, as the float64 product ``xR`` gives them.

    Parameters
    ----------
    x : (M, L, D) C-contiguous float32 or float64 array
        float32 rows are multiplied in float32 and only the rows whose
        buckets float32 rounding could change are recomputed in float64.
    rotations : (D, n_hashes, sum(factors) // 2) float64 array
    factors : bucket count per factor (each even); the bucket is
        ``sum_f argmax(concat[xR_f, -xR_f]) * prod(previous factors)``

    Returns
    -------
    buckets : (M, n_hashes, L) int32 array in ``[0, prod(factors))``
    """
    n_rows, length, d = x.shape
    n_hashes = rotations.shape[1]
    buckets = np.empty((n_rows, n_hashes, length), np.int32)
    if buckets.size == 0:
        return buckets
    rot = np.ascontiguousarray(rotations, dtype=np.float64).reshape(d, -1)
    rot_t = np.ascontiguousarray(rot.T)
    factors_arr = np.asarray(factors, np.int64)
    with single_threaded_blas():
        if x.dtype == np.float64:
            _hash_kernel_f64(x, rot_t, factors_arr, n_hashes, buckets, _HASH_BLOCK, gemm_address(np.float64))
        else:
            bound = 2.2 * (d + 2) * 2.0**-24 * float(np.sqrt((rot**2).sum(axis=0)).max())
            _hash_kernel_f32(
                x, rot, rot_t.astype(np.float32), bound, factors_arr, n_hashes, buckets, _HASH_BLOCK,
                gemm_address(np.float32),
            )  # fmt: skip
    return buckets

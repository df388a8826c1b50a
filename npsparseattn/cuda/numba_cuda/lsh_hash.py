"""LSH hashing on the GPU (numba-cuda): backend ``"numba-cuda"`` of ``lsh_buckets``.

One thread per row: for every round and factor it forms the rotated
coordinates ``y_c = sum_d x_d R[d, c]`` in float64 and takes
``argmax(concat[y, -y])`` without building the concatenation (the first
maximum wins, as NumPy's argmax).  The product is float64 whatever the
storage dtype (float16, bfloat16 and float32 values are exact in float64),
so the buckets are those of the float64 formula that the CPU backend and the
reference compute, near ties included: a tie the float64 product resolves is
resolved the same way.  The rotations (a few KiB) are read through the cache
by every thread alike.  On GPUs with slow float64 this costs more than a
float32 product would, but the hashing is a small part of LSH attention.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import numpy as np

from npsparseattn.cuda.layout_runs import upload
from npsparseattn.cuda.numba_cuda import DTYPES, KINDS, compute_dtype, reasons
from npsparseattn.cuda.numba_cuda.runtime import (
    blocks,
    cuda,
    empty,
    is_bf16,
    kernel,
    kernel_view,
    launch,
    on_device,
    storage,
    threads_per_block,
)

__all__ = ["DTYPES", "KINDS", "STRIDED_ROWS", "TOLERANCE", "buckets", "compute_dtype", "unsupported"]

STRIDED_ROWS = False
TOLERANCE = {name: 0.0 for name in DTYPES}  # bucket ids: exact, ties included

# numba.cuda, bound by the kernel factory on first use (a module global: the simulator swaps it)
cu: Any = None


def unsupported(problem: Any) -> list[str]:
    """Environment reasons (numba-cuda, CuPy, a GPU of compute capability 8.0+); any head dimension hashes."""
    return reasons()


@cache
def hash_kernel(bf16: bool) -> Any:
    """``buckets[m, r, i]`` of row ``x[m, i]`` under round ``r`` of ``rot`` (D, n_hashes * C), one thread a row."""
    global cu
    cu = cuda()
    from numba import float64

    widen = storage(bf16)[0]

    def hash_rows(x, rot, factors, buckets):
        n_rows, length, d = x.shape
        n_hashes = buckets.shape[1]
        width = rot.shape[1] // n_hashes
        e = cu.blockIdx.x * cu.blockDim.x + cu.threadIdx.x
        if e >= n_rows * length:
            return
        m = e // length
        i = e - m * length
        for r in range(n_hashes):
            start = r * width
            bucket = 0
            product = 1
            for f in range(factors.shape[0]):
                half = factors[f] // 2
                top = -np.inf
                low = np.inf
                i_top = 0
                i_low = 0
                for c in range(half):
                    y = float64(0.0)
                    for k in range(d):
                        y += float64(widen(x[m, i, k])) * rot[k, start + c]
                    if y > top:
                        top = y
                        i_top = c
                    if y < low:
                        low = y
                        i_low = c
                bucket += (i_top if top >= -low else half + i_low) * product
                product *= factors[f]
                start += half
            buckets[m, r, i] = bucket

    return kernel(hash_rows)


def buckets(x: Any, rotations: np.ndarray, factors: tuple[int, ...]) -> Any:
    """Random-rotation buckets of the rows of ``x``, as the float64 product ``xR`` gives them.

    Parameters
    ----------
    x : (M, L, D) C-contiguous CuPy array (NumPy under the simulator), float16, bfloat16 or float32
    rotations : (D, n_hashes, sum(factors) // 2) float64 NumPy array
    factors : bucket count per factor (each even); the bucket is
        ``sum_f argmax(concat[xR_f, -xR_f]) * prod(previous factors)``

    Returns
    -------
    buckets : (M, n_hashes, L) int32 array of the kind of ``x``, in ``[0, prod(factors))``
    """
    n_rows, length, d = x.shape
    n_hashes = rotations.shape[1]
    with on_device(x):
        result = empty(x, (n_rows, n_hashes, length), np.int32)
        if result.size == 0:
            return result
        rot = upload(x, np.ascontiguousarray(rotations, np.float64).reshape(d, -1))
        factors_arr = upload(x, np.asarray(factors, np.int32))
        threads = threads_per_block(128)
        launch(
            hash_kernel(is_bf16(x)), blocks(n_rows * length, threads), threads, kernel_view(x), rot, factors_arr, result
        )
    return result

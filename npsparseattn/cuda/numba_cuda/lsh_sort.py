"""The LSH sort plan on the GPU (numba-cuda): backend ``"numba-cuda"`` of ``lsh_sort``.

Sorting the ``n_hashes * L`` items by (round, bucket, position) puts round
``r`` in slots ``[r*L, (r+1)*L)``, so every (row, round) sorts on its own: one
thread block each, a stable least-significant-digit radix sort of the
positions by bucket id, :data:`RADIX_BITS` bits per pass (one pass up to 16
bucket ids, two up to 256, ...; any id below 2**31 sorts).

A pass is a stable counting sort.  Each thread owns a contiguous segment of
the sequence and counts its digits into its own column of a
(digit x thread) table in shared memory; an exclusive scan of the table in
(digit, thread) order gives every (digit, segment) pair its first slot; each
thread then walks its segment in order and places its items.  Segments are
in position order and each is walked in order, so equal digits keep their
order: the sort is stable without atomics, and the result is the same on
every run.  The last pass writes ``order`` and ``inverse`` directly.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import numpy as np

from npsparseattn.cuda.numba_cuda import KINDS, reasons
from npsparseattn.cuda.numba_cuda.runtime import cuda, empty, kernel, launch, on_device, threads_per_block

__all__ = ["DTYPES", "KINDS", "STRIDED_ROWS", "TOLERANCE", "compute_dtype", "sort", "unsupported"]

DTYPES = ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64")
STRIDED_ROWS = False
TOLERANCE = {name: 0.0 for name in DTYPES}  # a permutation: exact
RADIX_BITS = 4

# numba.cuda, bound by the kernel factory on first use (a module global: the simulator swaps it)
cu: Any = None


def unsupported(problem: Any) -> list[str]:
    """Environment reasons only: numba-cuda, and outside the simulator CuPy and a GPU of compute capability 8.0+."""
    return reasons()


def compute_dtype(dtype: Any) -> np.dtype:
    """Bucket ids are read as int32 (the problem checked that they fit)."""
    return np.dtype(np.int32)


@cache
def sort_kernel(threads: int) -> Any:
    """The radix sort of ``threads`` threads per block; one block per (row, round)."""
    global cu
    cu = cuda()
    from numba import int32

    radix = 1 << RADIX_BITS
    cells = radix * threads
    per_thread = radix  # scan cells per thread

    def sort_rows(buckets, n_passes, work, order, inverse):
        counts = cu.shared.array(cells, int32)  # counts[digit * threads + t]
        partial = cu.shared.array(threads, int32)
        n_hashes, length = buckets.shape[1], buckets.shape[2]
        m = cu.blockIdx.x // n_hashes
        r = cu.blockIdx.x - m * n_hashes
        t = cu.threadIdx.x
        seg = (length + threads - 1) // threads
        p0 = min(t * seg, length)
        p1 = min(p0 + seg, length)
        base = r * length
        for step in range(n_passes):
            shift = RADIX_BITS * step
            for dgt in range(radix):
                counts[dgt * threads + t] = 0
            for p in range(p0, p1):
                item = p if step == 0 else work[(step + 1) % 2, m, r, p]
                counts[((buckets[m, r, item] >> shift) & (radix - 1)) * threads + t] += 1
            cu.syncthreads()
            total = 0
            for f in range(t * per_thread, (t + 1) * per_thread):
                total += counts[f]
            partial[t] = total
            cu.syncthreads()
            if t == 0:
                running = 0
                for u in range(threads):
                    here = partial[u]
                    partial[u] = running
                    running += here
            cu.syncthreads()
            running = partial[t]
            for f in range(t * per_thread, (t + 1) * per_thread):
                here = counts[f]
                counts[f] = running
                running += here
            cu.syncthreads()
            last = step == n_passes - 1
            for p in range(p0, p1):
                item = p if step == 0 else work[(step + 1) % 2, m, r, p]
                cell = ((buckets[m, r, item] >> shift) & (radix - 1)) * threads + t
                slot = counts[cell]
                counts[cell] = slot + 1
                if last:
                    order[m, base + slot] = base + item
                    inverse[m, base + item] = base + slot
                else:
                    work[step % 2, m, r, slot] = item
            cu.syncthreads()

    return kernel(sort_rows)


def passes(n_values: int) -> int:
    """Radix passes that sort ids in ``[0, n_values)``: one per :data:`RADIX_BITS` bits of the largest id."""
    bits = max(1, (max(n_values, 1) - 1).bit_length())
    return -(-bits // RADIX_BITS)


def sort(buckets: Any, n_values: int) -> tuple[Any, Any]:
    """Sort plan of ``buckets`` (M, n_hashes, L) int32 with values in ``[0, n_values)``.

    Returns ``order`` and ``inverse``, both (M, n_hashes * L) int32 arrays of
    the kind of ``buckets``: ``order`` lists the items ``r * L + position``
    sorted by (round, bucket, position); ``inverse[order[s]] = s``.
    """
    n_rows, n_hashes, length = buckets.shape
    with on_device(buckets):
        order = empty(buckets, (n_rows, n_hashes * length), np.int32)
        inverse = empty(buckets, (n_rows, n_hashes * length), np.int32)
        if order.size == 0:
            return order, inverse
        n_passes = passes(n_values)
        work = empty(buckets, (2, n_rows, n_hashes, length) if n_passes > 1 else (2, 1, 1, 1), np.int32)
        threads = threads_per_block(256, 8)
        launch(sort_kernel(threads), n_rows * n_hashes, threads, buckets, n_passes, work, order, inverse)
    return order, inverse

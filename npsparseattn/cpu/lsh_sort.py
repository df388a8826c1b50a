"""The LSH sort plan on the CPU (numba), backend ``"numba"`` of ``lsh_sort``.

A counting sort per (row, round).  Sorting the ``n_hashes * L`` items by
(round, bucket, position) puts round ``r`` in slots ``[r*L, (r+1)*L)``, so
every round sorts on its own, in linear time and stably (positions are
visited in increasing order).  Sparse bucket ids (more distinct values than
``max(2 L, 65536)``) take a stable comparison sort instead of a huge count
table.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from npsparseattn.cpu import KINDS

__all__ = ["DTYPES", "KINDS", "STRIDED_ROWS", "TOLERANCE", "compute_dtype", "sort", "unsupported"]

DTYPES = ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64")
STRIDED_ROWS = False
TOLERANCE = {name: 0.0 for name in DTYPES}  # a permutation: exact
_COUNTING_SORT_VALUES = 1 << 16  # larger bucket ids than this (and than 2 L) are comparison-sorted


def unsupported(problem) -> list[str]:
    """Every sort problem on NumPy arrays is supported."""
    return []


def compute_dtype(dtype) -> np.dtype:
    """Bucket ids are read as int32 (the problem checked that they fit)."""
    return np.dtype(np.int32)


@njit(parallel=True, cache=True)
def _sort_kernel(buckets, n_values, order, inverse):
    n_rows, n_hashes, length = buckets.shape
    for task in prange(n_rows * n_hashes):
        m = task // n_hashes
        r = task % n_hashes
        row = buckets[m, r]
        counts = np.zeros(n_values + 1, np.int64)
        for p in range(length):
            counts[row[p] + 1] += 1
        for value in range(n_values):
            counts[value + 1] += counts[value]
        base = r * length
        for p in range(length):
            slot = base + counts[row[p]]
            counts[row[p]] += 1
            order[m, slot] = base + p
            inverse[m, base + p] = slot


def sort(buckets: np.ndarray, n_values: int) -> tuple[np.ndarray, np.ndarray]:
    """Sort plan of ``buckets`` (M, n_hashes, L) with values in ``[0, n_values)``.

    Returns ``order`` and ``inverse``, both (M, n_hashes * L) int32: ``order``
    lists the items ``r * L + position`` sorted by (round, bucket, position);
    ``inverse[order[s]] = s``.
    """
    n_rows, n_hashes, length = buckets.shape
    order = np.empty((n_rows, n_hashes * length), np.int32)
    inverse = np.empty_like(order)
    if order.size == 0:
        return order, inverse
    if n_values <= max(2 * length, _COUNTING_SORT_VALUES):
        _sort_kernel(np.ascontiguousarray(buckets, dtype=np.int32), int(n_values), order, inverse)
        return order, inverse
    # sparse bucket ids: a stable comparison sort instead of a huge count table
    rounds = np.argsort(buckets, axis=-1, kind="stable") + (np.arange(n_hashes) * length)[:, None]
    order[...] = rounds.reshape(n_rows, -1)
    slots = np.broadcast_to(np.arange(n_hashes * length, dtype=np.int32), order.shape)
    np.put_along_axis(inverse, order, slots, axis=-1)
    return order, inverse

"""The LSH sort plan with NumPy's stable sort: backend ``"reference"`` of ``lsh_sort``."""

from __future__ import annotations

from typing import Any

import numpy as np

from npsparseattn.problems.lsh import INTEGER_DTYPES

__all__ = ["DTYPES", "KINDS", "STRIDED_ROWS", "TOLERANCE", "compute_dtype", "sort", "unsupported"]

KINDS = ("numpy",)
DTYPES = INTEGER_DTYPES
STRIDED_ROWS = True
TOLERANCE = {name: 0.0 for name in DTYPES}


def compute_dtype(dtype: Any) -> np.dtype:
    """Bucket ids are read as int64."""
    return np.dtype(np.int64)


def unsupported(problem: Any) -> list[str]:
    """Every sort problem on NumPy arrays is supported."""
    return []


def sort(buckets: np.ndarray, n_values: int) -> tuple[np.ndarray, np.ndarray]:
    """``(order, inverse)``, int32 (M, n_hashes * L): items ``r * L + p`` sorted by (round, bucket, position)."""
    n_rows, n_hashes, length = buckets.shape
    items = np.arange(n_hashes * length, dtype=np.int64)
    order = np.empty((n_rows, n_hashes * length), np.int32)
    inverse = np.empty_like(order)
    for m in range(n_rows):
        keys = buckets[m].reshape(-1)
        rounds = items // max(length, 1)
        order[m] = np.lexsort((items, keys, rounds))
        inverse[m, order[m]] = items
    return order, inverse

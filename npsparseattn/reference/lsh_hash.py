"""float64 LSH hashing: backend ``"reference"`` of ``lsh_buckets``."""

from __future__ import annotations

from typing import Any

import numpy as np

from npsparseattn._dtypes import FLOAT_DTYPES

__all__ = ["DTYPES", "KINDS", "STRIDED_ROWS", "TOLERANCE", "buckets", "compute_dtype", "unsupported"]

KINDS = ("numpy",)
DTYPES = FLOAT_DTYPES
STRIDED_ROWS = True
TOLERANCE = {name: 0.0 for name in DTYPES}


def compute_dtype(dtype: Any) -> np.dtype:
    """Rows are hashed from their float64 values."""
    return np.dtype(np.float64)


def unsupported(problem: Any) -> list[str]:
    """Every hashing problem on NumPy arrays is supported."""
    return []


def buckets(x: np.ndarray, rotations: np.ndarray, factors: tuple[int, ...]) -> np.ndarray:
    """int32 (M, n_hashes, L) buckets of the rows of ``x`` (M, L, D): ``argmax(concat[xR, -xR])`` per factor."""
    rotated = np.einsum("mld,dhc->mhlc", np.asarray(x, np.float64), np.asarray(rotations, np.float64))
    result = np.zeros(rotated.shape[:3], dtype=np.int64)
    start, product = 0, 1
    for f in factors:
        part = rotated[..., start : start + f // 2]
        result += np.argmax(np.concatenate([part, -part], axis=-1), axis=-1) * product
        start += f // 2
        product *= f
    return result.astype(np.int32)

"""Evaluate a ``mask_mod(b, h, q_idx, kv_idx) -> bool`` block by block: which blocks hold a true pair, which are full.

Two ways, chosen by what the function is:

* a plain Python function is called on broadcast index arrays, ``q_idx``
  (rows, 1) against ``kv_idx`` (1, Lk), a few query blocks at a time (about
  2**22 pairs per call), so it must be written with NumPy operations
  (``&``, ``|``, ``~``, ``np.where``, array indexing) rather than ``if``,
  ``and``, ``or``;
* a ``numba.njit`` function is called on scalar indices in a compiled loop
  over the blocks, which stops looking inside a block as soon as it has seen
  a true and a false pair.  numba is imported only then.

:func:`npsparseattn.layouts.from_mask_mod` builds the layout from the result.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import numpy as np

_CHUNK_PAIRS = 1 << 22  # (query, key) pairs a vectorised call evaluates at once


def is_jitted(fn: Any) -> bool:
    """True for a numba ``njit`` dispatcher (without importing numba)."""
    return type(fn).__module__.startswith("numba.") and hasattr(fn, "py_func")


def block_flags(
    mask_mod: Callable[..., Any], seq: tuple[int, int], block: tuple[int, int], batch: int, head: int
) -> tuple[np.ndarray, np.ndarray]:
    """``(stored, full)``, bool (nqb, nkb): blocks with at least one true pair, and blocks with only true pairs."""
    if is_jitted(mask_mod):
        return _jit_flags(mask_mod, seq, block, batch, head)
    return _numpy_flags(mask_mod, seq, block, batch, head)


def _numpy_flags(mask_mod, seq, block, batch, head):
    (lq, lk), (bq, bk) = seq, block
    nqb, nkb = -(-lq // bq), -(-lk // bk)
    stored, full = np.zeros((nqb, nkb), dtype=bool), np.zeros((nqb, nkb), dtype=bool)
    if not nqb * nkb:
        return stored, full
    kv_idx = np.arange(lk, dtype=np.int64)[None, :]
    col_starts = np.arange(0, lk, bk)
    col_sizes = np.minimum(bk, lk - col_starts)
    step = max(1, _CHUNK_PAIRS // (bq * lk))  # query blocks per call
    for r0 in range(0, nqb, step):
        r1 = min(r0 + step, nqb)
        i0, i1 = r0 * bq, min(r1 * bq, lq)
        q_idx = np.arange(i0, i1, dtype=np.int64)[:, None]
        mask = _call(mask_mod, batch, head, q_idx, kv_idx)
        per_col = np.add.reduceat(mask, col_starts, axis=1, dtype=np.int32)
        counts = np.add.reduceat(per_col, np.arange(0, i1 - i0, bq), axis=0)
        sizes = np.minimum(bq, i1 - np.arange(i0, i1, bq))[:, None] * col_sizes[None, :]
        stored[r0:r1] = counts > 0
        full[r0:r1] = counts == sizes
    return stored, full


def _call(mask_mod, batch, head, q_idx, kv_idx) -> np.ndarray:
    """``mask_mod`` on index arrays, checked to give booleans of shape (len(q_idx), len(kv_idx))."""
    shape = (q_idx.shape[0], kv_idx.shape[1])
    try:
        result = mask_mod(batch, head, q_idx, kv_idx)
    except Exception as exc:
        raise TypeError(
            f"mask_mod could not be evaluated on index arrays (q_idx {q_idx.shape} against kv_idx "
            f"{kv_idx.shape}): {type(exc).__name__}: {exc}. Write it with NumPy operations (&, |, ~, np.where "
            "instead of and, or, if) or pass a numba.njit function"
        ) from exc
    result = np.asarray(result)
    if result.dtype != bool:
        raise TypeError(f"mask_mod must return booleans, got dtype {result.dtype.name}")
    try:
        return np.broadcast_to(result, shape)
    except ValueError:
        raise ValueError(
            f"mask_mod returned shape {result.shape} for q_idx {q_idx.shape} and kv_idx {kv_idx.shape}; "
            f"it must broadcast to {shape}"
        ) from None


def _jit_flags(mask_mod, seq, block, batch, head):
    (lq, lk), (bq, bk) = seq, block
    stored = np.zeros((-(-lq // bq), -(-lk // bk)), dtype=bool)
    full = np.zeros_like(stored)
    from numba.core.errors import NumbaError

    try:
        _classifier(mask_mod)(batch, head, lq, lk, bq, bk, stored, full)
    except NumbaError as exc:
        first = str(exc).strip().splitlines()[0]
        raise TypeError(
            f"the numba mask_mod could not be compiled for integer arguments (b, h, q_idx, kv_idx): {first}"
        ) from exc
    return stored, full


@functools.lru_cache(maxsize=64)
def _classifier(mask_mod: Any) -> Any:
    """A compiled block loop calling this ``mask_mod`` (one per function, compiled on first use)."""
    import numba

    @numba.njit
    def classify(batch, head, lq, lk, bq, bk, stored, full):
        nqb, nkb = stored.shape
        for r in range(nqb):
            i_end = min(r * bq + bq, lq)
            for c in range(nkb):
                j_end = min(c * bk + bk, lk)
                seen_true = False
                seen_false = False
                i = r * bq
                while i < i_end and not (seen_true and seen_false):
                    for j in range(c * bk, j_end):
                        if mask_mod(batch, head, i, j):
                            seen_true = True
                        else:
                            seen_false = True
                        if seen_true and seen_false:
                            break
                    i += 1
                stored[r, c] = seen_true
                full[r, c] = seen_true and not seen_false

    return classify

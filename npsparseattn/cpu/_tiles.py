"""Tile-level building blocks shared by the numba CPU attention kernels.

A *tile* is a block of ``m`` query rows by ``n`` key columns.  Scores are kept
in base-2 units: the score GEMM is scaled by ``scale * log2(e)`` so the
softmax needs ``exp2`` only, and ``lse`` is converted at the end.

Masks are never materialised: :func:`visible_keys` gives, for one query row,
the half-open range of keys that causal/window masking leaves visible, so a
tile touches exactly the columns it must and rows with nothing visible (or
no finite score yet) never produce ``exp(-inf - -inf)``.  Window bounds arrive as integers with
:data:`UNBOUNDED` standing for "no limit on this side"; ``off`` is the
diagonal offset (query ``i`` is aligned with key ``i + off``).
"""

from __future__ import annotations

import numpy as np
from numba import njit
from numba.extending import overload

from npsparseattn.cpu._vecmath import exp2, maxnum

UNBOUNDED = 1 << 40
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
FASTMATH = {"reassoc", "contract", "arcp", "nsz"}


def window_bound(value: int | None) -> int:
    """A window bound for the kernels: ``None`` (unbounded) becomes :data:`UNBOUNDED`."""
    return UNBOUNDED if value is None else int(value)


def like(value, arr):
    """``value`` converted to the dtype of ``arr`` (jitted code only)."""
    return arr.dtype.type(value)


@overload(like, inline="always")
def _like_overload(value, arr):
    dtype = arr.dtype
    return lambda value, arr: dtype(value)


@njit(inline="always")
def visible_keys(i, off, left, right, n_keys):
    """Keys ``[lo, hi)`` visible to query ``i``: ``i+off-left <= j <= i+off+right``."""
    lo = max(i + off - left, 0)
    hi = min(i + off + right + 1, n_keys)
    return lo, hi


@njit(inline="always")
def visible_queries(j0, j1, off, left, right, n_queries):
    """Queries ``[lo, hi)`` that see at least one key of ``[j0, j1)``."""
    lo = max(j0 - off - right, 0)
    hi = min(j1 - 1 - off + left + 1, n_queries)
    return lo, hi


@njit(inline="always")
def zigzag(t, n):
    """Tile visited at position ``t`` of ``n``: 0, n-1, 1, n-2, ...

    numba's ``prange`` hands each thread a contiguous block of iterations.
    Under a causal mask the cost of query tile ``t`` grows with ``t``, so
    contiguous blocks of tiles in order are unbalanced; pairing cheap tiles
    with expensive ones makes every block cost about the same.
    """
    return t // 2 if t % 2 == 0 else n - 1 - t // 2


@njit(inline="always")
def row_address(arr, b, h, i):
    """Byte address of ``arr[b, h, i, 0]`` for a 4-D array."""
    s = arr.strides
    return arr.ctypes.data + b * s[0] + h * s[1] + i * s[2]


@njit(inline="always")
def row_stride(arr):
    """Distance in elements between rows of the last two axes."""
    return arr.strides[2] // arr.itemsize


@njit(inline="always")
def tile_row_span(i, j0, n, off, left, right, n_keys):
    """Visible keys of query ``i`` as columns ``[lo, hi)`` of a tile starting at key ``j0``."""
    lo, hi = visible_keys(i, off, left, right, n_keys)
    lo = min(max(lo - j0, 0), n)
    hi = max(min(hi - j0, n), lo)
    return lo, hi


@njit(inline="always")
def whole_tile(i0, m, j0, n, off, left, right, n_keys):
    """True if every query of ``[i0, i0+m)`` sees every key of ``[j0, j0+n)``.

    Visible ranges move right with the query, so the first row bounds the
    right edge and the last row the left edge.
    """
    return visible_keys(i0 + m - 1, off, left, right, n_keys)[0] <= j0 and (
        visible_keys(i0, off, left, right, n_keys)[1] >= j0 + n
    )


@njit(inline="always")
def rows_key_span(i0, m, j0, n, off, left, right, n_keys):
    """Keys ``[lo, hi)`` of the tile ``[j0, j0+n)`` seen by at least one query of ``[i0, i0+m)``."""
    lo = max(visible_keys(i0, off, left, right, n_keys)[0], j0)
    hi = min(visible_keys(i0 + m - 1, off, left, right, n_keys)[1], j0 + n)
    return lo, max(hi, lo)


@njit(inline="always", fastmath=FASTMATH)
def nonfinite_rows(arr, b, h, i0, m):
    """True if ``arr[b, h, i0:i0+m, :]`` holds a NaN or an infinity.

    ``x * 0`` is 0 for every finite ``x`` and NaN otherwise; the flags keep
    NaN meaningful, so the sum is a vectorised test of the whole block.
    """
    zero = like(0.0, arr)
    total = zero
    for r in range(m):
        row = arr[b, h, i0 + r]
        for c in range(row.shape[0]):
            total += row[c] * zero
    return total != zero


@njit(inline="always", fastmath=FASTMATH)
def online_softmax_tile(s, m, n, i0, j0, off, left, right, n_keys, row_max, row_sum, acc):
    """Turn base-2 scores ``s[:m, :n]`` into unnormalised probabilities in place.

    Updates the running row maxima ``row_max``, sums ``row_sum`` and rescales
    the rows of the output accumulator ``acc`` whose maximum grew
    (FlashAttention's online softmax).  Masked entries become 0.

    A row whose scores so far are all ``-inf`` (a key of ``-inf``, a float32
    product that overflowed) keeps ``row_max = -inf`` and gains nothing: its
    probabilities are taken against 0 instead of ``-inf``, so they are 0
    (NaN stays NaN), never ``exp2(-inf - -inf)``.  When a finite maximum
    arrives, ``exp2(-inf - m_new) = 0`` rescales the empty state.

    Loops run over slices indexed from 0: a loop whose start numba cannot
    prove non-negative keeps its negative-index wraparound and does not
    vectorise (10x slower).
    """
    zero = like(0.0, s)
    for r in range(m):
        lo, hi = tile_row_span(i0 + r, j0, n, off, left, right, n_keys)
        row = s[r, :n]
        row[:lo] = zero
        row[hi:] = zero
        if hi == lo:
            continue
        vis = row[lo:hi]
        mx = vis[0]
        for c in range(1, vis.shape[0]):
            mx = maxnum(mx, vis[c])
        m_old = row_max[r]
        m_new = maxnum(m_old, mx)
        shift = m_new if m_new != -np.inf else zero
        total = zero
        for c in range(vis.shape[0]):
            p = exp2(vis[c] - shift)
            vis[c] = p
            total += p
        if m_new > m_old:
            alpha = exp2(m_old - m_new)
            row_sum[r] = row_sum[r] * alpha + total
            acc_row = acc[r]
            for c in range(acc_row.shape[0]):
                acc_row[c] *= alpha
        else:
            row_sum[r] += total
        row_max[r] = m_new


@njit(inline="always", fastmath=FASTMATH)
def probabilities_and_grads_tile(s, dp, m, n, i0, j0, off, left, right, n_keys, lse2, delta):
    """One pass over a tile: ``s <- P = exp2(s - lse2)`` and ``dp <- dS = P * (dp - delta)``.

    Entries a row does not see (and whole rows with ``lse = -inf``) become
    exactly 0 in both, whatever ``dp`` held there: a NaN or infinity in a
    value row reaches only the gradients of the queries that see it.
    """
    zero = like(0.0, s)
    for r in range(m):
        lo, hi = tile_row_span(i0 + r, j0, n, off, left, right, n_keys)
        row = s[r, :n]
        grad = dp[r, :n]
        shift = lse2[i0 + r]
        if shift == -np.inf:
            lo = hi = 0
        row[:lo] = zero
        row[hi:] = zero
        grad[:lo] = zero
        grad[hi:] = zero
        vis = row[lo:hi]
        gvis = grad[lo:hi]
        d = delta[i0 + r]
        for c in range(vis.shape[0]):
            p = exp2(vis[c] - shift)
            vis[c] = p
            gvis[c] = p * (gvis[c] - d)


@njit(inline="always", fastmath=FASTMATH)
def finish_rows(acc, row_max, row_sum, m, out, lse, b, h, i0):
    """Write ``acc / row_sum`` to ``out[b, h, i0:i0+m]`` and the natural-log lse.

    A row that saw no finite score (``row_max = -inf``, ``row_sum = 0``) gets
    output 0 and ``lse = -inf``; a NaN score leaves ``row_sum`` NaN, and the
    row NaN, as in the dense formula.
    """
    ln2 = like(LN2, row_max)
    for r in range(m):
        total = row_sum[r]
        if row_max[r] == -np.inf and total == 0:
            for c in range(acc.shape[1]):
                out[b, h, i0 + r, c] = 0
            lse[b, h, i0 + r] = -np.inf
        else:
            inv = like(1.0, acc) / total
            for c in range(acc.shape[1]):
                out[b, h, i0 + r, c] = acc[r, c] * inv
            lse[b, h, i0 + r] = row_max[r] * ln2 + np.log(total)

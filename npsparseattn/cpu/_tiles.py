"""Tile-level building blocks shared by the numba CPU attention kernels.

A *tile* is a block of ``m`` query rows by ``n`` key columns.  Scores are kept
in base-2 units: the score GEMM is scaled by ``scale * log2(e)`` so the
softmax needs ``exp2`` only, and ``lse`` is converted at the end.

Masks are never materialised: :func:`visible_keys` gives, for one query row,
the half-open range of keys that causal/window masking leaves visible, so a
tile touches exactly the columns it must and rows with nothing visible never
produce ``exp(-inf - -inf)``.  Window bounds arrive as integers with
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


@njit(inline="always", fastmath=FASTMATH)
def online_softmax_tile(s, m, n, i0, j0, off, left, right, n_keys, row_max, row_sum, acc):
    """Turn base-2 scores ``s[:m, :n]`` into unnormalised probabilities in place.

    Updates the running row maxima ``row_max``, sums ``row_sum`` and rescales
    the rows of the output accumulator ``acc`` whose maximum grew
    (FlashAttention's online softmax).  Masked entries become 0.

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
        total = zero
        for c in range(vis.shape[0]):
            p = exp2(vis[c] - m_new)
            vis[c] = p
            total += p
        if m_old == -np.inf:
            row_sum[r] = total
        elif m_new > m_old:
            alpha = exp2(m_old - m_new)
            row_sum[r] = row_sum[r] * alpha + total
            acc_row = acc[r]
            for c in range(acc_row.shape[0]):
                acc_row[c] *= alpha
        else:
            row_sum[r] += total
        row_max[r] = m_new


@njit(inline="always", fastmath=FASTMATH)
def probabilities_tile(s, m, n, i0, j0, off, left, right, n_keys, lse2):
    """``s[:m, :n] <- exp2(s - lse2[i0 + r])`` on visible entries, 0 elsewhere."""
    zero = like(0.0, s)
    for r in range(m):
        lo, hi = tile_row_span(i0 + r, j0, n, off, left, right, n_keys)
        row = s[r, :n]
        row[:lo] = zero
        row[hi:] = zero
        vis = row[lo:hi]
        shift = lse2[i0 + r]
        for c in range(vis.shape[0]):
            vis[c] = exp2(vis[c] - shift)


@njit(inline="always", fastmath=FASTMATH)
def score_grad_tile(p, dp, m, n, i0, delta):
    """``dp[:m, :n] <- p * (dp - delta[i0 + r])``: the gradient of the scores."""
    for r in range(m):
        d = delta[i0 + r]
        p_row = p[r, :n]
        dp_row = dp[r, :n]
        for c in range(n):
            dp_row[c] = p_row[c] * (dp_row[c] - d)


@njit(inline="always", fastmath=FASTMATH)
def finish_rows(acc, row_max, row_sum, m, out, lse, b, h, i0):
    """Write ``acc / row_sum`` to ``out[b, h, i0:i0+m]`` and the natural-log lse."""
    ln2 = like(LN2, row_max)
    for r in range(m):
        if row_max[r] != -np.inf:
            total = row_sum[r]
            inv = like(1.0, acc) / total
            for c in range(acc.shape[1]):
                out[b, h, i0 + r, c] = acc[r, c] * inv
            lse[b, h, i0 + r] = row_max[r] * ln2 + np.log(total)
        else:
            for c in range(acc.shape[1]):
                out[b, h, i0 + r, c] = 0
            lse[b, h, i0 + r] = -np.inf

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

The functions that take a *geometry* ``geo = (off, left, right, n_keys,
qdiv, kpos, mods)`` also serve tiles whose rows or keys are not at their own
positions (the sparse walk of ``cpu/_walk.py``): row ``i`` of the query
array sits at position ``i // qdiv`` (``qdiv`` query heads stacked per
position), and key column ``j`` of the key array at position ``kpos[j]``
(keys gathered into a contiguous tile, ``kpos`` ascending) or ``j`` when
``kpos`` is empty or ``None``.  Within a tile every row still sees one
interval of columns, so the masks stay intervals, found by binary search on
``kpos``.  :func:`geometry` builds the plain one, with ``qdiv=None`` and
``kpos=None``: the lookups are chosen when numba types the call
(:func:`row_keys`, :func:`visible_rows`, :func:`key_position`,
:func:`key_columns`), so the dense and varlen kernels carry no binary search
or division (inlined at every mask test, they tripled their compile time).
``mods`` are the score modifications the tile steps apply (``cpu/_scores.py``),
``None`` for plain attention (then they compile to nothing).
"""

from __future__ import annotations

import numpy as np
from numba import njit, types
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
    """``value`` converted to the dtype of the array (or the type of the scalar) ``arr`` (jitted code only)."""
    return np.asarray(arr).dtype.type(value)


@overload(like, inline="always")
def _like_overload(value, arr):
    dtype = arr.dtype if isinstance(arr, types.Array) else arr
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
def geometry(off, left, right, n_keys):
    """The geometry of a plain tile: rows and keys at their own positions, no score modifications."""
    return (off, left, right, n_keys, None, None, None)


@njit(inline="always")
def geometry_with(off, left, right, n_keys, mods):
    """:func:`geometry` with the score modifications ``mods`` (``cpu/_scores.py``; ``None``: none)."""
    return (off, left, right, n_keys, None, None, mods)


@njit(inline="always")
def _first_at_least(kpos, lo, hi, p):
    """First index in ``[lo, hi)`` of the ascending ``kpos`` whose value is ``>= p`` (``hi`` if none)."""
    while lo < hi:
        mid = (lo + hi) >> 1
        if kpos[mid] < p:
            lo = mid + 1
        else:
            hi = mid
    return lo


def key_position(geo, j):
    """Position of key column ``j`` of the key array (``geo[5]``: the gathered keys' positions, or ``None``).

    Compiled code only: numba picks the implementation from the type of ``geo[5]``.
    """
    raise TypeError("key_position is called from numba-compiled kernels only")


@njit
def _gathered_position(kpos, j):
    """:func:`key_position` for keys at positions ``kpos`` (a call: see :func:`_gathered_columns`)."""
    return j if kpos.shape[0] == 0 else kpos[j]


@overload(key_position, inline="always")
def _key_position_overload(geo, j):
    if isinstance(geo.types[5], types.NoneType):
        return lambda geo, j: j
    return lambda geo, j: _gathered_position(geo[5], j)


def key_columns(geo, j0, n, p_lo, p_hi):
    """Columns ``[lo, hi)`` (absolute, in ``[j0, j0+n)``) whose keys lie at positions ``[p_lo, p_hi)``.

    Compiled code only: numba picks the implementation from the type of ``geo[5]``.
    """
    raise TypeError("key_columns is called from numba-compiled kernels only")


@njit(inline="always")
def _own_columns(j0, n, p_lo, p_hi):
    """:func:`key_columns` for keys at their own positions."""
    lo = min(max(p_lo, j0), j0 + n)
    return lo, max(min(p_hi, j0 + n), lo)


@njit
def _gathered_columns(kpos, j0, n, p_lo, p_hi):
    """:func:`key_columns` for keys at positions ``kpos`` (a call, not inlined: numba's inliner does not keep the
    binary search's loop variables in scope when it inlines them into an overload)."""
    if kpos.shape[0] == 0:
        return _own_columns(j0, n, p_lo, p_hi)
    lo = _first_at_least(kpos, j0, j0 + n, p_lo)
    return lo, max(_first_at_least(kpos, lo, j0 + n, p_hi), lo)


@overload(key_columns, inline="always")
def _key_columns_overload(geo, j0, n, p_lo, p_hi):
    if isinstance(geo.types[5], types.NoneType):
        return lambda geo, j0, n, p_lo, p_hi: _own_columns(j0, n, p_lo, p_hi)
    return lambda geo, j0, n, p_lo, p_hi: _gathered_columns(geo[5], j0, n, p_lo, p_hi)


def row_keys(geo, i):
    """Key positions ``[lo, hi)`` visible to row ``i`` of the query array.

    Compiled code only: numba picks the implementation from the type of ``geo[4]`` (``None``: one head per row).
    """
    raise TypeError("row_keys is called from numba-compiled kernels only")


@njit
def _stacked_keys(geo, i):
    """:func:`row_keys` with ``qdiv`` query heads stacked per position (a call: see :func:`_gathered_columns`)."""
    off, left, right, n_keys, qdiv = geo[0], geo[1], geo[2], geo[3], geo[4]
    return visible_keys(i if qdiv == 1 else i // qdiv, off, left, right, n_keys)


@overload(row_keys, inline="always")
def _row_keys_overload(geo, i):
    if isinstance(geo.types[4], types.NoneType):
        return lambda geo, i: visible_keys(i, geo[0], geo[1], geo[2], geo[3])
    return lambda geo, i: _stacked_keys(geo, i)


def visible_rows(geo, p0, p1, n_rows):
    """Rows ``[lo, hi)`` of the query array (``n_rows`` rows) that see a key at a position in ``[p0, p1)``.

    Compiled code only: numba picks the implementation from the type of ``geo[4]``.
    """
    raise TypeError("visible_rows is called from numba-compiled kernels only")


@njit
def _stacked_rows(geo, p0, p1, n_rows):
    """:func:`visible_rows` with ``qdiv`` query heads stacked per position (a call: see :func:`_gathered_columns`)."""
    off, left, right, qdiv = geo[0], geo[1], geo[2], geo[4]
    lo, hi = visible_queries(p0, p1, off, left, right, (n_rows + qdiv - 1) // qdiv)
    return lo * qdiv, min(hi * qdiv, n_rows)


@overload(visible_rows, inline="always")
def _visible_rows_overload(geo, p0, p1, n_rows):
    if isinstance(geo.types[4], types.NoneType):
        return lambda geo, p0, p1, n_rows: visible_queries(p0, p1, geo[0], geo[1], geo[2], n_rows)
    return lambda geo, p0, p1, n_rows: _stacked_rows(geo, p0, p1, n_rows)


@njit(inline="always")
def tile_span(geo, i, j0, n):
    """Visible keys of row ``i`` as columns ``[lo, hi)`` of the tile of ``n`` columns from ``j0`` (0-based)."""
    lo, hi = row_keys(geo, i)
    lo, hi = key_columns(geo, j0, n, lo, hi)
    return lo - j0, hi - j0


@njit(inline="always")
def whole_tile_at(geo, i0, m, j0, n):
    """True if every row of ``[i0, i0+m)`` sees every key column of ``[j0, j0+n)``.

    Visible ranges move right with the row, so the first row bounds the
    right edge and the last row the left edge.
    """
    return row_keys(geo, i0 + m - 1)[0] <= key_position(geo, j0) and (
        row_keys(geo, i0)[1] > key_position(geo, j0 + n - 1)
    )


@njit(inline="always")
def rows_key_columns(geo, i0, m, j0, n):
    """Columns ``[lo, hi)`` (absolute) of the tile ``[j0, j0+n)`` seen by at least one row of ``[i0, i0+m)``."""
    return key_columns(geo, j0, n, row_keys(geo, i0)[0], row_keys(geo, i0 + m - 1)[1])


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
    """:func:`softmax_tile` on a plain tile (keys ``j0..`` at their positions)."""
    softmax_tile(s, m, n, i0, j0, geometry(off, left, right, n_keys), row_max, row_sum, acc)


@njit(inline="always", fastmath=FASTMATH)
def softmax_tile(s, m, n, i0, j0, geo, row_max, row_sum, acc):
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
        lo, hi = tile_span(geo, i0 + r, j0, n)
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
def probabilities_and_grads_tile(s, dp, m, n, i0, j0, geo, lse2, delta):
    """One pass over a tile: ``s <- P = exp2(s - lse2)`` and ``dp <- dS = P * (dp - delta)``.

    Entries a row does not see (and whole rows with ``lse = -inf``) become
    exactly 0 in both, whatever ``dp`` held there: a NaN or infinity in a
    value row reaches only the gradients of the queries that see it.
    """
    zero = like(0.0, s)
    for r in range(m):
        lo, hi = tile_span(geo, i0 + r, j0, n)
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

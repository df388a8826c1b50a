"""One (query tile, key tile) step of the attention kernels: GEMMs plus softmax.

The dense (``cpu/exact.py``) and block-sparse (``cpu/block_sparse.py``)
kernels differ only in *which* tile pairs they visit; the work on a pair is the
same and lives here.  A tile is ``m`` query rows from ``i0`` and ``n`` keys
from ``j0`` of batch ``b``, query head ``h`` and key/value head ``hk``.
Scratch tiles ``s``/``dp`` are row-major with leading dimension
``s.shape[1]``; ``c = scale * log2(e)`` and ``sc = scale`` in the array dtype.
Accumulators (``acc``, ``acc_k``, ``acc_v``) hold row 0 for query ``i0``
(forward, dQ) or key ``j0`` (dK, dV).

Non-finite inputs follow the dense formula with the mask applied exactly: a
NaN or infinity in value row ``j`` reaches the queries that see key ``j``
and no other.  A tile product would also multiply the zeros of masked
entries by it (``0 * NaN = NaN``), so a tile that some rows see only in
part, and whose operand holds a non-finite value, is multiplied row by row
over each row's visible keys (or key by key over its visible queries).
Whole tiles and finite operands, the common case, take one GEMM: the test
is a vectorised pass over the operand, made only for partly visible tiles.

The mask is a geometry ``geo`` (:func:`~npsparseattn.cpu._tiles.geometry`):
the ``*_at`` functions take one, so the sparse walk (``cpu/_walk.py``) runs
them on keys gathered into a contiguous tile and on stacked query heads; the
plain names (``forward_pair`` ...) are those functions on keys and rows at
their own positions, for the dense and varlen kernels.
"""

from __future__ import annotations

from numba import njit

from npsparseattn.cpu._blas import gemm_nn, gemm_nt, gemm_tn
from npsparseattn.cpu._scores import modify_scores, modify_scores_keeping, score_grads
from npsparseattn.cpu._tiles import (
    geometry_with,
    key_position,
    like,
    nonfinite_rows,
    probabilities_and_grads_tile,
    row_address,
    row_stride,
    rows_key_columns,
    softmax_tile,
    tile_span,
    visible_rows,
    whole_tile_at,
)


@njit(inline="always")
def _masked_rows_product(gemm, m, n, cols, alpha, a, lda, bp, ldb, cp, ldc, x, i0, j0, geo):
    """``C[r] += alpha * A[r, lo:hi] @ B[lo:hi]`` for each row ``r`` over the keys it sees: no ``0 * NaN``.

    ``a``, ``bp``, ``cp`` are byte addresses of row-major blocks of ``x``'s dtype.
    """
    itemsize = x.itemsize
    for r in range(m):
        lo, hi = tile_span(geo, i0 + r, j0, n)
        if hi > lo:
            gemm_nn(gemm, 1, cols, hi - lo, alpha, a + (r * lda + lo) * itemsize, lda, bp + lo * ldb * itemsize, ldb,
                    like(1.0, x), cp + r * ldc * itemsize, ldc)  # fmt: skip


@njit(inline="always")
def _masked_keys_product(gemm, m, n, cols, alpha, a, lda, bp, ldb, cp, ldc, x, i0, j0, geo, nq):
    """``C[col] += alpha * A[r0:r1, col]^T @ B[r0:r1]`` for each key column over the queries that see it."""
    itemsize = x.itemsize
    for col in range(n):
        p = key_position(geo, j0 + col)
        lo, hi = visible_rows(geo, p, p + 1, nq)
        r0 = min(max(lo - i0, 0), m)
        r1 = max(min(hi - i0, m), r0)
        if r1 > r0:
            gemm_tn(gemm, 1, cols, r1 - r0, alpha, a + (r0 * lda + col) * itemsize, lda, bp + r0 * ldb * itemsize,
                    ldb, like(1.0, x), cp + col * ldc * itemsize, ldc)  # fmt: skip


@njit(inline="always")
def column_address(xt, b, h, j):
    """Byte address of ``xt[b, h, 0, j]``: column ``j`` of a transposed (B, H, D, L) array."""
    st = xt.strides
    return xt.ctypes.data + b * st[0] + h * st[1] + j * st[3]


@njit(inline="always")
def _scores(gemm, m, n, alpha, x, b, h, i0, y, yt, hk, j0, out):
    """``out[:m, :n] = alpha * X Y^T`` for rows ``i0..`` of ``x`` and ``j0..`` of ``y``.

    With ``yt`` (``y`` transposed, (B, H, D, L)) the product is ``X @ Y^T``
    in plain (NN) form: OpenBLAS's small-matrix kernels run NN and TN
    products of up to 10^6 multiply-adds about 20 % faster than the NT form
    (measured on AVX-512).  With an empty ``yt`` (no copy made), ``y`` is read
    as the transposed operand in place.
    """
    xp = row_address(x, b, h, i0)
    zero = like(0.0, x)
    if yt.size == 0:
        gemm_nt(gemm, m, n, x.shape[3], alpha, xp, row_stride(x), row_address(y, b, hk, j0), row_stride(y), zero,
                out.ctypes.data, out.shape[1])  # fmt: skip
    else:
        gemm_nn(gemm, m, n, x.shape[3], alpha, xp, row_stride(x), column_address(yt, b, hk, j0),
                yt.strides[2] // yt.itemsize, zero, out.ctypes.data, out.shape[1])  # fmt: skip


@njit(inline="always")
def forward_step(gemm, q, k, v, b, h, hk, i0, m, j0, n, geo, c, s, acc, row_max, row_sum, kt):
    """``S = c * Q K^T``, online softmax into ``row_max``/``row_sum``, ``acc += P V``.

    ``kt``: optional ``k`` transposed, (B, Hk, D, Lk) (see :func:`_scores`).
    """
    one = like(1.0, q)
    ld = s.shape[1]
    _scores(gemm, m, n, c, q, b, h, i0, k, kt, hk, j0, s)
    modify_scores(geo, s, m, n, b, h, i0, j0)
    softmax_tile(s, m, n, i0, j0, geo, row_max, row_sum, acc)
    vp = row_address(v, b, hk, j0)
    if not whole_tile_at(geo, i0, m, j0, n) and nonfinite_rows(v, b, hk, j0, n):
        _masked_rows_product(gemm, m, n, v.shape[3], one, s.ctypes.data, ld, vp, row_stride(v), acc.ctypes.data,
                             acc.shape[1], q, i0, j0, geo)  # fmt: skip
    else:
        gemm_nn(gemm, m, v.shape[3], n, one, s.ctypes.data, ld, vp, row_stride(v), one, acc.ctypes.data, acc.shape[1])


@njit(inline="always")
def _probabilities_and_score_grads(gemm, dout, q, k, v, lse2, delta, b, h, hk, i0, m, j0, n, geo, c, s, dp, kt, vt):
    """``s <- P`` (recomputed from lse) and ``dp <- dS = P * (dO V^T - delta)``, masked entries exactly 0; with
    score modifications, ``dS`` of the unmodified scores (``cpu/_scores.py``)."""
    _scores(gemm, m, n, like(1.0, q), dout, b, h, i0, v, vt, hk, j0, dp)
    _scores(gemm, m, n, c, q, b, h, i0, k, kt, hk, j0, s)
    modify_scores_keeping(geo, s, dp, m, n, b, h, i0, j0)
    probabilities_and_grads_tile(s, dp, m, n, i0, j0, geo, lse2[b, h], delta[b, h])
    score_grads(geo, dp, m, n, b, h, i0, j0)


@njit(inline="always")
def _key_grads(gemm, dout, q, b, h, i0, m, j0, n, geo, sc, s, dp, acc_k, acc_v, whole):
    """``acc_v += P^T dO`` and ``acc_k += sc * dS^T Q`` (``s`` holds P, ``dp`` holds dS)."""
    one = like(1.0, q)
    ld = s.shape[1]
    op = row_address(dout, b, h, i0)
    qp = row_address(q, b, h, i0)
    if not whole and (nonfinite_rows(dout, b, h, i0, m) or nonfinite_rows(q, b, h, i0, m)):
        nq = q.shape[2]
        _masked_keys_product(gemm, m, n, acc_v.shape[1], one, s.ctypes.data, ld, op, row_stride(dout),
                             acc_v.ctypes.data, acc_v.shape[1], q, i0, j0, geo, nq)  # fmt: skip
        _masked_keys_product(gemm, m, n, acc_k.shape[1], sc, dp.ctypes.data, dp.shape[1], qp, row_stride(q),
                             acc_k.ctypes.data, acc_k.shape[1], q, i0, j0, geo, nq)  # fmt: skip
    else:
        gemm_tn(gemm, n, acc_v.shape[1], m, one, s.ctypes.data, ld, op, row_stride(dout), one,
                acc_v.ctypes.data, acc_v.shape[1])  # fmt: skip
        gemm_tn(gemm, n, acc_k.shape[1], m, sc, dp.ctypes.data, dp.shape[1], qp, row_stride(q), one,
                acc_k.ctypes.data, acc_k.shape[1])  # fmt: skip


@njit(inline="always")
def _query_grads(gemm, k, b, hk, i0, m, j0, n, geo, sc, dp, dst, ld_dst, whole):
    """``dst += sc * dS K`` into the rows at byte address ``dst``, ``ld_dst`` elements apart."""
    kp = row_address(k, b, hk, j0)
    ld = dp.shape[1]
    if not whole and nonfinite_rows(k, b, hk, j0, n):
        _masked_rows_product(gemm, m, n, k.shape[3], sc, dp.ctypes.data, ld, kp, row_stride(k), dst, ld_dst,
                             k, i0, j0, geo)  # fmt: skip
    else:
        gemm_nn(gemm, m, k.shape[3], n, sc, dp.ctypes.data, ld, kp, row_stride(k), like(1.0, k), dst, ld_dst)


@njit(inline="always")
def backward_kv_step(gemm, dout, q, k, v, lse2, delta, b, h, hk, i0, m, j0, n, geo, c, sc, s, dp, acc_k, acc_v, kt, vt):
    """``acc_v += P^T dO`` and ``acc_k += scale * dS^T Q`` for one tile pair (``kt``/``vt``: see :func:`_scores`)."""
    _probabilities_and_score_grads(gemm, dout, q, k, v, lse2, delta, b, h, hk, i0, m, j0, n, geo, c, s, dp, kt, vt)
    whole = whole_tile_at(geo, i0, m, j0, n)
    _key_grads(gemm, dout, q, b, h, i0, m, j0, n, geo, sc, s, dp, acc_k, acc_v, whole)


@njit(inline="always")
def backward_q_step(gemm, dout, q, k, v, lse2, delta, b, h, hk, i0, m, j0, n, geo, c, sc, s, dp, acc, kt, vt):
    """``acc += scale * dS K`` for one tile pair (``kt``/``vt``: see :func:`_scores`)."""
    _probabilities_and_score_grads(gemm, dout, q, k, v, lse2, delta, b, h, hk, i0, m, j0, n, geo, c, s, dp, kt, vt)
    whole = whole_tile_at(geo, i0, m, j0, n)
    _query_grads(gemm, k, b, hk, i0, m, j0, n, geo, sc, dp, acc.ctypes.data, acc.shape[1], whole)


@njit(inline="always")
def backward_step(
    gemm, dout, q, k, v, lse2, delta, b, h, hk, i0, m, j0, n, geo, c, sc, s, dp, acc_k, acc_v, dq, kt, vt
):
    """All of one tile pair's gradients at once: ``acc_v += P^T dO``, ``acc_k += scale * dS^T Q`` and
    ``dq[b, h, i0:i0+m] += scale * dS K`` in place (the caller owns those rows of ``dq``; ``kt``/``vt``: see
    :func:`_scores`)."""
    _probabilities_and_score_grads(gemm, dout, q, k, v, lse2, delta, b, h, hk, i0, m, j0, n, geo, c, s, dp, kt, vt)
    whole = whole_tile_at(geo, i0, m, j0, n)
    _key_grads(gemm, dout, q, b, h, i0, m, j0, n, geo, sc, s, dp, acc_k, acc_v, whole)
    _query_grads(gemm, k, b, hk, i0, m, j0, n, geo, sc, dp, row_address(dq, b, h, i0), row_stride(dq), whole)


@njit(inline="always")
def store_rows(acc, dst, b, h, i0, m):
    """``dst[b, h, i0:i0+m] = acc[:m]``."""
    for r in range(m):
        for col in range(acc.shape[1]):
            dst[b, h, i0 + r, col] = acc[r, col]


@njit(inline="always")
def forward_pair_at(gemm, q, k, v, b, h, hk, i0, m, j0, n, geo, c, s, acc, row_max, row_sum, strip, kt):
    """:func:`forward_step` on a tile pair, cut into strips of ``strip`` query rows where the mask cuts it.

    A pair that every row sees whole is one step.  Otherwise (the diagonal
    of a causal mask, the edges of a window) each strip of rows multiplies
    only the keys some of its rows see, so a causal diagonal tile costs
    about half a tile plus a strip, not a whole tile.  ``kt``: ``k``
    transposed or empty (see :func:`_scores`).
    """
    if whole_tile_at(geo, i0, m, j0, n):
        forward_step(gemm, q, k, v, b, h, hk, i0, m, j0, n, geo, c, s, acc, row_max, row_sum, kt)
        return
    for r0 in range(0, m, strip):
        mm = min(strip, m - r0)
        lo, hi = rows_key_columns(geo, i0 + r0, mm, j0, n)
        if hi > lo:
            forward_step(gemm, q, k, v, b, h, hk, i0 + r0, mm, lo, hi - lo, geo, c, s, acc[r0:], row_max[r0:],
                         row_sum[r0:], kt)  # fmt: skip


@njit(inline="always")
def backward_pair_at(
    gemm, dout, q, k, v, lse2, delta, b, h, hk, i0, m, j0, n, geo, c, sc, s, dp, acc_k, acc_v, dq, strip, kt, vt
):
    """:func:`backward_step` on a tile pair, cut into strips of rows where the mask cuts it (``acc_k``/``acc_v``
    row 0 is key column ``j0``)."""
    if whole_tile_at(geo, i0, m, j0, n):
        backward_step(gemm, dout, q, k, v, lse2, delta, b, h, hk, i0, m, j0, n, geo, c, sc, s, dp, acc_k, acc_v, dq,
                      kt, vt)  # fmt: skip
        return
    for r0 in range(0, m, strip):
        mm = min(strip, m - r0)
        lo, hi = rows_key_columns(geo, i0 + r0, mm, j0, n)
        if hi > lo:
            backward_step(gemm, dout, q, k, v, lse2, delta, b, h, hk, i0 + r0, mm, lo, hi - lo, geo, c, sc, s, dp,
                          acc_k[lo - j0 :], acc_v[lo - j0 :], dq, kt, vt)  # fmt: skip


@njit(inline="always")
def backward_kv_pair_at(
    gemm, dout, q, k, v, lse2, delta, b, h, hk, i0, m, j0, n, geo, c, sc, s, dp, acc_k, acc_v, strip, kt, vt
):
    """:func:`backward_kv_step` on a tile pair, cut into strips of rows where the mask cuts it."""
    if whole_tile_at(geo, i0, m, j0, n):
        backward_kv_step(gemm, dout, q, k, v, lse2, delta, b, h, hk, i0, m, j0, n, geo, c, sc, s, dp, acc_k, acc_v,
                         kt, vt)  # fmt: skip
        return
    for r0 in range(0, m, strip):
        mm = min(strip, m - r0)
        lo, hi = rows_key_columns(geo, i0 + r0, mm, j0, n)
        if hi > lo:
            backward_kv_step(gemm, dout, q, k, v, lse2, delta, b, h, hk, i0 + r0, mm, lo, hi - lo, geo, c, sc, s,
                             dp, acc_k[lo - j0 :], acc_v[lo - j0 :], kt, vt)  # fmt: skip


@njit(inline="always")
def backward_q_pair_at(gemm, dout, q, k, v, lse2, delta, b, h, hk, i0, m, j0, n, geo, c, sc, s, dp, acc, strip, kt, vt):
    """:func:`backward_q_step` on a tile pair, cut into strips of rows where the mask cuts it."""
    if whole_tile_at(geo, i0, m, j0, n):
        backward_q_step(gemm, dout, q, k, v, lse2, delta, b, h, hk, i0, m, j0, n, geo, c, sc, s, dp, acc, kt, vt)
        return
    for r0 in range(0, m, strip):
        mm = min(strip, m - r0)
        lo, hi = rows_key_columns(geo, i0 + r0, mm, j0, n)
        if hi > lo:
            backward_q_step(gemm, dout, q, k, v, lse2, delta, b, h, hk, i0 + r0, mm, lo, hi - lo, geo, c, sc, s, dp,
                            acc[r0:], kt, vt)  # fmt: skip


@njit(inline="always")
def forward_pair(gemm, q, k, v, b, h, hk, i0, m, j0, n, off, left, right, c, s, acc, row_max, row_sum, strip, kt, mods):
    """:func:`forward_pair_at` on keys and rows at their own positions (the dense and varlen kernels), with the
    score modifications ``mods`` (``cpu/_scores.py``; ``None``: none)."""
    geo = geometry_with(off, left, right, k.shape[2], mods)
    forward_pair_at(gemm, q, k, v, b, h, hk, i0, m, j0, n, geo, c, s, acc, row_max, row_sum, strip, kt)


@njit(inline="always")
def backward_pair(
    gemm, dout, q, k, v, lse2, delta, b, h, hk, i0, m, j0, n, off, left, right, c, sc, s, dp, acc_k, acc_v, dq, strip,
    kt, vt, mods,
):  # fmt: skip
    """:func:`backward_pair_at` on keys and rows at their own positions, with the score modifications ``mods``."""
    geo = geometry_with(off, left, right, k.shape[2], mods)
    backward_pair_at(gemm, dout, q, k, v, lse2, delta, b, h, hk, i0, m, j0, n, geo, c, sc, s, dp, acc_k, acc_v, dq,
                     strip, kt, vt)  # fmt: skip


@njit(inline="always")
def backward_kv_pair(
    gemm, dout, q, k, v, lse2, delta, b, h, hk, i0, m, j0, n, off, left, right, c, sc, s, dp, acc_k, acc_v, strip,
    kt, vt, mods,
):  # fmt: skip
    """:func:`backward_kv_pair_at` on keys and rows at their own positions, with the score modifications ``mods``."""
    geo = geometry_with(off, left, right, k.shape[2], mods)
    backward_kv_pair_at(gemm, dout, q, k, v, lse2, delta, b, h, hk, i0, m, j0, n, geo, c, sc, s, dp, acc_k, acc_v,
                        strip, kt, vt)  # fmt: skip


@njit(inline="always")
def backward_q_pair(
    gemm, dout, q, k, v, lse2, delta, b, h, hk, i0, m, j0, n, off, left, right, c, sc, s, dp, acc, strip, kt, vt, mods
):
    """:func:`backward_q_pair_at` on keys and rows at their own positions, with the score modifications ``mods``."""
    geo = geometry_with(off, left, right, k.shape[2], mods)
    backward_q_pair_at(gemm, dout, q, k, v, lse2, delta, b, h, hk, i0, m, j0, n, geo, c, sc, s, dp, acc, strip, kt,
                       vt)  # fmt: skip

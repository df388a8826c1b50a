"""One (query tile, key tile) step of the attention kernels: GEMMs plus softmax.

The dense (``cpu/attention.py``) and block-sparse (``cpu/block_sparse.py``)
kernels differ only in *which* tile pairs they visit; the work on a pair is the
same and lives here.  A tile is ``m`` query rows from ``i0`` and ``n`` keys
from ``j0`` of batch ``b``, query head ``h`` and key/value head ``hk``.
Scratch tiles ``s``/``dp`` are row-major with leading dimension
``s.shape[1]``; ``c = scale * log2(e)`` and ``sc = scale`` in the array dtype.
"""

from __future__ import annotations

from numba import njit

from npsparseattn.cpu._blas import gemm_nn, gemm_nt, gemm_tn
from npsparseattn.cpu._tiles import (
    like,
    online_softmax_tile,
    probabilities_tile,
    row_address,
    row_stride,
    score_grad_tile,
)


@njit(inline="always")
def forward_step(gemm, q, k, v, b, h, hk, i0, m, j0, n, off, left, right, c, s, acc, row_max, row_sum):
    """``S = c * Q K^T``, online softmax into ``row_max``/``row_sum``, ``acc += P V``."""
    one = like(1.0, q)
    ld = s.shape[1]
    qp = row_address(q, b, h, i0)
    kp = row_address(k, b, hk, j0)
    gemm_nt(gemm, m, n, q.shape[3], c, qp, row_stride(q), kp, row_stride(k), like(0.0, q), s.ctypes.data, ld)
    online_softmax_tile(s, m, n, i0, j0, off, left, right, k.shape[2], row_max, row_sum, acc)
    vp = row_address(v, b, hk, j0)
    gemm_nn(gemm, m, v.shape[3], n, one, s.ctypes.data, ld, vp, row_stride(v), one, acc.ctypes.data, acc.shape[1])


@njit(inline="always")
def _probabilities_and_score_grads(
    gemm, dout, q, k, v, lse2, delta, b, h, hk, i0, m, j0, n, off, left, right, c, s, dp
):
    """``s <- P`` (recomputed from lse) and ``dp <- dS = P * (dO V^T - delta)``; ``s`` keeps ``P``."""
    zero = like(0.0, q)
    ld = s.shape[1]
    qp = row_address(q, b, h, i0)
    kp = row_address(k, b, hk, j0)
    op = row_address(dout, b, h, i0)
    gemm_nt(gemm, m, n, q.shape[3], c, qp, row_stride(q), kp, row_stride(k), zero, s.ctypes.data, ld)
    probabilities_tile(s, m, n, i0, j0, off, left, right, k.shape[2], lse2[b, h])
    vp = row_address(v, b, hk, j0)
    gemm_nt(gemm, m, n, v.shape[3], like(1.0, q), op, row_stride(dout), vp, row_stride(v), zero, dp.ctypes.data, ld)
    score_grad_tile(s, dp, m, n, i0, delta[b, h])


@njit(inline="always")
def backward_kv_step(
    gemm, dout, q, k, v, lse2, delta, b, h, hk, i0, m, j0, n, off, left, right, c, sc, s, dp, acc_k, acc_v
):
    """``acc_v += P^T dO`` and ``acc_k += scale * dS^T Q`` for one tile pair."""
    _probabilities_and_score_grads(gemm, dout, q, k, v, lse2, delta, b, h, hk, i0, m, j0, n, off, left, right, c, s, dp)
    one = like(1.0, q)
    op = row_address(dout, b, h, i0)
    qp = row_address(q, b, h, i0)
    gemm_tn(gemm, n, acc_v.shape[1], m, one, s.ctypes.data, s.shape[1], op, row_stride(dout), one,
            acc_v.ctypes.data, acc_v.shape[1])  # fmt: skip
    gemm_tn(gemm, n, acc_k.shape[1], m, sc, dp.ctypes.data, dp.shape[1], qp, row_stride(q), one,
            acc_k.ctypes.data, acc_k.shape[1])  # fmt: skip


@njit(inline="always")
def backward_q_step(gemm, dout, q, k, v, lse2, delta, b, h, hk, i0, m, j0, n, off, left, right, c, sc, s, dp, acc):
    """``acc += scale * dS K`` for one tile pair."""
    _probabilities_and_score_grads(gemm, dout, q, k, v, lse2, delta, b, h, hk, i0, m, j0, n, off, left, right, c, s, dp)
    kp = row_address(k, b, hk, j0)
    gemm_nn(gemm, m, acc.shape[1], n, sc, dp.ctypes.data, s.shape[1], kp, row_stride(k), like(1.0, q),
            acc.ctypes.data, acc.shape[1])  # fmt: skip


@njit(inline="always")
def store_rows(acc, dst, b, h, i0, m):
    """``dst[b, h, i0:i0+m] = acc[:m]``."""
    for r in range(m):
        for col in range(acc.shape[1]):
            dst[b, h, i0 + r, col] = acc[r, col]

"""Packed variable-length attention on the CPU (numba): backend ``"numba"`` of ``attention_varlen``.

The tiles of :mod:`npsparseattn.cpu.exact`, sequence by sequence, with no
padding: a task is one query tile (forward, dQ) or one key tile (dK/dV) of
one head of one sequence, and the kernels run the shared per-tile steps
(:mod:`npsparseattn.cpu._steps`) on that sequence's rows, as views
``q[:, :, cu_q[s]:cu_q[s+1]]`` with the sequence's own offset
``Lk_s - Lq_s``.  The number of tasks and their cost follow the real lengths.

Tasks differ in cost (long and short sequences, causal tiles), so they are
dealt to one work list per thread, heaviest first
(:func:`npsparseattn.cpu._schedule.deal`).  Empty sequences have no query
tasks; their keys (if any) get zero gradients.
"""

from __future__ import annotations

import numpy as np
from numba import prange

from npsparseattn._dtypes import compute_dtype
from npsparseattn.cpu import DTYPES, KINDS
from npsparseattn.cpu._blas import gemm_address, single_threaded_blas
from npsparseattn.cpu._jit import kernel
from npsparseattn.cpu._schedule import deal
from npsparseattn.cpu._steps import backward_kv_pair, backward_q_pair, forward_pair, store_rows
from npsparseattn.cpu._tiles import LOG2E, finish_rows, like, visible_keys, visible_queries
from npsparseattn.cpu.exact import BACKWARD_STRIP, FORWARD_STRIP, row_dot_kernel, window_bound

__all__ = ["DTYPES", "KINDS", "STRIDED_ROWS", "TOLERANCE", "backward", "compute_dtype", "forward", "unsupported"]

STRIDED_ROWS = True  # sequences are row ranges of the packed arrays, read in place through the row stride
TOLERANCE = {"float16": 2e-3, "bfloat16": 1e-2, "float32": 1e-5, "float64": 1e-10}

FORWARD_TILES = (128, 256)  # (query rows, keys) per forward step
BACKWARD_TILES = (128, 128)


def unsupported(problem) -> list[str]:
    """Every packed problem on NumPy arrays is supported."""
    return []


@kernel(writes=("out", "lse"), strided=True)
def _forward_kernel(q, k, v, out, lse, cu_q, cu_k, tasks, order, starts, scale, left, right, bq, bk, gemm):
    group = q.shape[1] // k.shape[1]
    c = like(scale * LOG2E, q)
    no_kt = np.empty((0, 0, 0, 0), q.dtype)  # K and V read in place (cpu/exact.py: transposed)
    for w in prange(starts.shape[0] - 1):
        s = np.empty((bq, bk), q.dtype)
        acc = np.empty((bq, v.shape[3]), q.dtype)
        row_max = np.empty(bq, q.dtype)
        row_sum = np.empty(bq, q.dtype)
        for t in range(starts[w], starts[w + 1]):
            seq, h, i0 = tasks[order[t], 0], tasks[order[t], 1], tasks[order[t], 2]
            q0, q1, k0, k1 = cu_q[seq], cu_q[seq + 1], cu_k[seq], cu_k[seq + 1]
            lk = k1 - k0
            off = lk - (q1 - q0)
            m = min(bq, q1 - q0 - i0)
            acc[:] = 0
            row_max[:] = -np.inf
            row_sum[:] = 0
            qs, ks, vs = q[:, :, q0:q1], k[:, :, k0:k1], v[:, :, k0:k1]
            klo = visible_keys(i0, off, left, right, lk)[0]
            khi = visible_keys(i0 + m - 1, off, left, right, lk)[1]
            for j0 in range(klo, khi, bk):
                n = min(bk, khi - j0)
                forward_pair(gemm, qs, ks, vs, 0, h, h // group, i0, m, j0, n, off, left, right, c, s, acc, row_max,
                             row_sum, FORWARD_STRIP, no_kt, None)  # fmt: skip
            finish_rows(acc, row_max, row_sum, m, out[:, :, q0:q1], lse[:, :, q0:q1], 0, h, i0)


@kernel(writes=("dk", "dv"), strided=True)
def _backward_kv_kernel(
    dout, q, k, v, lse2, delta, dk, dv, cu_q, cu_k, tasks, order, starts, scale, left, right, bq, bk, gemm
):
    group = q.shape[1] // k.shape[1]
    c = like(scale * LOG2E, q)
    no_kt = np.empty((0, 0, 0, 0), q.dtype)  # K and V read in place (cpu/exact.py: transposed)
    sc = like(scale, q)
    for w in prange(starts.shape[0] - 1):
        s = np.empty((bq, bk), q.dtype)
        dp = np.empty((bq, bk), q.dtype)
        acc_k = np.empty((bk, q.shape[3]), q.dtype)
        acc_v = np.empty((bk, v.shape[3]), q.dtype)
        for t in range(starts[w], starts[w + 1]):
            seq, hk, j0 = tasks[order[t], 0], tasks[order[t], 1], tasks[order[t], 2]
            q0, q1, k0, k1 = cu_q[seq], cu_q[seq + 1], cu_k[seq], cu_k[seq + 1]
            lq, lk = q1 - q0, k1 - k0
            off = lk - lq
            n = min(bk, lk - j0)
            acc_k[:] = 0
            acc_v[:] = 0
            dos, qs, ks, vs = dout[:, :, q0:q1], q[:, :, q0:q1], k[:, :, k0:k1], v[:, :, k0:k1]
            lse2s, deltas = lse2[:, :, q0:q1], delta[:, :, q0:q1]
            ilo, ihi = visible_queries(j0, j0 + n, off, left, right, lq)
            for h in range(hk * group, (hk + 1) * group):
                for i0 in range(ilo, ihi, bq):
                    m = min(bq, ihi - i0)
                    backward_kv_pair(
                        gemm, dos, qs, ks, vs, lse2s, deltas, 0, h, hk, i0, m, j0, n, off, left, right, c, sc, s, dp,
                        acc_k, acc_v, BACKWARD_STRIP, no_kt, no_kt, None,
                    )  # fmt: skip
            store_rows(acc_k, dk[:, :, k0:k1], 0, hk, j0, n)
            store_rows(acc_v, dv[:, :, k0:k1], 0, hk, j0, n)


@kernel(writes=("dq",), strided=True)
def _backward_q_kernel(
    dout, q, k, v, lse2, delta, dq, cu_q, cu_k, tasks, order, starts, scale, left, right, bq, bk, gemm
):
    group = q.shape[1] // k.shape[1]
    c = like(scale * LOG2E, q)
    no_kt = np.empty((0, 0, 0, 0), q.dtype)  # K and V read in place (cpu/exact.py: transposed)
    sc = like(scale, q)
    for w in prange(starts.shape[0] - 1):
        s = np.empty((bq, bk), q.dtype)
        dp = np.empty((bq, bk), q.dtype)
        acc = np.empty((bq, q.shape[3]), q.dtype)
        for t in range(starts[w], starts[w + 1]):
            seq, h, i0 = tasks[order[t], 0], tasks[order[t], 1], tasks[order[t], 2]
            q0, q1, k0, k1 = cu_q[seq], cu_q[seq + 1], cu_k[seq], cu_k[seq + 1]
            lk = k1 - k0
            off = lk - (q1 - q0)
            m = min(bq, q1 - q0 - i0)
            acc[:] = 0
            dos, qs, ks, vs = dout[:, :, q0:q1], q[:, :, q0:q1], k[:, :, k0:k1], v[:, :, k0:k1]
            lse2s, deltas = lse2[:, :, q0:q1], delta[:, :, q0:q1]
            klo = visible_keys(i0, off, left, right, lk)[0]
            khi = visible_keys(i0 + m - 1, off, left, right, lk)[1]
            for j0 in range(klo, khi, bk):
                n = min(bk, khi - j0)
                backward_q_pair(
                    gemm, dos, qs, ks, vs, lse2s, deltas, 0, h, h // group, i0, m, j0, n, off, left, right, c, sc, s,
                    dp, acc, BACKWARD_STRIP, no_kt, no_kt, None,
                )  # fmt: skip
            store_rows(acc, dq[:, :, q0:q1], 0, h, i0, m)


def _span(lo: np.ndarray, hi: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Length of ``[max(lo, 0), min(hi, n))``, at least 0 (vectorised)."""
    return np.maximum(np.minimum(hi, n) - np.maximum(lo, 0), 0)


def tile_tasks(
    rows: np.ndarray, cols: np.ndarray, tile: int, heads: int, left: int, right: int, by_key: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Tasks ``(seq, head, start)`` (T, 3) over tiles of ``tile`` rows of every sequence, and their costs (T,).

    ``rows``/``cols`` are the per-sequence lengths along the tiled axis and
    the other one; the cost is the tile's rows times the span of the other
    axis that the window leaves visible to them (plus one, so empty tiles
    still count).  ``by_key``: the tiles are key tiles.
    """
    rows, cols = rows.astype(np.int64), cols.astype(np.int64)
    n_tiles = -(-rows // tile)
    seq = np.repeat(np.arange(rows.shape[0]), n_tiles)
    first = np.repeat(np.cumsum(n_tiles) - n_tiles, n_tiles)
    start = (np.arange(seq.shape[0]) - first) * tile
    m = np.minimum(tile, rows[seq] - start)
    if by_key:  # key tile [start, start + m) of Lk = rows, Lq = cols: offset Lk - Lq
        off = rows[seq] - cols[seq]
        span = _span(start - off - right, start + m - 1 - off + left + 1, cols[seq])
    else:
        off = cols[seq] - rows[seq]
        span = _span(start + off - left, start + m - 1 + off + right + 1, cols[seq])
    cost = m * span + m
    tasks = np.empty((seq.shape[0] * heads, 3), dtype=np.int64)
    tasks[:, 0] = np.repeat(seq, heads)
    tasks[:, 1] = np.tile(np.arange(heads), seq.shape[0])
    tasks[:, 2] = np.repeat(start, heads)
    return tasks, np.repeat(cost, heads)


def _bounds(left: int | None, right: int | None) -> tuple[int, int]:
    return window_bound(left), window_bound(right)


def forward(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    cu_seqlens_q: np.ndarray,
    cu_seqlens_k: np.ndarray,
    *,
    scale: float,
    left: int | None,
    right: int | None,
    out: np.ndarray | None = None,
    lse: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Packed attention forward.

    Parameters
    ----------
    q : (Hq, Tq, D), k : (Hk, Tk, D), v : (Hk, Tk, Dv)
        float32 or float64, one dtype, unit stride on the last axis.
    cu_seqlens_q, cu_seqlens_k : int32 (n_seqs + 1,)
        Validated offsets (from 0, non-decreasing, ending at Tq and Tk).
    scale, left, right :
        Query ``i`` of sequence ``s`` sees key ``j`` of that sequence iff
        ``i+off-left <= j <= i+off+right`` with ``off = Lk_s - Lq_s``.
    out, lse : arrays, optional
        Buffers (Hq, Tq, Dv) and (Hq, Tq) in the input dtype.

    Returns
    -------
    out : (Hq, Tq, Dv), lse : (Hq, Tq), in the input dtype.
    """
    hq, total_q, _ = q.shape
    out = np.empty((hq, total_q, v.shape[2]), q.dtype) if out is None else out
    lse = np.empty((hq, total_q), q.dtype) if lse is None else lse
    if total_q == 0:
        return out, lse
    lengths_q, lengths_k = np.diff(cu_seqlens_q), np.diff(cu_seqlens_k)
    left_b, right_b = _bounds(left, right)
    bq, bk = FORWARD_TILES
    tasks, costs = tile_tasks(lengths_q, lengths_k, bq, hq, left_b, right_b, by_key=False)
    order, starts = deal(costs)
    with single_threaded_blas():
        _forward_kernel(
            q[None], k[None], v[None], out[None], lse[None], cu_seqlens_q, cu_seqlens_k, tasks, order, starts, scale,
            left_b, right_b, bq, bk, gemm_address(q.dtype),
        )  # fmt: skip
    return out, lse


def backward(
    dout: np.ndarray,
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    out: np.ndarray,
    lse: np.ndarray,
    cu_seqlens_q: np.ndarray,
    cu_seqlens_k: np.ndarray,
    *,
    scale: float,
    left: int | None,
    right: int | None,
    grads: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Packed attention backward: ``(dq, dk, dv)`` shaped like ``q``, ``k``, ``v`` (dk/dv summed over GQA groups).

    ``dout``/``out`` (Hq, Tq, Dv) and ``lse`` (Hq, Tq) come from
    :func:`forward` with the same offsets and options; ``grads`` optionally
    gives the buffers to write.
    """
    hq, total_q, _ = q.shape
    hk, total_k, _ = k.shape
    dtype = q.dtype
    if grads is None:
        grads = (np.empty(q.shape, dtype), np.empty(k.shape, dtype), np.empty(v.shape, dtype))
    dq, dk, dv = grads
    if total_q == 0 or total_k == 0:
        for g in grads:
            g[...] = 0
        return dq, dk, dv
    lengths_q, lengths_k = np.diff(cu_seqlens_q), np.diff(cu_seqlens_k)
    left_b, right_b = _bounds(left, right)
    bq, bk = BACKWARD_TILES
    delta = np.empty((1, hq, total_q), dtype)
    lse2 = (np.ascontiguousarray(lse, dtype=dtype) * dtype.type(LOG2E))[None]
    gemm = gemm_address(dtype)
    q4, k4, v4, dout4 = q[None], k[None], v[None], dout[None]
    kv_tasks, kv_costs = tile_tasks(lengths_k, lengths_q, bk, hk, left_b, right_b, by_key=True)
    q_tasks, q_costs = tile_tasks(lengths_q, lengths_k, bq, hq, left_b, right_b, by_key=False)
    with single_threaded_blas():
        row_dot_kernel(dout4, out[None], delta)
        _backward_kv_kernel(
            dout4, q4, k4, v4, lse2, delta, dk[None], dv[None], cu_seqlens_q, cu_seqlens_k, kv_tasks,
            *deal(kv_costs), scale, left_b, right_b, bq, bk, gemm,
        )  # fmt: skip
        _backward_q_kernel(
            dout4, q4, k4, v4, lse2, delta, dq[None], cu_seqlens_q, cu_seqlens_k, q_tasks, *deal(q_costs), scale,
            left_b, right_b, bq, bk, gemm,
        )  # fmt: skip
    return dq, dk, dv

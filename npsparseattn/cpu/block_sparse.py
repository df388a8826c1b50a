"""Block-sparse attention on the CPU (numba), forward and backward: backend ``"numba"`` of ``block_sparse_attention``.

The work is proportional to the stored blocks of a :class:`BlockLayout`:

* forward, one parallel task per (batch, query head, query block): walk the
  row's *runs* of consecutive stored key blocks; each run (clipped to the keys
  the causal/window mask leaves visible to the block, cut into chunks of at
  most ``width`` keys, :func:`chunk_width`) is one score GEMM, one
  online-softmax update and one ``P @ V`` GEMM.  Merging runs keeps BLAS on
  wide tiles for 64-key blocks.
* backward, the schemes of ``cpu/exact.py``: in one pass, one task per
  (batch, key head) walks the layout's transpose (CSC) key block by key
  block over every query head of the GQA group, accumulating dQ in place; in
  two passes, dK/dV with one task per (batch, key head, key block) over the
  transpose, then dQ with one task per (batch, query head, query block) over
  the rows.  The one pass is taken when the (batch, key head) pairs, weighed
  by their stored blocks, keep the threads busy.

Causal/window masks apply inside blocks through the shared tile helpers; a run
that the mask empties costs nothing.  Tasks are visited heaviest-first in
zigzag order so numba's contiguous thread chunks get similar work.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from npsparseattn._dtypes import compute_dtype
from npsparseattn.cpu import DTYPES, KINDS
from npsparseattn.cpu._blas import gemm_address, single_threaded_blas
from npsparseattn.cpu._jit import kernel
from npsparseattn.cpu._steps import backward_kv_pair, backward_pair, backward_q_pair, forward_pair, store_rows
from npsparseattn.cpu._tiles import (
    LOG2E,
    finish_rows,
    like,
    visible_keys,
    visible_queries,
)
from npsparseattn.cpu.exact import (
    BACKWARD_STRIP,
    FORWARD_STRIP,
    GEMM_VOLUME,
    chosen_scheme,
    row_dot_kernel,
    transposed,
    window_bound,
)
from npsparseattn.layouts import BlockLayout

__all__ = ["DTYPES", "KINDS", "STRIDED_ROWS", "TOLERANCE", "backward", "compute_dtype", "forward", "unsupported"]

STRIDED_ROWS = False  # as cpu/exact.py: one compiled kernel per dtype, non-contiguous inputs copied
TOLERANCE = {"float16": 2e-3, "bfloat16": 1e-2, "float32": 1e-5, "float64": 1e-10}


def unsupported(problem) -> list[str]:
    """Every block-sparse problem on NumPy arrays is supported."""
    return []


@njit(inline="always")
def _chunk(lo, hi, width):
    """Step that cuts ``[lo, hi)`` into near-equal chunks of at most ``width``, a multiple of 32 (whole lines)."""
    n = hi - lo
    pieces = (n + width - 1) // width
    return min(width, ((n + pieces - 1) // pieces + 31) // 32 * 32)


def chunk_width(block: int, dim: int) -> int:
    """Most keys (forward, dQ) or queries (dK/dV) one product takes beside a ``block``-sized side: the tile
    products stay within :data:`~npsparseattn.cpu.exact.GEMM_VOLUME` multiply-adds, a multiple of 32, 32 to 256."""
    return max(32, min(256, GEMM_VOLUME // (block * max(dim, 1)) // 32 * 32))


@kernel(writes=("out", "lse"))
def _forward_kernel(
    q, k, kt, v, out, lse, run_ptr, run_start, run_stop, order, bq, bk, scale, off, left, right, width, strip, gemm
):
    n_batch, hq, lq, _ = q.shape
    group = hq // k.shape[1]
    lk = k.shape[2]
    dv = v.shape[3]
    lheads, nqb = order.shape
    c = like(scale * LOG2E, q)
    for task in prange(n_batch * hq * nqb):
        h = (task // nqb) % hq
        b = task // (nqb * hq)
        lh = h if lheads > 1 else 0
        r = order[lh, task % nqb]
        hk = h // group
        i0 = r * bq
        m = min(bq, lq - i0)
        s = np.empty((bq, width), q.dtype)
        acc = np.zeros((bq, dv), q.dtype)
        row_max = np.full(bq, -np.inf, q.dtype)
        row_sum = np.zeros(bq, q.dtype)
        klo = visible_keys(i0, off, left, right, lk)[0]
        khi = visible_keys(i0 + m - 1, off, left, right, lk)[1]
        row = lh * nqb + r
        for p in range(run_ptr[row], run_ptr[row + 1]):
            lo = max(run_start[p] * bk, klo)
            hi = min(run_stop[p] * bk, khi)
            if hi <= lo:
                continue
            step = _chunk(lo, hi, width)
            for j0 in range(lo, hi, step):
                n = min(step, hi - j0)
                forward_pair(
                    gemm, q, k, v, b, h, hk, i0, m, j0, n, off, left, right, c, s, acc, row_max, row_sum, strip, kt
                )
        finish_rows(acc, row_max, row_sum, m, out, lse, b, h, i0)


@kernel(writes=("dk", "dv_out"))
def _backward_kv_kernel(
    dout, q, k, kt, v, vt, lse2, delta, dk, dv_out, col_ptr, col_start, col_stop, order, lheads, bq, bk, scale, off,
    left, right, width, strip, gemm
):  # fmt: skip
    n_batch, hq, lq, d = q.shape
    hk_count = k.shape[1]
    group = hq // hk_count
    lk = k.shape[2]
    dv = v.shape[3]
    nkb = order.shape[1]
    c = like(scale * LOG2E, q)
    sc = like(scale, q)
    for task in prange(n_batch * hk_count * nkb):
        hk = (task // nkb) % hk_count
        b = task // (nkb * hk_count)
        blk = order[hk, task % nkb]
        j0 = blk * bk
        n = min(bk, lk - j0)
        s = np.empty((width, bk), q.dtype)
        dp = np.empty((width, bk), q.dtype)
        acc_k = np.zeros((bk, d), q.dtype)
        acc_v = np.zeros((bk, dv), q.dtype)
        ilo, ihi = visible_queries(j0, j0 + n, off, left, right, lq)
        for h in range(hk * group, (hk + 1) * group):
            col = (h if lheads > 1 else 0) * nkb + blk
            for p in range(col_ptr[col], col_ptr[col + 1]):
                lo = max(col_start[p] * bq, ilo)
                hi = min(col_stop[p] * bq, ihi)
                if hi <= lo:
                    continue
                step = _chunk(lo, hi, width)
                for i0 in range(lo, hi, step):
                    m = min(step, hi - i0)
                    backward_kv_pair(
                        gemm, dout, q, k, v, lse2, delta, b, h, hk, i0, m, j0, n, off, left, right, c, sc, s, dp,
                        acc_k, acc_v, strip, kt, vt,
                    )  # fmt: skip
        store_rows(acc_k, dk, b, hk, j0, n)
        store_rows(acc_v, dv_out, b, hk, j0, n)


@kernel(writes=("dq",))
def _backward_q_kernel(
    dout, q, k, kt, v, vt, lse2, delta, dq, run_ptr, run_start, run_stop, order, bq, bk, scale, off, left, right, width,
    strip, gemm,
):  # fmt: skip
    n_batch, hq, lq, d = q.shape
    group = hq // k.shape[1]
    lk = k.shape[2]
    lheads, nqb = order.shape
    c = like(scale * LOG2E, q)
    sc = like(scale, q)
    for task in prange(n_batch * hq * nqb):
        h = (task // nqb) % hq
        b = task // (nqb * hq)
        lh = h if lheads > 1 else 0
        r = order[lh, task % nqb]
        hk = h // group
        i0 = r * bq
        m = min(bq, lq - i0)
        s = np.empty((bq, width), q.dtype)
        dp = np.empty((bq, width), q.dtype)
        acc = np.zeros((bq, d), q.dtype)
        klo = visible_keys(i0, off, left, right, lk)[0]
        khi = visible_keys(i0 + m - 1, off, left, right, lk)[1]
        row = lh * nqb + r
        for p in range(run_ptr[row], run_ptr[row + 1]):
            lo = max(run_start[p] * bk, klo)
            hi = min(run_stop[p] * bk, khi)
            if hi <= lo:
                continue
            step = _chunk(lo, hi, width)
            for j0 in range(lo, hi, step):
                n = min(step, hi - j0)
                backward_q_pair(
                    gemm, dout, q, k, v, lse2, delta, b, h, hk, i0, m, j0, n, off, left, right, c, sc, s, dp, acc,
                    strip, kt, vt,
                )  # fmt: skip
        store_rows(acc, dq, b, h, i0, m)


@kernel(writes=("dq", "dk", "dv_out"))
def _backward_kernel(
    dout, q, k, kt, v, vt, lse2, delta, dq, dk, dv_out, col_ptr, col_start, col_stop, lheads, bq, bk, scale, off, left,
    right, width, strip, gemm
):  # fmt: skip
    n_batch, hq, lq, d = q.shape
    hk_count = k.shape[1]
    group = hq // hk_count
    lk = k.shape[2]
    dv = v.shape[3]
    nkb = (lk + bk - 1) // bk
    c = like(scale * LOG2E, q)
    sc = like(scale, q)
    zero = like(0.0, q)
    for task in prange(n_batch * hk_count):
        hk = task % hk_count
        b = task // hk_count
        s = np.empty((width, bk), q.dtype)
        dp = np.empty((width, bk), q.dtype)
        acc_k = np.empty((bk, d), q.dtype)
        acc_v = np.empty((bk, dv), q.dtype)
        for h in range(hk * group, (hk + 1) * group):
            for i in range(lq):
                dq_row = dq[b, h, i]
                for col in range(d):
                    dq_row[col] = zero
        for blk in range(nkb):
            j0 = blk * bk
            n = min(bk, lk - j0)
            acc_k[:] = zero
            acc_v[:] = zero
            ilo, ihi = visible_queries(j0, j0 + n, off, left, right, lq)
            for h in range(hk * group, (hk + 1) * group):
                col = (h if lheads > 1 else 0) * nkb + blk
                for p in range(col_ptr[col], col_ptr[col + 1]):
                    lo = max(col_start[p] * bq, ilo)
                    hi = min(col_stop[p] * bq, ihi)
                    if hi <= lo:
                        continue
                    step = _chunk(lo, hi, width)
                    for i0 in range(lo, hi, step):
                        m = min(step, hi - i0)
                        backward_pair(
                            gemm, dout, q, k, v, lse2, delta, b, h, hk, i0, m, j0, n, off, left, right, c, sc, s,
                            dp, acc_k, acc_v, dq, strip, kt, vt,
                        )  # fmt: skip
            store_rows(acc_k, dk, b, hk, j0, n)
            store_rows(acc_v, dv_out, b, hk, j0, n)


def _balanced_order(costs: np.ndarray, segment: int = 8) -> np.ndarray:
    """Per row of ``costs``, a visiting order of its items that balances threads and keeps neighbours together.

    numba hands each thread a contiguous range of tasks.  Items are taken in
    segments of ``segment`` neighbours (consecutive blocks share keys, so
    they stay together for the caches); segments are sorted heaviest first and
    interleaved 0, n-1, 1, n-2, ... (zigzag), which pairs heavy with light
    and evens the ranges out.
    """
    heads, n = costs.shape
    n_seg = -(-n // segment)
    padded = np.zeros((heads, n_seg * segment), dtype=np.int64)
    padded[:, :n] = costs
    heavy_first = np.argsort(-padded.reshape(heads, n_seg, segment).sum(axis=2), axis=1, kind="stable")
    t = np.arange(n_seg)
    segments = heavy_first[:, np.where(t % 2 == 0, t // 2, n_seg - 1 - t // 2)]
    items = (segments[:, :, None] * segment + np.arange(segment)).reshape(heads, -1)
    return np.ascontiguousarray(items[items < n].reshape(heads, n), dtype=np.int64)


def _row_order(layout: BlockLayout) -> np.ndarray:
    """(layout heads, nqb) visiting order of the query blocks, by stored blocks per row."""
    return _balanced_order(np.diff(layout.indptr).reshape(layout.heads, layout.n_query_blocks))


def _column_order(layout: BlockLayout, n_heads: int, n_kv_heads: int) -> np.ndarray:
    """(key heads, nkb) visiting order of the key blocks, by stored blocks over each GQA group."""
    per_column = np.diff(layout.transpose().indptr).reshape(layout.heads, layout.n_key_blocks)
    per_head = np.broadcast_to(per_column, (n_heads, layout.n_key_blocks))
    return _balanced_order(per_head.reshape(n_kv_heads, -1, layout.n_key_blocks).sum(axis=1))


def _reuse(layout: BlockLayout, seq_q: int, group: int) -> int:
    """Query rows that read a key on average: the layout's density times ``Lq``, times the GQA group."""
    return int(layout.density * seq_q) * group


def _group_costs(layout: BlockLayout, n_heads: int, n_kv_heads: int) -> np.ndarray:
    """Stored blocks of each key head's group of query heads: the work of one one-pass backward task."""
    per_head = np.broadcast_to(np.diff(layout.indptr).reshape(layout.heads, -1).sum(axis=1), (n_heads,))
    return per_head.reshape(n_kv_heads, -1).sum(axis=1)


def forward(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    layout: BlockLayout,
    *,
    scale: float,
    offset: int,
    left: int | None,
    right: int | None,
    out: np.ndarray | None = None,
    lse: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Block-sparse attention forward on canonical 4-D arrays.

    Parameters
    ----------
    q : (B, Hq, Lq, D), k : (B, Hk, Lk, D), v : (B, Hk, Lk, Dv)
        float32 or float64, one dtype, unit stride on the last axis.
    layout : BlockLayout
        ``seq == (Lq, Lk)`` and ``heads`` 1 or Hq (checked by the caller).
    scale, offset, left, right :
        As :func:`npsparseattn.cpu.exact.forward`: query ``i`` sees key
        ``j`` of a stored block iff ``i+offset-left <= j <= i+offset+right``.
    out, lse : arrays, optional
        Buffers (B, Hq, Lq, Dv) and (B, Hq, Lq) in the input dtype.

    Returns
    -------
    out : (B, Hq, Lq, Dv), lse : (B, Hq, Lq); rows with no visible stored key get 0 and ``-inf``.
    """
    n_batch, hq, lq, _ = q.shape
    out = np.empty((n_batch, hq, lq, v.shape[3]), q.dtype) if out is None else out
    lse = np.empty((n_batch, hq, lq), q.dtype) if lse is None else lse
    if lq == 0:
        return out, lse
    bq, bk = layout.block
    kt = transposed(k, _reuse(layout, lq, hq // k.shape[1]))
    with single_threaded_blas():
        _forward_kernel(
            q, k, kt, v, out, lse, *layout.runs(), _row_order(layout), bq, bk, scale, offset,
            window_bound(left), window_bound(right), chunk_width(bq, max(q.shape[3], v.shape[3])), FORWARD_STRIP,
            gemm_address(q.dtype),
        )  # fmt: skip
    return out, lse


def backward(
    dout: np.ndarray,
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    out: np.ndarray,
    lse: np.ndarray,
    layout: BlockLayout,
    *,
    scale: float,
    offset: int,
    left: int | None,
    right: int | None,
    grads: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
    scheme: str | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Block-sparse attention backward on canonical 4-D arrays.

    ``dout``/``out`` (B, Hq, Lq, Dv) and ``lse`` (B, Hq, Lq) come from
    :func:`forward` with the same layout and options; ``grads`` optionally
    gives the ``(dq, dk, dv)`` buffers.  Returns ``(dq, dk, dv)`` shaped like
    ``q``, ``k``, ``v``; ``dk``/``dv`` are summed over each GQA group.
    ``scheme`` (``"one-pass"`` or ``"two-pass"``) overrides the choice of
    :func:`~npsparseattn.cpu.exact.backward_scheme`; both are deterministic.
    """
    n_batch, hq, lq, _ = q.shape
    hk, lk = k.shape[1], k.shape[2]
    dtype = q.dtype
    if grads is None:
        grads = (np.empty(q.shape, dtype), np.empty(k.shape, dtype), np.empty(v.shape, dtype))
    dq, dk, dv = grads
    if lq == 0 or lk == 0:
        for g in grads:
            g[...] = 0
        return dq, dk, dv
    delta = np.empty((n_batch, hq, lq), dtype)
    lse2 = np.ascontiguousarray(lse, dtype=dtype) * dtype.type(LOG2E)
    bq, bk = layout.block
    dim = max(q.shape[3], v.shape[3])
    mask = (scale, offset, window_bound(left), window_bound(right))
    by_queries = (chunk_width(bk, dim), BACKWARD_STRIP, gemm_address(dtype))
    by_keys = (chunk_width(bq, dim), BACKWARD_STRIP, gemm_address(dtype))
    columns = layout.transpose().runs()
    with single_threaded_blas():
        row_dot_kernel(dout, out, delta)
        reuse = _reuse(layout, lq, hq // hk)
        kv = (k, transposed(k, reuse), v, transposed(v, reuse))
        if chosen_scheme(scheme, np.tile(_group_costs(layout, hq, hk), n_batch)) == "one-pass":
            _backward_kernel(dout, q, *kv, lse2, delta, dq, dk, dv, *columns, layout.heads, bq, bk, *mask, *by_queries)
            return dq, dk, dv
        _backward_kv_kernel(
            dout, q, *kv, lse2, delta, dk, dv, *columns, _column_order(layout, hq, hk), layout.heads, bq, bk, *mask,
            *by_queries,
        )  # fmt: skip
        _backward_q_kernel(dout, q, *kv, lse2, delta, dq, *layout.runs(), _row_order(layout), bq, bk, *mask, *by_keys)
    return dq, dk, dv

"""Tiled attention kernels of the numba-cuda backend, shared by dense and block-sparse attention.

Every kernel walks key (or query) ranges given as *runs*: CSR rows of
``[start, stop)`` block ranges (:meth:`~npsparseattn.layouts.BlockLayout.runs`).
Block-sparse attention passes its layout's runs (and the transpose's for
dK/dV); dense attention passes one run that covers every key, so both are
the same kernels and a causal or windowed mask is clipped to the visible
range before any tile is touched (tile skipping).  Masks apply per element
on top, with the visibility rule of the kernel contract; scores are kept in
base-2 units (``scale * log2(e)``) so the softmax needs ``exp2`` only.

* **forward**, one block per (query tile, query head, batch): the query tile
  stays in shared memory; each key tile is staged (K, then V in the same
  buffer), the scores go to registers, the online softmax keeps the running
  row maxima (reduced across the row's threads through shared memory) and
  per-thread partial sums, and ``P V`` accumulates in registers, in float32.
  Heavy tiles (the last queries under a causal mask) are launched first.
* **backward**, FlashAttention-2 in two deterministic passes, no atomics:
  ``delta = rowsum(dO * O)``; then one block per (query tile, query head)
  for ``dQ`` and one per (key tile, key head) for ``dK``/``dV``, which loops
  over the query heads of its GQA group, so every output element has one
  owner.  Both recompute ``P = exp2(s - lse * log2(e))``.

Rows with no visible key get output 0 and ``lse = -inf``, and contribute no
gradient: their ``P`` is never evaluated.

Each factory takes the tiles, ``bf16``: whether the storage arrays are
bfloat16 viewed as uint16 (:func:`~npsparseattn.cuda.numba_cuda.runtime.storage`),
and ``user``: the caller's ``score_mod``/``mask_mod``
(:mod:`~npsparseattn.cuda.numba_cuda.user_functions`), compiled into a kernel
of their own; with ``None`` (the plain kernels) the branches that call them
are removed before typing, so the plain kernels are what they were.
"""

from __future__ import annotations

import math
from functools import cache
from typing import Any

from npsparseattn.cuda.constants import LN2, LOG2E
from npsparseattn.cuda.numba_cuda.runtime import (
    blocks,
    cuda,
    empty,
    is_bf16,
    kernel,
    kernel_view,
    launch,
    on_device,
    storage,
    window_bound,
)
from npsparseattn.cuda.numba_cuda.score_terms import ALIBI, BIAS, bias_grad_arg, bias_offset, modifier, score_args
from npsparseattn.cuda.numba_cuda.tiles import PAD, Tiles, ops, tiles
from npsparseattn.cuda.numba_cuda.user_functions import UserFunctions, user_functions, user_step
from npsparseattn.problems.scores import check_backward_mods

# numba.cuda, bound by the kernel factories on first use.  Kernels must reach it as a module global:
# the simulator swaps the module globals that hold numba.cuda for its own while a kernel runs.
cu: Any = None

Runs = tuple[Any, Any, Any]  # (ptr, start, stop) on the device: CSR rows of [start, stop) block ranges


@cache
def forward_kernel(t: Tiles, bf16: bool, user: UserFunctions | None = None) -> Any:
    """The forward kernel of tiles ``t`` (see the module docstring).

    Arguments: ``q, k, v, out, lse, run_ptr, run_start, run_stop, lheads,
    bq, bk, n_sub, scale2, off, left, right``, then the score modifications
    ``flags, cap2, slopes, bias, sb, sh, si, sj, hm``
    (:mod:`~npsparseattn.cuda.numba_cuda.score_terms`): runs of key blocks
    of ``bk`` keys per layout row ``lh * nqb + r`` (``lheads`` 1 or Hq); each
    query block of ``bq`` rows is cut into ``n_sub`` tiles; ``scale2`` is
    the score scale in base-2 units.
    """
    global cu
    cu = cuda()
    from numba import float32, int64

    o = ops(t, bf16)
    narrow = storage(bf16)[1]
    modify, bias_base = modifier(), bias_offset()
    user_score, has_user = user_step(user), user is not None
    clear, scores, accumulate_t = o.clear, o.scores, o.accumulate_t
    load_by_row, load_by_col, load_rows = o.load_by_row, o.load_by_col, o.load_rows
    tr_n, tc_n, rm, cn, dn, dp = t.tr, t.tc, t.rm, t.cn, t.dn, t.dp
    rows, cols, threads = t.rows, t.cols, t.threads
    ks = cols + 1  # row stride of K^T
    pst = rows + PAD  # row stride of P^T
    n_rows_t, n_kt, n_pt, n_red = dp * rows, dp * ks, cols * pst, rows * tc_n  # shared-memory words

    def forward(
        q, k, v, out, lse, run_ptr, run_start, run_stop, lheads, bq, bk, n_sub, scale2, off, left, right, flags,
        cap2, slopes, bias, sb, sh, si, sj, hm,
    ):  # fmt: skip
        qs = cu.shared.array(n_rows_t, float32)
        kv = cu.shared.array(n_kt, float32)
        ps = cu.shared.array(n_pt, float32)
        red = cu.shared.array(n_red, float32)
        s = cu.local.array((rm, cn), float32)
        acc = cu.local.array((rm, dn), float32)
        row_max = cu.local.array(rm, float32)
        row_sum = cu.local.array(rm, float32)
        lo_r = cu.local.array(rm, int64)
        hi_r = cu.local.array(rm, int64)
        hq, lq, d = q.shape[1], q.shape[2], q.shape[3]
        lk, dv = k.shape[2], v.shape[3]
        group = hq // k.shape[1]
        nqb = (lq + bq - 1) // bq
        n_tiles = nqb * n_sub
        task = cu.blockIdx.x
        tile = n_tiles - 1 - task % n_tiles  # heaviest (latest) query tiles first
        bh = task // n_tiles
        b = bh // hq
        h = bh - b * hq
        g = h // group
        r = tile // n_sub
        i0 = r * bq + (tile - r * n_sub) * rows
        i1 = min(i0 + rows, min((r + 1) * bq, lq))
        if i0 >= i1:
            return
        tid = cu.threadIdx.x
        tr = tid // tc_n
        tc = tid - tr * tc_n
        neg_inf = float32(-math.inf)
        zero = float32(0.0)
        clear(kv, n_kt, tid)
        cu.syncthreads()
        for i in range(rm):
            row = i0 + tr + tr_n * i
            row_max[i] = neg_inf
            row_sum[i] = zero
            for n in range(dn):
                acc[i, n] = zero
            lo_r[i] = max(row + off - left, 0)
            hi_r[i] = min(row + off + right + 1, lk) if row < i1 else 0
        load_by_row(q, b, h, i0, i1 - i0, rows, d, qs, rows, tid)
        klo = max(i0 + off - left, 0)
        khi = min(i1 - 1 + off + right + 1, lk)
        lrow = (h if lheads > 1 else 0) * nqb + r
        sc = float32(scale2)
        c2 = float32(cap2)
        slope2 = slopes[b * hq + h] if flags & ALIBI else zero
        bbase = bias_base(b * hq + h, hm, sb, sh) if flags & BIAS else -1
        if has_user:  # the caller's (b, h) for the user's functions
            mb = (b * hq + h) // hm
            mh = b * hq + h - mb * hm
        for p in range(run_ptr[lrow], run_ptr[lrow + 1]):
            lo = max(run_start[p] * bk, klo)
            hi = min(run_stop[p] * bk, khi)
            for j0 in range(lo, hi, cols):
                n = min(cols, hi - j0)
                cu.syncthreads()
                load_by_col(k, b, g, j0, n, d, kv, ks, tid)
                cu.syncthreads()
                scores(qs, rows, kv, ks, d, tr, tc, s)
                for i in range(rm):
                    row = i0 + tr + tr_n * i
                    part = neg_inf
                    for j in range(cn):
                        col = j0 + tc + tc_n * j
                        x = neg_inf
                        if lo_r[i] <= col < hi_r[i] and col < j0 + n:
                            x = s[i, j] * sc
                            if flags:
                                at = bbase + row * si + col * sj if bbase >= 0 else -1
                                x = modify(x, c2, slope2, bias, at, abs(row + off - col))[0]
                            if has_user:
                                x, _, keep = user_score(x, mb, mh, row, col)
                                if not keep:
                                    x = neg_inf
                        s[i, j] = x
                        part = max(part, x)
                    red[(tr + tr_n * i) * tc_n + tc] = part
                cu.syncthreads()  # K^T is dead from here: V may take its place
                for i in range(rm):
                    m_new = row_max[i]
                    for c in range(tc_n):
                        m_new = max(m_new, red[(tr + tr_n * i) * tc_n + c])
                    if m_new != neg_inf:
                        alpha = float32(math.exp2(row_max[i] - m_new))  # 0 while the row had seen nothing
                        row_sum[i] *= alpha
                        for n2 in range(dn):
                            acc[i, n2] *= alpha
                        row_max[i] = m_new
                    for j in range(cn):
                        pj = float32(math.exp2(s[i, j] - m_new)) if s[i, j] != neg_inf else zero
                        row_sum[i] += pj
                        ps[(tc + tc_n * j) * pst + tr + tr_n * i] = pj
                load_rows(v, b, g, j0, n, dv, kv, dp, tid)
                cu.syncthreads()
                accumulate_t(ps, pst, kv, dp, n, tr, tc, acc)
        cu.syncthreads()
        for i in range(rm):
            red[(tr + tr_n * i) * tc_n + tc] = row_sum[i]
        cu.syncthreads()
        for i in range(rm):  # normalised rows into the dead Q tile, then stored coalesced
            r = tr + tr_n * i
            total = zero
            for c in range(tc_n):
                total += red[r * tc_n + c]
            seen = row_max[i] != neg_inf
            inv = float32(1.0) / total if seen else zero
            for n in range(dn):
                qs[r * dp + tc + tc_n * n] = acc[i, n] * inv
            if tc == 0 and i0 + r < i1:
                lse[b, h, i0 + r] = row_max[i] * float32(LN2) + float32(math.log(total)) if seen else neg_inf
        cu.syncthreads()
        for e in range(tid, (i1 - i0) * dv, threads):
            r = e // dv
            out[b, h, i0 + r, e - r * dv] = narrow(qs[r * dp + e - r * dv])

    return kernel(forward)


@cache
def row_dot_kernel(bf16: bool) -> Any:
    """``delta[b, h, i] = sum_c dout[b, h, i, c] * out[b, h, i, c]`` in float32, one thread per row."""
    global cu
    cu = cuda()
    from numba import float32

    widen = storage(bf16)[0]

    def row_dot(dout, out, delta):
        hq, lq, dv = out.shape[1], out.shape[2], out.shape[3]
        e = cu.blockIdx.x * cu.blockDim.x + cu.threadIdx.x
        if e < out.shape[0] * hq * lq:
            i = e % lq
            bh = e // lq
            b = bh // hq
            h = bh - b * hq
            total = float32(0.0)
            for c in range(dv):
                total += widen(dout[b, h, i, c]) * widen(out[b, h, i, c])
            delta[b, h, i] = total

    return kernel(row_dot)


@cache
def dq_kernel(t: Tiles, bf16: bool, user: UserFunctions | None = None) -> Any:
    """The dQ pass of tiles ``t``: one block per (query tile, query head, batch), the forward's grid.

    Arguments: ``dout, q, k, v, lse, delta, dq``, then the forward's run,
    visibility and score-modification arguments with ``scale`` after
    ``scale2``, then ``dbias`` (B, Hq, Lq, Lk), where the gradient of each
    visible pair's biased score goes when ``flags`` has a bias.  Per key
    tile: V^T staged for ``dP = dO V^T``, then K^T in the same buffer for the
    scores and for ``dQ += dS K``.
    """
    global cu
    cu = cuda()
    from numba import float32, int64

    o = ops(t, bf16)
    narrow = storage(bf16)[1]
    modify, bias_base = modifier(), bias_offset()
    user_score, has_user = user_step(user), user is not None
    clear, scores, accumulate_n = o.clear, o.scores, o.accumulate_n
    load_by_row, load_by_col = o.load_by_row, o.load_by_col
    tr_n, tc_n, rm, cn, dn, dp = t.tr, t.tc, t.rm, t.cn, t.dn, t.dp
    rows, cols = t.rows, t.cols
    ks = cols + 1
    pst = rows + PAD
    n_rows_t, n_kt, n_pt = dp * rows, dp * ks, cols * pst  # shared-memory words

    def dq_pass(
        dout, q, k, v, lse, delta, dq, run_ptr, run_start, run_stop, lheads, bq, bk, n_sub, scale2, scale, off,
        left, right, flags, cap2, slopes, bias, sb, sh, si, sj, hm, dbias,
    ):  # fmt: skip
        qs = cu.shared.array(n_rows_t, float32)
        dos = cu.shared.array(n_rows_t, float32)
        kv = cu.shared.array(n_kt, float32)
        dss = cu.shared.array(n_pt, float32)
        s = cu.local.array((rm, cn), float32)
        dpv = cu.local.array((rm, cn), float32)
        acc = cu.local.array((rm, dn), float32)
        lse2 = cu.local.array(rm, float32)
        dl = cu.local.array(rm, float32)
        lo_r = cu.local.array(rm, int64)
        hi_r = cu.local.array(rm, int64)
        hq, lq, d = q.shape[1], q.shape[2], q.shape[3]
        lk, dv = k.shape[2], v.shape[3]
        group = hq // k.shape[1]
        nqb = (lq + bq - 1) // bq
        n_tiles = nqb * n_sub
        task = cu.blockIdx.x
        tile = n_tiles - 1 - task % n_tiles
        bh = task // n_tiles
        b = bh // hq
        h = bh - b * hq
        g = h // group
        r = tile // n_sub
        i0 = r * bq + (tile - r * n_sub) * rows
        i1 = min(i0 + rows, min((r + 1) * bq, lq))
        if i0 >= i1:
            return
        tid = cu.threadIdx.x
        tr = tid // tc_n
        tc = tid - tr * tc_n
        zero = float32(0.0)
        clear(kv, n_kt, tid)
        cu.syncthreads()
        for i in range(rm):
            row = i0 + tr + tr_n * i
            for n in range(dn):
                acc[i, n] = zero
            lo_r[i] = max(row + off - left, 0)
            hi_r[i] = min(row + off + right + 1, lk) if row < i1 else 0
            lse2[i] = lse[b, h, row] * float32(LOG2E) if row < i1 else zero
            dl[i] = delta[b, h, row] if row < i1 else zero
        load_by_row(q, b, h, i0, i1 - i0, rows, d, qs, rows, tid)
        load_by_row(dout, b, h, i0, i1 - i0, rows, dv, dos, rows, tid)
        klo = max(i0 + off - left, 0)
        khi = min(i1 - 1 + off + right + 1, lk)
        lrow = (h if lheads > 1 else 0) * nqb + r
        sc = float32(scale2)
        c2 = float32(cap2)
        slope2 = slopes[b * hq + h] if flags & ALIBI else zero
        bbase = bias_base(b * hq + h, hm, sb, sh) if flags & BIAS else -1
        if has_user:  # the caller's (b, h) for the user's functions
            mb = (b * hq + h) // hm
            mh = b * hq + h - mb * hm
        for p in range(run_ptr[lrow], run_ptr[lrow + 1]):
            lo = max(run_start[p] * bk, klo)
            hi = min(run_stop[p] * bk, khi)
            for j0 in range(lo, hi, cols):
                n = min(cols, hi - j0)
                cu.syncthreads()
                load_by_col(v, b, g, j0, n, dv, kv, ks, tid)
                cu.syncthreads()
                scores(dos, rows, kv, ks, dv, tr, tc, dpv)
                cu.syncthreads()
                load_by_col(k, b, g, j0, n, d, kv, ks, tid)
                cu.syncthreads()
                scores(qs, rows, kv, ks, d, tr, tc, s)
                for i in range(rm):
                    row = i0 + tr + tr_n * i
                    for j in range(cn):
                        col = j0 + tc + tc_n * j
                        ds = zero
                        if lo_r[i] <= col < hi_r[i] and col < j0 + n:
                            x = s[i, j] * sc
                            dmod = float32(1.0)
                            if flags:
                                at = bbase + row * si + col * sj if bbase >= 0 else -1
                                x, dmod = modify(x, c2, slope2, bias, at, abs(row + off - col))
                            if has_user:
                                x, gsm, keep = user_score(x, mb, mh, row, col)
                                if keep:
                                    ds = float32(math.exp2(x - lse2[i])) * (dpv[i, j] - dl[i]) * gsm
                            else:
                                ds = float32(math.exp2(x - lse2[i])) * (dpv[i, j] - dl[i])
                            if flags & BIAS:
                                dbias[b, h, row, col] = narrow(ds)
                            ds *= dmod
                        dss[(tc + tc_n * j) * pst + tr + tr_n * i] = ds
                cu.syncthreads()
                accumulate_n(dss, pst, kv, ks, n, tr, tc, acc)
        sd = float32(scale)
        for i in range(rm):
            row = i0 + tr + tr_n * i
            if row < i1:
                for n in range(dn):
                    col = tc + tc_n * n
                    if col < d:
                        dq[b, h, row, col] = narrow(acc[i, n] * sd)

    return kernel(dq_pass)


@cache
def dkdv_kernel(t: Tiles, bf16: bool, user: UserFunctions | None = None) -> Any:
    """The dK/dV pass of tiles ``t`` (rows are keys, columns queries): one block per (key tile, key head, batch).

    Arguments: ``dout, q, k, v, lse, delta, dk, dv, col_ptr, col_start,
    col_stop, lheads, bq, bk, n_sub, scale2, scale, off, left, right``, then
    the score modifications as for the forward: the
    runs are the layout's transpose (CSC), rows ``lh * nkb + c`` listing
    query blocks of ``bq`` rows; each key block of ``bk`` keys is cut into
    ``n_sub`` tiles.  K^T and V^T stay in shared memory; per query tile the
    block stages Q^T, dO^T and the rows' lse and delta, forms ``P^T`` and
    ``dS^T`` and accumulates ``dV += P^T dO`` and ``dK += dS^T Q``.
    """
    global cu
    cu = cuda()
    from numba import float32

    o = ops(t, bf16)
    narrow = storage(bf16)[1]
    modify, bias_base = modifier(), bias_offset()
    user_score, has_user = user_step(user), user is not None
    clear, scores, accumulate_n = o.clear, o.scores, o.accumulate_n
    load_by_row, load_by_col = o.load_by_row, o.load_by_col
    tr_n, tc_n, rm, cn, dn, dp = t.tr, t.tc, t.rm, t.cn, t.dn, t.dp
    rows, cols, threads = t.rows, t.cols, t.threads
    qst = cols + 1
    pst = rows + PAD
    n_rows_t, n_qt, n_pt = dp * rows, dp * qst, cols * pst  # shared-memory words

    def dkdv_pass(
        dout, q, k, v, lse, delta, dk, dv_out, col_ptr, col_start, col_stop, lheads, bq, bk, n_sub, scale2, scale,
        off, left, right, flags, cap2, slopes, bias, sb, sh, si, sj, hm,
    ):  # fmt: skip
        ks_t = cu.shared.array(n_rows_t, float32)
        vs_t = cu.shared.array(n_rows_t, float32)
        qs = cu.shared.array(n_qt, float32)
        dos = cu.shared.array(n_qt, float32)
        pt = cu.shared.array(n_pt, float32)
        dst = cu.shared.array(n_pt, float32)
        lse2 = cu.shared.array(cols, float32)
        dl = cu.shared.array(cols, float32)
        s = cu.local.array((rm, cn), float32)
        dpv = cu.local.array((rm, cn), float32)
        acc_k = cu.local.array((rm, dn), float32)
        acc_v = cu.local.array((rm, dn), float32)
        hq, lq, d = q.shape[1], q.shape[2], q.shape[3]
        hk, lk, dv = k.shape[1], k.shape[2], v.shape[3]
        group = hq // hk
        nkb = (lk + bk - 1) // bk
        n_tiles = nkb * n_sub
        task = cu.blockIdx.x
        tile = task % n_tiles
        bh = task // n_tiles
        b = bh // hk
        g = bh - b * hk
        c = tile // n_sub
        j0 = c * bk + (tile - c * n_sub) * rows
        j1 = min(j0 + rows, min((c + 1) * bk, lk))
        if j0 >= j1:
            return
        tid = cu.threadIdx.x
        tr = tid // tc_n
        tc = tid - tr * tc_n
        zero = float32(0.0)
        clear(qs, n_qt, tid)
        clear(dos, n_qt, tid)
        cu.syncthreads()
        for i in range(rm):
            for n in range(dn):
                acc_k[i, n] = zero
                acc_v[i, n] = zero
        load_by_row(k, b, g, j0, j1 - j0, rows, d, ks_t, rows, tid)
        load_by_row(v, b, g, j0, j1 - j0, rows, dv, vs_t, rows, tid)
        ilo = max(j0 - off - right, 0)
        ihi = min(j1 - 1 - off + left + 1, lq)
        sc = float32(scale2)
        c2 = float32(cap2)
        for h in range(g * group, (g + 1) * group):
            slope2 = slopes[b * hq + h] if flags & ALIBI else zero
            bbase = bias_base(b * hq + h, hm, sb, sh) if flags & BIAS else -1
            if has_user:
                mb = (b * hq + h) // hm
                mh = b * hq + h - mb * hm
            lrow = (h if lheads > 1 else 0) * nkb + c
            for p in range(col_ptr[lrow], col_ptr[lrow + 1]):
                lo = max(col_start[p] * bq, ilo)
                hi = min(col_stop[p] * bq, ihi)
                for i0 in range(lo, hi, cols):
                    m = min(cols, hi - i0)
                    cu.syncthreads()
                    load_by_col(q, b, h, i0, m, d, qs, qst, tid)
                    load_by_col(dout, b, h, i0, m, dv, dos, qst, tid)
                    for e in range(tid, m, threads):
                        lse2[e] = lse[b, h, i0 + e] * float32(LOG2E)
                        dl[e] = delta[b, h, i0 + e]
                    cu.syncthreads()
                    scores(ks_t, rows, qs, qst, d, tr, tc, s)
                    scores(vs_t, rows, dos, qst, dv, tr, tc, dpv)
                    for i in range(rm):
                        key = j0 + tr + tr_n * i
                        for j in range(cn):
                            qj = tc + tc_n * j
                            row = i0 + qj
                            pj = zero
                            ds = zero
                            if key < j1 and qj < m and row + off - left <= key <= row + off + right:
                                x = s[i, j] * sc
                                dmod = float32(1.0)
                                if flags:
                                    at = bbase + row * si + key * sj if bbase >= 0 else -1
                                    x, dmod = modify(x, c2, slope2, bias, at, abs(row + off - key))
                                if has_user:
                                    x, gsm, keep = user_score(x, mb, mh, row, key)
                                    if keep:
                                        pj = float32(math.exp2(x - lse2[qj]))
                                        ds = pj * (dpv[i, j] - dl[qj]) * gsm * dmod
                                else:
                                    pj = float32(math.exp2(x - lse2[qj]))
                                    ds = pj * (dpv[i, j] - dl[qj]) * dmod
                            pt[qj * pst + tr + tr_n * i] = pj
                            dst[qj * pst + tr + tr_n * i] = ds
                    cu.syncthreads()
                    accumulate_n(pt, pst, dos, qst, m, tr, tc, acc_v)
                    accumulate_n(dst, pst, qs, qst, m, tr, tc, acc_k)
        sd = float32(scale)
        for i in range(rm):
            key = j0 + tr + tr_n * i
            if key < j1:
                for n in range(dn):
                    col = tc + tc_n * n
                    if col < d:
                        dk[b, g, key, col] = narrow(acc_k[i, n] * sd)
                    if col < dv:
                        dv_out[b, g, key, col] = narrow(acc_v[i, n])

    return kernel(dkdv_pass)


def _mods_shape(mask: dict[str, Any], shape: tuple[int, ...], lk: int) -> tuple[int, int, int, int]:
    """The (B, Hq, Lq, Lk) of the modifications: ``q``'s ``shape`` unfolded by ``mask["heads"]`` if given."""
    n_batch, hq, lq = shape[:3]
    hm = mask.get("heads") or hq
    return n_batch * hq // hm, hm, lq, lk


def forward_runs(
    q: Any, k: Any, v: Any, runs: Runs, lheads: int, block: tuple[int, int], mask: dict[str, Any], out: Any, lse: Any
) -> tuple[Any, Any]:
    """Attention forward over runs of key blocks, on canonical arrays of one kind (CuPy, or NumPy simulated).

    Parameters
    ----------
    q : (B, Hq, Lq, D), k : (B, Hk, Lk, D), v : (B, Hk, Lk, Dv)
        C-contiguous, one storage dtype (float16, bfloat16 or float32).
    runs : (ptr, start, stop) device arrays
        Row ``lh * nqb + r`` (``nqb = ceil(Lq / bq)``) lists ranges of key
        blocks ``[start, stop)`` that query block ``r`` attends.
    lheads : int
        1 (rows shared by every head) or Hq.
    block : (bq, bk)
        Query and key block edges of the runs.
    mask : ``scale, offset, left, right``, the visibility rule of the kernel contract, and optionally
        ``mods``: a :class:`~npsparseattn.problems.scores.ScoreMods` or None (ALiBi, softcap, bias as
        runtime arguments; ``score_mod``/``mask_mod`` compiled into kernels built for them,
        :mod:`~npsparseattn.cuda.numba_cuda.user_functions`),
        and ``heads``: the Hq of the unfolded problem when ``q`` folds the batch into its heads
        (``(1, B*Hq, Lq, D)``; the modifications are numbered by the unfolded ``(b, h)``).
    out, lse : buffers (B, Hq, Lq, Dv) in the storage dtype and (B, Hq, Lq) float32, or None.

    Returns
    -------
    out, lse
    """
    n_batch, hq, lq, d = q.shape
    lk, dv = k.shape[2], v.shape[3]
    scale, offset, left, right = (mask[key] for key in ("scale", "offset", "left", "right"))
    with on_device(q):
        out = empty(q, (n_batch, hq, lq, dv), q.dtype) if out is None else out
        lse = empty(q, (n_batch, hq, lq), "float32") if lse is None else lse
        if out.size == 0 and lse.size == 0:
            return out, lse
        if lk == 0:
            out.fill(0)
            lse.fill(-math.inf)
            return out, lse
        user = user_functions(mask.get("mods"))
        t = tiles("forward", max(d, dv), user=user is not None)
        bq, bk = block
        n_sub = blocks(bq, t.rows)
        grid = blocks(lq, bq) * n_sub * n_batch * hq
        storage_args = (kernel_view(x) for x in (q, k, v, out))
        mods = score_args(mask.get("mods"), q, _mods_shape(mask, q.shape, lk))
        fn = forward_kernel(t, is_bf16(q), user)
        launch(
            fn, grid, t.threads, *storage_args, lse, *runs, lheads, bq, bk, n_sub,
            scale * LOG2E, offset, window_bound(left), window_bound(right), *mods,
        )  # fmt: skip
    return out, lse


def backward_runs(
    arrays: tuple,
    runs: Runs,
    columns: Runs,
    lheads: int,
    block: tuple[int, int],
    mask: dict[str, Any],
    grads: Any,
    dbias: Any = None,
) -> tuple[Any, Any, Any]:
    """Attention backward over runs (dQ) and the transpose's runs ``columns`` (dK/dV); see :func:`forward_runs`.

    ``arrays`` are ``(dout, q, k, v, out, lse)``; ``grads`` the ``(dq, dk, dv)`` buffers or None;
    ``dbias``: with a bias in ``mask["mods"]``, a zeroed (B, Hq, Lq, Lk) buffer in the storage dtype that
    receives the gradient of each visible pair's biased score.

    ``dout``/``out`` (B, Hq, Lq, Dv) in the storage dtype, ``lse`` (B, Hq, Lq)
    float32; ``columns`` row ``lh * nkb + c`` lists ranges of query blocks
    that attend key block ``c``.  Returns ``(dq, dk, dv)`` in the storage
    dtype, ``dk``/``dv`` summed over each GQA group.
    """
    dout, q, k, v, out, lse = arrays
    check_backward_mods(mask.get("mods"))
    scale, offset, left, right = (mask[key] for key in ("scale", "offset", "left", "right"))
    n_batch, hq, lq, d = q.shape
    hk, lk, dv = k.shape[1], k.shape[2], v.shape[3]
    with on_device(q):
        if grads is None:
            grads = (empty(q, q.shape, q.dtype), empty(q, k.shape, q.dtype), empty(q, v.shape, q.dtype))
        dq, dk, dv_out = grads
        if lq == 0 or lk == 0 or n_batch * hq == 0:
            for g in grads:
                g.fill(0)
            return dq, dk, dv_out
        bq, bk = block
        bf16 = is_bf16(q)
        user = user_functions(mask.get("mods"))
        mods = score_args(mask.get("mods"), q, _mods_shape(mask, q.shape, lk))
        mask = (scale * LOG2E, scale, offset, window_bound(left), window_bound(right), *mods)
        dout_s, q_s, k_s, v_s, out_s, dq_s, dk_s, dv_s = (kernel_view(x) for x in (dout, q, k, v, out, *grads))
        tq = tiles("dq", max(d, dv), user=user is not None)
        delta = empty(q, (n_batch, hq, lq), "float32")
        launch(row_dot_kernel(bf16), blocks(n_batch * hq * lq, tq.threads), tq.threads, dout_s, out_s, delta)
        n_sub = blocks(bq, tq.rows)
        launch(
            dq_kernel(tq, bf16, user), blocks(lq, bq) * n_sub * n_batch * hq, tq.threads, dout_s, q_s, k_s, v_s, lse,
            delta, dq_s, *runs, lheads, bq, bk, n_sub, *mask, bias_grad_arg(dbias, q),
        )  # fmt: skip
        tk = tiles("dkdv", max(d, dv), user=user is not None)
        n_sub = blocks(bk, tk.rows)
        launch(
            dkdv_kernel(tk, bf16, user), blocks(lk, bk) * n_sub * n_batch * hk, tk.threads, dout_s, q_s, k_s, v_s, lse,
            delta, dk_s, dv_s, *columns, lheads, bq, bk, n_sub, *mask,
        )  # fmt: skip
    return dq, dk, dv_out

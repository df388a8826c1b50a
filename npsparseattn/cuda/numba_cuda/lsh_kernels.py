"""Kernels of LSH attention on the GPU (numba-cuda): chunked shared-QK attention over the sorted items.

The sorted sequence of a (batch, head) has ``N = n_hashes * L`` items (slot
``s`` holds item ``order[s]``, position ``order[s] % L``), cut into chunks of
``chunk`` slots; chunk ``c`` attends chunks ``c - before .. c + after``
(cyclically; a chunk listed twice counts twice).  The kernels are those of
dense attention (:mod:`npsparseattn.cuda.numba_cuda.attention_kernels`, the same tiles and
helpers) with rows gathered through the sort plan and the Reformer masks:
logits ``q . key`` in base-2 units, a later position (causal) gets
``NEG_CAUSAL``, the own position ``NEG_SELF`` (constants, not ``-inf``, so
every row sees something).

* :func:`key_scale_kernel`: ``1 / sqrt(mean(x^2) + 1e-6) / sqrt(D)`` per position.
* :func:`forward_kernel`: one block per (chunk tile, head, batch); per slot the
  round's normalised output, its base-2 row maximum and its sum.
* :func:`combine_kernel`: per position, the rounds weighted by
  ``2^(max_r - M) * sum_r`` (``M`` the largest maximum), and the lse.
  Weights from (maximum, sum) pairs rather than from float32 lse
  differences: at the ``-1e5`` self logit a float32 lse has an ulp of
  0.008, the maxima are exact.
* backward: :func:`row_stats_kernel` (per position ``M``, ``1 / sum``,
  ``delta = dout . out``: one softmax over every round's entries has
  ``P = 2^(x - M) / sum``), then :func:`dq_kernel` (query side, one block per
  query tile) and :func:`dkdv_kernel` (key side, one block per key tile of
  a chunk, over the chunks whose windows hold it), each slot owned by one
  block: deterministic, no atomics; :func:`gather_kernel` sums every
  position's rounds and applies the key normalisation's Jacobian.

Each factory takes ``bf16``: whether the storage arrays are bfloat16 viewed
as uint16 (:func:`~npsparseattn.cuda.numba_cuda.runtime.storage`).
"""

from __future__ import annotations

import math
from functools import cache
from typing import Any

from npsparseattn.cuda.constants import LN2, LOG2E
from npsparseattn.cuda.numba_cuda.runtime import cuda, kernel, storage
from npsparseattn.cuda.numba_cuda.tiles import PAD, Tiles, ops
from npsparseattn.problems.lsh import KEY_EPS, NEG_CAUSAL, NEG_SELF

# numba.cuda, bound by the kernel factories on first use (a module global: the simulator swaps it)
cu: Any = None


def _bind() -> None:
    global cu
    cu = cuda()


@cache
def key_scale_kernel(bf16: bool) -> Any:
    """``scale[b, h, p] = 1 / sqrt(mean(qk[b, h, p]^2) + 1e-6) / sqrt(D)``, float32, one thread a position."""
    _bind()
    from numba import float32

    widen = storage(bf16)[0]

    def key_scale(qk, scale):
        n_heads, length, d = qk.shape[1], qk.shape[2], qk.shape[3]
        e = cu.blockIdx.x * cu.blockDim.x + cu.threadIdx.x
        if e < qk.shape[0] * n_heads * length:
            p = e % length
            bh = e // length
            b = bh // n_heads
            h = bh - b * n_heads
            total = float32(0.0)
            for c in range(d):
                x = widen(qk[b, h, p, c])
                total += x * x
            norm = float32(math.sqrt(total / float32(d) + float32(KEY_EPS)))
            scale[b, h, p] = float32(1.0) / (norm * float32(math.sqrt(float32(d))))

    return kernel(key_scale)


@cache
def forward_kernel(t: Tiles, bf16: bool) -> Any:
    """The chunked forward of tiles ``t``.

    Arguments: ``qk, v, order, kscale, chunk, before, after, causal,
    exclude_self, n_sub, with_output, rounds, rmax, rsum``: each chunk is cut
    into ``n_sub`` tiles of query rows; per slot it writes the base-2 row
    maximum ``rmax`` and sum ``rsum`` (B, H, N) and, ``with_output``, the
    normalised round output ``rounds`` (B, H, N, Dv), all float32.
    """
    _bind()
    from numba import float32, int32, int64

    o = ops(t, bf16)
    widen = storage(bf16)[0]
    clear, scores, accumulate_t = o.clear, o.scores, o.accumulate_t
    tr_n, tc_n, rm, cn, dn, dp = t.tr, t.tc, t.rm, t.cn, t.dn, t.dp
    rows, cols, threads = t.rows, t.cols, t.threads
    ks = cols + 1
    pst = rows + PAD
    n_rows_t, n_kt, n_pt, n_red = dp * rows, dp * ks, cols * pst, rows * tc_n
    neg_causal = NEG_CAUSAL * LOG2E
    neg_self = NEG_SELF * LOG2E

    def lsh_forward(
        qk, v, order, kscale, chunk, before, after, causal, exclude_self, n_sub, with_output, rounds, rmax, rsum
    ):
        qs = cu.shared.array(n_rows_t, float32)
        kv = cu.shared.array(n_kt, float32)
        ps = cu.shared.array(n_pt, float32)
        red = cu.shared.array(n_red, float32)
        qpos = cu.shared.array(rows, int32)
        kpos = cu.shared.array(cols, int32)
        s = cu.local.array((rm, cn), float32)
        acc = cu.local.array((rm, dn), float32)
        row_max = cu.local.array(rm, float32)
        row_sum = cu.local.array(rm, float32)
        qp_r = cu.local.array(rm, int64)
        n_heads, length, d = qk.shape[1], qk.shape[2], qk.shape[3]
        dv = v.shape[3]
        n_chunks = order.shape[2] // chunk
        n_tiles = n_chunks * n_sub
        task = cu.blockIdx.x
        tile = task % n_tiles
        bh = task // n_tiles
        b = bh // n_heads
        h = bh - b * n_heads
        c = tile // n_sub
        s0 = c * chunk + (tile - c * n_sub) * rows
        s1 = min(s0 + rows, (c + 1) * chunk)
        if s0 >= s1:
            return
        tid = cu.threadIdx.x
        tr = tid // tc_n
        tc = tid - tr * tc_n
        neg_inf = float32(-math.inf)
        zero = float32(0.0)
        clear(kv, n_kt, tid)
        cu.syncthreads()
        for e in range(tid, s1 - s0, threads):
            qpos[e] = order[b, h, s0 + e] % length
        cu.syncthreads()
        for i in range(rm):
            r = tr + tr_n * i
            row_max[i] = neg_inf
            row_sum[i] = zero
            for n in range(dn):
                acc[i, n] = zero
            qp_r[i] = qpos[r] if s0 + r < s1 else -1
        for e in range(tid, rows * d, threads):
            col = e // rows
            r = e - col * rows
            qs[col * rows + r] = widen(qk[b, h, qpos[r], col]) if s0 + r < s1 else zero
        for step in range(-before, after + 1):
            w0 = ((c + step) % n_chunks) * chunk
            for j0 in range(w0, w0 + chunk, cols):
                n = min(cols, w0 + chunk - j0)
                cu.syncthreads()
                for e in range(tid, n, threads):
                    kpos[e] = order[b, h, j0 + e] % length
                cu.syncthreads()
                for e in range(tid, n * d, threads):
                    j = e // d
                    col = e - j * d
                    kv[col * ks + j] = widen(qk[b, h, kpos[j], col]) * kscale[b, h, kpos[j]]
                cu.syncthreads()
                scores(qs, rows, kv, ks, d, tr, tc, s)
                for i in range(rm):
                    part = neg_inf
                    qp = qp_r[i]
                    for j in range(cn):
                        jl = tc + tc_n * j
                        x = neg_inf
                        if jl < n and qp >= 0:
                            kp = kpos[jl]
                            x = s[i, j] * float32(LOG2E)
                            if causal and kp > qp:
                                x = float32(neg_causal)
                            if exclude_self and kp == qp:
                                x = float32(neg_self)
                        s[i, j] = x
                        part = max(part, x)
                    red[(tr + tr_n * i) * tc_n + tc] = part
                cu.syncthreads()
                for i in range(rm):
                    m_new = row_max[i]
                    for u in range(tc_n):
                        m_new = max(m_new, red[(tr + tr_n * i) * tc_n + u])
                    if m_new != neg_inf:
                        alpha = float32(math.exp2(row_max[i] - m_new))
                        row_sum[i] *= alpha
                        for n2 in range(dn):
                            acc[i, n2] *= alpha
                        row_max[i] = m_new
                    for j in range(cn):
                        pj = float32(math.exp2(s[i, j] - m_new)) if s[i, j] != neg_inf else zero
                        row_sum[i] += pj
                        ps[(tc + tc_n * j) * pst + tr + tr_n * i] = pj
                if with_output:
                    for e in range(tid, n * dv, threads):
                        j = e // dv
                        col = e - j * dv
                        kv[j * dp + col] = widen(v[b, h, kpos[j], col])
                    cu.syncthreads()
                    accumulate_t(ps, pst, kv, dp, n, tr, tc, acc)
        cu.syncthreads()
        for i in range(rm):
            red[(tr + tr_n * i) * tc_n + tc] = row_sum[i]
        cu.syncthreads()
        for i in range(rm):
            slot = s0 + tr + tr_n * i
            if slot < s1:
                total = zero
                for u in range(tc_n):
                    total += red[(tr + tr_n * i) * tc_n + u]
                if tc == 0:
                    rmax[b, h, slot] = row_max[i]
                    rsum[b, h, slot] = total
                if with_output:
                    inv = float32(1.0) / total
                    for n in range(dn):
                        col = tc + tc_n * n
                        if col < dv:
                            rounds[b, h, slot, col] = acc[i, n] * inv

    return kernel(lsh_forward)


@cache
def combine_kernel(bf16: bool) -> Any:
    """``out[b, h, p, col]`` and ``lse[b, h, p]`` from the rounds of position ``p``; one thread per element."""
    _bind()
    from numba import float32

    narrow = storage(bf16)[1]

    def combine(rounds, rmax, rsum, inverse, n_hashes, out, lse):
        n_heads, length, dv = out.shape[1], out.shape[2], out.shape[3]
        e = cu.blockIdx.x * cu.blockDim.x + cu.threadIdx.x
        if e >= out.shape[0] * n_heads * length * dv:
            return
        col = e % dv
        p = (e // dv) % length
        bh = e // (dv * length)
        b = bh // n_heads
        h = bh - b * n_heads
        top = float32(-math.inf)
        for r in range(n_hashes):
            top = max(top, rmax[b, h, inverse[b, h, r * length + p]])
        total = float32(0.0)
        value = float32(0.0)
        for r in range(n_hashes):
            slot = inverse[b, h, r * length + p]
            w = float32(math.exp2(rmax[b, h, slot] - top)) * rsum[b, h, slot]
            total += w
            value += w * rounds[b, h, slot, col]
        out[b, h, p, col] = narrow(value / total)
        if col == 0:
            lse[b, h, p] = top * float32(LN2) + float32(math.log(total))

    return kernel(combine)


@cache
def row_stats_kernel(bf16: bool) -> Any:
    """Per position: the base-2 maximum ``pmax`` over its rounds, ``pinv = 1 / sum`` and ``delta = dout . out``."""
    _bind()
    from numba import float32

    widen = storage(bf16)[0]

    def row_stats(rmax, rsum, inverse, n_hashes, dout, out, pmax, pinv, delta):
        n_heads, length, dv = out.shape[1], out.shape[2], out.shape[3]
        e = cu.blockIdx.x * cu.blockDim.x + cu.threadIdx.x
        if e >= out.shape[0] * n_heads * length:
            return
        p = e % length
        bh = e // length
        b = bh // n_heads
        h = bh - b * n_heads
        top = float32(-math.inf)
        for r in range(n_hashes):
            top = max(top, rmax[b, h, inverse[b, h, r * length + p]])
        total = float32(0.0)
        for r in range(n_hashes):
            slot = inverse[b, h, r * length + p]
            total += float32(math.exp2(rmax[b, h, slot] - top)) * rsum[b, h, slot]
        pmax[b, h, p] = top
        pinv[b, h, p] = float32(1.0) / total
        dot = float32(0.0)
        for col in range(dv):
            dot += widen(dout[b, h, p, col]) * widen(out[b, h, p, col])
        delta[b, h, p] = dot

    return kernel(row_stats)


@cache
def dq_kernel(t: Tiles, bf16: bool) -> Any:
    """The query side of the backward (tiles ``t``, the forward's grid): ``dq`` per slot, float32 (B, H, N, D).

    Arguments: ``dout, qk, v, order, kscale, pmax, pinv, delta, chunk, before,
    after, causal, exclude_self, n_sub, dq``.  ``dlogit = P (dout . v - delta)``
    on the unmasked entries (masked logits are constants), ``dq = sum dlogit key``.
    """
    _bind()
    from numba import float32, int32, int64

    o = ops(t, bf16)
    widen = storage(bf16)[0]
    clear, scores, accumulate_n = o.clear, o.scores, o.accumulate_n
    tr_n, tc_n, rm, cn, dn, dp = t.tr, t.tc, t.rm, t.cn, t.dn, t.dp
    rows, cols, threads = t.rows, t.cols, t.threads
    ks = cols + 1
    pst = rows + PAD
    n_rows_t, n_kt, n_pt = dp * rows, dp * ks, cols * pst

    def lsh_dq(dout, qk, v, order, kscale, pmax, pinv, delta, chunk, before, after, causal, exclude_self, n_sub, dq):
        qs = cu.shared.array(n_rows_t, float32)
        dos = cu.shared.array(n_rows_t, float32)
        kv = cu.shared.array(n_kt, float32)
        dss = cu.shared.array(n_pt, float32)
        qpos = cu.shared.array(rows, int32)
        kpos = cu.shared.array(cols, int32)
        s = cu.local.array((rm, cn), float32)
        dpv = cu.local.array((rm, cn), float32)
        acc = cu.local.array((rm, dn), float32)
        top = cu.local.array(rm, float32)
        inv = cu.local.array(rm, float32)
        dl = cu.local.array(rm, float32)
        qp_r = cu.local.array(rm, int64)
        n_heads, length, d = qk.shape[1], qk.shape[2], qk.shape[3]
        dv = v.shape[3]
        n_chunks = order.shape[2] // chunk
        n_tiles = n_chunks * n_sub
        task = cu.blockIdx.x
        tile = task % n_tiles
        bh = task // n_tiles
        b = bh // n_heads
        h = bh - b * n_heads
        c = tile // n_sub
        s0 = c * chunk + (tile - c * n_sub) * rows
        s1 = min(s0 + rows, (c + 1) * chunk)
        if s0 >= s1:
            return
        tid = cu.threadIdx.x
        tr = tid // tc_n
        tc = tid - tr * tc_n
        zero = float32(0.0)
        clear(kv, n_kt, tid)
        cu.syncthreads()
        for e in range(tid, s1 - s0, threads):
            qpos[e] = order[b, h, s0 + e] % length
        cu.syncthreads()
        for i in range(rm):
            r = tr + tr_n * i
            for n in range(dn):
                acc[i, n] = zero
            qp = qpos[r] if s0 + r < s1 else -1
            qp_r[i] = qp
            top[i] = pmax[b, h, qp] if qp >= 0 else zero
            inv[i] = pinv[b, h, qp] if qp >= 0 else zero
            dl[i] = delta[b, h, qp] if qp >= 0 else zero
        for e in range(tid, rows * d, threads):
            col = e // rows
            r = e - col * rows
            qs[col * rows + r] = widen(qk[b, h, qpos[r], col]) if s0 + r < s1 else zero
        for e in range(tid, rows * dv, threads):
            col = e // rows
            r = e - col * rows
            dos[col * rows + r] = widen(dout[b, h, qpos[r], col]) if s0 + r < s1 else zero
        for step in range(-before, after + 1):
            w0 = ((c + step) % n_chunks) * chunk
            for j0 in range(w0, w0 + chunk, cols):
                n = min(cols, w0 + chunk - j0)
                cu.syncthreads()
                for e in range(tid, n, threads):
                    kpos[e] = order[b, h, j0 + e] % length
                cu.syncthreads()
                for e in range(tid, n * dv, threads):
                    j = e // dv
                    col = e - j * dv
                    kv[col * ks + j] = widen(v[b, h, kpos[j], col])
                cu.syncthreads()
                scores(dos, rows, kv, ks, dv, tr, tc, dpv)
                cu.syncthreads()
                for e in range(tid, n * d, threads):
                    j = e // d
                    col = e - j * d
                    kv[col * ks + j] = widen(qk[b, h, kpos[j], col]) * kscale[b, h, kpos[j]]
                cu.syncthreads()
                scores(qs, rows, kv, ks, d, tr, tc, s)
                for i in range(rm):
                    qp = qp_r[i]
                    for j in range(cn):
                        jl = tc + tc_n * j
                        ds = zero
                        if jl < n and qp >= 0:
                            kp = kpos[jl]
                            if not ((causal and kp > qp) or (exclude_self and kp == qp)):
                                pj = float32(math.exp2(s[i, j] * float32(LOG2E) - top[i])) * inv[i]
                                ds = pj * (dpv[i, j] - dl[i])
                        dss[jl * pst + tr + tr_n * i] = ds
                cu.syncthreads()
                accumulate_n(dss, pst, kv, ks, n, tr, tc, acc)
        for i in range(rm):
            slot = s0 + tr + tr_n * i
            if slot < s1:
                for n in range(dn):
                    col = tc + tc_n * n
                    if col < d:
                        dq[b, h, slot, col] = acc[i, n]

    return kernel(lsh_dq)


@cache
def dkdv_kernel(t: Tiles, bf16: bool) -> Any:
    """The key side of the backward (tiles ``t``; rows are keys): ``dk`` (normalised-key side) and ``dv`` per slot.

    Arguments: ``dout, qk, v, order, kscale, pmax, pinv, delta, chunk, before,
    after, causal, exclude_self, n_sub, dk, dv``.  Key chunk ``c`` is in the
    windows of query chunks ``c - step`` for ``step`` in ``-before..after``;
    each is visited once per appearance, as the forward counted it.
    """
    _bind()
    from numba import float32, int32, int64

    o = ops(t, bf16)
    widen = storage(bf16)[0]
    clear, scores, accumulate_n = o.clear, o.scores, o.accumulate_n
    tr_n, tc_n, rm, cn, dn, dp = t.tr, t.tc, t.rm, t.cn, t.dn, t.dp
    rows, cols, threads = t.rows, t.cols, t.threads
    qst = cols + 1
    pst = rows + PAD
    n_rows_t, n_qt, n_pt = dp * rows, dp * qst, cols * pst
    neg_causal = NEG_CAUSAL * LOG2E
    neg_self = NEG_SELF * LOG2E

    def lsh_dkdv(
        dout, qk, v, order, kscale, pmax, pinv, delta, chunk, before, after, causal, exclude_self, n_sub, dk, dv_out
    ):
        ks_t = cu.shared.array(n_rows_t, float32)
        vs_t = cu.shared.array(n_rows_t, float32)
        qs = cu.shared.array(n_qt, float32)
        dos = cu.shared.array(n_qt, float32)
        pt = cu.shared.array(n_pt, float32)
        dst = cu.shared.array(n_pt, float32)
        kpos = cu.shared.array(rows, int32)
        qpos = cu.shared.array(cols, int32)
        top = cu.shared.array(cols, float32)
        inv = cu.shared.array(cols, float32)
        dl = cu.shared.array(cols, float32)
        s = cu.local.array((rm, cn), float32)
        dpv = cu.local.array((rm, cn), float32)
        acc_k = cu.local.array((rm, dn), float32)
        acc_v = cu.local.array((rm, dn), float32)
        kp_r = cu.local.array(rm, int64)
        n_heads, length, d = qk.shape[1], qk.shape[2], qk.shape[3]
        dv = v.shape[3]
        n_chunks = order.shape[2] // chunk
        n_tiles = n_chunks * n_sub
        task = cu.blockIdx.x
        tile = task % n_tiles
        bh = task // n_tiles
        b = bh // n_heads
        h = bh - b * n_heads
        c = tile // n_sub
        k0 = c * chunk + (tile - c * n_sub) * rows
        k1 = min(k0 + rows, (c + 1) * chunk)
        if k0 >= k1:
            return
        tid = cu.threadIdx.x
        tr = tid // tc_n
        tc = tid - tr * tc_n
        zero = float32(0.0)
        clear(qs, n_qt, tid)
        clear(dos, n_qt, tid)
        cu.syncthreads()
        for e in range(tid, k1 - k0, threads):
            kpos[e] = order[b, h, k0 + e] % length
        cu.syncthreads()
        for i in range(rm):
            r = tr + tr_n * i
            kp_r[i] = kpos[r] if k0 + r < k1 else -1
            for n in range(dn):
                acc_k[i, n] = zero
                acc_v[i, n] = zero
        for e in range(tid, rows * d, threads):
            col = e // rows
            r = e - col * rows
            value = zero
            if k0 + r < k1:
                value = widen(qk[b, h, kpos[r], col]) * kscale[b, h, kpos[r]]
            ks_t[col * rows + r] = value
        for e in range(tid, rows * dv, threads):
            col = e // rows
            r = e - col * rows
            vs_t[col * rows + r] = widen(v[b, h, kpos[r], col]) if k0 + r < k1 else zero
        for step in range(-before, after + 1):
            w0 = ((c - step) % n_chunks) * chunk
            for i0 in range(w0, w0 + chunk, cols):
                m = min(cols, w0 + chunk - i0)
                cu.syncthreads()
                for e in range(tid, m, threads):
                    qp = order[b, h, i0 + e] % length
                    qpos[e] = qp
                    top[e] = pmax[b, h, qp]
                    inv[e] = pinv[b, h, qp]
                    dl[e] = delta[b, h, qp]
                cu.syncthreads()
                for e in range(tid, m * d, threads):
                    j = e // d
                    col = e - j * d
                    qs[col * qst + j] = widen(qk[b, h, qpos[j], col])
                for e in range(tid, m * dv, threads):
                    j = e // dv
                    col = e - j * dv
                    dos[col * qst + j] = widen(dout[b, h, qpos[j], col])
                cu.syncthreads()
                scores(ks_t, rows, qs, qst, d, tr, tc, s)
                scores(vs_t, rows, dos, qst, dv, tr, tc, dpv)
                for i in range(rm):
                    kp = kp_r[i]
                    for j in range(cn):
                        qj = tc + tc_n * j
                        pj = zero
                        ds = zero
                        if qj < m and kp >= 0:
                            qp = qpos[qj]
                            x = s[i, j] * float32(LOG2E)
                            masked = False
                            if causal and kp > qp:
                                x = float32(neg_causal)
                                masked = True
                            if exclude_self and kp == qp:
                                x = float32(neg_self)
                                masked = True
                            pj = float32(math.exp2(x - top[qj])) * inv[qj]
                            if not masked:
                                ds = pj * (dpv[i, j] - dl[qj])
                        pt[qj * pst + tr + tr_n * i] = pj
                        dst[qj * pst + tr + tr_n * i] = ds
                cu.syncthreads()
                accumulate_n(pt, pst, dos, qst, m, tr, tc, acc_v)
                accumulate_n(dst, pst, qs, qst, m, tr, tc, acc_k)
        for i in range(rm):
            slot = k0 + tr + tr_n * i
            if slot < k1:
                for n in range(dn):
                    col = tc + tc_n * n
                    if col < d:
                        dk[b, h, slot, col] = acc_k[i, n]
                    if col < dv:
                        dv_out[b, h, slot, col] = acc_v[i, n]

    return kernel(lsh_dkdv)


@cache
def gather_kernel(bf16: bool) -> Any:
    """``dqk`` and ``dv`` of every position: its rounds summed, the key side through the normalisation's Jacobian.

    ``key = x * a / sqrt(D)`` with ``a = (mean(x^2) + eps)^-1/2``, so
    ``J^T g = a / sqrt(D) * (g - a^2 (x . g) / D * x)``.  One thread a position.
    """
    _bind()
    from numba import float32

    widen, narrow = storage(bf16)

    def gather(qk, inverse, n_hashes, dq_s, dk_s, dv_s, dqk, dv_out):
        n_heads, length, d = qk.shape[1], qk.shape[2], qk.shape[3]
        dv = dv_out.shape[3]
        e = cu.blockIdx.x * cu.blockDim.x + cu.threadIdx.x
        if e >= qk.shape[0] * n_heads * length:
            return
        p = e % length
        bh = e // length
        b = bh // n_heads
        h = bh - b * n_heads
        squares = float32(0.0)
        xg = float32(0.0)
        for col in range(d):
            x = widen(qk[b, h, p, col])
            g = float32(0.0)
            for r in range(n_hashes):
                g += dk_s[b, h, inverse[b, h, r * length + p], col]
            squares += x * x
            xg += x * g
        a = float32(1.0) / float32(math.sqrt(squares / float32(d) + float32(KEY_EPS)))
        root = float32(math.sqrt(float32(d)))
        coef = a * a * xg / float32(d)
        for col in range(d):
            x = widen(qk[b, h, p, col])
            gq = float32(0.0)
            g = float32(0.0)
            for r in range(n_hashes):
                slot = inverse[b, h, r * length + p]
                gq += dq_s[b, h, slot, col]
                g += dk_s[b, h, slot, col]
            dqk[b, h, p, col] = narrow(gq + a / root * (g - coef * x))
        for col in range(dv):
            total = float32(0.0)
            for r in range(n_hashes):
                total += dv_s[b, h, inverse[b, h, r * length + p], col]
            dv_out[b, h, p, col] = narrow(total)

    return kernel(gather)

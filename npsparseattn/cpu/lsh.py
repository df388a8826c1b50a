"""Reformer LSH attention on the CPU (numba): hashing, sort plan, chunked attention.

Hashing (:func:`hash_buckets`): one parallel task per block of rows; the block
is multiplied by the rotations with one BLAS GEMM, then every factor's
``argmax(concat[xR, -xR])`` is found without building the concatenation.  The
buckets are those of the float64 product whatever the input dtype, so float32
and float64 copies of the same values hash identically: float32 rows go
through sgemm (2.4x faster than dgemm on these skinny products), and the few
rows whose argmax float32 rounding could change are recomputed in float64.

Sort plan (:func:`sort_buckets`): a counting sort per (row, round).  Sorting
the ``n_hashes * L`` items by (round, bucket, position) puts round ``r`` in
slots ``[r*L, (r+1)*L)``, so every round sorts on its own, in linear time and
stably (positions are visited in increasing order).

Attention (:func:`forward`): one parallel task per (batch, head, block of up
to 8 chunks).  A task gathers once the sorted rows its chunks and their
windows need (raw ``qk`` rows for the queries, keys normalised as
``x / sqrt(mean(x^2) + 1e-6) / sqrt(D)``, values, original positions;
neighbouring chunks share most of their windows), then for each chunk of
``chunk`` sorted items computes the scores against its window of
``(1 + before + after) * chunk`` items (cyclic over the whole sorted sequence)
with one GEMM in base-2 units, masks them per element from the gathered
positions (causal: ``-1e9``, own position: ``-1e5``, in natural units), and
multiplies the probabilities by the window's values with a second GEMM.  Each
sorted slot's ``[o_r | lse_r]`` row stays in sorted order; :func:`_combine_kernel`
gathers every position's rounds through the inverse permutation and weights
them by ``exp(lse_r - logsumexp_r lse_r)``.  Gathers by a permutation are
memory-latency bound, so they prefetch a few rows ahead.

Extra memory: the sort plan, O(n_hashes * L) integers, plus the per-round rows
of the heads processed together (heads run in passes whose temporaries fit
``_WORKSPACE_BYTES``, at least one head), plus one chunk-by-window score tile
per task: O(n_hashes * L * Dv) at most, never L x L.

Backward (:func:`backward`): the rounds are combined by their lse, so the
output is one softmax over all rounds' window entries and the gradient is the
FlashAttention one with ``P = w_r * P_r``.  The per-round ``lse_r`` are
recomputed (one score GEMM per chunk) rather than derived from the combined
lse: a token that sees only itself has logit -1e5, where a float32 lse has an
ulp of 0.008, and ``exp(s - lse)`` would be off by about 1 %.  The main pass
then recomputes each chunk's scores, takes ``P_r`` from the row's own maximum
and sum, and accumulates ``dQ`` (query side), ``dK`` (normalised-key side) and
``dV`` in sorted order.  Blocks whose windows overlap would race on
``dK``/``dV``, so blocks run in phases of disjoint windows
(:func:`_block_phases`: two or three phases).  A last kernel sums every
position's rounds and applies the normalisation's Jacobian to the key side.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from llvmlite import ir
from numba import get_num_threads, njit, prange, types
from numba.extending import intrinsic

from npsparseattn.cpu._blas import gemm_address, gemm_nn, gemm_nt, gemm_tn, single_threaded_blas
from npsparseattn.cpu._tiles import FASTMATH, LN2, LOG2E, like, row_address
from npsparseattn.cpu._vecmath import exp2, maxnum
from npsparseattn.cpu.adapters import compute_dtype

if TYPE_CHECKING:
    from npsparseattn._checks import Gradients
    from npsparseattn.lsh import LSHProblem

NEG_CAUSAL = -1e9  # logit of a key after the query (causal)
NEG_SELF = -1e5  # logit of the query's own position (exclude_self)
KEY_EPS = 1e-6  # keys = x / sqrt(mean(x^2) + KEY_EPS) / sqrt(D)
_HASH_BLOCK = 256
_POSITION_BLOCK = 256
_AHEAD = 8  # rows prefetched ahead in gathers
_WORKSPACE_BYTES = 64 << 20  # per-call temporaries; heads are processed in passes that fit (one head at least)
_COUNTING_SORT_VALUES = 1 << 16  # larger bucket ids than this (and than 2 L) are comparison-sorted


@intrinsic
def _prefetch(typingctx, address):
    """Hint the CPU to load the cache line at byte ``address`` (LLVM ``prefetch``, read, keep in all levels)."""
    sig = types.void(types.intp)

    def codegen(context, builder, signature, args):
        i8p = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        fn = builder.module.declare_intrinsic(
            "llvm.prefetch", [i8p], ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32])
        )
        builder.call(
            fn, [builder.inttoptr(args[0], i8p), ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)]
        )
        return context.get_dummy_value()

    return sig, codegen


@njit(inline="always")
def _prefetch_row(arr, b, h, i):
    """Prefetch every cache line of ``arr[b, h, i, :]``: gathers by a permutation are latency bound."""
    start = row_address(arr, b, h, i)
    for offset in range(0, arr.shape[3] * arr.itemsize, 64):
        _prefetch(start + offset)


@njit(inline="always")
def _row3(arr, m, i):
    """Byte address of ``arr[m, i, 0]`` for a C-contiguous 3-D array."""
    return arr.ctypes.data + m * arr.strides[0] + i * arr.strides[1]


@njit(inline="always")
def _row(buffer, r):
    """Byte address of row ``r`` of a C-contiguous 2-D buffer."""
    return buffer.ctypes.data + r * buffer.strides[0]


@njit(inline="always")
def _bucket(y, factors, start):
    """``sum_f argmax(concat[y_f, -y_f]) * prod(previous factors)`` over the factor groups of ``y`` from ``start``.

    The argmax is that of NumPy on the concatenation: the first maximum wins.
    """
    bucket = 0
    product = 1
    for f in factors:
        half = f // 2
        seg = y[start : start + half]
        imax = 0
        imin = 0
        for c in range(1, half):
            if seg[c] > seg[imax]:
                imax = c
            if seg[c] < seg[imin]:
                imin = c
        index = imax if seg[imax] >= -seg[imin] else half + imin
        bucket += index * product
        product *= f
        start += half
    return bucket


@njit(inline="always", fastmath=FASTMATH)
def _block_buckets(yt, rows, factors, start, hi, lo, index, bucket):
    """``bucket[r] = _bucket(yt[:, r], factors, start)`` for ``rows`` rows of a column-major product, vectorised.

    ``yt`` is (columns, rows): each factor group takes the running maxima of
    ``y`` and ``-y`` across its columns, then finds the first column holding
    the winner (scanning backwards keeps the first occurrence); the loops run
    over rows, so they vectorise.
    """
    for r in range(rows):
        bucket[r] = 0
    product = 1
    for f in factors:
        half = f // 2
        first = yt[start, :rows]
        for r in range(rows):
            hi[r] = first[r]
            lo[r] = -first[r]
        for c in range(1, half):
            col = yt[start + c, :rows]
            for r in range(rows):
                hi[r] = maxnum(hi[r], col[r])
                lo[r] = maxnum(lo[r], -col[r])
        for r in range(rows):
            index[r] = 0
        for c in range(half - 1, -1, -1):
            col = yt[start + c, :rows]
            for r in range(rows):
                if hi[r] >= lo[r]:
                    index[r] = c if col[r] == hi[r] else index[r]
                else:
                    index[r] = half + c if -col[r] == lo[r] else index[r]
        for r in range(rows):
            bucket[r] += index[r] * product
        product *= f
        start += half


@njit(inline="always", fastmath=FASTMATH)
def _block_decided(yt, rows, factors, start, tol, top, second, decided):
    """Clear ``decided[r]`` where a factor group's two largest ``|y|`` (or the largest and 0) are within ``tol[r]``."""
    for f in factors:
        for r in range(rows):
            top[r] = 0
            second[r] = 0
        for c in range(start, start + f // 2):
            col = yt[c, :rows]
            for r in range(rows):
                a = abs(col[r])
                second[r] = maxnum(second[r], -maxnum(-top[r], -a))
                top[r] = maxnum(top[r], a)
        for r in range(rows):
            decided[r] = decided[r] and top[r] - second[r] > tol[r]
        start += f // 2


@njit(parallel=True, cache=True)
def _hash_kernel_f64(x, rot_t, factors, n_hashes, buckets, block, gemm):
    """Buckets of float64 rows: the rotation product with one dgemm per block of rows."""
    n_rows, length, d = x.shape
    width = rot_t.shape[0]
    cols = width // n_hashes
    n_blocks = (length + block - 1) // block
    for task in prange(n_rows * n_blocks):
        m = task // n_blocks
        i0 = (task % n_blocks) * block
        rows = min(block, length - i0)
        yt = np.empty((width, block), np.float64)
        hi = np.empty(block, np.float64)
        lo = np.empty(block, np.float64)
        index = np.empty(block, np.int32)
        bucket = np.empty(block, np.int32)
        gemm_nt(gemm, width, rows, d, 1.0, rot_t.ctypes.data, d, _row3(x, m, i0), d, 0.0, yt.ctypes.data, block)
        for hsh in range(n_hashes):
            _block_buckets(yt, rows, factors, hsh * cols, hi, lo, index, bucket)
            for r in range(rows):
                buckets[m, hsh, i0 + r] = bucket[r]


@njit(parallel=True, cache=True)
def _hash_kernel_f32(x, rot, rot_t32, bound, factors, n_hashes, buckets, block, gemm):
    """Buckets of float32 rows, equal to those of the float64 product.

    The product is taken with sgemm; its error on ``y_c`` is below
    ``(D + 2) * 2**-24 * |x| * |R_c|`` (``bound`` holds that factor times
    ``max_c |R_c|``, doubled, with a margin).  Where a group's two largest
    ``|y|`` (or the largest and zero) are closer than that, float32 cannot
    tell the float64 answer and the row is recomputed in float64.
    """
    n_rows, length, d = x.shape
    width = rot_t32.shape[0]
    cols = width // n_hashes
    n_blocks = (length + block - 1) // block
    for task in prange(n_rows * n_blocks):
        m = task // n_blocks
        i0 = (task % n_blocks) * block
        rows = min(block, length - i0)
        yt = np.empty((width, block), np.float32)
        hi = np.empty(block, np.float32)
        lo = np.empty(block, np.float32)
        index = np.empty(block, np.int32)
        bucket = np.empty((n_hashes, block), np.int32)
        tol = np.empty(block, np.float32)
        decided = np.ones(block, np.bool_)
        exact = np.empty(width, np.float64)
        one = np.float32(1.0)
        zero = np.float32(0.0)
        gemm_nt(gemm, width, rows, d, one, rot_t32.ctypes.data, d, _row3(x, m, i0), d, zero, yt.ctypes.data, block)
        for r in range(rows):
            src = x[m, i0 + r]
            norm = 0.0
            for c in range(d):
                norm += np.float64(src[c]) * np.float64(src[c])
            tol[r] = bound * np.sqrt(norm)
        for hsh in range(n_hashes):
            _block_buckets(yt, rows, factors, hsh * cols, hi, lo, index, bucket[hsh])
            _block_decided(yt, rows, factors, hsh * cols, tol, hi, lo, decided)
        for r in range(rows):
            if not decided[r]:
                src = x[m, i0 + r]
                for col in range(width):
                    total = 0.0
                    for c in range(d):
                        total += np.float64(src[c]) * rot[c, col]
                    exact[col] = total
                for hsh in range(n_hashes):
                    bucket[hsh, r] = _bucket(exact, factors, hsh * cols)
            for hsh in range(n_hashes):
                buckets[m, hsh, i0 + r] = bucket[hsh, r]


@njit(parallel=True, cache=True)
def _sort_kernel(buckets, n_values, order, inverse):
    n_rows, n_hashes, length = buckets.shape
    for task in prange(n_rows * n_hashes):
        m = task // n_hashes
        r = task % n_hashes
        row = buckets[m, r]
        counts = np.zeros(n_values + 1, np.int64)
        for p in range(length):
            counts[row[p] + 1] += 1
        for value in range(n_values):
            counts[value + 1] += counts[value]
        base = r * length
        for p in range(length):
            slot = base + counts[row[p]]
            counts[row[p]] += 1
            order[m, slot] = base + p
            inverse[m, base + p] = slot


@njit(inline="always", fastmath=FASTMATH)
def _key_scale(row):
    """``1 / sqrt(mean(row^2) + KEY_EPS)``: the length normalisation of a shared-QK key."""
    total = like(0.0, row)
    for c in range(row.shape[0]):
        total += row[c] * row[c]
    return like(1.0, row) / np.sqrt(total / like(row.shape[0], row) + like(KEY_EPS, row))


@njit(inline="always", fastmath=FASTMATH)
def _gather_span(qk, v, order, b, h, first, rows, raw, keys, values, pos):
    """Rows of ``rows`` sorted slots from ``first`` (cyclically): raw qk, normalised keys, values, positions."""
    length = qk.shape[2]
    n_items = order.shape[2]
    inv_sqrt_d = like(1.0 / np.sqrt(qk.shape[3]), raw)
    for r in range(rows):
        if r + _AHEAD < rows:
            ahead = order[b, h, (first + r + _AHEAD) % n_items] % length
            _prefetch_row(qk, b, h, ahead)
            _prefetch_row(v, b, h, ahead)
        p = order[b, h, (first + r) % n_items] % length
        pos[r] = p
        src = qk[b, h, p]
        raw_row = raw[r]
        for c in range(raw_row.shape[0]):
            raw_row[c] = src[c]
        scale = _key_scale(raw_row) * inv_sqrt_d
        key_row = keys[r]
        for c in range(key_row.shape[0]):
            key_row[c] = raw_row[c] * scale
        vsrc = v[b, h, p]
        vrow = values[r]
        for c in range(vrow.shape[0]):
            vrow[c] = vsrc[c]


@njit(inline="always", fastmath=FASTMATH)
def _masked_row(row, kpos, qp, causal, exclude_self, neg_causal, neg_self):
    """Apply the causal and self masks to one base-2 score row in place; return its maximum."""
    mx = like(-np.inf, row)
    for j in range(row.shape[0]):
        x = row[j]
        kp = kpos[j]
        if causal and kp > qp:
            x = neg_causal
        if exclude_self and kp == qp:
            x = neg_self
        row[j] = x
        mx = maxnum(mx, x)
    return mx


@njit(inline="always", fastmath=FASTMATH)
def _exp_row(row, mx):
    """``row <- exp2(row - mx)``; return the sum."""
    total = like(0.0, row)
    for j in range(row.shape[0]):
        e = exp2(row[j] - mx)
        row[j] = e
        total += e
    return total


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def _forward_kernel(qk, v, order, chunk, before, after, causal, exclude_self, group, with_output, rounds, gemm):
    n_batch, n_heads, _, d = qk.shape
    dv = v.shape[3]
    lse_col = rounds.shape[3] - 1
    ldr = rounds.shape[3]
    n_chunks = order.shape[2] // chunk
    width = (1 + before + after) * chunk
    n_blocks = (n_chunks + group - 1) // group
    span = (group + before + after) * chunk
    c2 = like(LOG2E, qk)
    ln2 = like(LN2, qk)
    one = like(1.0, qk)
    zero = like(0.0, qk)
    neg_causal = like(NEG_CAUSAL * LOG2E, qk)
    neg_self = like(NEG_SELF * LOG2E, qk)
    for task in prange(n_batch * n_heads * n_blocks):
        c0 = (task % n_blocks) * group
        c1 = min(c0 + group, n_chunks)
        b = task // (n_blocks * n_heads)
        h = (task // n_blocks) % n_heads
        raw = np.empty((span, d), qk.dtype)
        keys = np.empty((span, d), qk.dtype)
        values = np.empty((span, dv), qk.dtype)
        pos = np.empty(span, np.int32)
        s = np.empty((chunk, width), qk.dtype)
        inv_total = np.empty(chunk, qk.dtype)
        rows = (c1 - c0 + before + after) * chunk
        _gather_span(qk, v, order, b, h, ((c0 - before) % n_chunks) * chunk, rows, raw, keys, values, pos)
        for c in range(c0, c1):
            first = c * chunk
            w0 = (c - c0) * chunk  # the window's first row in the span
            q0 = w0 + before * chunk  # the chunk's own rows
            kpos = pos[w0 : w0 + width]
            gemm_nt(gemm, chunk, width, d, c2, _row(raw, q0), d, _row(keys, w0), d, zero, s.ctypes.data, width)
            for i in range(chunk):
                row = s[i]
                mx = _masked_row(row, kpos, pos[q0 + i], causal, exclude_self, neg_causal, neg_self)
                total = _exp_row(row, mx)
                inv_total[i] = one / total
                rounds[b, h, first + i, lse_col] = mx * ln2 + np.log(total)
            if with_output:
                dst = row_address(rounds, b, h, first)
                gemm_nn(gemm, chunk, dv, width, one, s.ctypes.data, width, _row(values, w0), dv, zero, dst, ldr)
                for i in range(chunk):
                    orow = rounds[b, h, first + i]
                    for col in range(dv):
                        orow[col] *= inv_total[i]


@njit(inline="always", fastmath=FASTMATH)
def _round_weights(rounds, inverse, b, h, p, weights):
    """Weights ``exp(lse_r - logsumexp_r lse_r)`` of position ``p``'s rounds; returns the logsumexp.

    ``rounds[b, h, slot, -1]`` holds the lse of the round that ``slot`` belongs to.
    """
    n_hashes = weights.shape[0]
    length = inverse.shape[2] // n_hashes
    lse_col = rounds.shape[3] - 1
    mx = like(-np.inf, weights)
    for r in range(n_hashes):
        mx = max(mx, rounds[b, h, inverse[b, h, r * length + p], lse_col])
    total = like(0.0, weights)
    for r in range(n_hashes):
        w = np.exp(rounds[b, h, inverse[b, h, r * length + p], lse_col] - mx)
        weights[r] = w
        total += w
    for r in range(n_hashes):
        weights[r] /= total
    return mx + np.log(total)


@njit(inline="always")
def _prefetch_rounds(arr, inverse, b, h, p, n_hashes):
    """Prefetch the rows of position ``p``'s rounds (slots ``inverse[r*L + p]``)."""
    length = inverse.shape[2] // n_hashes
    if p < length:
        for r in range(n_hashes):
            _prefetch_row(arr, b, h, inverse[b, h, r * length + p])


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def _combine_kernel(rounds, inverse, n_hashes, block, out, lse):
    """``out``/``lse`` of every position from its rounds' ``[o_r | lse_r]`` rows in sorted order."""
    n_batch, n_heads, length, dv = out.shape
    n_blocks = (length + block - 1) // block
    for task in prange(n_batch * n_heads * n_blocks):
        p0 = (task % n_blocks) * block
        b = task // (n_blocks * n_heads)
        h = (task // n_blocks) % n_heads
        weights = np.empty(n_hashes, rounds.dtype)
        for p in range(p0, min(p0 + block, length)):
            _prefetch_rounds(rounds, inverse, b, h, p + _AHEAD, n_hashes)
            lse[b, h, p] = _round_weights(rounds, inverse, b, h, p, weights)
            dst = out[b, h, p]
            for col in range(dv):
                dst[col] = 0
            for r in range(n_hashes):
                w = weights[r]
                src = rounds[b, h, inverse[b, h, r * length + p]]
                for col in range(dv):
                    dst[col] += w * src[col]


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def _slot_weights_kernel(rounds, inverse, n_hashes, block, slot_weights):
    """``slot_weights[b, h, slot]``: the combination weight of the round that ``slot`` belongs to."""
    n_batch, n_heads, n_items, _ = rounds.shape
    length = n_items // n_hashes
    n_blocks = (length + block - 1) // block
    for task in prange(n_batch * n_heads * n_blocks):
        p0 = (task % n_blocks) * block
        b = task // (n_blocks * n_heads)
        h = (task // n_blocks) % n_heads
        weights = np.empty(n_hashes, rounds.dtype)
        for p in range(p0, min(p0 + block, length)):
            _round_weights(rounds, inverse, b, h, p, weights)
            for r in range(n_hashes):
                slot_weights[b, h, inverse[b, h, r * length + p]] = weights[r]


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def _backward_kernel(
    dout,
    qk,
    v,
    out,
    order,
    slot_weights,
    chunk,
    before,
    after,
    causal,
    exclude_self,
    group,
    phase_ptr,
    phase_blocks,
    grads_sorted,
    gemm,
):
    n_batch, n_heads, _, d = qk.shape
    dv = v.shape[3]
    n_items = order.shape[2]
    n_chunks = n_items // chunk
    width = (1 + before + after) * chunk
    span = (group + before + after) * chunk
    ldg = grads_sorted.shape[3]
    c2 = like(LOG2E, qk)
    one = like(1.0, qk)
    zero = like(0.0, qk)
    neg_causal = like(NEG_CAUSAL * LOG2E, qk)
    neg_self = like(NEG_SELF * LOG2E, qk)
    for phase in range(phase_ptr.shape[0] - 1):
        lo = phase_ptr[phase]
        count = phase_ptr[phase + 1] - lo
        for task in prange(n_batch * n_heads * count):
            c0 = phase_blocks[lo + task % count] * group
            c1 = min(c0 + group, n_chunks)
            b = task // (count * n_heads)
            h = (task // count) % n_heads
            raw = np.empty((span, d), qk.dtype)
            keys = np.empty((span, d), qk.dtype)
            values = np.empty((span, dv), qk.dtype)
            pos = np.empty(span, np.int32)
            dk_span = np.zeros((span, d), qk.dtype)
            dv_span = np.zeros((span, dv), qk.dtype)
            grad_out = np.empty((chunk, dv), qk.dtype)
            s = np.empty((chunk, width), qk.dtype)
            dp = np.empty((chunk, width), qk.dtype)
            rows = (c1 - c0 + before + after) * chunk
            span_first = ((c0 - before) % n_chunks) * chunk
            _gather_span(qk, v, order, b, h, span_first, rows, raw, keys, values, pos)
            for c in range(c0, c1):
                first = c * chunk
                w0 = (c - c0) * chunk
                q0 = w0 + before * chunk
                kpos = pos[w0 : w0 + width]
                for i in range(chunk):
                    if i + _AHEAD < chunk:
                        _prefetch_row(dout, b, h, pos[q0 + i + _AHEAD])
                        _prefetch_row(out, b, h, pos[q0 + i + _AHEAD])
                    src = dout[b, h, pos[q0 + i]]
                    for col in range(dv):
                        grad_out[i, col] = src[col]
                query_rows, key_rows = _row(raw, q0), _row(keys, w0)
                s_data, dp_data, grad_data = s.ctypes.data, dp.ctypes.data, grad_out.ctypes.data
                gemm_nt(gemm, chunk, width, d, c2, query_rows, d, key_rows, d, zero, s_data, width)
                gemm_nt(gemm, chunk, width, dv, one, grad_data, dv, _row(values, w0), dv, zero, dp_data, width)
                for i in range(chunk):
                    qp = pos[q0 + i]
                    row = s[i]
                    mx = _masked_row(row, kpos, qp, causal, exclude_self, neg_causal, neg_self)
                    total = _exp_row(row, mx)
                    scale = slot_weights[b, h, first + i] / total
                    delta = zero
                    orow = out[b, h, qp]
                    grow = grad_out[i]
                    for col in range(dv):
                        delta += grow[col] * orow[col]
                    dp_row = dp[i]
                    for j in range(width):
                        p = row[j] * scale
                        row[j] = p
                        kp = kpos[j]
                        free = not ((causal and kp > qp) or (exclude_self and kp == qp))
                        dp_row[j] = p * (dp_row[j] - delta) if free else zero
                dq_rows = row_address(grads_sorted, b, h, first)
                gemm_nn(gemm, chunk, d, width, one, dp_data, width, key_rows, d, zero, dq_rows, ldg)
                gemm_tn(gemm, width, d, chunk, one, dp_data, width, query_rows, d, one, _row(dk_span, w0), d)
                gemm_tn(gemm, width, dv, chunk, one, s_data, width, grad_data, dv, one, _row(dv_span, w0), dv)
            for r in range(rows):
                slot = (span_first + r) % n_items
                dst = grads_sorted[b, h, slot]
                for col in range(d):
                    dst[d + col] += dk_span[r, col]
                for col in range(dv):
                    dst[2 * d + col] += dv_span[r, col]


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def _gradient_kernel(qk, inverse, n_hashes, grads_sorted, block, dqk, dv_out):
    """Sum every position's rounds of ``[dq | dk | dv]``; the key side goes through the normalisation's Jacobian."""
    n_batch, n_heads, length, d = qk.shape
    dv = dv_out.shape[3]
    n_blocks = (length + block - 1) // block
    inv_sqrt_d = like(1.0 / np.sqrt(d), qk)
    inv_d = like(1.0 / d, qk)
    for task in prange(n_batch * n_heads * n_blocks):
        p0 = (task % n_blocks) * block
        b = task // (n_blocks * n_heads)
        h = (task // n_blocks) % n_heads
        gk = np.empty(d, qk.dtype)
        for p in range(p0, min(p0 + block, length)):
            _prefetch_rounds(grads_sorted, inverse, b, h, p + _AHEAD, n_hashes)
            dst = dqk[b, h, p]
            vdst = dv_out[b, h, p]
            for col in range(d):
                dst[col] = 0
                gk[col] = 0
            for col in range(dv):
                vdst[col] = 0
            for r in range(n_hashes):
                src = grads_sorted[b, h, inverse[b, h, r * length + p]]
                for col in range(d):
                    dst[col] += src[col]
                    gk[col] += src[d + col]
                for col in range(dv):
                    vdst[col] += src[2 * d + col]
            # key = x * a / sqrt(D) with a = (mean(x^2) + eps)^-1/2:
            # J^T g = a / sqrt(D) * (g - a^2 (x.g) / D * x)
            x = qk[b, h, p]
            a = _key_scale(x)
            xg = like(0.0, qk)
            for col in range(d):
                xg += x[col] * gk[col]
            coef = a * a * xg * inv_d
            for col in range(d):
                dst[col] += a * inv_sqrt_d * (gk[col] - coef * x[col])


def hash_buckets(x: np.ndarray, rotations: np.ndarray, factors: tuple[int, ...]) -> np.ndarray:
    """Random-rotation buckets of the rows of ``x``, as the float64 product ``xR`` gives them.

    Parameters
    ----------
    x : (M, L, D) C-contiguous float32 or float64 array
        float32 rows are multiplied in float32 and only the rows whose
        buckets float32 rounding could change are recomputed in float64.
    rotations : (D, n_hashes, sum(factors) // 2) float64 array
    factors : bucket count per factor (each even); the bucket is
        ``sum_f argmax(concat[xR_f, -xR_f]) * prod(previous factors)``

    Returns
    -------
    buckets : (M, n_hashes, L) int32 array in ``[0, prod(factors))``
    """
    n_rows, length, d = x.shape
    n_hashes = rotations.shape[1]
    buckets = np.empty((n_rows, n_hashes, length), np.int32)
    if buckets.size == 0:
        return buckets
    rot = np.ascontiguousarray(rotations, dtype=np.float64).reshape(d, -1)
    rot_t = np.ascontiguousarray(rot.T)
    factors_arr = np.asarray(factors, np.int64)
    with single_threaded_blas():
        if x.dtype == np.float64:
            _hash_kernel_f64(x, rot_t, factors_arr, n_hashes, buckets, _HASH_BLOCK, gemm_address(np.float64))
        else:
            bound = 2.2 * (d + 2) * 2.0**-24 * float(np.sqrt((rot**2).sum(axis=0)).max())
            _hash_kernel_f32(
                x, rot, rot_t.astype(np.float32), bound, factors_arr, n_hashes, buckets, _HASH_BLOCK,
                gemm_address(np.float32),
            )  # fmt: skip
    return buckets


def sort_buckets(buckets: np.ndarray, n_values: int) -> tuple[np.ndarray, np.ndarray]:
    """Sort plan of ``buckets`` (M, n_hashes, L) with values in ``[0, n_values)``.

    Returns ``order`` and ``inverse``, both (M, n_hashes * L) int32: ``order``
    lists the items ``r * L + position`` sorted by (round, bucket, position);
    ``inverse[order[s]] = s``.
    """
    n_rows, n_hashes, length = buckets.shape
    order = np.empty((n_rows, n_hashes * length), np.int32)
    inverse = np.empty_like(order)
    if order.size == 0:
        return order, inverse
    if n_values <= max(2 * length, _COUNTING_SORT_VALUES):
        _sort_kernel(np.ascontiguousarray(buckets, dtype=np.int32), int(n_values), order, inverse)
        return order, inverse
    # sparse bucket ids: a stable comparison sort instead of a huge count table
    rounds = np.argsort(buckets, axis=-1, kind="stable") + (np.arange(n_hashes) * length)[:, None]
    order[...] = rounds.reshape(n_rows, -1)
    slots = np.broadcast_to(np.arange(n_hashes * length, dtype=np.int32), order.shape)
    np.put_along_axis(inverse, order, slots, axis=-1)
    return order, inverse


def _sort_plan(qk, rotations, factors):
    """``order``, ``inverse`` (B, H, n_hashes * L) of canonical ``qk``."""
    n_batch, n_heads, length, d = qk.shape
    buckets = hash_buckets(qk.reshape(n_batch * n_heads, length, d), rotations, factors)
    order, inverse = sort_buckets(buckets, int(np.prod(factors)))
    shape = (n_batch, n_heads, -1)
    return order.reshape(shape), inverse.reshape(shape)


def _chunk_group(n_chunks: int) -> int:
    """Chunks per task: a task gathers its chunks' windows once (neighbours share keys); enough
    tasks remain to balance the threads, and a task's buffers stay within a core's L2 cache."""
    return max(1, min(8, n_chunks // (8 * get_num_threads())))


def _round_results(qk, v, order, chunk, before, after, causal, exclude_self, rounds):
    """Fill ``rounds`` (B, H, N, Dv + 1) with every sorted slot's ``[o_r | lse_r]`` row (lse only: one column)."""
    n_batch, n_heads, n_items, _ = rounds.shape
    group = _chunk_group(n_batch * n_heads * (n_items // chunk))
    with_output = rounds.shape[3] > 1
    _forward_kernel(
        qk, v, order, chunk, before, after, causal, exclude_self, group, with_output, rounds, gemm_address(qk.dtype)
    )


def _head_passes(n_heads: int, head_bytes: int) -> tuple[int, list[tuple[int, int]]]:
    """Heads per pass and the ``[h0, h1)`` ranges: a pass's temporaries stay within ``_WORKSPACE_BYTES``
    (at least one head), so they are allocated once and their pages reused by the next pass."""
    step = max(1, min(n_heads, _WORKSPACE_BYTES // max(head_bytes, 1)))
    return step, [(h0, min(h0 + step, n_heads)) for h0 in range(0, n_heads, step)]


def _flat_heads(x: np.ndarray, name: str) -> np.ndarray:
    """(B, H, ...) C-contiguous -> a (1, B*H, ...) view."""
    if not x.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous")
    return x.reshape((1, x.shape[0] * x.shape[1]) + x.shape[2:])


def forward(
    qk: np.ndarray,
    v: np.ndarray,
    *,
    rotations: np.ndarray,
    factors: tuple[int, ...],
    chunk_size: int,
    chunks_before: int,
    chunks_after: int,
    causal: bool,
    exclude_self: bool,
    out: np.ndarray | None = None,
    lse: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """LSH attention forward on canonical 4-D arrays.

    Parameters
    ----------
    qk : (B, H, L, D), v : (B, H, L, Dv)
        C-contiguous, one dtype (float32 or float64); ``L % chunk_size == 0``.
    rotations : (D, n_hashes, sum(factors) // 2) float64
    factors : bucket factors (``(n_buckets,)`` when not factorized)
    chunk_size, chunks_before, chunks_after, causal, exclude_self
        As for :func:`npsparseattn.lsh.lsh_attention`.
    out, lse : arrays, optional
        Buffers to write: (B, H, L, Dv) and (B, H, L), input dtype.

    Returns
    -------
    out : (B, H, L, Dv) and lse : (B, H, L), both in the input dtype.
    """
    n_batch, n_heads, length, _ = qk.shape
    n_hashes = rotations.shape[1]
    out = np.empty((n_batch, n_heads, length, v.shape[3]), qk.dtype) if out is None else out
    lse = np.empty((n_batch, n_heads, length), qk.dtype) if lse is None else lse
    if out.size == 0 and lse.size == 0:
        return out, lse
    qk_h, v_h, out_h, lse_h = (_flat_heads(x, name) for x, name in ((qk, "qk"), (v, "v"), (out, "out"), (lse, "lse")))
    order, inverse = _sort_plan(qk_h, rotations, factors)
    n_items = order.shape[2]
    columns = v.shape[3] + 1
    step, passes = _head_passes(qk_h.shape[1], n_items * columns * qk.itemsize)
    workspace = np.empty((1, step, n_items, columns), qk.dtype)
    with single_threaded_blas():
        for h0, h1 in passes:
            rounds = workspace[:, : h1 - h0]
            heads = slice(h0, h1)
            _round_results(
                qk_h[:, heads], v_h[:, heads], order[:, heads], chunk_size, chunks_before, chunks_after, causal,
                exclude_self, rounds,
            )  # fmt: skip
            _combine_kernel(rounds, inverse[:, heads], n_hashes, _POSITION_BLOCK, out_h[:, heads], lse_h[:, heads])
    return out, lse


def _block_phases(n_chunks: int, group: int, before: int, after: int) -> tuple[np.ndarray, np.ndarray]:
    """Blocks of ``group`` chunks sorted into phases whose blocks touch disjoint windows.

    Block ``k`` holds chunks ``[k*group, (k+1)*group)`` and reads and writes
    the keys of chunks ``k*group - before .. (k+1)*group - 1 + after``
    (cyclically); a block joins the first phase none of whose blocks share
    such a chunk (with ``group >= before + after`` that is two or three phases).
    Returns ``(phase_ptr, blocks)``: phase ``i`` runs ``blocks[phase_ptr[i]:phase_ptr[i+1]]``.
    """
    phases: list[list[int]] = []
    used: list[set[int]] = []
    for k in range(-(-n_chunks // group)):
        c0, c1 = k * group, min((k + 1) * group, n_chunks)
        touched = {(c0 - before + t) % n_chunks for t in range(c1 - c0 + before + after)}
        for blocks, chunks in zip(phases, used):
            if not chunks & touched:
                blocks.append(k)
                chunks |= touched
                break
        else:
            phases.append([k])
            used.append(touched)
    ptr = np.zeros(len(phases) + 1, np.int64)
    ptr[1:] = np.cumsum([len(blocks) for blocks in phases])
    return ptr, np.array([k for blocks in phases for k in blocks], np.int64)


def backward(
    dout: np.ndarray,
    qk: np.ndarray,
    v: np.ndarray,
    out: np.ndarray,
    *,
    rotations: np.ndarray,
    factors: tuple[int, ...],
    chunk_size: int,
    chunks_before: int,
    chunks_after: int,
    causal: bool,
    exclude_self: bool,
    grads: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """LSH attention backward on canonical 4-D arrays.

    ``dout`` and ``out`` are (B, H, L, Dv) in the dtype of ``qk``; the other
    arguments are those of :func:`forward` (the per-round lse are recomputed,
    see the module docstring); ``grads`` optionally gives the ``(dqk, dv)``
    buffers to write.  Returns ``(dqk, dv)`` shaped like ``qk`` and ``v``.
    """
    d = qk.shape[3]
    n_hashes = rotations.shape[1]
    if grads is None:
        grads = (np.empty(qk.shape, qk.dtype), np.empty(v.shape, qk.dtype))
    dqk, dv = grads
    if dqk.size == 0 and dv.size == 0:
        return dqk, dv
    named = ((dout, "dout"), (qk, "qk"), (v, "v"), (out, "out"), (dqk, "dqk"), (dv, "dv"))
    dout_h, qk_h, v_h, out_h, dqk_h, dv_h = (_flat_heads(x, name) for x, name in named)
    order, inverse = _sort_plan(qk_h, rotations, factors)
    n_items = order.shape[2]
    columns = 2 * d + v.shape[3]  # [dq | dk | dv] of every sorted slot
    step, passes = _head_passes(qk_h.shape[1], n_items * (columns + 2) * qk.itemsize)
    grads_ws = np.empty((1, step, n_items, columns), qk.dtype)
    lse_ws = np.empty((1, step, n_items, 1), qk.dtype)
    weights_ws = np.empty((1, step, n_items), qk.dtype)
    n_chunks = n_items // chunk_size
    gemm = gemm_address(qk.dtype)
    with single_threaded_blas():
        for h0, h1 in passes:
            heads, count = slice(h0, h1), h1 - h0
            grads_sorted, lse_rounds, slot_weights = grads_ws[:, :count], lse_ws[:, :count], weights_ws[:, :count]
            grads_sorted.fill(0)
            group = _chunk_group(count * n_chunks)
            phase_ptr, phase_blocks = _block_phases(n_chunks, group, chunks_before, chunks_after)
            _round_results(
                qk_h[:, heads], v_h[:, heads], order[:, heads], chunk_size, chunks_before, chunks_after, causal,
                exclude_self, lse_rounds,
            )  # fmt: skip
            _slot_weights_kernel(lse_rounds, inverse[:, heads], n_hashes, _POSITION_BLOCK, slot_weights)
            _backward_kernel(
                dout_h[:, heads], qk_h[:, heads], v_h[:, heads], out_h[:, heads], order[:, heads], slot_weights,
                chunk_size, chunks_before, chunks_after, causal, exclude_self, group, phase_ptr, phase_blocks,
                grads_sorted, gemm,
            )  # fmt: skip
            _gradient_kernel(
                qk_h[:, heads], inverse[:, heads], n_hashes, grads_sorted, _POSITION_BLOCK, dqk_h[:, heads],
                dv_h[:, heads],
            )  # fmt: skip
    return dqk, dv


def _kernel_inputs(problem: LSHProblem) -> tuple[np.ndarray, np.ndarray, dict]:
    dt = compute_dtype(problem.dtype)
    options = dict(
        rotations=problem.rotations,
        factors=problem.factors,
        chunk_size=problem.chunk_size,
        chunks_before=problem.chunks_before,
        chunks_after=problem.chunks_after,
        causal=problem.causal,
        exclude_self=problem.exclude_self,
    )
    return np.ascontiguousarray(problem.qk, dtype=dt), np.ascontiguousarray(problem.v, dtype=dt), options


def problem_forward(problem: LSHProblem) -> tuple[np.ndarray, np.ndarray]:
    """``(out, lse)`` of a validated problem in canonical form: out in the input dtype, lse float32/float64."""
    qk, v, options = _kernel_inputs(problem)
    out, lse = forward(qk, v, **options)
    return out.astype(problem.dtype, copy=False), lse


def problem_backward(problem: LSHProblem, grads: Gradients) -> tuple[np.ndarray, np.ndarray]:
    """``(dqk, dv)`` of a validated problem in canonical form and the input dtype."""
    qk, v, options = _kernel_inputs(problem)
    dt = qk.dtype
    dout = np.ascontiguousarray(grads.dout, dtype=dt)
    out = np.ascontiguousarray(grads.out, dtype=dt)
    dqk, dv = backward(dout, qk, v, out, **options)
    return dqk.astype(problem.dtype, copy=False), dv.astype(problem.dtype, copy=False)

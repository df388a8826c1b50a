"""Reformer LSH attention on the CPU (numba), backend ``"numba"`` of ``lsh_attention``.

The sort plan (``order``, ``inverse``) arrives from the ``lsh_buckets`` and
``lsh_sort`` operations (``cpu/lsh_hash.py``, ``cpu/lsh_sort.py``).

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

import numpy as np
from llvmlite import ir
from numba import get_num_threads, njit, prange, types
from numba.extending import intrinsic

from npsparseattn._dtypes import compute_dtype
from npsparseattn.cpu import DTYPES, KINDS
from npsparseattn.cpu._blas import gemm_address, gemm_nn, gemm_nt, gemm_tn, single_threaded_blas
from npsparseattn.cpu._tiles import FASTMATH, LN2, LOG2E, like, row_address
from npsparseattn.cpu._vecmath import exp2, maxnum
from npsparseattn.problems.lsh import KEY_EPS, NEG_CAUSAL, NEG_SELF

__all__ = ["DTYPES", "KINDS", "STRIDED_ROWS", "TOLERANCE", "backward", "compute_dtype", "forward", "unsupported"]

STRIDED_ROWS = False
TOLERANCE = {"float16": 2e-3, "bfloat16": 1e-2, "float32": 1e-5, "float64": 1e-10}
_POSITION_BLOCK = 256
_AHEAD = 8  # rows prefetched ahead in gathers
_WORKSPACE_BYTES = 64 << 20  # per-call temporaries; heads are processed in passes that fit (one head at least)


def unsupported(problem) -> list[str]:
    """Every LSH problem on NumPy arrays is supported."""
    return []


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
def _row(buffer, r):
    """Byte address of row ``r`` of a C-contiguous 2-D buffer."""
    return buffer.ctypes.data + r * buffer.strides[0]


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
    order: np.ndarray,
    inverse: np.ndarray,
    *,
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
    order, inverse : (B, H, n_hashes * L) int32, C-contiguous
        The sort plan (``lsh_sort`` of the buckets of ``qk``).
    chunk_size, chunks_before, chunks_after, causal, exclude_self
        As for :func:`npsparseattn.lsh.lsh_attention`.
    out, lse : arrays, optional
        Buffers to write: (B, H, L, Dv) and (B, H, L), input dtype.

    Returns
    -------
    out : (B, H, L, Dv) and lse : (B, H, L), both in the input dtype.
    """
    n_batch, n_heads, length, _ = qk.shape
    out = np.empty((n_batch, n_heads, length, v.shape[3]), qk.dtype) if out is None else out
    lse = np.empty((n_batch, n_heads, length), qk.dtype) if lse is None else lse
    if out.size == 0 and lse.size == 0:
        return out, lse
    n_hashes = order.shape[2] // length
    named = ((qk, "qk"), (v, "v"), (order, "order"), (inverse, "inverse"), (out, "out"), (lse, "lse"))
    qk_h, v_h, order, inverse, out_h, lse_h = (_flat_heads(x, name) for x, name in named)
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
    lse: np.ndarray,
    order: np.ndarray,
    inverse: np.ndarray,
    *,
    chunk_size: int,
    chunks_before: int,
    chunks_after: int,
    causal: bool,
    exclude_self: bool,
    grads: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """LSH attention backward on canonical 4-D arrays.

    ``dout`` and ``out`` are (B, H, L, Dv) in the dtype of ``qk``, ``lse``
    (B, H, L) is the forward's; the other arguments are those of
    :func:`forward`.  ``lse`` is not read: the per-round lse are recomputed
    (see the module docstring).  ``grads`` optionally gives the ``(dqk, dv)``
    buffers to write.  Returns ``(dqk, dv)`` shaped like ``qk`` and ``v``.
    """
    d = qk.shape[3]
    n_hashes = order.shape[2] // qk.shape[2] if qk.shape[2] else 1
    if grads is None:
        grads = (np.empty(qk.shape, qk.dtype), np.empty(v.shape, qk.dtype))
    dqk, dv = grads
    if dqk.size == 0 and dv.size == 0:
        return dqk, dv
    named = ((dout, "dout"), (qk, "qk"), (v, "v"), (out, "out"), (order, "order"), (inverse, "inverse"))
    dout_h, qk_h, v_h, out_h, order, inverse = (_flat_heads(x, name) for x, name in named)
    dqk_h, dv_h = _flat_heads(dqk, "dqk"), _flat_heads(dv, "dv")
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

"""Tiled exact attention on the CPU (numba), forward and backward: backend ``"numba"`` of ``attention``.

Forward (FlashAttention-2 order): one parallel task per (batch, query head,
query tile).  Each task walks the key tiles that its rows can see, computes the
score tile with one GEMM, updates the online softmax, and accumulates
``P @ V`` with a second GEMM.  Extra memory is one score tile and one output
accumulator per task, plus one transposed copy of ``K``: O(L), never
O(Lq * Lk).

Backward, recomputing ``P = exp(scale*S - lse)`` tile by tile, in one of two
deterministic schemes (:func:`backward_scheme` chooses):

* one pass, one task per (batch, key head): for each key tile, every query
  tile of the GQA group that sees it gives ``dV``, ``dK`` (private
  accumulators) and ``dQ`` (accumulated in place in rows only this task
  owns): five GEMMs per tile pair, 2.5x the forward's matrix work;
* two passes, for too few (batch, key head) pairs to fill the threads:
  dK/dV with one task per (batch, key head, key tile), then dQ with one per
  (batch, query head, query tile): seven GEMMs per tile pair.

Tile shapes (:func:`tile_shape`) keep every product within OpenBLAS's
small-matrix kernels, and the score products read ``K^T``/``V^T``
(:func:`transposed`); tile pairs that the mask cuts run as strips of rows.
``docs/design.md`` has the measurements behind these choices.

Decoding shapes (:func:`decode_shaped`: the query rows of a whole GQA group
fit one tile, and the keys are many) take the forward of the KV-cache
kernels (:mod:`npsparseattn.cpu.kvcache`) instead, ``K``/``V`` read as one
page per sequence: it reads each key tile once for the group's query heads
and splits the keys across threads when the rows cannot fill them
(flash-decoding, as flash-attn's ``num_splits``), where the tiled forward
would run ``B * Hq`` tasks that each read every key.
"""

from __future__ import annotations

import numpy as np
from numba import get_num_threads, prange

from npsparseattn._dtypes import compute_dtype
from npsparseattn.cpu import DTYPES, KINDS, kvcache
from npsparseattn.cpu._blas import gemm_address, single_threaded_blas, small_matrix_kernels
from npsparseattn.cpu._jit import kernel
from npsparseattn.cpu._scores import backward_mods, jit_functions_only, kernel_mods, scratch_width
from npsparseattn.cpu._steps import backward_kv_pair, backward_pair, backward_q_pair, forward_pair, store_rows
from npsparseattn.cpu._tiles import (
    LOG2E,
    finish_rows,
    like,
    visible_keys,
    visible_queries,
    window_bound,
    zigzag,
)
from npsparseattn.problems.scores import FEATURES, ScoreMods

__all__ = [
    "DTYPES",
    "KINDS",
    "SCORE_MODS",
    "STRIDED_ROWS",
    "TOLERANCE",
    "backward",
    "backward_scheme",
    "compute_dtype",
    "forward",
    "unsupported",
]

SCORE_MODS = FEATURES
STRIDED_ROWS = False  # one compiled kernel per dtype: the public layer copies non-contiguous inputs (O(L))
TOLERANCE = {"float16": 2e-3, "bfloat16": 1e-2, "float32": 1e-5, "float64": 1e-10}
GEMM_VOLUME = 900_000  # most multiply-adds of one tile product (OpenBLAS's small-matrix kernels: m*n*k <= 10**6)
FORWARD_STRIP = 64  # rows per strip of a tile pair the mask cuts (the diagonal of a causal mask)
BACKWARD_STRIP = 32
ONE_PASS_WORK, TWO_PASS_WORK = 2.5, 3.5  # matrix work of the backward schemes, in forwards
SCHEMES = ("one-pass", "two-pass")
TRANSPOSE_REUSE = 64  # query rows per key from which K and V are transposed once for the score products


def unsupported(problem) -> list[str]:
    """Every attention problem on NumPy arrays is supported; a ``score_mod``/``mask_mod`` must be compiled by numba."""
    return jit_functions_only(problem.mods)


@kernel(writes=("out", "lse"))
def _forward_kernel(q, k, kt, v, out, lse, scale, off, left, right, bq, bk, strip, gemm, mods):
    n_batch, hq, lq, _ = q.shape
    group = hq // k.shape[1]
    lk = k.shape[2]
    n_qt = (lq + bq - 1) // bq
    c = like(scale * LOG2E, q)
    for task in prange(n_batch * hq * n_qt):
        t = zigzag(task % n_qt, n_qt)
        h = (task // n_qt) % hq
        b = task // (n_qt * hq)
        i0 = t * bq
        m = min(bq, lq - i0)
        s = np.empty((bq, bk), q.dtype)
        acc = np.zeros((bq, v.shape[3]), q.dtype)
        row_max = np.full(bq, -np.inf, q.dtype)
        row_sum = np.zeros(bq, q.dtype)
        klo = visible_keys(i0, off, left, right, lk)[0]
        khi = visible_keys(i0 + m - 1, off, left, right, lk)[1]
        for j0 in range(klo, khi, bk):
            n = min(bk, khi - j0)
            forward_pair(
                gemm, q, k, v, b, h, h // group, i0, m, j0, n, off, left, right, c, s, acc, row_max, row_sum, strip,
                kt, mods,
            )  # fmt: skip
        finish_rows(acc, row_max, row_sum, m, out, lse, b, h, i0)


@kernel(writes=("delta",), strided=True)  # varlen reads dout and out in place
def row_dot_kernel(dout, out, delta):
    """``delta[b, h, i] = sum_c dout[b, h, i, c] * out[b, h, i, c]`` in delta's dtype."""
    n_batch, hq, lq, dv = out.shape
    for bh in prange(n_batch * hq):
        b = bh // hq
        h = bh % hq
        for i in range(lq):
            total = like(0.0, delta)
            for c in range(dv):
                total += like(dout[b, h, i, c], delta) * like(out[b, h, i, c], delta)
            delta[b, h, i] = total


@kernel(writes=("xt",), fastmath=False)
def transpose_kernel(x, xt):
    """``xt[b, h, c, j] = x[b, h, j, c]``: (B, H, L, D) rows to (B, H, D, L) columns, in blocks of 64 rows."""
    n_batch, heads, length, d = x.shape
    n_blocks = (length + 63) // 64
    for task in prange(n_batch * heads * n_blocks):
        j0 = (task % n_blocks) * 64
        h = (task // n_blocks) % heads
        b = task // (n_blocks * heads)
        rows = x[b, h, j0 : j0 + 64]
        for col in range(d):
            dst = xt[b, h, col, j0 : j0 + rows.shape[0]]
            for j in range(rows.shape[0]):
                dst[j] = rows[j, col]


@kernel(writes=("dk", "dv"))
def _backward_kv_kernel(dout, q, k, kt, v, vt, lse2, delta, dk, dv, scale, off, left, right, bq, bk, strip, gemm, mods):
    n_batch, hq, lq, d = q.shape
    hk_count = k.shape[1]
    group = hq // hk_count
    lk = k.shape[2]
    n_kt = (lk + bk - 1) // bk
    c = like(scale * LOG2E, q)
    sc = like(scale, q)
    for task in prange(n_batch * hk_count * n_kt):
        t = zigzag(task % n_kt, n_kt)
        hk = (task // n_kt) % hk_count
        b = task // (n_kt * hk_count)
        j0 = t * bk
        n = min(bk, lk - j0)
        s = np.empty((bq, bk), q.dtype)
        dp = np.empty((bq, scratch_width(mods, bk)), q.dtype)
        acc_k = np.zeros((bk, d), q.dtype)
        acc_v = np.zeros((bk, v.shape[3]), q.dtype)
        ilo, ihi = visible_queries(j0, j0 + n, off, left, right, lq)
        for h in range(hk * group, (hk + 1) * group):
            for i0 in range(ilo, ihi, bq):
                m = min(bq, ihi - i0)
                backward_kv_pair(
                    gemm, dout, q, k, v, lse2, delta, b, h, hk, i0, m, j0, n, off, left, right, c, sc, s, dp,
                    acc_k, acc_v, strip, kt, vt, mods,
                )  # fmt: skip
        store_rows(acc_k, dk, b, hk, j0, n)
        store_rows(acc_v, dv, b, hk, j0, n)


@kernel(writes=("dq",))
def _backward_q_kernel(dout, q, k, kt, v, vt, lse2, delta, dq, scale, off, left, right, bq, bk, strip, gemm, mods):
    n_batch, hq, lq, d = q.shape
    group = hq // k.shape[1]
    lk = k.shape[2]
    n_qt = (lq + bq - 1) // bq
    c = like(scale * LOG2E, q)
    sc = like(scale, q)
    for task in prange(n_batch * hq * n_qt):
        t = zigzag(task % n_qt, n_qt)
        h = (task // n_qt) % hq
        b = task // (n_qt * hq)
        i0 = t * bq
        m = min(bq, lq - i0)
        s = np.empty((bq, bk), q.dtype)
        dp = np.empty((bq, scratch_width(mods, bk)), q.dtype)
        acc = np.zeros((bq, d), q.dtype)
        klo = visible_keys(i0, off, left, right, lk)[0]
        khi = visible_keys(i0 + m - 1, off, left, right, lk)[1]
        for j0 in range(klo, khi, bk):
            n = min(bk, khi - j0)
            backward_q_pair(
                gemm, dout, q, k, v, lse2, delta, b, h, h // group, i0, m, j0, n, off, left, right, c, sc, s, dp, acc,
                strip, kt, vt, mods,
            )  # fmt: skip
        store_rows(acc, dq, b, h, i0, m)


@kernel(writes=("dq", "dk", "dv"))
def _backward_kernel(
    dout, q, k, kt, v, vt, lse2, delta, dq, dk, dv, scale, off, left, right, bq, bk, strip, gemm, mods
):
    n_batch, hq, lq, d = q.shape
    hk_count = k.shape[1]
    group = hq // hk_count
    lk = k.shape[2]
    n_kt = (lk + bk - 1) // bk
    c = like(scale * LOG2E, q)
    sc = like(scale, q)
    zero = like(0.0, q)
    for task in prange(n_batch * hk_count):
        hk = task % hk_count
        b = task // hk_count
        s = np.empty((bq, bk), q.dtype)
        dp = np.empty((bq, scratch_width(mods, bk)), q.dtype)
        acc_k = np.empty((bk, d), q.dtype)
        acc_v = np.empty((bk, v.shape[3]), q.dtype)
        for h in range(hk * group, (hk + 1) * group):
            for i in range(lq):
                dq_row = dq[b, h, i]
                for col in range(d):
                    dq_row[col] = zero
        for t in range(n_kt):
            j0 = t * bk
            n = min(bk, lk - j0)
            acc_k[:] = zero
            acc_v[:] = zero
            ilo, ihi = visible_queries(j0, j0 + n, off, left, right, lq)
            for h in range(hk * group, (hk + 1) * group):
                for i0 in range(ilo, ihi, bq):
                    m = min(bq, ihi - i0)
                    backward_pair(
                        gemm, dout, q, k, v, lse2, delta, b, h, hk, i0, m, j0, n, off, left, right, c, sc, s, dp,
                        acc_k, acc_v, dq, strip, kt, vt, mods,
                    )  # fmt: skip
            store_rows(acc_k, dk, b, hk, j0, n)
            store_rows(acc_v, dv, b, hk, j0, n)


def backward_scheme(costs: np.ndarray | int, threads: int | None = None) -> str:
    """``"one-pass"`` or ``"two-pass"``: which backward to run on ``threads`` threads (default numba's).

    ``costs`` is the work of each (batch, key head) pair in visiting order, or
    their number when they cost the same.  The one-pass backward runs one
    task per pair and does 2.5x the forward's matrix work; the two-pass one
    parallelises over key tiles and query tiles and does 3.5x.  One pass wins
    unless its tasks leave threads idle for longer than the extra work costs:
    the busiest thread's share of the work (``prange`` hands each thread a
    contiguous range of tasks) against an even split must stay within
    3.5 / 2.5.

    >>> backward_scheme(8, threads=2), backward_scheme(1, threads=2), backward_scheme(5, threads=4)
    ('one-pass', 'two-pass', 'two-pass')
    """
    threads = get_num_threads() if threads is None else threads
    costs = np.ones(costs) if np.ndim(costs) == 0 else np.asarray(costs, dtype=np.float64)
    total = costs.sum()
    if costs.size < threads or total <= 0:
        return "two-pass"
    busiest = max(part.sum() for part in np.array_split(costs, threads)) * threads / total
    return "one-pass" if busiest <= TWO_PASS_WORK / ONE_PASS_WORK else "two-pass"


def chosen_scheme(scheme: str | None, costs: np.ndarray | int) -> str:
    """``scheme`` if given (checked), else :func:`backward_scheme` of ``costs``."""
    if scheme is None:
        return backward_scheme(costs)
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {', '.join(map(repr, SCHEMES))} or None, got {scheme!r}")
    return scheme


def transposed(x: np.ndarray, reuse: int) -> np.ndarray:
    """``x`` (B, H, L, D) as a C-contiguous (B, H, D, L) copy: the plain (NN) operand of the score products.

    ``reuse`` is how many query rows read each row of ``x``.  The copy costs a
    pass over ``x`` and its memory; it pays from :data:`TRANSPOSE_REUSE`
    rows on.  Below (decoding one token), an empty array: the products read
    ``x`` in place as their transposed operand.  (An empty array rather than
    ``None`` keeps one compiled kernel for both cases.)
    """
    if reuse < TRANSPOSE_REUSE:
        return np.empty((0, 0, 0, 0), x.dtype)
    xt = np.empty(x.shape[:2] + (x.shape[3], x.shape[2]), x.dtype)
    transpose_kernel(x, xt)
    return xt


# (forward, backward) tiles, rows x keys, for BLAS cores without small-matrix kernels, by head dimension
# (measured on an AVX2 AMD EPYC, OpenBLAS Haswell kernels: docs/design.md)
PACKED_TILES = {64: ((256, 256), (256, 256)), 128: ((256, 256), (128, 256)), None: ((128, 256), (64, 256))}


def tile_shape(width: int, backward: bool = False) -> tuple[int, int]:
    """``(query rows, keys)`` of a tile pair whose products have head dimension ``width = max(D, Dv)``.

    Every product of a tile pair (scores, ``P @ V``, the backward's four
    others) has ``rows * keys * width`` multiply-adds.  With OpenBLAS on an
    AVX-512 core (:func:`~npsparseattn.cpu._blas.small_matrix_kernels`) they
    are kept within :data:`GEMM_VOLUME`: OpenBLAS multiplies them with its
    small-matrix kernels, unpacked, about 15 % faster than its packed path
    (measured: 113 against 90-99 GFLOP/s per core on AVX-512).  Keys come in
    multiples of 32 (a row of scores is whole 128-byte lines; odd multiples
    of 16 ran 10-20 % slower); the forward prefers long key tiles and few
    rows (one online-softmax update covers more keys), the backward
    square-ish ones.  Any other BLAS core packs every product, and large
    tiles amortise the packing (:data:`PACKED_TILES`; on AVX2 the forward
    ran at 53 % of the GEMM rate with the small-matrix tiles, 80 % with
    these).
    """
    if not small_matrix_kernels():
        size = 64 if width <= 64 else 128 if width <= 128 else None
        return PACKED_TILES[size][1 if backward else 0]
    if backward:
        keys = 128 if width <= 64 else 64 if width <= 128 else 32
    else:
        keys = 384 if width <= 64 else 192 if width <= 128 else 128
    rows = GEMM_VOLUME // (keys * max(width, 1)) // 16 * 16
    return max(16, min(256, rows)), keys


def decode_shaped(q: np.ndarray, k: np.ndarray, offset: int) -> bool:
    """True for problems the KV-cache forward runs faster: decoding, or a short chunk against many keys.

    The query rows of a GQA group fit one of its row tiles
    (``Lq * Hq / Hk <= kvcache.FOLD_ROWS``), there are at least
    ``kvcache.MIN_SPLIT`` keys, and the diagonal is bottom-right aligned
    (``offset == Lk - Lq``, the KV-cache kernels' rule).
    """
    lq, lk = q.shape[2], k.shape[2]
    group = q.shape[1] // max(k.shape[1], 1)
    return offset == lk - lq and lq * group <= kvcache.FOLD_ROWS and lk >= kvcache.MIN_SPLIT


def _decode_forward(q, k, v, scale, left, right, out, lse):
    """:func:`forward` through the KV-cache kernels: ``k``/``v`` (B, Hk, Lk, X) are B pages of Lk rows."""
    n_batch, lk = q.shape[0], k.shape[2]
    seqlens = np.full(n_batch, lk, dtype=np.int32)
    table = np.arange(n_batch, dtype=np.int32).reshape(n_batch, 1)
    return kvcache.forward(q, k, v, seqlens, table, scale=scale, left=left, right=right, out=out, lse=lse)


def _tile(length: int, preferred: int, parallel_units: int) -> int:
    """Tile edge: ``preferred``, halved (down to 16) until there are enough tasks."""
    tile = preferred
    while tile > 16 and parallel_units * -(-length // tile) < 4 * get_num_threads():
        tile //= 2
    return max(1, min(tile, length))


def forward(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    *,
    scale: float,
    offset: int,
    left: int | None,
    right: int | None,
    out: np.ndarray | None = None,
    lse: np.ndarray | None = None,
    mods: ScoreMods | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Tiled attention forward on canonical 4-D arrays.

    Parameters
    ----------
    q : (B, Hq, Lq, D), k : (B, Hk, Lk, D), v : (B, Hk, Lk, Dv)
        float32 or float64, one dtype, unit stride on the last axis.
    scale : float
        Multiplies ``q @ k.T``.
    offset : int
        Query ``i`` is aligned with key ``i + offset`` (``Lk - Lq`` for
        bottom-right alignment).
    left, right : int or None
        Query ``i`` sees key ``j`` iff ``i+offset-left <= j <= i+offset+right``;
        ``None`` is unbounded.
    out, lse : arrays, optional
        Buffers to write into: (B, Hq, Lq, Dv) and (B, Hq, Lq), input dtype.
    mods : ScoreMods, optional
        Score modifications (:mod:`npsparseattn.problems.scores`), applied
        to every score tile (``cpu/_scores.py``).

    Returns
    -------
    out : (B, Hq, Lq, Dv) and lse : (B, Hq, Lq), both in the input dtype.
    """
    n_batch, hq, lq, _ = q.shape
    lk = k.shape[2]
    out = np.empty((n_batch, hq, lq, v.shape[3]), q.dtype) if out is None else out
    lse = np.empty((n_batch, hq, lq), q.dtype) if lse is None else lse
    if lq == 0:
        return out, lse
    if mods is None and decode_shaped(q, k, offset):
        return _decode_forward(q, k, v, scale, left, right, out, lse)
    rows, keys = tile_shape(max(q.shape[3], v.shape[3]))
    bq = _tile(lq, rows, n_batch * hq)
    bk = max(1, min(keys, lk))
    kt = transposed(k, lq * hq // k.shape[1])
    with single_threaded_blas():
        _forward_kernel(
            q, k, kt, v, out, lse, scale, offset, window_bound(left), window_bound(right), bq, bk, FORWARD_STRIP,
            gemm_address(q.dtype), kernel_mods(mods, q.dtype, q.shape[:3] + (lk,)),
        )  # fmt: skip
    return out, lse


def backward(
    dout: np.ndarray,
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    out: np.ndarray,
    lse: np.ndarray,
    *,
    scale: float,
    offset: int,
    left: int | None,
    right: int | None,
    grads: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
    scheme: str | None = None,
    mods: ScoreMods | None = None,
    dbias: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tiled attention backward on canonical 4-D arrays.

    ``dout`` and ``out`` are (B, Hq, Lq, Dv), ``lse`` is (B, Hq, Lq); the other
    arguments are those of :func:`forward`; ``grads`` optionally gives the
    ``(dq, dk, dv)`` buffers to write.  Returns ``(dq, dk, dv)`` shaped like
    ``q``, ``k``, ``v``; ``dk``/``dv`` are summed over each GQA group.
    ``scheme`` (``"one-pass"`` or ``"two-pass"``) overrides
    :func:`backward_scheme`'s choice; both are deterministic.  ``mods``:
    the forward's score modifications; ``dbias``, a zero (B, Hq, Lq, Lk)
    buffer, receives the gradient of the biased score of every visible pair.
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
    mask = (scale, offset, window_bound(left), window_bound(right))
    gemm = gemm_address(dtype)
    shape = (n_batch, hq, lq, lk)
    mods_kv, mods_q = backward_mods(mods, dtype, shape, dbias)
    rows, keys = tile_shape(max(q.shape[3], v.shape[3]), backward=True)
    with single_threaded_blas():
        row_dot_kernel(dout, out, delta)
        reuse = lq * hq // hk
        kv = (k, transposed(k, reuse), v, transposed(v, reuse))
        if chosen_scheme(scheme, n_batch * hk) == "one-pass":
            bq, bk = min(rows, lq), min(keys, lk)
            _backward_kernel(dout, q, *kv, lse2, delta, dq, dk, dv, *mask, bq, bk, BACKWARD_STRIP, gemm, mods_kv)
            return dq, dk, dv
        bk = _tile(lk, keys, n_batch * hk)
        bq = max(1, min(rows, lq))
        _backward_kv_kernel(dout, q, *kv, lse2, delta, dk, dv, *mask, bq, bk, BACKWARD_STRIP, gemm, mods_kv)
        bq = _tile(lq, rows, n_batch * hq)
        bk = max(1, min(keys, lk))
        _backward_q_kernel(dout, q, *kv, lse2, delta, dq, *mask, bq, bk, BACKWARD_STRIP, gemm, mods_q)
    return dq, dk, dv

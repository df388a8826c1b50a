"""The sparse walk: the kernels of block-sparse and index-driven sparse attention on the CPU.

Both operations say, per query tile, which keys it attends; they differ only
in how that list is written (a CSR :class:`~npsparseattn.layouts.BlockLayout`,
or ``kv_idx`` lists per key head).  Each backend module turns its input into
a *walk* and these kernels run it, on the tile steps of ``cpu/_steps.py``:

* a :class:`RowWalk` for the forward and dQ: tasks ``(b, h, i0, m, row,
  off)`` (``m`` rows of query head ``h`` from row ``i0``, the key runs of
  list ``row``, diagonal offset ``off``), and per list its *runs* of
  consecutive key positions ``[start, stop)`` (CSR ``run_ptr``);
* a :class:`ColumnWalk` for dK/dV: tasks ``(b, hk, j0, n, col_base,
  col_step, off)`` (keys ``[j0, j0+n)`` of key head ``hk``; query head ``h``
  of its group walks column ``col_base + (h - hk * group) * col_step``), and
  per column its *entries*: query rows ``[r0, r1)`` with a key run
  ``[k0, k1)`` inside the task's keys, sorted by rows then keys (CSR
  ``ent_ptr``).  It is the transposed index, built once per call; every
  accumulator belongs to one task, so the backward is deterministic without
  atomics.

**Runs and gathered tiles.**  A run of at least ``gather_min`` keys, or the
only run of its list, is multiplied in place, in chunks of at most ``width``
keys.  Shorter runs (the single tokens of DSA-style selection, blocks of a
few keys) are gathered:
their key and value rows are copied into a contiguous tile of up to ``width``
keys, and the same steps run on it with the keys' positions as the tile's
geometry (``kpos``), so causal and window masks hold inside it exactly.  Both
kinds of tile come out of one iterator (:func:`next_tile`) into one call of
the step, so each kernel holds one copy of it.

**Stacked rows.**  ``qdiv > 1`` says that row ``i`` of the query arrays sits
at position ``i // qdiv``: the index-driven backend stacks the ``qdiv`` query
heads of a GQA group position by position, so the heads that share a list
share its tiles (``cpu/sparse.py``).

**Schedule.**  ``prange`` hands each thread a contiguous range of task
chunks (``chunk`` tasks each, scratch allocated once per chunk); the walk's
task order (heaviest first, zigzag; :func:`balanced_order`) evens the ranges
out.  The backward runs in one pass (one task per (batch, key head) pair
over its columns, dQ accumulated in place) or two (dK/dV by columns, then dQ
by rows), as ``cpu/exact.py`` chooses.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import get_num_threads, njit, prange

from npsparseattn.cpu._blas import gemm_address, single_threaded_blas
from npsparseattn.cpu._jit import kernel
from npsparseattn.cpu._scores import scratch_width
from npsparseattn.cpu._steps import (
    backward_kv_pair_at,
    backward_pair_at,
    backward_q_pair_at,
    forward_pair_at,
    store_rows,
)
from npsparseattn.cpu._tiles import FASTMATH, LOG2E, finish_rows, like, row_keys, visible_rows
from npsparseattn.cpu.exact import BACKWARD_STRIP, FORWARD_STRIP, chosen_scheme, row_dot_kernel, transposed

__all__ = ["GATHER_BELOW", "ColumnWalk", "RowWalk", "backward", "balanced_order", "forward"]

GATHER_BELOW = 32  # runs shorter than this many keys are gathered into contiguous tiles
FEW_ROWS = 16  # tiles with fewer query rows gather every run shorter than a tile
CHUNKS_PER_THREAD = 256  # task chunks per thread at most (scratch is allocated once per chunk)

# The tile steps as functions of their own, called (not inlined) by the walk kernels: a kernel whose
# parallel body inlined every step took several times longer to compile, for no measurable speed.
_forward_tile = njit(fastmath=FASTMATH)(forward_pair_at.py_func)
_backward_q_tile = njit(fastmath=FASTMATH)(backward_q_pair_at.py_func)
_backward_tile = njit(fastmath=FASTMATH)(backward_pair_at.py_func)
_backward_kv_tile = njit(fastmath=FASTMATH)(backward_kv_pair_at.py_func)


@dataclass(frozen=True)
class RowWalk:
    """The query side of a walk: tasks over query tiles and, per list, its runs of key positions.

    ``tasks`` int64 (T, 6) ``(b, h, i0, m, row, off)`` in visiting order;
    ``run_ptr`` (lists + 1), ``run_start``/``run_stop`` int64 key positions;
    ``rows``: most rows of a task; ``width``: most keys per product;
    ``reuse``: query rows that read a key on average (to decide on ``K^T``).
    """

    tasks: np.ndarray
    run_ptr: np.ndarray
    run_start: np.ndarray
    run_stop: np.ndarray
    rows: int
    width: int
    reuse: int


@dataclass(frozen=True)
class ColumnWalk:
    """The key side of a walk (the transposed index): tasks over key tiles and, per column, its entries.

    ``tasks`` int64 (T, 7) ``(b, hk, j0, n, col_base, col_step, off)`` in
    visiting order, grouped by (batch, key head) pair: ``pairs`` int64 (P, 4)
    ``(first task, end task, b, hk)`` lists every pair, which costs
    ``pair_costs[p]`` (the one-pass backward runs one task per pair and
    zeroes its rows of dQ first); ``ent_ptr`` (columns + 1) and the
    entries' query rows ``[ent_r0, ent_r1)`` and key runs ``[ent_k0,
    ent_k1)``; ``cols``: most keys of a task; ``width``: most rows per
    product.
    """

    tasks: np.ndarray
    pairs: np.ndarray
    pair_costs: np.ndarray
    ent_ptr: np.ndarray
    ent_r0: np.ndarray
    ent_r1: np.ndarray
    ent_k0: np.ndarray
    ent_k1: np.ndarray
    cols: int
    width: int


@njit(inline="always")
def _chunk(lo, hi, width):
    """Step that cuts ``[lo, hi)`` into near-equal chunks of at most ``width``, a multiple of 32 (whole lines)."""
    n = hi - lo
    pieces = (n + width - 1) // width
    return min(width, ((n + pieces - 1) // pieces + 31) // 32 * 32)


@njit(inline="always")
def _gather_buffers(x, n_batch, n_heads, width, d, dv):
    """Scratch of a gathered tile in ``x``'s dtype: key and value rows (1, 1, width, D|Dv), the same seen as
    (B, Hk, width, D|Dv) (strides 0: the steps address every head's keys there), positions, iterator state."""
    kg = np.empty((1, 1, width, d), x.dtype)
    vg = np.empty((1, 1, width, dv), x.dtype)
    k_g = np.broadcast_to(kg, (n_batch, n_heads, width, d))
    v_g = np.broadcast_to(vg, (n_batch, n_heads, width, dv))
    return kg, vg, k_g, v_g, np.empty(width, np.int64), np.empty(4, np.int64)


@njit(inline="always")
def _gather(k, v, b, hk, j, count, kg, vg, pos, at):
    """Copy key and value rows ``j..j+count`` of head ``(b, hk)`` to rows ``at..`` of the tile, with positions."""
    for c in range(count):
        src = k[b, hk, j + c]
        dst = kg[0, 0, at + c]
        for d in range(src.shape[0]):
            dst[d] = src[d]
        src_v = v[b, hk, j + c]
        dst_v = vg[0, 0, at + c]
        for d in range(src_v.shape[0]):
            dst_v[d] = src_v[d]
        pos[at + c] = j + c


@njit(inline="always")
def next_tile(state, end, start, stop, klo, khi, width, gather_min, k, v, b, hk, kg, vg, pos):
    """The next tile of a walk over the runs ``[start[p], stop[p])`` for ``p`` from ``state[0]`` to ``end``.

    Runs are clipped to ``[klo, khi)``.  Returns ``(kind, j0, n)``: kind 1
    is keys ``[j0, j0+n)`` read in place (a run of at least ``gather_min``
    keys, cut into chunks of at most ``width``); kind 2 is ``n`` keys of
    shorter runs gathered into rows ``0..n`` of ``kg``/``vg``, their
    positions in ``pos[:n]`` (ascending); kind 0 means the walk is over.
    ``state`` is ``[run, resume position or -1, chunk step, keys gathered]``.
    """
    p, cursor, step, ng = state[0], state[1], state[2], state[3]
    kind, j0, n = 0, 0, 0
    while p < end:
        lo = max(start[p], klo, cursor)
        hi = min(stop[p], khi)
        if hi <= lo:
            p += 1
            cursor = -1
            continue
        if stop[p] - start[p] >= gather_min:
            if cursor < 0:
                step = _chunk(lo, hi, width)
            kind, j0, n = 1, lo, min(step, hi - lo)
            cursor = lo + n
        else:
            take = min(hi - lo, width - ng)
            _gather(k, v, b, hk, lo, take, kg, vg, pos, ng)
            ng += take
            cursor = lo + take
            if ng == width:
                kind, n, ng = 2, ng, 0
        if cursor >= hi:
            p += 1
            cursor = -1
        if kind != 0:
            break
    if kind == 0 and ng > 0:
        kind, n, ng = 2, ng, 0
    state[0], state[1], state[2], state[3] = p, cursor, step, ng
    return kind, j0, n


@njit(inline="always")
def _gather_threshold(runs, rows, gather_min, width):
    """Shortest run read in place: a list's only run always (nothing to gather it with); with fewer than
    :data:`FEW_ROWS` rows every run shorter than a whole tile (a product of so few rows costs its call, not
    its arithmetic: gathered, a query's 13 blocks of 64 keys take 4 calls instead of 13); else ``gather_min``."""
    if runs == 1:
        return 0
    return width if rows < FEW_ROWS else gather_min


@njit(inline="always")
def _scatter_add(acc_g, n, pos, j0, acc):
    """``acc[pos[c] - j0] += acc_g[c]`` for the ``n`` gathered keys."""
    for c in range(n):
        src = acc_g[c]
        dst = acc[pos[c] - j0]
        for d in range(src.shape[0]):
            dst[d] += src[d]


@kernel(writes=("out", "lse"))
def _forward_kernel(
    q, k, kt, v, out, lse, tasks, run_ptr, run_start, run_stop, scale, left, right, qdiv, rows, width, strip,
    gather_min, chunk, gemm, mods,
):  # fmt: skip
    n_batch, hq, _, d = q.shape
    hk_count, lk = k.shape[1], k.shape[2]
    group = hq // hk_count
    dv = v.shape[3]
    c = like(scale * LOG2E, q)
    no_kt = kt[:0]
    n_tasks = tasks.shape[0]
    for ch in prange((n_tasks + chunk - 1) // chunk):
        s = np.empty((rows, width), q.dtype)
        acc = np.empty((rows, dv), q.dtype)
        row_max = np.empty(rows, q.dtype)
        row_sum = np.empty(rows, q.dtype)
        kg, vg, k_g, v_g, pos, state = _gather_buffers(q, n_batch, hk_count, width, d, dv)
        for t in range(ch * chunk, min((ch + 1) * chunk, n_tasks)):
            b, h, i0, m, row, off = tasks[t, 0], tasks[t, 1], tasks[t, 2], tasks[t, 3], tasks[t, 4], tasks[t, 5]
            hk = h // group
            acc[:m] = 0
            row_max[:m] = -np.inf
            row_sum[:m] = 0
            geo = (off, left, right, lk, qdiv, pos[:0], mods)
            klo, khi = row_keys(geo, i0)[0], row_keys(geo, i0 + m - 1)[1]
            state[0], state[1], state[2], state[3] = run_ptr[row], -1, 0, 0
            gmin = _gather_threshold(run_ptr[row + 1] - run_ptr[row], m, gather_min, width)
            while True:
                kind, j0, n = next_tile(
                    state, run_ptr[row + 1], run_start, run_stop, klo, khi, width, gmin, k, v, b, hk, kg, vg, pos
                )
                if kind == 0:
                    break
                if kind == 1:
                    _forward_tile(gemm, q, k, v, b, h, hk, i0, m, j0, n, geo, c, s, acc, row_max, row_sum, strip, kt)
                else:
                    g = (off, left, right, lk, qdiv, pos[:n], mods)
                    _forward_tile(
                        gemm, q, k_g, v_g, b, h, hk, i0, m, 0, n, g, c, s, acc, row_max, row_sum, strip, no_kt
                    )
            finish_rows(acc, row_max, row_sum, m, out, lse, b, h, i0)


@kernel(writes=("dq",))
def _backward_q_kernel(
    dout, q, k, kt, v, vt, lse2, delta, dq, tasks, run_ptr, run_start, run_stop, scale, left, right, qdiv, rows,
    width, strip, gather_min, chunk, gemm, mods,
):  # fmt: skip
    n_batch, hq, _, d = q.shape
    hk_count, lk = k.shape[1], k.shape[2]
    group = hq // hk_count
    dv = v.shape[3]
    c = like(scale * LOG2E, q)
    sc = like(scale, q)
    no_kt, no_vt = kt[:0], vt[:0]
    n_tasks = tasks.shape[0]
    for ch in prange((n_tasks + chunk - 1) // chunk):
        s = np.empty((rows, width), q.dtype)
        dp = np.empty((rows, scratch_width(mods, width)), q.dtype)
        acc = np.empty((rows, d), q.dtype)
        kg, vg, k_g, v_g, pos, state = _gather_buffers(q, n_batch, hk_count, width, d, dv)
        for t in range(ch * chunk, min((ch + 1) * chunk, n_tasks)):
            b, h, i0, m, row, off = tasks[t, 0], tasks[t, 1], tasks[t, 2], tasks[t, 3], tasks[t, 4], tasks[t, 5]
            hk = h // group
            acc[:m] = 0
            geo = (off, left, right, lk, qdiv, pos[:0], mods)
            klo, khi = row_keys(geo, i0)[0], row_keys(geo, i0 + m - 1)[1]
            state[0], state[1], state[2], state[3] = run_ptr[row], -1, 0, 0
            gmin = _gather_threshold(run_ptr[row + 1] - run_ptr[row], m, gather_min, width)
            while True:
                kind, j0, n = next_tile(
                    state, run_ptr[row + 1], run_start, run_stop, klo, khi, width, gmin, k, v, b, hk, kg, vg, pos
                )
                if kind == 0:
                    break
                if kind == 1:
                    _backward_q_tile(gemm, dout, q, k, v, lse2, delta, b, h, hk, i0, m, j0, n, geo, c, sc, s, dp, acc,
                                     strip, kt, vt)  # fmt: skip
                else:
                    g = (off, left, right, lk, qdiv, pos[:n], mods)
                    _backward_q_tile(gemm, dout, q, k_g, v_g, lse2, delta, b, h, hk, i0, m, 0, n, g, c, sc, s, dp, acc,
                                     strip, no_kt, no_vt)  # fmt: skip
            store_rows(acc, dq, b, h, i0, m)


@njit(fastmath=FASTMATH)
def _column(dout, q, k, v, lse2, delta, dq, entries, task, options, operands, scratch):
    """dK/dV of column task ``task`` (a row of the task table) into ``acc_k``/``acc_v`` (row 0 = the task's first
    key), walking the column of every query head of the group; with a non-empty ``dq``, dQ too, in place (the
    one pass).  The other arguments are tuples, to keep the call short: ``entries`` the column CSR,
    ``options`` the scalars, ``operands`` K^T, V^T, the gathered tiles as the steps read them and empty
    transposes for those, ``scratch`` the task's buffers."""
    ent_ptr, ent_r0, ent_r1, ent_k0, ent_k1 = entries
    b, hk, j0, n, col_base, col_step, off = task[0], task[1], task[2], task[3], task[4], task[5], task[6]
    left, right, qdiv, width, cols, strip, gather_min, gemm, c, sc, mods = options
    kt, vt, k_g, v_g, no_kt, no_vt = operands
    s, dp, acc_k, acc_v, acc_kg, acc_vg, kg, vg, pos, state = scratch
    hq, nq = q.shape[1], q.shape[2]
    group = hq // k.shape[1]
    lk = k.shape[2]
    geo = (off, left, right, lk, qdiv, pos[:0], mods)
    for h in range(hk * group, (hk + 1) * group):
        col = col_base + (h - hk * group) * col_step
        e = ent_ptr[col]
        while e < ent_ptr[col + 1]:
            e1 = e + 1
            while e1 < ent_ptr[col + 1] and ent_r0[e1] == ent_r0[e] and ent_r1[e1] == ent_r1[e]:
                e1 += 1
            ilo, ihi = visible_rows(geo, ent_k0[e], ent_k1[e1 - 1], nq)
            ilo, ihi = max(ilo, ent_r0[e]), min(ihi, ent_r1[e])
            if ihi > ilo:
                rstep = _chunk(ilo, ihi, width)
                for i0 in range(ilo, ihi, rstep):
                    m = min(rstep, ihi - i0)
                    klo, khi = max(row_keys(geo, i0)[0], j0), min(row_keys(geo, i0 + m - 1)[1], j0 + n)
                    state[0], state[1], state[2], state[3] = e, -1, 0, 0
                    gmin = 0 if e1 - e == 1 else gather_min  # one run: read it in place
                    while True:
                        kind, t0, tn = next_tile(
                            state, e1, ent_k0, ent_k1, klo, khi, cols, gmin, k, v, b, hk, kg, vg, pos
                        )
                        if kind == 0:
                            break
                        if kind == 1:
                            ak, av = acc_k[t0 - j0 :], acc_v[t0 - j0 :]
                            if dq.size > 0:
                                backward_pair_at(gemm, dout, q, k, v, lse2, delta, b, h, hk, i0, m, t0, tn, geo, c, sc,
                                                 s, dp, ak, av, dq, strip, kt, vt)  # fmt: skip
                            else:
                                backward_kv_pair_at(gemm, dout, q, k, v, lse2, delta, b, h, hk, i0, m, t0, tn, geo, c,
                                                    sc, s, dp, ak, av, strip, kt, vt)  # fmt: skip
                            continue
                        g = (off, left, right, lk, qdiv, pos[:tn], mods)
                        acc_kg[:tn] = 0
                        acc_vg[:tn] = 0
                        if dq.size > 0:
                            _backward_tile(gemm, dout, q, k_g, v_g, lse2, delta, b, h, hk, i0, m, 0, tn, g, c, sc, s,
                                           dp, acc_kg, acc_vg, dq, strip, no_kt, no_vt)  # fmt: skip
                        else:
                            _backward_kv_tile(gemm, dout, q, k_g, v_g, lse2, delta, b, h, hk, i0, m, 0, tn, g, c, sc,
                                              s, dp, acc_kg, acc_vg, strip, no_kt, no_vt)  # fmt: skip
                        _scatter_add(acc_kg, tn, pos, j0, acc_k)
                        _scatter_add(acc_vg, tn, pos, j0, acc_v)
            e = e1


@kernel(writes=("dq", "dk", "dv_out"))
def _backward_columns_kernel(
    dout, q, k, kt, v, vt, lse2, delta, dq, dk, dv_out, tasks, pairs, ent_ptr, ent_r0, ent_r1, ent_k0, ent_k1,
    scale, left, right, qdiv, width, cols, strip, gather_min, chunk, one_pass, gemm, mods,
):  # fmt: skip
    """dK/dV by columns: ``one_pass`` 0, one task per column task (``dq`` untouched, pass it empty); ``one_pass``
    1, one task per (batch, key head) pair over its column tasks, dQ accumulated in place into ``dq``."""
    n_batch, hq, nq, d = q.shape
    hk_count = k.shape[1]
    group = hq // hk_count
    dv = v.shape[3]
    c = like(scale * LOG2E, q)
    sc = like(scale, q)
    no_kt, no_vt = kt[:0], vt[:0]
    units = pairs.shape[0] if one_pass else tasks.shape[0]
    for ch in prange((units + chunk - 1) // chunk):
        s = np.empty((width, cols), q.dtype)
        dp = np.empty((width, scratch_width(mods, cols)), q.dtype)
        acc_k = np.empty((cols, d), q.dtype)
        acc_v = np.empty((cols, dv), q.dtype)
        acc_kg = np.empty((cols, d), q.dtype)
        acc_vg = np.empty((cols, dv), q.dtype)
        kg, vg, k_g, v_g, pos, state = _gather_buffers(q, n_batch, hk_count, cols, d, dv)
        for u in range(ch * chunk, min((ch + 1) * chunk, units)):
            first, last = (pairs[u, 0], pairs[u, 1]) if one_pass else (u, u + 1)
            if one_pass:
                b, hk = pairs[u, 2], pairs[u, 3]
                for h in range(hk * group, (hk + 1) * group):
                    for i in range(nq):
                        dq[b, h, i] = 0
            for t in range(first, last):
                b, hk, j0, n = tasks[t, 0], tasks[t, 1], tasks[t, 2], tasks[t, 3]
                acc_k[:n] = 0
                acc_v[:n] = 0
                _column(
                    dout, q, k, v, lse2, delta, dq, (ent_ptr, ent_r0, ent_r1, ent_k0, ent_k1), tasks[t],
                    (left, right, qdiv, width, cols, strip, gather_min, gemm, c, sc, mods),
                    (kt, vt, k_g, v_g, no_kt, no_vt),
                    (s, dp, acc_k, acc_v, acc_kg, acc_vg, kg, vg, pos, state),
                )  # fmt: skip
                store_rows(acc_k, dk, b, hk, j0, n)
                store_rows(acc_v, dv_out, b, hk, j0, n)


def balanced_order(costs: np.ndarray, segment: int = 8) -> np.ndarray:
    """Per row of ``costs``, a visiting order of its items that balances threads and keeps neighbours together.

    numba hands each thread a contiguous range of tasks.  Items are taken in
    segments of ``segment`` neighbours (consecutive blocks share keys, so
    they stay together for the caches); segments are sorted heaviest first and
    interleaved 0, n-1, 1, n-2, ... (zigzag), which pairs heavy with light
    and evens the ranges out.

    >>> balanced_order(np.array([[1, 1, 5, 5]]), segment=1).tolist()
    [[2, 1, 3, 0]]
    """
    heads, n = costs.shape
    n_seg = -(-n // segment)
    padded = np.zeros((heads, n_seg * segment), dtype=np.int64)
    padded[:, :n] = costs
    heavy_first = np.argsort(-padded.reshape(heads, n_seg, segment).sum(axis=2), axis=1, kind="stable")
    t = np.arange(n_seg)
    segments = heavy_first[:, np.where(t % 2 == 0, t // 2, n_seg - 1 - t // 2)]
    items = (segments[:, :, None] * segment + np.arange(segment)).reshape(heads, n_seg * segment)
    return np.ascontiguousarray(items[items < n].reshape(heads, n), dtype=np.int64)


def _chunk_size(units: int) -> int:
    """Tasks per ``prange`` iteration: about :data:`CHUNKS_PER_THREAD` chunks per thread, at least one task."""
    return max(1, units // (CHUNKS_PER_THREAD * get_num_threads()))


def forward(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    walk: RowWalk,
    *,
    scale: float,
    left: int,
    right: int,
    qdiv: int = 1,
    out: np.ndarray | None = None,
    lse: np.ndarray | None = None,
    mods: tuple | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Run the forward of ``walk`` on canonical 4-D arrays (window bounds as kernel integers); ``(out, lse)``.

    ``mods``: the kernels' tuple of score modifications (``cpu/_scores.py``: ``kernel_mods``) or ``None``.

    The walk's tasks must cover every query row (rows no task covers are not written).
    """
    n_batch, hq, lq, _ = q.shape
    out = np.empty((n_batch, hq, lq, v.shape[3]), q.dtype) if out is None else out
    lse = np.empty((n_batch, hq, lq), q.dtype) if lse is None else lse
    if walk.tasks.shape[0] == 0:
        return out, lse
    kt = transposed(k, walk.reuse)
    with single_threaded_blas():
        _forward_kernel(
            q, k, kt, v, out, lse, walk.tasks, walk.run_ptr, walk.run_start, walk.run_stop, scale, left, right, qdiv,
            walk.rows, walk.width, FORWARD_STRIP, GATHER_BELOW, _chunk_size(walk.tasks.shape[0]),
            gemm_address(q.dtype), mods,
        )  # fmt: skip
    return out, lse


def backward(
    dout: np.ndarray,
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    out: np.ndarray,
    lse: np.ndarray,
    rows: RowWalk,
    columns: ColumnWalk,
    *,
    scale: float,
    left: int,
    right: int,
    qdiv: int = 1,
    grads: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
    scheme: str | None = None,
    mods: tuple | None = None,
    mods_q: tuple | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Run the backward of a walk: ``(dq, dk, dv)``; ``scheme`` as :func:`npsparseattn.cpu.exact.backward`.

    ``mods``: the kernels' tuple of score modifications (its ``dbias``
    written by the dK/dV pass), ``mods_q`` the same without ``dbias`` for
    the two-pass scheme's dQ pass.

    The row tasks must cover every query row, and the column tasks every key
    row and every (batch, key head) pair (``columns.pairs``).
    """
    n_batch, hq, lq, _ = q.shape
    dtype = q.dtype
    if grads is None:
        grads = (np.empty(q.shape, dtype), np.empty(k.shape, dtype), np.empty(v.shape, dtype))
    dq, dk, dv = grads
    if rows.tasks.shape[0] == 0 or columns.tasks.shape[0] == 0:
        for g in grads:
            g[...] = 0
        return dq, dk, dv
    delta = np.empty((n_batch, hq, lq), dtype)
    lse2 = np.ascontiguousarray(lse, dtype=dtype) * dtype.type(LOG2E)
    gemm = gemm_address(dtype)
    walk = (columns.ent_ptr, columns.ent_r0, columns.ent_r1, columns.ent_k0, columns.ent_k1)
    by_keys = (scale, left, right, qdiv, columns.width, columns.cols, BACKWARD_STRIP, GATHER_BELOW)
    with single_threaded_blas():
        row_dot_kernel(dout, out, delta)
        kv = (k, transposed(k, rows.reuse), v, transposed(v, rows.reuse))
        if chosen_scheme(scheme, columns.pair_costs) == "one-pass":
            units = columns.pairs.shape[0]
            _backward_columns_kernel(dout, q, *kv, lse2, delta, dq, dk, dv, columns.tasks, columns.pairs, *walk,
                                     *by_keys, _chunk_size(units), 1, gemm, mods)  # fmt: skip
            return dq, dk, dv
        no_dq = np.empty((0, 0, 0, 0), dtype)
        _backward_columns_kernel(dout, q, *kv, lse2, delta, no_dq, dk, dv, columns.tasks, columns.pairs, *walk,
                                 *by_keys, _chunk_size(columns.tasks.shape[0]), 0, gemm, mods)  # fmt: skip
        _backward_q_kernel(
            dout, q, *kv, lse2, delta, dq, rows.tasks, rows.run_ptr, rows.run_start, rows.run_stop, scale, left, right,
            qdiv, rows.rows, rows.width, BACKWARD_STRIP, GATHER_BELOW, _chunk_size(rows.tasks.shape[0]), gemm, mods_q,
        )  # fmt: skip
    return dq, dk, dv

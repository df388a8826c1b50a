"""Index-driven sparse attention on the CPU (numba): backend ``"numba"`` of ``sparse_attention``.

The canonical index (:mod:`npsparseattn.problems.sparse`: per (batch, key
head, query block) its key blocks ascending, ``kv_cnt`` of them) becomes a
walk of ``cpu/_walk.py``, the kernels block-sparse attention runs too:

* **rows** (forward, dQ): each list's consecutive key blocks merged into
  runs of key positions.  Runs of at least
  :data:`~npsparseattn.cpu._walk.GATHER_BELOW` keys are multiplied in place;
  shorter ones (token mode ``kv_block=1``, small blocks, scattered picks) are
  gathered into contiguous tiles of up to ``width`` keys and run through the
  same steps with their positions, so masks stay exact.
* **columns** (dK/dV, the transposed index built once per call by a counting
  sort, no atomics): one task per (batch, key head, key tile), the tile
  being one key block (``kv_block >= 32``; consecutive query blocks that chose
  it merge into one run of rows) or ``ceil(64 / kv_block)`` blocks (its
  entries are each query block's runs inside the tile, gathered the same
  way, their gradients added back to the tile's keys in a fixed order).
* **stacked heads**: with grouped-query attention and query blocks shorter
  than :data:`STACK_BELOW`, the ``G`` query heads that share a list are
  stacked position by position (a copy of ``q`` as (B, Hk, Lq * G, D)), so a
  list's keys are read (and gathered) once for the group and the products
  have ``G * q_block`` rows instead of ``q_block``.  ``q_block=1`` with a
  group of 16 multiplies 16 rows at a time, as NSA's kernel does.

Both backward schemes are deterministic: every accumulator belongs to one
task, and gradients are summed in the walk's fixed order.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from npsparseattn._dtypes import compute_dtype
from npsparseattn.cpu import DTYPES, KINDS, _walk
from npsparseattn.cpu._scores import backward_mods, jit_functions_only, kernel_mods
from npsparseattn.cpu._tiles import window_bound
from npsparseattn.cpu._walk import GATHER_BELOW, ColumnWalk, RowWalk, balanced_order
from npsparseattn.cpu.block_sparse import chunk_width
from npsparseattn.problems.scores import FEATURES, ScoreMods

__all__ = [
    "DTYPES",
    "KINDS",
    "SCORE_MODS",
    "STRIDED_ROWS",
    "TOLERANCE",
    "backward",
    "compute_dtype",
    "forward",
    "unsupported",
]

SCORE_MODS = FEATURES
STRIDED_ROWS = False  # one compiled kernel per dtype: the public layer copies non-contiguous inputs
TOLERANCE = {"float16": 2e-3, "bfloat16": 1e-2, "float32": 1e-5, "float64": 1e-10}
STACK_BELOW = 64  # query blocks shorter than this stack the heads of a GQA group
KEY_TILE = 64  # keys per dK/dV task at least: blocks shorter than GATHER_BELOW are grouped into tiles this long


def unsupported(problem) -> list[str]:
    """Every sparse problem on NumPy arrays is supported; a ``score_mod``/``mask_mod`` must be compiled by numba."""
    return jit_functions_only(getattr(problem, "mods", None))


@njit(cache=True)
def list_runs(kv_idx, kv_cnt, kv_block, key_lo, key_hi):
    """Per list, its consecutive key blocks merged into runs of key positions: ``(run_ptr, start, stop)``.

    ``kv_idx`` (lists, K) canonical; list ``r``'s key block ``c`` is keys
    ``[key_lo[r] + c * kv_block, key_lo[r] + (c + 1) * kv_block)`` clipped to
    ``key_hi[r]`` (``key_lo``/``key_hi``: the keys of the list's sequence).
    """
    lists = kv_idx.shape[0]
    run_ptr = np.zeros(lists + 1, np.int64)
    total = 0
    for r in range(lists):
        for s in range(kv_cnt[r]):
            if s == 0 or kv_idx[r, s] != kv_idx[r, s - 1] + 1:
                total += 1
        run_ptr[r + 1] = total
    start = np.empty(total, np.int64)
    stop = np.empty(total, np.int64)
    p = 0
    for r in range(lists):
        for s in range(kv_cnt[r]):
            block = kv_idx[r, s]
            if s == 0 or block != kv_idx[r, s - 1] + 1:
                start[p] = key_lo[r] + block * kv_block
                p += 1
            stop[p - 1] = min(key_lo[r] + (block + 1) * kv_block, key_hi[r])
    return run_ptr, start, stop


@njit(cache=True)
def list_entries(kv_idx, kv_cnt, list_col, n_cols, tile_blocks, kv_block, key_lo, key_hi, row_lo, row_hi):
    """The transposed index: per column, entries ``(rows [r0, r1), keys [k0, k1))``, CSR ``ent_ptr``.

    List ``r`` (query rows ``[row_lo[r], row_hi[r])``, keys as in
    :func:`list_runs`) puts its key block ``c`` into column ``list_col[r] +
    c // tile_blocks``.  Items are counting-sorted by column (stable: by list,
    then key block, within a column); consecutive key blocks of one list
    merge into one key run; with one block per tile, consecutive lists whose
    rows follow one another and that chose the same key block merge into one
    row range.
    """
    lists = kv_idx.shape[0]
    count = np.zeros(n_cols + 1, np.int64)
    for r in range(lists):
        for s in range(kv_cnt[r]):
            count[list_col[r] + kv_idx[r, s] // tile_blocks + 1] += 1
    for c in range(n_cols):
        count[c + 1] += count[c]
    fill = count[:-1].copy()
    item_r = np.empty(count[n_cols], np.int64)
    item_b = np.empty(count[n_cols], np.int64)
    for r in range(lists):
        for s in range(kv_cnt[r]):
            c = list_col[r] + kv_idx[r, s] // tile_blocks
            item_r[fill[c]] = r
            item_b[fill[c]] = kv_idx[r, s]
            fill[c] += 1
    ent_ptr = np.zeros(n_cols + 1, np.int64)
    r0 = np.empty(item_r.shape[0], np.int64)
    r1 = np.empty(item_r.shape[0], np.int64)
    k0 = np.empty(item_r.shape[0], np.int64)
    k1 = np.empty(item_r.shape[0], np.int64)
    e = 0
    for c in range(n_cols):
        for i in range(count[c], count[c + 1]):
            r, kb = item_r[i], item_b[i]
            key_start, key_stop = key_lo[r] + kb * kv_block, min(key_lo[r] + (kb + 1) * kv_block, key_hi[r])
            if e > ent_ptr[c] and item_r[i - 1] == r and k1[e - 1] == key_start:
                k1[e - 1] = key_stop  # the next key block of the same list: one key run
            elif tile_blocks == 1 and e > ent_ptr[c] and r1[e - 1] == row_lo[r] and k0[e - 1] == key_start:
                r1[e - 1] = row_hi[r]  # the next query block chose the same key block: one row range
            else:
                r0[e], r1[e], k0[e], k1[e] = row_lo[r], row_hi[r], key_start, key_stop
                e += 1
        ent_ptr[c + 1] = e
    return ent_ptr, r0[:e].copy(), r1[:e].copy(), k0[:e].copy(), k1[:e].copy()


def tile_blocks(kv_block: int) -> int:
    """Key blocks per dK/dV task: one from :data:`~npsparseattn.cpu._walk.GATHER_BELOW` keys, else enough for
    :data:`KEY_TILE` keys."""
    return 1 if kv_block >= GATHER_BELOW else -(-KEY_TILE // kv_block)


def segment_sums(values: np.ndarray, ptr: np.ndarray) -> np.ndarray:
    """Sum of ``values[ptr[i]:ptr[i+1]]`` for every segment ``i`` (empty segments give 0)."""
    total = np.concatenate([[0], np.cumsum(values, dtype=np.int64)])
    return total[ptr[1:]] - total[ptr[:-1]]


def stacks(n_heads: int, n_kv_heads: int, q_block: int) -> int:
    """Query heads stacked per position: the GQA group when query blocks are short, else 1."""
    group = n_heads // n_kv_heads
    return group if group > 1 and q_block < STACK_BELOW else 1


def stack(x: np.ndarray, n_kv_heads: int) -> np.ndarray:
    """(B, Hq, L, X) -> (B, Hk, L * G, X): row ``i * G + g`` is query head ``hk * G + g`` at position ``i``."""
    b, hq, length = x.shape[:3]
    tail = x.shape[3:]
    g = hq // n_kv_heads
    x = x.reshape((b, n_kv_heads, g, length) + tail).swapaxes(2, 3)
    return np.ascontiguousarray(x.reshape((b, n_kv_heads, length * g) + tail))


def unstack(x: np.ndarray, n_heads: int, dst: np.ndarray | None) -> np.ndarray:
    """The inverse of :func:`stack`, written into ``dst`` when given."""
    b, hk, rows = x.shape[:3]
    tail = x.shape[3:]
    g = n_heads // hk
    x = x.reshape((b, hk, rows // g, g) + tail).swapaxes(2, 3).reshape((b, n_heads, rows // g) + tail)
    if dst is None:
        return np.ascontiguousarray(x)
    dst[...] = x
    return dst


def _row_walk(kv_idx, kv_cnt, n_heads, seq_q, seq_k, q_block, kv_block, stacked, dim, offset) -> RowWalk:
    """Tasks over the query blocks of every (batch, query head), or of every (batch, key head) when ``stacked``."""
    n_batch, hk, nqb, slots = kv_idx.shape
    group = n_heads // hk
    heads = hk if stacked > 1 else n_heads
    lists = n_batch * hk * nqb
    key_lo, key_hi = np.zeros(lists, np.int64), np.full(lists, seq_k, np.int64)
    run_ptr, start, stop = list_runs(kv_idx.reshape(lists, slots), kv_cnt.reshape(lists), kv_block, key_lo, key_hi)
    keys = segment_sums(stop - start, run_ptr).reshape(n_batch, hk, nqb)
    head = np.arange(heads)
    kv_head = head // (heads // hk)
    r = balanced_order(keys[:, kv_head].reshape(n_batch * heads, nqb) + 1).reshape(n_batch, heads, nqb)
    tasks = np.empty((n_batch, heads, nqb, 6), np.int64)
    tasks[..., 0] = np.arange(n_batch)[:, None, None]
    tasks[..., 1] = head[None, :, None]
    tasks[..., 2] = r * q_block * stacked
    tasks[..., 3] = np.minimum(q_block, seq_q - r * q_block) * stacked
    tasks[..., 4] = (np.arange(n_batch)[:, None, None] * hk + kv_head[None, :, None]) * nqb + r
    tasks[..., 5] = offset
    return RowWalk(
        tasks=tasks.reshape(-1, 6),
        run_ptr=run_ptr,
        run_start=start,
        run_stop=stop,
        rows=q_block * stacked,
        width=chunk_width(q_block * stacked, dim),
        reuse=transpose_reuse(int(keys.sum()) * q_block * group, n_batch * hk * seq_k, kv_block),
    )


def transpose_reuse(pairs: int, keys: int, kv_block: int) -> int:
    """Query rows that read a key in place on average (``pairs`` selected (query, key) pairs over ``keys``
    keys), for :func:`~npsparseattn.cpu.exact.transposed`; 0 when short blocks are gathered, not read in place."""
    return pairs // max(keys, 1) if kv_block >= GATHER_BELOW else 0


def _column_walk(kv_idx, kv_cnt, n_heads, seq_q, seq_k, q_block, kv_block, stacked, dim, offset) -> ColumnWalk:
    """Tasks over the key tiles of every (batch, key head), with the transposed index as their entries."""
    n_batch, hk, nqb, slots = kv_idx.shape
    group = n_heads // hk
    blocks = tile_blocks(kv_block)
    tile = blocks * kv_block
    n_tiles = -(-seq_k // tile)
    lists = n_batch * hk * nqb
    r = np.tile(np.arange(nqb), n_batch * hk)
    row_lo = r * q_block * stacked
    row_hi = np.minimum((r + 1) * q_block, seq_q) * stacked
    list_col = np.repeat(np.arange(n_batch * hk) * n_tiles, nqb)
    key_lo, key_hi = np.zeros(lists, np.int64), np.full(lists, seq_k, np.int64)
    ent_ptr, r0, r1, k0, k1 = list_entries(
        kv_idx.reshape(lists, slots), kv_cnt.reshape(lists), list_col, n_batch * hk * n_tiles, blocks, kv_block,
        key_lo, key_hi, row_lo, row_hi,
    )  # fmt: skip
    work = segment_sums((r1 - r0) * (k1 - k0), ent_ptr).reshape(n_batch * hk, n_tiles)
    t = balanced_order(work + 1).reshape(n_batch, hk, n_tiles)
    tasks = np.empty((n_batch, hk, n_tiles, 7), np.int64)
    tasks[..., 0] = np.arange(n_batch)[:, None, None]
    tasks[..., 1] = np.arange(hk)[None, :, None]
    tasks[..., 2] = t * tile
    tasks[..., 3] = np.minimum(tile, seq_k - t * tile)
    tasks[..., 4] = (np.arange(n_batch)[:, None, None] * hk + np.arange(hk)[None, :, None]) * n_tiles + t
    tasks[..., 5] = 0
    tasks[..., 6] = offset
    first = np.arange(n_batch * hk) * n_tiles
    pairs = np.stack([first, first + n_tiles, np.repeat(np.arange(n_batch), hk), np.tile(np.arange(hk), n_batch)], 1)
    return ColumnWalk(
        tasks=tasks.reshape(-1, 7),
        pairs=pairs,
        pair_costs=work.sum(axis=1) * (group // stacked),
        ent_ptr=ent_ptr,
        ent_r0=r0,
        ent_r1=r1,
        ent_k0=k0,
        ent_k1=k1,
        cols=tile,
        width=chunk_width(tile, dim),
    )


def forward(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    kv_idx: np.ndarray,
    kv_cnt: np.ndarray,
    *,
    q_block: int,
    kv_block: int,
    scale: float,
    offset: int,
    left: int | None,
    right: int | None,
    out: np.ndarray | None = None,
    lse: np.ndarray | None = None,
    mods: ScoreMods | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Sparse attention forward on canonical arrays.

    Parameters
    ----------
    q : (B, Hq, Lq, D), k : (B, Hk, Lk, D), v : (B, Hk, Lk, Dv)
        float32 or float64, one dtype, C-contiguous.
    kv_idx : int32 (B, Hk, ceil(Lq / q_block), K), kv_cnt : int32 (B, Hk, nqb)
        The canonical index (each list's ``kv_cnt`` key blocks ascending
        first), checked by the caller.
    q_block, kv_block : block edges in queries and keys.
    scale, offset, left, right :
        Query ``i`` sees key ``j`` of a selected block iff
        ``i+offset-left <= j <= i+offset+right`` (``None``: unbounded).
    out, lse : arrays, optional
        Buffers (B, Hq, Lq, Dv) and (B, Hq, Lq) in the input dtype.
    mods : ScoreMods, optional
        Score modifications applied to the selected keys' scores (``cpu/_scores.py``).

    Returns
    -------
    out : (B, Hq, Lq, Dv), lse : (B, Hq, Lq); rows that see no key get 0 and ``-inf``.
    """
    _, hq, lq, _ = q.shape
    hk, lk = k.shape[1], k.shape[2]
    g = stacks(hq, hk, q_block)
    walk = _row_walk(kv_idx, kv_cnt, hq, lq, lk, q_block, kv_block, g, max(q.shape[3], v.shape[3]), offset)
    bounds = {"scale": scale, "left": window_bound(left), "right": window_bound(right), "qdiv": g}
    bounds["mods"] = kernel_mods(mods, q.dtype, (q.shape[0], hq, lq, lk))
    if g == 1:
        return _walk.forward(q, k, v, walk, out=out, lse=lse, **bounds)
    out_s, lse_s = _walk.forward(stack(q, hk), k, v, walk, **bounds)
    return unstack(out_s, hq, out), unstack(lse_s, hq, lse)


def backward(
    dout: np.ndarray,
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    out: np.ndarray,
    lse: np.ndarray,
    kv_idx: np.ndarray,
    kv_cnt: np.ndarray,
    *,
    q_block: int,
    kv_block: int,
    scale: float,
    offset: int,
    left: int | None,
    right: int | None,
    grads: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
    scheme: str | None = None,
    mods: ScoreMods | None = None,
    dbias: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sparse attention backward: ``(dq, dk, dv)`` shaped like ``q``, ``k``, ``v`` (dk/dv summed over GQA groups).

    ``dout``/``out`` (B, Hq, Lq, Dv) and ``lse`` (B, Hq, Lq) come from
    :func:`forward` with the same index and options; ``grads`` optionally
    gives the buffers.  ``scheme`` (``"one-pass"`` or ``"two-pass"``)
    overrides the choice of :func:`~npsparseattn.cpu.exact.backward_scheme`;
    both are deterministic (bitwise equal results run after run).  ``mods``/``dbias`` as
    :func:`npsparseattn.cpu.exact.backward`.
    """
    _, hq, lq, _ = q.shape
    hk, lk = k.shape[1], k.shape[2]
    g = stacks(hq, hk, q_block)
    dim = max(q.shape[3], v.shape[3])
    walk = (kv_idx, kv_cnt, hq, lq, lk, q_block, kv_block, g, dim, offset)
    rows, columns = _row_walk(*walk), _column_walk(*walk)
    bounds = {"scale": scale, "left": window_bound(left), "right": window_bound(right), "qdiv": g, "scheme": scheme}
    bounds["mods"], bounds["mods_q"] = backward_mods(mods, q.dtype, (q.shape[0], hq, lq, lk), dbias)
    if g == 1:
        return _walk.backward(dout, q, k, v, out, lse, rows, columns, grads=grads, **bounds)
    q_s = stack(q, hk)
    grads_s = None if grads is None else (np.empty_like(q_s), grads[1], grads[2])
    dq_s, dk, dv = _walk.backward(
        stack(dout, hk), q_s, k, v, stack(out, hk), stack(lse, hk), rows, columns, grads=grads_s, **bounds
    )
    return unstack(dq_s, hq, None if grads is None else grads[0]), dk, dv

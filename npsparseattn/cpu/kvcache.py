"""Attention over a paged KV cache on the CPU (numba): backend ``"numba"`` of ``attention_with_kvcache``.

The cache arrives as pages (P, Hk, page_size, D|Dv); a contiguous cache is
one page per sequence.  A key tile is up to ``KEY_TILE`` consecutive logical
positions; its products run page segment by page segment, each read in
place through the page's row stride, and the online softmax runs once per
tile whatever the page size.

**Row tiles.**  Decoding has few queries per sequence, so the query rows of a
whole GQA group are one tile when ``G * Lq <= FOLD_ROWS``: the ``G`` query
heads that share a key/value head read each key tile once (PyTorch's SDPA
reads it ``G`` times).  When a page holds less than ``SWEEP_BYTES`` per head,
a tile takes every head of the sequence and reads each page's heads, which
are adjacent in memory, in one sweep.  Longer query blocks (chunked prefill
against a cache) are tiled per query head, ``QUERY_TILE`` rows at a time.

**Products.**  Up to ``SMALL_ROWS`` query rows per KV head (decoding) on
C-ordered pages: loops that read each key and value row once for all rows
(vectorised over D); otherwise BLAS GEMMs on the tile, which read any row
stride.

**Half-precision caches.**  A float16 or bfloat16 cache is read as stored
(``CACHE_DTYPES``): the kernels take its bits as ``uint16`` and widen each
page segment of a key tile to float32 into a scratch tile as they reach it
(one table lookup per element, exact), so only the keys in use are read and
no float32 copy of the pool is made.

**Flash-decoding.**  A row tile's visible keys are split into chunks when
there are too few row tiles to keep every thread busy (``Lq = 1``, a single
sequence); each chunk is a task that writes a partial ``(out, lse)``, and a
second kernel merges the chunks of each row tile exactly (the merge of
:mod:`npsparseattn.merge`).  Tasks are dealt to one work list per thread
(:func:`npsparseattn.cpu._schedule.deal`), heaviest first.
"""

from __future__ import annotations

import functools

import numpy as np
from numba import get_num_threads, njit, prange
from numba.extending import overload

from npsparseattn._dtypes import compute_dtype
from npsparseattn.cpu import DTYPES, KINDS
from npsparseattn.cpu._blas import gemm_address, gemm_nn, gemm_nt, single_threaded_blas
from npsparseattn.cpu._jit import kernel
from npsparseattn.cpu._schedule import deal
from npsparseattn.cpu._tiles import (
    FASTMATH,
    LOG2E,
    finish_rows,
    like,
    online_softmax_tile,
    row_address,
    row_stride,
    window_bound,
)
from npsparseattn.cpu._vecmath import maxnum

__all__ = [
    "CACHE_DTYPES",
    "DTYPES",
    "KINDS",
    "STRIDED_ROWS",
    "TOLERANCE",
    "compute_dtype",
    "forward",
    "plan",
    "unsupported",
]

STRIDED_ROWS = True  # pages are read in place through their row stride; q is made contiguous here (it is small)
CACHE_DTYPES = DTYPES  # caches are read as stored: float16/bfloat16 pages are widened tile by tile, never copied
TOLERANCE = {"float16": 2e-3, "bfloat16": 1e-2, "float32": 1e-5, "float64": 1e-10}

KEY_TILE = 256  # keys per step (fewer at a page's end)
QUERY_TILE = 128  # query rows per tile when the GQA group is not folded
SMALL_ROWS = 16  # tiles of at most this many query rows multiply by loops over key rows, larger ones by BLAS
SWEEP_BYTES = 65536  # pages whose per-head slab is smaller are read all heads at once
FOLD_ROWS = 64  # fold a GQA group's G * Lq query rows into one tile up to this many rows
MIN_SPLIT = 1024  # fewest keys in one flash-decoding chunk
TASKS_PER_THREAD = 4  # split keys until there are about this many tasks per thread


def unsupported(problem) -> list[str]:
    """Every KV-cache problem on NumPy arrays is supported."""
    return []


@njit(inline="always", fastmath=FASTMATH)
def _scores_by_rows(q_rows, keys, n, c, s):
    """``s[:R, :n] = c * q_rows @ keys[:n].T`` one key row at a time (each key row read once for all R rows)."""
    for j in range(n):
        key = keys[j]
        for r in range(q_rows.shape[0]):
            query = q_rows[r]
            total = like(0.0, s)
            for d in range(key.shape[0]):
                total += query[d] * key[d]
            s[r, j] = c * total


@njit(inline="always", fastmath=FASTMATH)
def _accumulate_by_rows(p, values, n, rows, acc):
    """``acc[:rows] += p[:rows, :n] @ values[:n]`` one value row at a time."""
    for j in range(n):
        value = values[j]
        for r in range(rows):
            weight = p[r, j]
            acc_row = acc[r]
            for d in range(value.shape[0]):
                acc_row[d] += weight * value[d]


def widening_table(dtype: np.dtype) -> np.ndarray:
    """float32 value of each of the 65536 bit patterns of a 16-bit float ``dtype`` (float16 or bfloat16)."""
    return _widening_table(np.dtype(dtype).name)


@functools.cache
def _widening_table(name: str) -> np.ndarray:
    bits = np.arange(1 << 16, dtype=np.uint32)
    if name == "bfloat16":  # the upper half of a float32
        return (bits << 16).view(np.float32)
    return bits.astype(np.uint16).view(np.float16).astype(np.float32)


def page_rows(cache, page, hk, slot, seg, table, scratch):
    """Rows ``[slot, slot + seg)`` of head ``hk`` of ``page`` as a (seg, X) array in the compute dtype (jitted
    code only): a view of a float32/float64 cache; for the ``uint16`` bits of a float16/bfloat16 cache, those
    rows widened through ``table`` into ``scratch``."""
    raise NotImplementedError("jitted code only")


@overload(page_rows, inline="always")
def _page_rows_overload(cache, page, hk, slot, seg, table, scratch):
    if cache.dtype.bitwidth != 16:
        return lambda cache, page, hk, slot, seg, table, scratch: cache[page, hk, slot : slot + seg]

    def widen(cache, page, hk, slot, seg, table, scratch):
        for r in range(seg):
            src, dst = cache[page, hk, slot + r], scratch[r]
            for d in range(src.shape[0]):
                dst[d] = table[src[d]]
        return scratch[:seg]

    return widen


@njit(inline="always")
def _head_rows(h0, nh, m, group, hk):
    """Query heads ``[hs, he)`` of a tile of heads ``[h0, h0 + nh)`` that read KV head ``hk``, and their first row."""
    hs = max(h0, hk * group)
    he = min(h0 + nh, (hk + 1) * group)
    return hs, he, (hs - h0) * m


@njit(inline="always")
def _tile_scores(gemm, q, q_rows, kc, table, b, h0, nh, i0, m, j0, n, c, s, small, widen, scratch):
    """``s[:rows, :n] = c * Q K^T`` for logical keys ``[j0, j0 + n)``: page segment by segment, and within a
    segment every KV head of the tile in turn (a page's heads are adjacent in memory, so small pages stream).

    ``small``: few rows per KV head (decoding), so the product runs as loops that
    read each key row once for all its rows; otherwise as BLAS GEMMs.  A
    16-bit cache's rows are widened through ``widen`` into ``scratch`` first
    (:func:`page_rows`).
    """
    page_size = kc.shape[2]
    group = q.shape[1] // kc.shape[1]
    col = 0
    while col < n:
        pos = j0 + col
        slot = pos % page_size
        seg = min(n - col, page_size - slot)
        page = table[b, pos // page_size]
        for hk in range(h0 // group, (h0 + nh - 1) // group + 1):
            hs, he, r0 = _head_rows(h0, nh, m, group, hk)
            rows = (he - hs) * m
            keys = page_rows(kc, page, hk, slot, seg, widen, scratch)
            if small:
                _scores_by_rows(q_rows[r0 : r0 + rows], keys, seg, c, s[r0:, col:])
            else:
                gemm_nt(gemm, rows, seg, q.shape[3], c, row_address(q, b, hs, i0), row_stride(q),
                        keys.ctypes.data, keys.strides[0] // keys.itemsize, like(0.0, q),
                        s.ctypes.data + (r0 * s.shape[1] + col) * s.itemsize, s.shape[1])  # fmt: skip
        col += seg


@njit(inline="always")
def _tile_values(gemm, vc, table, b, h0, nh, m, group, j0, n, s, acc, tile_acc, small, widen, scratch):
    """``acc[:rows] += P V`` for the probabilities ``s[:rows, :n]`` of keys ``[j0, j0 + n)``, in the order of
    :func:`_tile_scores`.

    The loops sum the tile into ``tile_acc`` first and add that to ``acc``
    (as a GEMM with ``beta = 1`` does): one rounding per tile, not per key, in
    the running sum of a long cache.
    """
    page_size = vc.shape[2]
    if small:
        tile_acc[: nh * m] = 0
    one = like(1.0, acc)
    col = 0
    while col < n:
        pos = j0 + col
        slot = pos % page_size
        seg = min(n - col, page_size - slot)
        page = table[b, pos // page_size]
        for hk in range(h0 // group, (h0 + nh - 1) // group + 1):
            hs, he, r0 = _head_rows(h0, nh, m, group, hk)
            rows = (he - hs) * m
            values = page_rows(vc, page, hk, slot, seg, widen, scratch)
            if small:
                _accumulate_by_rows(s[r0:, col:], values, seg, rows, tile_acc[r0:])
            else:
                gemm_nn(gemm, rows, vc.shape[3], seg, one, s.ctypes.data + (r0 * s.shape[1] + col) * s.itemsize,
                        s.shape[1], values.ctypes.data, values.strides[0] // values.itemsize, one,
                        acc.ctypes.data + r0 * acc.shape[1] * acc.itemsize, acc.shape[1])  # fmt: skip
        col += seg
    if small:
        for r in range(nh * m):
            acc_row, tile_row = acc[r], tile_acc[r]
            for d in range(acc_row.shape[0]):
                acc_row[d] += tile_row[d]


@kernel(writes=("out", "lse", "part_out", "part_lse"), strided=True)
def _decode_kernel(q, q_flat, kc, vc, widen, seqlens, table, tiles, tasks, order, starts, out, lse, part_out,
                   part_lse, direct, scale, left, right, rows_max, bk, small_rows, gemm):  # fmt: skip
    lq = q.shape[2]
    group = q.shape[1] // kc.shape[1]
    c = like(scale * LOG2E, q)
    scratch_rows = bk if widen.shape[0] else 0
    for w in prange(starts.shape[0] - 1):
        s = np.empty((rows_max, bk), q.dtype)
        acc = np.empty((rows_max, vc.shape[3]), q.dtype)
        tile_acc = np.empty((rows_max, vc.shape[3]), q.dtype)
        k_scratch = np.empty((scratch_rows, kc.shape[3]), q.dtype)
        v_scratch = np.empty((scratch_rows, vc.shape[3]), q.dtype)
        row_max = np.empty(rows_max, q.dtype)
        row_sum = np.empty(rows_max, q.dtype)
        for t in range(starts[w], starts[w + 1]):
            task = order[t]
            tile, k_start, k_stop = tasks[task, 0], tasks[task, 1], tasks[task, 2]
            b, h0, nh, i0, m = tiles[tile, 0], tiles[tile, 1], tiles[tile, 2], tiles[tile, 3], tiles[tile, 4]
            n_keys = seqlens[b]
            off = n_keys - lq
            rows = nh * m
            q_rows = q_flat[b, h0 * lq + i0 : h0 * lq + i0 + rows]
            small = min(nh, group) * m <= small_rows
            acc[:rows] = 0
            row_max[:rows] = -np.inf
            row_sum[:rows] = 0
            for j0 in range(k_start, k_stop, bk):
                n = min(bk, k_stop - j0)
                _tile_scores(gemm, q, q_rows, kc, table, b, h0, nh, i0, m, j0, n, c, s, small, widen, k_scratch)
                for g in range(nh):
                    r0 = g * m
                    online_softmax_tile(s[r0 : r0 + m], m, n, i0, j0, off, left, right, n_keys, row_max[r0 : r0 + m],
                                        row_sum[r0 : r0 + m], acc[r0 : r0 + m])  # fmt: skip
                _tile_values(gemm, vc, table, b, h0, nh, m, group, j0, n, s, acc, tile_acc, small, widen, v_scratch)
            if direct:
                for g in range(nh):
                    r0 = g * m
                    finish_rows(acc[r0:], row_max[r0:], row_sum[r0:], m, out, lse, b, h0 + g, i0)
            else:
                finish_rows(acc, row_max, row_sum, rows, part_out, part_lse, task, 0, 0)


@kernel(writes=("out", "lse"))
def _merge_kernel(tiles, first, part_out, part_lse, out, lse):
    """Merge the chunks ``first[t]:first[t+1]`` of every row tile ``t`` into ``out``/``lse`` (exact, guarded)."""
    for tile in prange(tiles.shape[0]):
        b, h0, nh, i0, m = tiles[tile, 0], tiles[tile, 1], tiles[tile, 2], tiles[tile, 3], tiles[tile, 4]
        for r in range(nh * m):
            h = h0 + r // m
            i = i0 + r % m
            top = like(-np.inf, part_lse)
            for u in range(first[tile], first[tile + 1]):
                top = maxnum(top, part_lse[u, 0, r])
            out_row = out[b, h, i]
            out_row[:] = 0
            if top == -np.inf:
                lse[b, h, i] = -np.inf
                continue
            total = like(0.0, part_lse)
            for u in range(first[tile], first[tile + 1]):
                weight = np.exp(part_lse[u, 0, r] - top)
                total += weight
                part = part_out[u, 0, r]
                for col in range(out_row.shape[0]):
                    out_row[col] += weight * part[col]
            inv = like(1.0, part_lse) / total
            for col in range(out_row.shape[0]):
                out_row[col] *= inv
            lse[b, h, i] = top + np.log(total)


def _row_tiles(batch: int, hq: int, hk: int, lq: int, all_heads: bool) -> np.ndarray:
    """Row tiles ``(b, h0, nh, i0, m)`` (T, 5): every head of a sequence (``all_heads``), whole GQA groups
    when they fit :data:`FOLD_ROWS`, else one head and up to :data:`QUERY_TILE` queries."""
    group = hq // hk
    if all_heads:
        b = np.arange(batch)
        return np.stack([b, np.zeros_like(b), np.full_like(b, hq), np.zeros_like(b), np.full_like(b, lq)], axis=1)
    if group * lq <= FOLD_ROWS:
        b, g = np.divmod(np.arange(batch * hk), hk)
        return np.stack([b, g * group, np.full_like(b, group), np.zeros_like(b), np.full_like(b, lq)], axis=1)
    starts = np.arange(0, lq, QUERY_TILE)
    b, h, t = (x.reshape(-1) for x in np.meshgrid(np.arange(batch), np.arange(hq), starts, indexing="ij"))
    return np.stack([b, h, np.ones_like(b), t, np.minimum(QUERY_TILE, lq - t)], axis=1)


def plan(
    seqlens: np.ndarray,
    batch: int,
    hq: int,
    hk: int,
    lq: int,
    left: int,
    right: int,
    threads: int,
    all_heads: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(tiles, tasks, first, costs)``: row tiles, their key chunks ``(tile, start, stop)``, chunk ranges, costs.

    A row tile's visible keys (the union over its rows under the window) are
    cut into chunks of ``chunk`` keys, a multiple of :data:`KEY_TILE` of at
    least :data:`MIN_SPLIT`, chosen so there are about
    :data:`TASKS_PER_THREAD` tasks per thread.  Chunks of tile ``t`` are
    tasks ``first[t]:first[t+1]``; every tile has at least one.
    """
    tiles = _row_tiles(batch, hq, hk, lq, all_heads).astype(np.int64)
    n_keys = seqlens.astype(np.int64)[tiles[:, 0]]
    off = n_keys - lq
    lo = np.clip(tiles[:, 3] + off - left, 0, n_keys)
    hi = np.clip(tiles[:, 3] + tiles[:, 4] - 1 + off + right + 1, lo, n_keys)
    span = hi - lo
    wanted = -(-int(span.sum()) // (TASKS_PER_THREAD * threads))
    chunk = max(MIN_SPLIT, -(-wanted // KEY_TILE) * KEY_TILE)
    n_chunks = np.maximum(1, -(-span // chunk))
    first = np.zeros(tiles.shape[0] + 1, dtype=np.int64)
    first[1:] = np.cumsum(n_chunks)
    tile = np.repeat(np.arange(tiles.shape[0]), n_chunks)
    start = lo[tile] + (np.arange(tile.shape[0]) - first[tile]) * chunk
    stop = np.minimum(start + chunk, hi[tile])
    tasks = np.stack([tile, start, stop], axis=1)
    rows = tiles[tile, 2] * tiles[tile, 4]
    return tiles, tasks, first, rows * (stop - start) + rows


def forward(
    q: np.ndarray,
    k_cache: np.ndarray,
    v_cache: np.ndarray,
    seqlens: np.ndarray,
    block_table: np.ndarray,
    *,
    scale: float,
    left: int | None,
    right: int | None,
    out: np.ndarray | None = None,
    lse: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Attention of ``q`` over the first ``seqlens[b]`` keys of each sequence's pages.

    Parameters
    ----------
    q : (B, Hq, Lq, D)
        float32 or float64 (copied to C order if it is not: it is small).
    k_cache, v_cache : (P, Hk, page_size, D) and (P, Hk, page_size, Dv)
        Pages, unit stride on the last axis; the dtype of ``q``, or float16 or
        bfloat16 with a float32 ``q`` (read as stored, widened tile by tile).
    seqlens : int32 (B,)
        Keys of each sequence (new tokens already written).
    block_table : int32 (B, max_pages)
        Position ``p`` of sequence ``b`` is slot ``p % page_size`` of page
        ``block_table[b, p // page_size]``.
    scale, left, right :
        Query ``i`` of sequence ``b`` sees key ``j < seqlens[b]`` iff
        ``i+off-left <= j <= i+off+right`` with ``off = seqlens[b] - Lq``.
    out, lse : arrays, optional
        Buffers (B, Hq, Lq, Dv) and (B, Hq, Lq) in the input dtype.

    Returns
    -------
    out : (B, Hq, Lq, Dv), lse : (B, Hq, Lq), in the input dtype.
    """
    batch, hq, lq, _ = q.shape
    hk, dv = k_cache.shape[1], v_cache.shape[3]
    out = np.empty((batch, hq, lq, dv), q.dtype) if out is None else out
    lse = np.empty((batch, hq, lq), q.dtype) if lse is None else lse
    if lq == 0 or batch == 0:
        return out, lse
    q = np.ascontiguousarray(q)
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        if q.dtype != np.float32 or k_cache.dtype != v_cache.dtype or k_cache.itemsize != 2:
            raise TypeError(f"caches of {k_cache.dtype}/{v_cache.dtype} with {q.dtype} queries")
        widen = widening_table(k_cache.dtype)
        k_cache, v_cache = k_cache.view(np.uint16), v_cache.view(np.uint16)
    else:
        widen = np.empty(0, q.dtype)
    left_b, right_b = window_bound(left), window_bound(right)
    # small pages: a tile takes every head of a sequence, so it reads each page's heads in one sweep
    small_pages = k_cache.shape[2] * k_cache.shape[3] * k_cache.itemsize < SWEEP_BYTES and hq * lq <= FOLD_ROWS
    tiles, tasks, first, costs = plan(
        np.asarray(seqlens), batch, hq, hk, lq, left_b, right_b, get_num_threads(), all_heads=small_pages
    )
    rows_max = int((tiles[:, 2] * tiles[:, 4]).max())
    direct = tasks.shape[0] == tiles.shape[0]
    n_parts = 1 if direct else tasks.shape[0]
    part_out = np.empty((n_parts, 1, rows_max, dv), q.dtype)
    part_lse = np.empty((n_parts, 1, rows_max), q.dtype)
    order, starts = deal(costs)
    # the loops over key rows vectorise on C-ordered rows only (pages, or the scratch tiles of a 16-bit cache);
    # other layouts go through BLAS's leading dimension
    contiguous = widen.shape[0] > 0 or (k_cache.flags.c_contiguous and v_cache.flags.c_contiguous)
    small_rows = SMALL_ROWS if contiguous else 0
    with single_threaded_blas():
        _decode_kernel(
            q, q.reshape(batch, hq * lq, q.shape[3]), k_cache, v_cache, widen, seqlens, block_table, tiles, tasks,
            order, starts, out, lse, part_out, part_lse, direct, scale, left_b, right_b, rows_max, KEY_TILE,
            small_rows, gemm_address(q.dtype),
        )  # fmt: skip
        if not direct:
            _merge_kernel(tiles, first, part_out, part_lse, out, lse)
    return out, lse

"""Packed index-driven sparse attention on the CPU (numba): backend ``"numba"`` of ``sparse_attention_varlen``.

The walk of :mod:`npsparseattn.cpu.sparse` on packed sequences: the arrays
are one batch entry ``(1, H, total, X)``, list ``qb_offset[s] + r`` is query
block ``r`` of sequence ``s`` (rows from ``cu_seqlens_q[s] + r * q_block``),
its key blocks count from ``cu_seqlens_k[s]`` and stop at the sequence's
last key, and every task carries its sequence's diagonal offset in packed
positions, ``cu_seqlens_k[s+1] - cu_seqlens_q[s+1]`` (the bottom-right
alignment of each sequence).  dK/dV tiles never cross a sequence boundary.
Short query blocks with grouped-query attention stack the group's heads as
:mod:`npsparseattn.cpu.sparse` does.
"""

from __future__ import annotations

import numpy as np

from npsparseattn._dtypes import compute_dtype
from npsparseattn.cpu import DTYPES, KINDS, _walk
from npsparseattn.cpu._tiles import window_bound
from npsparseattn.cpu._walk import ColumnWalk, RowWalk, balanced_order
from npsparseattn.cpu.block_sparse import chunk_width
from npsparseattn.cpu.sparse import (
    list_entries,
    list_runs,
    segment_sums,
    stack,
    stacks,
    tile_blocks,
    transpose_reuse,
    unstack,
)
from npsparseattn.problems.sparse import query_block_offsets

__all__ = ["DTYPES", "KINDS", "STRIDED_ROWS", "TOLERANCE", "backward", "compute_dtype", "forward", "unsupported"]

STRIDED_ROWS = False  # the packed arrays are made contiguous by the public layer (one copy, O(total * D))
TOLERANCE = {"float16": 2e-3, "bfloat16": 1e-2, "float32": 1e-5, "float64": 1e-10}


def unsupported(problem) -> list[str]:
    """Every packed sparse problem on NumPy arrays is supported."""
    return []


def _lists(cu_q: np.ndarray, cu_k: np.ndarray, q_block: int) -> dict[str, np.ndarray]:
    """Per list of one key head (NQB,): its sequence, query rows and keys, and its sequence's offset."""
    cu_q, cu_k = cu_q.astype(np.int64), cu_k.astype(np.int64)
    first = query_block_offsets(np.diff(cu_q), q_block)
    seq = np.repeat(np.arange(cu_q.size - 1), np.diff(first))
    local = np.arange(seq.size) - first[seq]
    row_lo = cu_q[seq] + local * q_block
    return {
        "seq": seq,
        "row_lo": row_lo,
        "row_hi": np.minimum(row_lo + q_block, cu_q[seq + 1]),
        "key_lo": cu_k[seq],
        "key_hi": cu_k[seq + 1],
        "offset": cu_k[seq + 1] - cu_q[seq + 1],
    }


def _row_walk(kv_idx, kv_cnt, n_heads, lists, q_block, kv_block, stacked, dim, n_keys) -> RowWalk:
    """Tasks over every list of every query head (or key head when ``stacked``)."""
    hk, nqb, slots = kv_idx.shape
    group = n_heads // hk
    heads = hk if stacked > 1 else n_heads
    key_lo, key_hi = np.tile(lists["key_lo"], hk), np.tile(lists["key_hi"], hk)
    index = kv_idx.reshape(hk * nqb, slots), kv_cnt.reshape(hk * nqb)
    run_ptr, start, stop = list_runs(*index, kv_block, key_lo, key_hi)
    keys = segment_sums(stop - start, run_ptr).reshape(hk, nqb)
    head = np.arange(heads)
    kv_head = head // (heads // hk)
    order = balanced_order(keys[kv_head] + 1)
    tasks = np.empty((heads, nqb, 6), np.int64)
    tasks[..., 0] = 0
    tasks[..., 1] = head[:, None]
    tasks[..., 2] = lists["row_lo"][order] * stacked
    tasks[..., 3] = (lists["row_hi"] - lists["row_lo"])[order] * stacked
    tasks[..., 4] = kv_head[:, None] * nqb + order
    tasks[..., 5] = lists["offset"][order]
    return RowWalk(
        tasks=tasks.reshape(-1, 6),
        run_ptr=run_ptr,
        run_start=start,
        run_stop=stop,
        rows=q_block * stacked,
        width=chunk_width(q_block * stacked, dim),
        reuse=transpose_reuse(int(keys.sum()) * q_block * group, hk * n_keys, kv_block),
    )


def _column_walk(kv_idx, kv_cnt, n_heads, lists, cu_q, cu_k, kv_block, stacked, dim) -> ColumnWalk:
    """Tasks over the key tiles of every sequence and key head, with the transposed index as their entries."""
    hk, nqb, slots = kv_idx.shape
    group = n_heads // hk
    blocks = tile_blocks(kv_block)
    tile = blocks * kv_block
    cu_k = cu_k.astype(np.int64)
    tiles_per_seq = -(-np.diff(cu_k) // tile)
    tile_first = np.concatenate([[0], np.cumsum(tiles_per_seq)])
    n_tiles = int(tile_first[-1])
    list_col = (np.arange(hk)[:, None] * n_tiles + tile_first[lists["seq"]][None, :]).reshape(-1)
    ent_ptr, r0, r1, k0, k1 = list_entries(
        kv_idx.reshape(hk * nqb, slots), kv_cnt.reshape(hk * nqb), list_col, hk * n_tiles, blocks, kv_block,
        np.tile(lists["key_lo"], hk), np.tile(lists["key_hi"], hk), np.tile(lists["row_lo"], hk) * stacked,
        np.tile(lists["row_hi"], hk) * stacked,
    )  # fmt: skip
    work = segment_sums((r1 - r0) * (k1 - k0), ent_ptr).reshape(hk, n_tiles)
    seq_of_tile = np.repeat(np.arange(tiles_per_seq.size), tiles_per_seq)
    j0 = cu_k[seq_of_tile] + (np.arange(n_tiles) - tile_first[seq_of_tile]) * tile
    n = np.minimum(tile, cu_k[seq_of_tile + 1] - j0)
    offset_of_seq = cu_k[1:] - cu_q[1:].astype(np.int64)
    order = balanced_order(work + 1)
    tasks = np.empty((hk, n_tiles, 7), np.int64)
    tasks[..., 0] = 0
    tasks[..., 1] = np.arange(hk)[:, None]
    tasks[..., 2] = j0[order]
    tasks[..., 3] = n[order]
    tasks[..., 4] = np.arange(hk)[:, None] * n_tiles + order
    tasks[..., 5] = 0
    tasks[..., 6] = offset_of_seq[seq_of_tile][order]
    first = np.arange(hk) * n_tiles
    pairs = np.stack([first, first + n_tiles, np.zeros(hk, np.int64), np.arange(hk)], 1)
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
    cu_seqlens_q: np.ndarray,
    cu_seqlens_k: np.ndarray,
    kv_idx: np.ndarray,
    kv_cnt: np.ndarray,
    *,
    q_block: int,
    kv_block: int,
    scale: float,
    left: int | None,
    right: int | None,
    out: np.ndarray | None = None,
    lse: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Packed sparse attention forward.

    Parameters
    ----------
    q : (Hq, Tq, D), k : (Hk, Tk, D), v : (Hk, Tk, Dv)
        float32 or float64, one dtype, C-contiguous.
    cu_seqlens_q, cu_seqlens_k : int32 (n_seqs + 1,), validated offsets.
    kv_idx : int32 (Hk, NQB, K), kv_cnt : int32 (Hk, NQB)
        The canonical index, lists sequence after sequence, indices local
        to each sequence.
    q_block, kv_block, scale, left, right :
        As :func:`npsparseattn.cpu.sparse.forward`, with each sequence's own
        offset ``Lk_s - Lq_s``.
    out, lse : arrays, optional
        Buffers (Hq, Tq, Dv) and (Hq, Tq) in the input dtype.

    Returns
    -------
    out : (Hq, Tq, Dv), lse : (Hq, Tq).
    """
    hq, hk = q.shape[0], k.shape[0]
    g = stacks(hq, hk, q_block)
    lists = _lists(cu_seqlens_q, cu_seqlens_k, q_block)
    walk = _row_walk(kv_idx, kv_cnt, hq, lists, q_block, kv_block, g, max(q.shape[2], v.shape[2]), k.shape[1])
    bounds = {"scale": scale, "left": window_bound(left), "right": window_bound(right), "qdiv": g}
    q4 = stack(q[None], hk) if g > 1 else q[None]
    out4, lse4 = _walk.forward(q4, k[None], v[None], walk, **bounds)
    if g > 1:
        out4, lse4 = unstack(out4, hq, None), unstack(lse4, hq, None)
    if out is None:
        return out4[0], lse4[0]
    out[...], lse[...] = out4[0], lse4[0]
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
    kv_idx: np.ndarray,
    kv_cnt: np.ndarray,
    *,
    q_block: int,
    kv_block: int,
    scale: float,
    left: int | None,
    right: int | None,
    grads: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
    scheme: str | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Packed sparse attention backward: ``(dq, dk, dv)`` shaped like ``q``, ``k``, ``v``, deterministic.

    ``dout``/``out`` (Hq, Tq, Dv) and ``lse`` (Hq, Tq) come from
    :func:`forward` with the same offsets, index and options.
    """
    hq = q.shape[0]
    hk = k.shape[0]
    g = stacks(hq, hk, q_block)
    dim = max(q.shape[2], v.shape[2])
    lists = _lists(cu_seqlens_q, cu_seqlens_k, q_block)
    rows = _row_walk(kv_idx, kv_cnt, hq, lists, q_block, kv_block, g, dim, k.shape[1])
    columns = _column_walk(kv_idx, kv_cnt, hq, lists, cu_seqlens_q, cu_seqlens_k, kv_block, g, dim)
    bounds = {"scale": scale, "left": window_bound(left), "right": window_bound(right), "qdiv": g, "scheme": scheme}
    q4, dout4, out4, lse4 = q[None], dout[None], out[None], lse[None]
    if g > 1:
        q4, dout4, out4, lse4 = (stack(x, hk) for x in (q4, dout4, out4, lse4))
    dq4, dk4, dv4 = _walk.backward(dout4, q4, k[None], v[None], out4, lse4, rows, columns, **bounds)
    dq = unstack(dq4, hq, None)[0] if g > 1 else dq4[0]
    if grads is None:
        return dq, dk4[0], dv4[0]
    for buf, grad in zip(grads, (dq, dk4[0], dv4[0])):
        buf[...] = grad
    return grads

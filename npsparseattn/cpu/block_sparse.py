"""Block-sparse attention on the CPU (numba), forward and backward: backend ``"numba"`` of ``block_sparse_attention``.

The work is proportional to the stored blocks of a :class:`BlockLayout`.  The
layout becomes a walk of ``cpu/_walk.py`` (the kernels it shares with the
index-driven ``sparse_attention``):

* forward and dQ, one task per (batch, query head, query block): the row's
  *runs* of consecutive stored key blocks, in key positions; each run
  (clipped to the keys the causal/window mask leaves visible to the block,
  cut into chunks of at most ``width`` keys, :func:`chunk_width`) is one
  score GEMM, one online-softmax update and one ``P @ V`` GEMM.  Merging
  runs keeps BLAS on wide tiles for 64-key blocks; runs of blocks shorter
  than :data:`~npsparseattn.cpu._walk.GATHER_BELOW` keys are gathered into
  contiguous tiles.
* dK/dV, one task per (batch, key head, key block) over the layout's
  transpose (CSC): the runs of query blocks that attend the key block, for
  every query head of the GQA group.  The backward runs in one pass (one
  task per (batch, key head) over its key blocks, dQ accumulated in place)
  when the (batch, key head) pairs, weighed by their stored blocks, keep the
  threads busy, else in two (dK/dV by key blocks, then dQ by query blocks).

Causal/window masks apply inside blocks through the shared tile helpers; a run
that the mask empties costs nothing.  Tasks are visited heaviest-first in
zigzag order so numba's contiguous thread chunks get similar work.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from npsparseattn._dtypes import compute_dtype
from npsparseattn.cpu import DTYPES, KINDS, _walk
from npsparseattn.cpu._scores import backward_mods, jit_functions_only, kernel_mods
from npsparseattn.cpu._tiles import window_bound
from npsparseattn.cpu._walk import ColumnWalk, RowWalk, balanced_order
from npsparseattn.cpu.exact import GEMM_VOLUME
from npsparseattn.layouts import BlockLayout, MaskModLayout
from npsparseattn.merge import merge_states
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
STRIDED_ROWS = False  # as cpu/exact.py: one compiled kernel per dtype, non-contiguous inputs copied
TOLERANCE = {"float16": 2e-3, "bfloat16": 1e-2, "float32": 1e-5, "float64": 1e-10}


def unsupported(problem) -> list[str]:
    """Every block-sparse problem on NumPy arrays is supported; a ``score_mod``/``mask_mod`` must be compiled by
    numba."""
    return jit_functions_only(problem.mods)


def chunk_width(block: int, dim: int) -> int:
    """Most keys (forward, dQ) or queries (dK/dV) one product takes beside a ``block``-sized side: the tile
    products stay within :data:`~npsparseattn.cpu.exact.GEMM_VOLUME` multiply-adds, a multiple of 32, 32 to 256."""
    return max(32, min(256, GEMM_VOLUME // (block * max(dim, 1)) // 32 * 32))


def _row_order(layout: BlockLayout) -> np.ndarray:
    """(layout heads, nqb) visiting order of the query blocks, by stored blocks per row."""
    return balanced_order(np.diff(layout.indptr).reshape(layout.heads, layout.n_query_blocks))


def _column_order(layout: BlockLayout, n_heads: int, n_kv_heads: int) -> np.ndarray:
    """(key heads, nkb) visiting order of the key blocks, by stored blocks over each GQA group."""
    per_column = np.diff(layout.transpose().indptr).reshape(layout.heads, layout.n_key_blocks)
    per_head = np.broadcast_to(per_column, (n_heads, layout.n_key_blocks))
    return balanced_order(per_head.reshape(n_kv_heads, n_heads // n_kv_heads, layout.n_key_blocks).sum(axis=1))


def _reuse(layout: BlockLayout, seq_q: int, group: int) -> int:
    """Query rows that read a key on average: the layout's density times ``Lq``, times the GQA group."""
    return int(layout.density * seq_q) * group


def _group_costs(layout: BlockLayout, n_heads: int, n_kv_heads: int) -> np.ndarray:
    """Stored blocks of each key head's group of query heads: the work of one one-pass backward task."""
    per_head = np.broadcast_to(np.diff(layout.indptr).reshape(layout.heads, -1).sum(axis=1), (n_heads,))
    return per_head.reshape(n_kv_heads, n_heads // n_kv_heads).sum(axis=1)


def row_walk(layout: BlockLayout, n_batch: int, n_heads: int, n_kv_heads: int, dim: int, offset: int) -> RowWalk:
    """The forward/dQ walk of ``layout``: one task per (batch, query head, query block), in balanced order."""
    (bq, bk), (lq, lk) = layout.block, layout.seq
    nqb = layout.n_query_blocks
    run_ptr, start, stop = layout.runs()
    order = _row_order(layout)
    head = np.arange(n_heads)
    lhead = head if layout.heads > 1 else np.zeros_like(head)
    r = np.broadcast_to(order[lhead], (n_batch, n_heads, nqb))
    tasks = np.empty((n_batch, n_heads, nqb, 6), np.int64)
    tasks[..., 0] = np.arange(n_batch)[:, None, None]
    tasks[..., 1] = head[None, :, None]
    tasks[..., 2] = r * bq
    tasks[..., 3] = np.minimum(bq, lq - r * bq)
    tasks[..., 4] = lhead[None, :, None] * nqb + r
    tasks[..., 5] = offset
    return RowWalk(
        tasks=tasks.reshape(-1, 6),
        run_ptr=run_ptr,
        run_start=start * bk,
        run_stop=np.minimum(stop * bk, lk),
        rows=bq,
        width=chunk_width(bq, dim),
        reuse=_reuse(layout, lq, n_heads // n_kv_heads),
    )


def column_walk(layout: BlockLayout, n_batch: int, n_heads: int, n_kv_heads: int, dim: int, offset: int) -> ColumnWalk:
    """The dK/dV walk of ``layout``: one task per (batch, key head, key block) over the layout's transpose."""
    (bq, bk), (lq, lk) = layout.block, layout.seq
    nkb = layout.n_key_blocks
    group = n_heads // n_kv_heads
    col_ptr, start, stop = layout.transpose().runs()
    column = np.repeat(np.arange(col_ptr.size - 1), np.diff(col_ptr))
    key_block = column % max(nkb, 1)
    c = np.broadcast_to(_column_order(layout, n_heads, n_kv_heads), (n_batch, n_kv_heads, nkb))
    tasks = np.empty((n_batch, n_kv_heads, nkb, 7), np.int64)
    tasks[..., 0] = np.arange(n_batch)[:, None, None]
    tasks[..., 1] = np.arange(n_kv_heads)[None, :, None]
    tasks[..., 2] = c * bk
    tasks[..., 3] = np.minimum(bk, lk - c * bk)
    per_head = layout.heads > 1
    tasks[..., 4] = (np.arange(n_kv_heads)[None, :, None] * group * nkb if per_head else 0) + c
    tasks[..., 5] = nkb if per_head else 0
    tasks[..., 6] = offset
    first = np.arange(n_batch * n_kv_heads) * nkb
    pairs = np.stack(
        [first, first + nkb, np.repeat(np.arange(n_batch), n_kv_heads), np.tile(np.arange(n_kv_heads), n_batch)],
        axis=1,
    )
    return ColumnWalk(
        tasks=tasks.reshape(-1, 7),
        pairs=pairs,
        pair_costs=np.tile(_group_costs(layout, n_heads, n_kv_heads), n_batch),
        ent_ptr=col_ptr,
        ent_r0=start * bq,
        ent_r1=np.minimum(stop * bq, lq),
        ent_k0=key_block * bk,
        ent_k1=np.minimum(key_block * bk + bk, lk),
        cols=bk,
        width=chunk_width(bk, dim),
    )


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
    mods: ScoreMods | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Block-sparse attention forward on canonical 4-D arrays.

    Parameters
    ----------
    q : (B, Hq, Lq, D), k : (B, Hk, Lk, D), v : (B, Hk, Lk, Dv)
        float32 or float64, one dtype, C-contiguous.
    layout : BlockLayout
        ``seq == (Lq, Lk)`` and ``heads`` 1 or Hq (checked by the caller).
    scale, offset, left, right :
        As :func:`npsparseattn.cpu.exact.forward`: query ``i`` sees key
        ``j`` of a stored block iff ``i+offset-left <= j <= i+offset+right``
        (``offset`` is ``Lk - Lq``, as the layout's geometry).
    out, lse : arrays, optional
        Buffers (B, Hq, Lq, Dv) and (B, Hq, Lq) in the input dtype.
    mods : ScoreMods, optional
        Score modifications applied inside the stored blocks (``cpu/_scores.py``).

    Returns
    -------
    out : (B, Hq, Lq, Dv), lse : (B, Hq, Lq); rows with no visible stored key get 0 and ``-inf``.
    """
    n_batch, hq, lq, _ = q.shape
    bounds = {"left": window_bound(left), "right": window_bound(right)}
    parts = mask_mod_parts(layout, mods)
    buffers = {"out": out, "lse": lse} if len(parts) == 1 else {}
    results = []
    for part, part_mods in parts:
        walk = row_walk(part, n_batch, hq, k.shape[1], max(q.shape[3], v.shape[3]), offset)
        kmods = kernel_mods(part_mods, q.dtype, (n_batch, hq, lq, k.shape[2]))
        results.append(_walk.forward(q, k, v, walk, scale=scale, mods=kmods, **buffers, **bounds))
    if len(results) == 1:
        return results[0]
    merged = merge_states(*results[0], *results[1])
    return _store(merged[0], out), _store(merged[1].astype(q.dtype, copy=False), lse)


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
    mods: ScoreMods | None = None,
    dbias: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Block-sparse attention backward on canonical 4-D arrays.

    ``dout``/``out`` (B, Hq, Lq, Dv) and ``lse`` (B, Hq, Lq) come from
    :func:`forward` with the same layout and options; ``grads`` optionally
    gives the ``(dq, dk, dv)`` buffers.  Returns ``(dq, dk, dv)`` shaped like
    ``q``, ``k``, ``v``; ``dk``/``dv`` are summed over each GQA group.
    ``scheme`` (``"one-pass"`` or ``"two-pass"``) overrides the choice of
    :func:`~npsparseattn.cpu.exact.backward_scheme`; both are deterministic.
    ``mods``/``dbias`` as :func:`npsparseattn.cpu.exact.backward`.
    """
    n_batch, hq, lq, _ = q.shape
    hk = k.shape[1]
    dim = max(q.shape[3], v.shape[3])
    bounds = {"left": window_bound(left), "right": window_bound(right)}
    total = None
    for part, part_mods in mask_mod_parts(layout, mods):  # the parts split the keys: their gradients add up
        rows = row_walk(part, n_batch, hq, hk, dim, offset)
        columns = column_walk(part, n_batch, hq, hk, dim, offset)
        kmods, kmods_q = backward_mods(part_mods, q.dtype, (n_batch, hq, lq, k.shape[2]), dbias)
        result = _walk.backward(dout, q, k, v, out, lse, rows, columns, scale=scale, scheme=scheme, mods=kmods,
                                mods_q=kmods_q, grads=grads if total is None else None, **bounds)  # fmt: skip
        if total is None:
            total = result
        else:
            for acc, part_grad in zip(total, result, strict=True):
                acc += part_grad
    return total


def mask_mod_parts(layout: BlockLayout, mods: ScoreMods | None) -> list[tuple[BlockLayout, ScoreMods | None]]:
    """The layouts to run, each with its modifications: FlexAttention's split of a :class:`MaskModLayout`.

    With a ``mask_mod`` and a layout from :func:`~npsparseattn.layouts.from_mask_mod`, the
    stored blocks the predicate fills (``layout.full``) run without it, and only the partial
    ones evaluate it per score; the two results are merged exactly (``merge_states``; in the
    backward the gradients of the two key sets add up).  The full flags are trusted, as a
    FlexAttention block mask's are: build the layout from the same ``mask_mod``.  Otherwise
    the layout runs whole.
    """
    if mods is None or mods.mask_mod is None or not isinstance(layout, MaskModLayout) or not layout.full.any():
        return [(layout, mods)]
    unmasked = replace(mods, mask_mod=None)
    full = _sub_layout(layout, layout.full)
    if layout.full.all():
        return [(full, unmasked if unmasked.features() else None)]
    return [(full, unmasked if unmasked.features() else None), (_sub_layout(layout, ~layout.full), mods)]


def _sub_layout(layout: BlockLayout, keep: np.ndarray) -> BlockLayout:
    """The stored blocks of ``layout`` where ``keep`` (one bool per stored block) holds."""
    rows = np.repeat(np.arange(layout.indptr.shape[0] - 1), np.diff(layout.indptr))
    counts = np.bincount(rows[keep], minlength=layout.indptr.shape[0] - 1)
    indptr = np.concatenate([[0], np.cumsum(counts)])
    return BlockLayout(indptr, layout.indices[keep], layout.block, layout.seq, layout.heads)


def _store(x: np.ndarray, buffer: np.ndarray | None) -> np.ndarray:
    if buffer is None:
        return x
    buffer[...] = x
    return buffer

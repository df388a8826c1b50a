"""The canonical sparse index as the block-sparse GPU kernels walk it: runs of a layout with one row per query head.

Both GPU backends run ``sparse_attention`` on their block-sparse kernels
(:mod:`npsparseattn.cuda.cupy_raw.block_sparse`,
:mod:`npsparseattn.cuda.numba_cuda.block_sparse`).  Those walk a CSR layout
whose rows are per query head (``lheads = Hq``) and shared by the batch, as
int32 *runs* of consecutive blocks ``(ptr, start, stop)``, and the runs of
its transpose for dK/dV.  The index of ``sparse_attention`` is per (batch,
key head, query block), so the batch folds into the heads: q ``(B, Hq, Lq,
D)`` is read as ``(1, B*Hq, Lq, D)`` and k, v as ``(1, B*Hk, Lk, .)``; query
head ``b*Hq + h`` then reads key head ``(b*Hq + h) // G = b*Hk + h // G``
(``G = Hq // Hk``), the GQA pairing of the unfolded problem, and its layout
row is list ``(b, h // G, r)``.

:func:`index_runs` builds both run sets from the canonical index
(:mod:`npsparseattn.problems.sparse`: each list's valid blocks ascending
first, ``-1`` after) with array operations of the index's own module (CuPy on
the device that holds it, NumPy under the simulator and the host emulation):
no copy of the index to the host, no loop over heads or lists.  The transpose
is a sort of one int64 key per selected block, ``(row, query block)``, which
is unique because a list names a block at most once.

>>> import numpy as np
>>> kv_idx = np.array([[[[0, 2], [1, -1]]]], np.int32)     # (B, Hk, nqb, K) = (1, 1, 2, 2)
>>> runs = index_runs(kv_idx, hq=2, n_key_blocks=3)       # two query heads share the lists
>>> [a.tolist() for a in runs.rows]                        # row h * nqb + r: blocks [start, stop)
[[0, 2, 3, 5, 6], [0, 2, 1, 0, 2, 1], [1, 3, 2, 1, 3, 2]]
>>> [a.tolist() for a in runs.columns]                     # row h * nkb + c: query blocks that chose c
[[0, 1, 2, 3, 4, 5, 6], [0, 1, 0, 0, 1, 0], [1, 2, 1, 1, 2, 1]]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

INT32_LIMIT = 2**31 - 1
MIN_BLOCK = 16
"""The smallest ``q_block`` and ``kv_block`` the GPU backends take: the block-sparse kernels cover a block with
tiles of 16 to 64 query rows or keys, so smaller blocks would leave most of every tile idle."""

Runs = tuple[Any, Any, Any]


@dataclass(frozen=True)
class IndexRuns:
    """A sparse index as a block-sparse layout on the device: ``rows`` (forward, dQ) and ``columns`` (dK/dV).

    ``heads`` is ``B * Hq`` (one layout row set per folded query head),
    ``block`` ``(q_block, kv_block)``; the attributes the GPU drivers read of
    a :class:`~npsparseattn.layouts.BlockLayout`.
    """

    rows: Runs
    columns: Runs
    heads: int
    block: tuple[int, int]
    n_query_blocks: int
    n_key_blocks: int

    def device_runs(self, transposed: bool) -> Runs:
        """int32 ``(ptr, start, stop)`` of the rows, or of the transpose's rows if ``transposed``."""
        return self.columns if transposed else self.rows


def _module(x: Any) -> Any:
    if isinstance(x, np.ndarray):
        return np
    import cupy

    return cupy


def block_reasons(problem: Any) -> list[str]:
    """Why the block-sparse GPU kernels cannot take the :class:`~npsparseattn.problems.sparse.SparseProblem`
    ``problem``: blocks below :data:`MIN_BLOCK` (token mode ``kv_block=1`` and one list per query ``q_block=1``
    among them), or more rows or selected blocks over all ``B * Hq`` query heads than int32 indexes."""
    reasons = []
    sizes = (("q_block", problem.q_block, "query rows", "one list per query"),
             ("kv_block", problem.kv_block, "keys", "token mode"))  # fmt: skip
    for name, size, what, mode in sizes:
        if size < MIN_BLOCK:
            reasons.append(
                f"{name}={size}{f' ({mode})' if size == 1 else ''} is below {MIN_BLOCK}: the GPU kernels of "
                f"sparse_attention are the block-sparse ones, which give each block tiles of 16 to 64 {what}, so most "
                f"of every tile would stay idle; no GPU kernel gathers small blocks into tiles yet (backend 'numba' "
                f"does, on the CPU)"
            )
    n_batch, _, nqb, slots = problem.kv_idx.shape
    hq = problem.dense.q.shape[1]
    largest = n_batch * hq * max(nqb * max(slots, 1), problem.n_key_blocks)
    if largest >= INT32_LIMIT:
        reasons.append(f"{largest} layout rows or selected blocks over all B * Hq query heads exceed int32")
    return reasons


def _runs(values: Any, first: Any, last: Any, row_of_first: Any, n_rows: int, xp: Any) -> Runs:
    """int32 ``(ptr, start, stop)``: a run from ``values[first]`` to ``values[last] + 1`` in row ``row_of_first``."""
    ptr = xp.zeros(n_rows + 1, np.int32)
    if row_of_first.size:
        ptr[1:] = xp.cumsum(xp.bincount(row_of_first, minlength=n_rows))
    start = xp.ascontiguousarray(values[first], dtype=np.int32)
    stop = xp.ascontiguousarray(values[last] + 1, dtype=np.int32)
    return ptr, start, stop


def index_runs(kv_idx: Any, *, hq: int, n_key_blocks: int, q_block: int = 1, kv_block: int = 1) -> IndexRuns:
    """The runs of the canonical index ``kv_idx`` int32 (B, Hk, nqb, K) with the batch folded into ``B * hq`` heads.

    Row ``(b * hq + h) * nqb + r`` of :attr:`IndexRuns.rows` holds the runs
    of consecutive key blocks of list ``(b, h // G, r)``; row ``(b * hq + h)
    * n_key_blocks + c`` of :attr:`IndexRuns.columns` the runs of consecutive
    query blocks whose list (for that head) names key block ``c``, ascending.
    The arrays are of ``kv_idx``'s module, on its device.
    """
    xp = _module(kv_idx)
    n_batch, hk, nqb, slots = kv_idx.shape
    group = hq // hk if hk else 1
    heads = n_batch * hq
    lists = xp.broadcast_to(kv_idx[:, :, None], (n_batch, hk, group, nqb, slots)).reshape(heads, nqb, slots)
    valid = lists >= 0
    # rows: a run starts where a block does not follow its slot's predecessor and ends where its successor does
    # not follow it (canonical lists: the valid blocks ascending first, -1 after, so -1 never continues a run)
    edge = xp.full((heads, nqb, 1), -2, lists.dtype)
    before = xp.concatenate([edge, lists[..., :-1]], axis=-1)
    after = xp.concatenate([lists[..., 1:], edge], axis=-1)
    first = valid & (lists != before + 1)
    last = valid & (after != lists + 1)
    row = xp.broadcast_to(xp.arange(heads * nqb, dtype=np.int64).reshape(heads, nqb, 1), lists.shape)
    rows = _runs(lists, first, last, row[first], heads * nqb, xp)
    # columns: one key per selected block, (head * nkb + block) * nqb + query block, sorted
    query_block = xp.arange(nqb, dtype=np.int64).reshape(1, nqb, 1)
    head = xp.arange(heads, dtype=np.int64).reshape(heads, 1, 1)
    keys = xp.sort(((head * n_key_blocks + lists) * nqb + query_block)[valid])
    column, r = keys // max(nqb, 1), keys % max(nqb, 1)
    new = xp.ones(keys.shape, bool)
    new[1:] = (column[1:] != column[:-1]) | (r[1:] != r[:-1] + 1)
    ends = xp.ones(keys.shape, bool)
    ends[:-1] = new[1:]
    columns = _runs(r, new, ends, column[new], heads * n_key_blocks, xp)
    return IndexRuns(rows, columns, heads, (q_block, kv_block), nqb, n_key_blocks)


def runs_for(q: Any, k: Any, kv_idx: Any, q_block: int, kv_block: int) -> IndexRuns:
    """:func:`index_runs` of ``kv_idx`` for ``q`` (B, Hq, Lq, D) and ``k`` (B, Hk, Lk, D), the index moved to
    ``q``'s array kind (the caller selects ``q``'s device)."""
    n_key_blocks = -(-k.shape[2] // kv_block)
    return index_runs(
        on_device_of(q, kv_idx), hq=q.shape[1], n_key_blocks=n_key_blocks, q_block=q_block, kv_block=kv_block
    )


def on_device_of(like: Any, x: Any) -> Any:
    """``x`` on the device that holds ``like``: itself, or a copy made there (call inside ``with like.device``)."""
    if isinstance(x, np.ndarray) or x.device.id == like.device.id:
        return x
    return x.copy()  # CuPy copies an array of another device to the current one


def fold(x: Any) -> Any:
    """``x`` (B, H, ...) as (1, B*H, ...): a view of a C-contiguous array, which the kernels then write in place."""
    return x.reshape((1, x.shape[0] * x.shape[1]) + tuple(x.shape[2:]))


def fold_buffer(x: Any) -> Any:
    """A caller's output buffer folded (:func:`fold`) if the kernels can write it in place, else None."""
    return fold(x) if x is not None and x.flags.c_contiguous else None


def unfold(result: Any, target: Any, buffer: Any, shape: tuple[int, ...]) -> Any:
    """A folded kernel ``result`` as ``shape``: ``result`` reshaped if the caller gave no ``target``; ``target``
    itself if the kernels wrote it through its folded view ``buffer`` (:func:`fold_buffer`); else ``target``
    after a copy of the result into it."""
    if target is None:
        return result.reshape(shape)
    if result is not buffer or buffer is None:
        target[...] = result.reshape(shape)
    return target

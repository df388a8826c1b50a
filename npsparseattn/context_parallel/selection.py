"""Which key blocks each query block needs: the sparse input of context-parallel attention.

Context parallelism skips work and communication by asking one question of
a sparse pattern: *for the query blocks of this range of the global
sequence, which key blocks of that range are selected?*  A
:class:`KeyBlockSelection` answers it with :meth:`~KeyBlockSelection.blocks`
(arrays of selected ``(head, query block, key block)``), and turns the answer
into what the sparse kernels of :attr:`~KeyBlockSelection.operation` read
for one call (:meth:`~KeyBlockSelection.kernel_argument`).  Everything else
(which rank pairs need anything, what is sent at each step, which calls
run) is derived from those two methods, so any source of block indices can
plug in:

* :class:`LayoutSelection` wraps a :class:`~npsparseattn.layouts.BlockLayout`
  over the global sequence (the kernels of ``block_sparse_attention``);
* a selection over ``sparse_attention``'s ``kv_idx`` arrays (issue 20) has
  the same two methods: ``blocks`` reads the rows of ``kv_idx`` of the query
  blocks in range and keeps the indices in range (``-1`` dropped, the union
  over batch entries, key heads mapped to their query heads), and
  ``kernel_argument`` slices ``kv_idx`` to those rows and shifts the indices
  to the call's first key block.

Ranges are global token ranges aligned to the block grid (their starts are
multiples of the block sizes), which the sharding guarantees
(``shard(..., block=)``).
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from npsparseattn.layouts import BlockLayout

Range = tuple[int, int]


class KeyBlockSelection(Protocol):
    """The sparse pattern over the whole sequence, as context-parallel attention reads it."""

    block: tuple[int, int]
    """``(bq, bk)``: block edges in query and key tokens."""
    heads: int
    """1 (one pattern for every query head) or the number of query heads."""
    operation: str
    """The registry operation whose kernels take :meth:`kernel_argument` (e.g. ``"block_sparse_attention"``)."""

    def blocks(self, q_range: Range, k_range: Range, heads: range) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Selected blocks of the query blocks of ``q_range`` among the key blocks of ``k_range``.

        ``heads``: the global query heads of the call.  Returns int64 arrays
        ``(head, qb, kb)``: ``head`` indexes ``heads`` (always 0 for a pattern
        shared by every head), ``qb``/``kb`` are global block numbers.
        """
        ...

    def kernel_argument(
        self, q_range: Range, k_range: Range, heads: range, chosen: tuple[np.ndarray, np.ndarray, np.ndarray]
    ) -> Any:
        """What the sparse kernels read for one call over ``q_range x k_range``, restricted to ``chosen`` blocks."""
        ...


class LayoutSelection:
    """A :class:`~npsparseattn.layouts.BlockLayout` over the global sequence as a :class:`KeyBlockSelection`.

    >>> from npsparseattn import layouts
    >>> sel = LayoutSelection(layouts.sliding_window(64, 8, (8, 0)))    # 8 blocks, each sees itself and the one before
    >>> head, qb, kb = sel.blocks((16, 32), (0, 24), range(2))           # query blocks 2-3, key blocks 0-2
    >>> list(zip(qb.tolist(), kb.tolist()))
    [(2, 1), (2, 2), (3, 2)]
    >>> sel.kernel_argument((16, 32), (0, 24), range(2), (head, qb, kb)).to_dense()[0].astype(int)
    array([[0, 1, 1],
           [0, 0, 1]])
    """

    operation = "block_sparse_attention"

    def __init__(self, layout: BlockLayout):
        self.layout = layout
        self.block = layout.block
        self.heads = layout.heads

    def blocks(self, q_range: Range, k_range: Range, heads: range) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        (bq, bk), nqb = self.block, self.layout.n_query_blocks
        r0, r1 = q_range[0] // bq, -(-q_range[1] // bq)
        c0, c1 = k_range[0] // bk, -(-k_range[1] // bk)
        indptr, indices = self.layout.indptr, self.layout.indices
        found = []
        for h, head in enumerate(heads if self.heads > 1 else range(1)):
            lo, hi = indptr[head * nqb + r0], indptr[head * nqb + r1]
            counts = np.diff(indptr[head * nqb + r0 : head * nqb + r1 + 1])
            qb = np.repeat(np.arange(r0, r1, dtype=np.int64), counts)
            kb = indices[lo:hi]
            keep = (kb >= c0) & (kb < c1)
            found.append((np.full(int(keep.sum()), h, dtype=np.int64), qb[keep], kb[keep].astype(np.int64)))
        return tuple(np.concatenate(parts) for parts in zip(*found))  # type: ignore[return-value]

    def kernel_argument(
        self, q_range: Range, k_range: Range, heads: range, chosen: tuple[np.ndarray, np.ndarray, np.ndarray]
    ) -> BlockLayout:
        """The call's own :class:`BlockLayout`: rows of ``q_range``, columns of ``k_range``, the ``chosen`` blocks."""
        (bq, bk) = self.block
        r0, r1 = q_range[0] // bq, -(-q_range[1] // bq)
        c0 = k_range[0] // bk
        n_heads = len(heads) if self.heads > 1 else 1
        head, qb, kb = chosen
        rows = head * (r1 - r0) + (qb - r0)
        order = np.lexsort((kb, rows))
        counts = np.bincount(rows, minlength=n_heads * (r1 - r0))
        indptr = np.concatenate([[0], np.cumsum(counts)])
        seq = (q_range[1] - q_range[0], k_range[1] - k_range[0])
        return BlockLayout(indptr, kb[order] - c0, block=self.block, seq=seq, heads=n_heads)

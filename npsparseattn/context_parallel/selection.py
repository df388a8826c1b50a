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
* :class:`IndexSelection` wraps ``sparse_attention``'s ``kv_idx`` (and
  ``kv_cnt``) over the global sequence (the kernels of ``sparse_attention``):
  ``blocks`` reads the rows of ``kv_idx`` of the query blocks in range and
  keeps the indices in range (``-1`` and the slots past ``kv_cnt`` dropped,
  the union over batch entries, key heads mapped to their query heads), and
  ``kernel_argument`` slices ``kv_idx`` to those rows and the call's key
  heads, shifts the indices to the call's first key block, sets the entries
  outside the chosen blocks to ``-1`` and recounts ``kv_cnt`` (the canonical
  index the kernels read, :mod:`npsparseattn.problems.sparse`).

The engine calls ``module.forward(q, k, v, *args, **kernel_options, scale=,
offset=, left=, right=)`` (and ``backward`` with ``dout, q, k, v, out, lse``
first) of the operation's implementation, where ``args`` is the value of
:meth:`~KeyBlockSelection.kernel_argument` (a tuple is spread, anything else
passed as one argument).

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
    kernel_options: dict[str, Any]
    """Keywords the operation's kernels take besides the visibility ones (e.g. the block sizes)."""

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
        """What the sparse kernels read for one call over ``q_range x k_range``, restricted to ``chosen`` blocks.

        A tuple is spread into the kernels' positional arguments after the
        arrays; anything else is passed as one argument.
        """
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
        self.kernel_options: dict[str, Any] = {}
        self.layout = layout
        self.block = layout.block
        self.heads = layout.heads

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LayoutSelection) and self.layout == other.layout

    __hash__ = None  # type: ignore[assignment]

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


class IndexSelection:
    """``sparse_attention``'s ``kv_idx`` (and ``kv_cnt``) over the global sequence as a :class:`KeyBlockSelection`.

    Parameters
    ----------
    kv_idx : integer array (B, Hk, ceil(L / q_block), K)
        Checked indices (``-1`` or a key block of the whole sequence, no
        block twice in one list; :func:`~npsparseattn.problems.sparse.canonical_index`
        checks them); any order.
    kv_cnt : integer array (B, Hk, nqb) or None
        Slots in use at the front of each list (default: every slot).
    q_block, kv_block : int
    heads : int
        The query heads ``Hq`` (a multiple of ``Hk``); query head ``h`` reads
        the lists of key head ``h // (Hq // Hk)``.
    xp : module
        The array module of the kernels' index arrays (``numpy`` or ``cupy``).

    >>> idx = np.array([[[[0, 1], [1, -1], [2, 0]]]])     # B=1, Hk=1, 3 query blocks of 8, K=2
    >>> sel = IndexSelection(idx, None, 8, 4, heads=2)     # key blocks of 4
    >>> head, qb, kb = sel.blocks((8, 24), (0, 8), range(2))
    >>> list(zip(head.tolist(), qb.tolist(), kb.tolist()))
    [(0, 1, 1), (0, 2, 0), (1, 1, 1), (1, 2, 0)]
    >>> kv_idx, kv_cnt = sel.kernel_argument((8, 24), (4, 8), range(2), sel.blocks((8, 24), (4, 8), range(2)))
    >>> kv_idx[0, 0].tolist(), kv_cnt.tolist()                # block 1 is the call's block 0
    ([[0], [-1]], [[[1, 0]]])
    """

    operation = "sparse_attention"

    def __init__(self, kv_idx: Any, kv_cnt: Any, q_block: int, kv_block: int, *, heads: int, xp: Any = np):
        idx = np.asarray(kv_idx, dtype=np.int64)
        slots = np.arange(idx.shape[-1])
        counted = slots < (idx.shape[-1] if kv_cnt is None else np.asarray(kv_cnt)[..., None])
        valid = counted & (idx >= 0)
        ordered = np.sort(np.where(valid, idx, _UNUSED), axis=-1)
        ordered[ordered == _UNUSED] = -1
        self.kv_idx = ordered  # canonical: each list's blocks ascending first, -1 after
        self.kv_cnt = valid.sum(axis=-1)
        self.block = (int(q_block), int(kv_block))
        self.kernel_options = {"q_block": int(q_block), "kv_block": int(kv_block)}
        self.heads = int(heads)
        self.group = self.heads // idx.shape[1]
        self.xp = xp

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, IndexSelection)
            and (self.block, self.heads) == (other.block, other.heads)
            and np.array_equal(self.kv_idx, other.kv_idx)
        )

    __hash__ = None  # type: ignore[assignment]

    def _ranges(self, q_range: Range, k_range: Range) -> tuple[int, int, int, int]:
        (bq, bk) = self.block
        return q_range[0] // bq, -(-q_range[1] // bq), k_range[0] // bk, -(-k_range[1] // bk)

    def blocks(self, q_range: Range, k_range: Range, heads: range) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        r0, r1, c0, c1 = self._ranges(q_range, k_range)
        rows = self.kv_idx[:, :, r0:r1]
        _, kh, qb, _ = np.nonzero((rows >= c0) & (rows < c1))
        kb = rows[(rows >= c0) & (rows < c1)]
        n_rows, n_cols = r1 - r0, c1 - c0
        pairs = np.unique((kh * n_rows + qb) * n_cols + (kb - c0))  # the union over batch entries, by key head
        kh, rest = np.divmod(pairs, n_rows * n_cols)
        bounds = np.searchsorted(kh, np.arange(self.kv_idx.shape[1] + 1))
        found = []
        for h, head in enumerate(heads):
            part = rest[bounds[head // self.group] : bounds[head // self.group + 1]]
            found.append((np.full(part.size, h, dtype=np.int64), part // n_cols + r0, part % n_cols + c0))
        if not found:
            return tuple(np.zeros(0, np.int64) for _ in range(3))  # type: ignore[return-value]
        return tuple(np.concatenate(parts) for parts in zip(*found))  # type: ignore[return-value]

    def kernel_argument(
        self, q_range: Range, k_range: Range, heads: range, chosen: tuple[np.ndarray, np.ndarray, np.ndarray]
    ) -> tuple[Any, Any]:
        """The call's canonical ``(kv_idx, kv_cnt)``: its rows and key heads, indices from its first key block.

        Entries outside ``chosen`` (outside the key range, or blocks the
        masks empty) become ``-1`` and ``kv_cnt`` counts the rest.
        """
        r0, r1, c0, c1 = self._ranges(q_range, k_range)
        first, last = heads[0] // self.group, heads[-1] // self.group
        rows = self.kv_idx[:, first : last + 1, r0:r1]
        _, qb, kb = chosen
        n_cols = c1 - c0
        local = rows - c0
        inside = (rows >= c0) & (rows < c1)
        code = np.arange(r1 - r0)[:, None] * n_cols + local
        keep = inside & np.isin(code, (qb - r0) * n_cols + (kb - c0))
        ordered = np.sort(np.where(keep, local, _UNUSED), axis=-1)
        count = keep.sum(axis=-1)
        ordered = ordered[..., : max(1, int(count.max(initial=0)))]
        ordered[ordered == _UNUSED] = -1
        xp = self.xp
        return xp.asarray(ordered.astype(np.int32)), xp.asarray(count.astype(np.int32))


_UNUSED = np.iinfo(np.int64).max

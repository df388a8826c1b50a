"""Block-sparse layouts: which (query block, key block) pairs attention computes.

A :class:`BlockLayout` is a CSR matrix over blocks.  The query sequence is cut
into blocks of ``bq`` tokens and the key sequence into blocks of ``bk`` tokens
(the last block of each may be partial); row ``h * nqb + r`` lists, sorted, the
key blocks that query block ``r`` of head ``h`` attends.  A layout with
``heads=1`` serves every head.

Token geometry shared by every builder (the conventions of
:func:`npsparseattn.attention`): query ``i`` sits at key position
``p = i + (Lk - Lq)`` (bottom-right alignment), and a *window*
``(left, right)`` of tokens lets query ``i`` see keys
``p - left <= j <= p + right``.  A builder defined by a token-level rule stores
exactly the blocks that contain at least one pair the rule allows, so passing
the same ``causal``/``window`` to :func:`npsparseattn.block_sparse_attention`
gives the token-exact pattern.

Builders, each drawn in its docstring (``#`` stored block, ``.`` absent):
:func:`dense`, :func:`causal`, :func:`sliding_window`, :func:`strided`,
:func:`fixed`, :func:`longformer`, :func:`bigbird`, :func:`topk` (content
routing), :func:`from_block_mask`, :func:`from_token_mask`, :func:`from_mask_mod`,
:func:`from_scipy`; combine with :func:`union`, :func:`intersect`,
:func:`stack`; export with :func:`to_scipy`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from os import PathLike
from typing import Any

import numpy as np

from npsparseattn._checks import check_flag, check_int, check_window, is_int
from npsparseattn._dtypes import FLOAT_DTYPES
from npsparseattn._topk import select_topk_blocks

Pair = int | tuple[int, int]
Window = int | tuple[int | None, int | None] | None

_CHUNK_CELLS = 1 << 20  # block-grid cells evaluated at once by the pattern builders
MAX_SEQ = (1 << 40) - 1  # longest sequence a layout describes
MAX_CELLS = 1 << 32  # most (query block, key block) cells, over all heads, a builder evaluates


def _pair(value: Any, name: str, minimum: int) -> tuple[int, int]:
    """An int (used for queries and keys) or a pair ``(query, key)`` of ints in ``[minimum, MAX_SEQ]``."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise TypeError(f"{name} must be an int or a pair (query, key) of ints, got {value!r}")
        pair = check_int(value[0], f"{name}[0]", minimum), check_int(value[1], f"{name}[1]", minimum)
    elif is_int(value):
        size = check_int(value, name, minimum)
        pair = size, size
    else:
        raise TypeError(f"{name} must be an int or a pair (query, key) of ints, got {value!r}")
    if max(pair) > MAX_SEQ:
        raise ValueError(f"{name} must be at most 2**40 - 1 tokens, got {value!r}")
    return pair


def _index_array(value: Any, name: str) -> np.ndarray:
    """A read-only 1-D int64 copy of an integer array."""
    if value is None or isinstance(value, (str, bytes, dict, set)):
        raise TypeError(f"{name} must be a 1-D integer array, got {value!r}")
    arr = np.asarray(value)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.dtype.kind not in "iu" and not (arr.size == 0 and arr.dtype.kind in "fb"):
        raise TypeError(f"{name} must be an integer array, got dtype {arr.dtype.name}")
    arr = np.array(arr, dtype=np.int64)
    arr.flags.writeable = False
    return arr


def _blocks(length: int, size: int) -> int:
    return -(-length // size)


class BlockLayout:
    """CSR block layout: row ``h * nqb + r`` lists the key blocks of query block ``r``, head ``h``.

    Parameters
    ----------
    indptr : integer array, shape (heads * nqb + 1,)
        Row pointers: row ``t`` is ``indices[indptr[t]:indptr[t + 1]]``;
        ``nqb = ceil(Lq / bq)``.
    indices : integer array, shape (nnz,)
        Key block numbers in ``[0, nkb)``, ``nkb = ceil(Lk / bk)``, sorted
        and unique within each row.
    block : int or (bq, bk)
        Block edge in query and key tokens.
    seq : int or (Lq, Lk)
        Query and key sequence lengths; the last block of each may be partial.
    heads : int
        1 (one layout for every head) or the number of query heads (one
        layout per head, stacked).

    Every rule is checked (``TypeError``/``ValueError`` naming the argument,
    the value and the expectation); arrays are copied and read-only.

    Examples
    --------
    >>> from npsparseattn.layouts import BlockLayout
    >>> lay = BlockLayout([0, 1, 3], [0, 0, 1], block=64, seq=100)
    >>> lay
    BlockLayout(seq=(100, 100), block=(64, 64), heads=1, grid=2x2, nnz=3, density=75.0%)
    >>> lay.to_dense()[0].astype(int)
    array([[1, 0],
           [1, 1]])
    """

    __slots__ = ("_block", "_cache", "_heads", "_indices", "_indptr", "_seq")

    def __init__(self, indptr: Any, indices: Any, block: Pair, seq: Pair, heads: int = 1) -> None:
        block = _pair(block, "block", 1)
        seq = _pair(seq, "seq", 0)
        heads = check_int(heads, "heads", 1)
        indptr = _index_array(indptr, "indptr")
        indices = _index_array(indices, "indices")
        _check_csr(indptr, indices, block, seq, heads)
        self._init(indptr, indices, block, seq, heads)

    def _init(self, indptr, indices, block, seq, heads) -> None:
        self._indptr, self._indices = indptr, indices
        self._block, self._seq, self._heads = block, seq, heads
        self._cache: dict[str, Any] = {}

    @classmethod
    def _trusted(cls, indptr, indices, block, seq, heads) -> BlockLayout:
        """Build from arrays known to be valid (the transpose of a valid layout)."""
        layout = cls.__new__(cls)
        for arr in (indptr, indices):
            arr.flags.writeable = False
        layout._init(indptr, indices, block, seq, heads)
        return layout

    indptr = property(lambda self: self._indptr, doc="Row pointers, int64 (heads * nqb + 1,).")
    indices = property(lambda self: self._indices, doc="Key block of each stored block, int64 (nnz,).")
    block = property(lambda self: self._block, doc="(bq, bk): block edge in query and key tokens.")
    seq = property(lambda self: self._seq, doc="(Lq, Lk): sequence lengths.")
    heads = property(lambda self: self._heads, doc="1 (shared by all heads) or the number of query heads.")

    @property
    def n_query_blocks(self) -> int:
        """``nqb = ceil(Lq / bq)``."""
        return _blocks(self._seq[0], self._block[0])

    @property
    def n_key_blocks(self) -> int:
        """``nkb = ceil(Lk / bk)``."""
        return _blocks(self._seq[1], self._block[1])

    @property
    def shape(self) -> tuple[int, int]:
        """Shape of the CSR matrix: ``(heads * nqb, nkb)``."""
        return self._heads * self.n_query_blocks, self.n_key_blocks

    @property
    def nnz(self) -> int:
        """Number of stored blocks (over all heads)."""
        return int(self._indices.size)

    @property
    def density(self) -> float:
        """Stored blocks over all blocks of the grid (0 for an empty grid)."""
        rows, cols = self.shape
        return self.nnz / (rows * cols) if rows * cols else 0.0

    def to_dense(self) -> np.ndarray:
        """Block mask, bool (heads, nqb, nkb)."""
        rows, cols = self.shape
        mask = np.zeros((rows, cols), dtype=bool)
        mask[np.repeat(np.arange(rows), np.diff(self._indptr)), self._indices] = True
        return mask.reshape(self._heads, self.n_query_blocks, cols)

    def to_token_mask(self) -> np.ndarray:
        """Token mask, bool (heads, Lq, Lk): ``True`` where the pair lies in a stored block."""
        (bq, bk), (lq, lk) = self._block, self._seq
        return self.to_dense().repeat(bq, axis=1).repeat(bk, axis=2)[:, :lq, :lk]

    def transpose(self) -> BlockLayout:
        """The CSC form as a layout of the transposed problem (keys attend queries); cached.

        Row ``h * nkb + c`` lists the query blocks that attend key block ``c``
        in head ``h``; ``block`` and ``seq`` are swapped.  The backward walks
        it to accumulate dK and dV one key block at a time.

        >>> from npsparseattn import layouts
        >>> layouts.causal(3 * 16, 16).transpose().to_dense()[0].astype(int)
        array([[1, 1, 1],
               [0, 1, 1],
               [0, 0, 1]])
        """
        cached = self._cache.get("transpose")
        if cached is None:
            nqb, (rows, cols) = self.n_query_blocks, self.shape
            row_of = np.repeat(np.arange(rows), np.diff(self._indptr))
            key = (row_of // max(nqb, 1)) * cols + self._indices
            order = np.argsort(key, kind="stable")
            indptr = np.zeros(self._heads * cols + 1, dtype=np.int64)
            np.cumsum(np.bincount(key, minlength=self._heads * cols), out=indptr[1:])
            indices = (row_of % max(nqb, 1))[order]
            cached = BlockLayout._trusted(indptr, indices, self._block[::-1], self._seq[::-1], self._heads)
            cached._cache["transpose"] = self
            self._cache["transpose"] = cached
        return cached

    def runs(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Runs of consecutive stored blocks per row, as CSR; cached.

        Returns ``(run_ptr, start, stop)``: row ``t`` holds the runs
        ``start[run_ptr[t]:run_ptr[t+1]]`` to ``stop[...]`` (key blocks
        ``[start, stop)``).  The kernels multiply a whole run with one GEMM.

        >>> from npsparseattn.layouts import BlockLayout
        >>> BlockLayout([0, 4], [0, 1, 2, 5], block=1, seq=(1, 6)).runs()
        (array([0, 2]), array([0, 5]), array([3, 6]))
        """
        cached = self._cache.get("runs")
        if cached is None:
            indptr, indices = self._indptr, self._indices
            new = np.ones(indices.size, dtype=bool)
            new[1:] = indices[1:] != indices[:-1] + 1
            new[indptr[:-1][indptr[:-1] < indices.size]] = True
            first = np.flatnonzero(new)
            last = np.append(first[1:], indices.size)[: first.size] - 1
            run_ptr = np.searchsorted(first, indptr).astype(np.int64)
            cached = (run_ptr, indices[first], indices[last] + 1)
            for arr in cached:
                arr.flags.writeable = False
            self._cache["runs"] = cached
        return cached

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, BlockLayout):
            return NotImplemented
        return (
            self._block == other._block
            and self._seq == other._seq
            and self._heads == other._heads
            and np.array_equal(self._indptr, other._indptr)
            and np.array_equal(self._indices, other._indices)
        )

    def __hash__(self) -> int:
        return hash((self._block, self._seq, self._heads, self._indptr.tobytes(), self._indices.tobytes()))

    def __repr__(self) -> str:
        return (
            f"BlockLayout(seq={self._seq}, block={self._block}, heads={self._heads}, "
            f"grid={self.n_query_blocks}x{self.n_key_blocks}, nnz={self.nnz}, density={self.density:.1%})"
        )

    def _coarse(self, head: int, cells: int) -> tuple[np.ndarray, int]:
        """Fraction of stored blocks in square groups of ``f`` x ``f`` blocks, at most ``cells`` per side."""
        head = check_int(head, "head", 0)
        if head >= self._heads:
            raise ValueError(f"head must be < heads={self._heads}, got {head}")
        nqb, nkb = self.n_query_blocks, self.n_key_blocks
        f = max(1, _blocks(max(nqb, nkb), cells))
        gr, gc = _blocks(nqb, f), _blocks(nkb, f)
        lo, hi = self._indptr[head * nqb], self._indptr[(head + 1) * nqb]
        rows = np.repeat(np.arange(nqb), np.diff(self._indptr[head * nqb : (head + 1) * nqb + 1]))
        counts = np.bincount((rows // f) * gc + self._indices[lo:hi] // f, minlength=gr * gc).reshape(gr, gc)
        row_sizes = np.minimum(f, nqb - f * np.arange(gr))
        col_sizes = np.minimum(f, nkb - f * np.arange(gc))
        return counts / np.outer(row_sizes, col_sizes), f

    def to_ascii(self, *, head: int = 0, width: int = 64) -> str:
        """A picture for the terminal: one character per block, query blocks down, key blocks across.

        ``#`` stored, ``.`` absent.  Grids wider than ``width`` are shrunk: a
        character then covers ``f`` x ``f`` blocks and shows ``#`` (all
        stored), ``+`` (some) or ``.`` (none).

        >>> from npsparseattn import layouts
        >>> print(layouts.causal(4 * 16, 16).to_ascii())
        4 x 4 blocks of 16 x 16 tokens, 10 stored (62.5%)
        #...
        ##..
        ###.
        ####
        """
        width = check_int(width, "width", 1)
        frac, f = self._coarse(head, width)
        (bq, bk), nqb, nkb = self._block, self.n_query_blocks, self.n_key_blocks
        per_head = self.nnz if self._heads == 1 else int(self._indptr[(head + 1) * nqb] - self._indptr[head * nqb])
        title = f"{nqb} x {nkb} blocks of {bq} x {bk} tokens, {per_head} stored ({per_head / max(nqb * nkb, 1):.1%})"
        if self._heads > 1:
            title = f"head {head} of {self._heads}: " + title
        if f > 1:
            title += f"; 1 char = {f} x {f} blocks"
        chars = np.where(frac >= 1, "#", np.where(frac > 0, "+", "."))
        return "\n".join([title] + ["".join(row) for row in chars])

    def plot(
        self, path: str | PathLike[str], *, head: int = 0, title: str | None = None, size: float = 3.2, dpi: int = 100
    ) -> None:
        """Draw the layout of one head to a PNG file (needs matplotlib).

        Axes are in tokens (query position down, key position across), so
        partial last blocks are drawn at their true size.  Grids larger than
        512 blocks a side are shaded by the fraction of blocks stored.

        >>> from npsparseattn import layouts
        >>> layouts.bigbird(4096, 64).plot("bigbird.png")  # doctest: +SKIP
        """
        try:
            from matplotlib.colors import LinearSegmentedColormap
            from matplotlib.figure import Figure
        except ImportError as exc:
            raise ImportError(
                "BlockLayout.plot needs matplotlib: pip install 'npsparseattn[plot]' (or pip install matplotlib)"
            ) from exc
        frac, f = self._coarse(head, 512)
        (bq, bk), (lq, lk) = self._block, self._seq
        y = np.minimum(np.arange(frac.shape[0] + 1) * f * bq, lq)
        x = np.minimum(np.arange(frac.shape[1] + 1) * f * bk, lk)
        fig = Figure(figsize=(size, size), dpi=dpi)
        ax = fig.subplots()
        edges = {"edgecolors": "white", "linewidth": 0.4} if max(frac.shape) <= 64 else {}
        cmap = LinearSegmentedColormap.from_list("stored", ["white", "#08306b"])
        ax.pcolormesh(x, y, frac, cmap=cmap, vmin=0, vmax=1, **edges)
        ax.set_xlim(0, lk)
        ax.set_ylim(lq, 0)
        ax.set_aspect("equal" if lq == lk else "auto")
        ax.set_xlabel("key position", fontsize=8)
        ax.set_ylabel("query position", fontsize=8)
        ax.xaxis.set_label_position("top")
        ax.xaxis.tick_top()
        ax.tick_params(labelsize=7)
        fig.suptitle(title if title is not None else f"density {self.density:.1%}", fontsize=9)
        fig.tight_layout()
        fig.savefig(path)


def _check_csr(indptr, indices, block, seq, heads) -> None:
    (bq, bk), (lq, lk) = block, seq
    nqb, nkb = _blocks(lq, bq), _blocks(lk, bk)
    rows = heads * nqb
    if indptr.size != rows + 1:
        raise ValueError(
            f"indptr must have heads * ceil(Lq/bq) + 1 = {rows + 1} entries for heads={heads}, seq={seq}, "
            f"block={block}; got {indptr.size}"
        )
    if indptr[0] != 0:
        raise ValueError(f"indptr must start at 0, got {indptr[0]}")
    drops = np.flatnonzero(np.diff(indptr) < 0)
    if drops.size:
        t = drops[0]
        raise ValueError(f"indptr must be non-decreasing; indptr[{t}]={indptr[t]} > indptr[{t + 1}]={indptr[t + 1]}")
    if indptr[-1] != indices.size:
        raise ValueError(f"indptr[-1] must equal len(indices) = {indices.size}, got {indptr[-1]}")

    def where(p: int) -> str:
        t = int(np.searchsorted(indptr, p, side="right")) - 1
        return f"row {t} (head {t // nqb}, query block {t % nqb})"

    outside = np.flatnonzero((indices < 0) | (indices >= nkb))
    if outside.size:
        p = outside[0]
        raise ValueError(
            f"indices must lie in [0, {nkb}) (key blocks of Lk={lk} with bk={bk}); {where(p)} has {indices[p]}"
        )
    unordered = np.diff(indices) <= 0
    starts = indptr[1:-1]
    unordered[starts[(starts >= 1) & (starts < indices.size)] - 1] = False
    bad = np.flatnonzero(unordered)
    if bad.size:
        p = bad[0] + 1
        raise ValueError(
            f"indices must be sorted and unique within each row; {where(p)} has {indices[p]} after {indices[p - 1]}"
        )


class _Grid:
    """Token extents of the blocks of a (seq, block) pair, for the pattern builders."""

    def __init__(self, seq: Any, block: Any, heads: int = 1) -> None:
        (self.lq, self.lk), (self.bq, self.bk) = _pair(seq, "seq", 0), _pair(block, "block", 1)
        self.seq, self.block = (self.lq, self.lk), (self.bq, self.bk)
        self.nqb, self.nkb = _blocks(self.lq, self.bq), _blocks(self.lk, self.bk)
        self.off = self.lk - self.lq
        cells = heads * self.nqb * self.nkb
        if cells > MAX_CELLS:
            raise ValueError(
                f"a layout of {heads} x {self.nqb} x {self.nkb} blocks (seq={self.seq}, block={self.block}) "
                f"is too large to build (more than 2**32 cells); use larger blocks"
            )

    def span_blocks(self) -> int:
        """A count of key blocks that reaches across every (query, key) distance of this grid."""
        return -(-(self.lq + self.lk) // self.bk) + 1

    def positions(self, r0: int, r1: int) -> tuple[np.ndarray, np.ndarray]:
        """First and last aligned key position ``i + Lk - Lq`` of query blocks ``r0..r1-1`` (columns)."""
        i0 = np.arange(r0, r1, dtype=np.int64)[:, None] * self.bq
        return i0 + self.off, np.minimum(i0 + self.bq, self.lq) - 1 + self.off

    def keys(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Block number, first and one-past-last key of every key block (rows)."""
        c = np.arange(self.nkb, dtype=np.int64)[None, :]
        return c, c * self.bk, np.minimum(c * self.bk + self.bk, self.lk)

    def key_blocks(self, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Key blocks ``[first, stop)`` touched by token ranges ``[lo, hi]`` (inclusive, clipped to the keys)."""
        lo, hi = np.maximum(lo, 0), np.minimum(hi, self.lk - 1)
        empty = lo > hi
        return np.where(empty, 0, lo // self.bk), np.where(empty, 0, hi // self.bk + 1)

    def window_blocks(self, left: int | None, right: int | None) -> tuple[np.ndarray, np.ndarray]:
        """Per query block, the key blocks ``[first, stop)`` a token window touches."""
        plo, phi = (x[:, 0] for x in self.positions(0, self.nqb))
        lo = plo - left if left is not None else np.zeros_like(plo)
        hi = phi + right if right is not None else np.full_like(phi, self.lk - 1)
        return self.key_blocks(lo, hi)

    def from_ranges(self, first: np.ndarray, stop: np.ndarray) -> BlockLayout:
        counts = np.maximum(stop - first, 0)
        indptr = np.concatenate([[0], np.cumsum(counts)])
        indices = np.arange(indptr[-1]) - np.repeat(indptr[:-1] - first, counts)
        return BlockLayout(indptr, indices, self.block, self.seq)

    def from_rule(self, rule: Callable[[int, int], np.ndarray]) -> BlockLayout:
        """Layout from ``rule(r0, r1) -> bool (r1 - r0, nkb)``, evaluated on row chunks of the block grid."""
        step = max(1, _CHUNK_CELLS // max(self.nkb, 1))
        counts, indices = [], []
        for r0 in range(0, self.nqb, step):
            r1 = min(r0 + step, self.nqb)
            rows, cols = np.nonzero(rule(r0, r1))
            counts.append(np.bincount(rows, minlength=r1 - r0))
            indices.append(cols)
        indptr = np.concatenate([[0], np.cumsum(np.concatenate(counts))]) if counts else np.zeros(1, np.int64)
        return BlockLayout(indptr, np.concatenate(indices) if indices else [], self.block, self.seq)

    def global_columns(self, global_blocks: Any) -> np.ndarray:
        """Bool (nkb,) marking the global key blocks (negative numbers count from the end).

        With no keys there are no blocks, and the numbers are only type-checked.
        """
        if isinstance(global_blocks, (str, bytes)) or not isinstance(global_blocks, Sequence | np.ndarray):
            raise TypeError(f"global_blocks must be a sequence of key block numbers, got {global_blocks!r}")
        flags = np.zeros(self.nkb, dtype=bool)
        for g in global_blocks:
            g = check_int(g, "global_blocks entry", -self.nkb if self.nkb else -(1 << 62))
            if not self.nkb:
                continue
            if g >= self.nkb:
                raise ValueError(f"global_blocks entries must lie in [-{self.nkb}, {self.nkb}) (key blocks), got {g}")
            flags[g] = True
        return flags

    def window_and_global(self, window: Window, global_blocks: Any) -> Callable[[int, int], np.ndarray]:
        """Rule of :func:`longformer`: window, global key blocks, and global query blocks (full rows)."""
        left, right = _window(window)
        first, stop = self.window_blocks(left, right)
        glob = self.global_columns(global_blocks)
        cum = np.concatenate([[0], np.cumsum(glob)])

        def rule(r0: int, r1: int) -> np.ndarray:
            c = self.keys()[0]
            plo, phi = self.positions(r0, r1)
            lo, hi = self.key_blocks(plo, phi)
            global_row = cum[hi] > cum[lo]
            return ((c >= first[r0:r1, None]) & (c < stop[r0:r1, None])) | glob[None, :] | global_row

        return rule


def _window(window: Window) -> tuple[int | None, int | None]:
    """An int ``w`` (``(w, w)``), a pair ``(left, right)`` with ``None`` unbounded, or ``None`` (no limit)."""
    if is_int(window):
        w = check_int(window, "window", 0)
        return check_window((w, w), False)
    return check_window(window, False)


def dense(seq: Pair, block: Pair) -> BlockLayout:
    """Every block: with the same ``causal``/``window``, block-sparse attention equals :func:`attention`.

    >>> print(dense(4 * 16, 16).to_ascii())
    4 x 4 blocks of 16 x 16 tokens, 16 stored (100.0%)
    ####
    ####
    ####
    ####
    """
    return sliding_window(seq, block, None)


def causal(seq: Pair, block: Pair) -> BlockLayout:
    """Blocks holding a pair with ``j <= i + Lk - Lq`` (the causal mask, aligned bottom-right).

    Pass ``causal=True`` to the attention call as well to mask inside the
    diagonal blocks.

    >>> print(causal((6 * 16, 8 * 16), 16).to_ascii())
    6 x 8 blocks of 16 x 16 tokens, 33 stored (68.8%)
    ###.....
    ####....
    #####...
    ######..
    #######.
    ########
    """
    return sliding_window(seq, block, (None, 0))


def sliding_window(seq: Pair, block: Pair, window: Window) -> BlockLayout:
    """Blocks touched by a token window: query ``i`` sees ``p - left <= j <= p + right``, ``p = i + Lk - Lq``.

    ``window`` is an int ``w`` (the same as ``(w, w)``), a pair
    ``(left, right)`` (``None`` on a side: unbounded) or ``None`` (dense).
    The meaning is that of ``window=`` in :func:`npsparseattn.attention`;
    pass the same window there for the token-exact band, or leave it out to
    attend whole blocks (``window=(bk, bk)`` on aligned blocks is BigBird's
    three-block window).

    >>> print(sliding_window(8 * 16, 16, (32, 0)).to_ascii())
    8 x 8 blocks of 16 x 16 tokens, 21 stored (32.8%)
    #.......
    ##......
    ###.....
    .###....
    ..###...
    ...###..
    ....###.
    .....###
    """
    grid = _Grid(seq, block)
    return grid.from_ranges(*grid.window_blocks(*_window(window)))


def strided(seq: Pair, block: Pair, stride: int, *, causal: bool = True) -> BlockLayout:
    """Sparse Transformer *strided* pattern (Child et al. 2019): a local band plus every stride-th block.

    With ``l = stride * bk`` tokens and ``d = i + Lk - Lq - j``, query ``i``
    sees key ``j`` iff ``0 <= d <= l`` (the band) or ``d >= 0`` and
    ``d mod l == 0`` (the stride); ``causal=False`` drops ``d >= 0``
    (``|d| <= l`` or ``d mod l == 0``).  On aligned blocks, query block
    ``r`` keeps key blocks ``r-stride .. r`` and every ``r - m*stride``.

    >>> print(strided(8 * 16, 16, 3).to_ascii())
    8 x 8 blocks of 16 x 16 tokens, 28 stored (43.8%)
    #.......
    ##......
    ###.....
    ####....
    .####...
    ..####..
    #..####.
    .#..####
    """
    grid = _Grid(seq, block)
    # a stride longer than every distance adds nothing to the band: the same pattern as the span
    length = min(check_int(stride, "stride", 1), grid.span_blocks()) * grid.bk
    check_flag(causal, "causal")

    def rule(r0: int, r1: int) -> np.ndarray:
        _, j0, j1 = grid.keys()
        plo, phi = grid.positions(r0, r1)
        dlo, dhi = plo - (j1 - 1), phi - j0
        if causal:
            dlo = np.maximum(dlo, 0)
            band = dlo <= np.minimum(dhi, length)
        else:
            band = np.maximum(dlo, -length) <= np.minimum(dhi, length)
        return band | (-(-dlo // length) * length <= dhi)

    return grid.from_rule(rule)


def fixed(seq: Pair, block: Pair, stride: int, *, summary: int = 1, causal: bool = True) -> BlockLayout:
    """Sparse Transformer *fixed* pattern: the own segment plus the last ``summary`` blocks of every segment.

    Segments are ``l = stride * bk`` keys long.  Query ``i`` (key position
    ``p = i + Lk - Lq``) sees key ``j`` iff ``floor(j/l) == floor(p/l)`` or
    ``j mod l >= l - summary * bk`` (a summary position), and ``j <= p``
    when ``causal``.

    >>> print(fixed(8 * 16, 16, 3, summary=1).to_ascii())
    8 x 8 blocks of 16 x 16 tokens, 22 stored (34.4%)
    #.......
    ##......
    ###.....
    ..##....
    ..###...
    ..####..
    ..#..##.
    ..#..###
    """
    grid = _Grid(seq, block)
    stride = check_int(stride, "stride", 1)
    summary = check_int(summary, "summary", 0)
    if summary > stride:
        raise ValueError(f"summary must be <= stride ({stride} blocks per segment), got {summary}")
    check_flag(causal, "causal")
    span = grid.span_blocks()
    if stride > span:
        # one segment holds every position either way; summary blocks start at block stride - summary
        stride, summary = span, span - min(stride - summary, span)
    length = stride * grid.bk

    def rule(r0: int, r1: int) -> np.ndarray:
        c, j0, _ = grid.keys()
        plo, phi = grid.positions(r0, r1)
        seg = (c // stride) * length
        own = np.maximum(plo, seg) <= np.minimum(phi, seg + length - 1)
        mask = own | (c % stride >= stride - summary)
        return mask & (j0 <= phi) if causal else mask

    return grid.from_rule(rule)


def longformer(seq: Pair, block: Pair, window: Window, *, global_blocks: Sequence[int] = (0,)) -> BlockLayout:
    """Longformer (Beltagy et al. 2020): a sliding window plus global blocks, symmetric.

    ``window`` as in :func:`sliding_window` (tokens).  Every query attends
    the key blocks in ``global_blocks`` (negative numbers count from the
    end), and the query blocks at those positions (aligned as
    ``i + Lk - Lq``) attend every key.

    >>> print(longformer(8 * 16, 16, 16, global_blocks=[0]).to_ascii())
    8 x 8 blocks of 16 x 16 tokens, 34 stored (53.1%)
    ########
    ###.....
    ####....
    #.###...
    #..###..
    #...###.
    #....###
    #.....##
    """
    grid = _Grid(seq, block)
    return grid.from_rule(grid.window_and_global(window, global_blocks))


def bigbird(
    seq: Pair,
    block: Pair,
    *,
    window: Window = None,
    global_blocks: Sequence[int] = (0, -1),
    random_blocks: int = 3,
    seed: int | None = 0,
    heads: int = 1,
) -> BlockLayout:
    """BigBird (Zaheer et al. 2020): window + global + ``random_blocks`` random key blocks per query block.

    Window and global blocks as in :func:`longformer`; ``window=None`` means
    ``(bk, bk)``, the paper's three-block window on aligned blocks.  Each
    query block that is not global then draws ``random_blocks`` further key
    blocks uniformly among those the window and global blocks left out (all
    of them if fewer remain).  The draw is made with
    ``numpy.random.default_rng(seed)``, so a seed reproduces the layout;
    ``heads > 1`` draws a different pattern per head.

    >>> print(bigbird(8 * 16, 16, random_blocks=1, seed=0).to_ascii())
    8 x 8 blocks of 16 x 16 tokens, 50 stored (78.1%)
    ########
    ###...##
    ####.#.#
    #.####.#
    ##.###.#
    ##..####
    ##...###
    ########
    """
    heads = check_int(heads, "heads", 1)
    grid = _Grid(seq, block, heads)
    random_blocks = check_int(random_blocks, "random_blocks", 0)
    if seed is not None:
        check_int(seed, "seed", 0)
    base = grid.from_rule(grid.window_and_global((grid.bk, grid.bk) if window is None else window, global_blocks))
    rng = np.random.default_rng(seed)
    counts, indices = [], []
    for _ in range(heads):
        for r in range(grid.nqb):
            cols = base.indices[base.indptr[r] : base.indptr[r + 1]]
            free = np.ones(grid.nkb, dtype=bool)
            free[cols] = False
            candidates = np.flatnonzero(free)
            picks = rng.choice(candidates, size=min(random_blocks, candidates.size), replace=False)
            row = np.union1d(cols, picks)
            counts.append(row.size)
            indices.append(row)
    indptr = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
    flat = np.concatenate(indices) if indices else np.zeros(0, np.int64)
    return BlockLayout(indptr, flat, grid.block, grid.seq, heads)


def from_block_mask(mask: Any, block: Pair, seq: Pair | None = None) -> BlockLayout:
    """Layout from a block mask, bool (nqb, nkb) or (heads, nqb, nkb).

    ``seq`` defaults to whole blocks, ``(nqb * bq, nkb * bk)``; when given,
    ``ceil(Lq/bq)`` and ``ceil(Lk/bk)`` must match the mask.

    >>> import numpy as np
    >>> print(from_block_mask(np.eye(3, dtype=bool), 16).to_ascii())
    3 x 3 blocks of 16 x 16 tokens, 3 stored (33.3%)
    #..
    .#.
    ..#
    """
    mask = _bool_array(mask, "mask")
    bq, bk = _pair(block, "block", 1)
    heads, nqb, nkb = mask.shape
    if seq is None:
        seq = (nqb * bq, nkb * bk)
    lq, lk = _pair(seq, "seq", 0)
    if (_blocks(lq, bq), _blocks(lk, bk)) != (nqb, nkb):
        raise ValueError(
            f"mask has {nqb} x {nkb} blocks but seq={(lq, lk)} with block={(bq, bk)} needs "
            f"{_blocks(lq, bq)} x {_blocks(lk, bk)}"
        )
    rows, cols = np.nonzero(mask.reshape(heads * nqb, nkb))
    indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=heads * nqb))])
    return BlockLayout(indptr, cols, (bq, bk), (lq, lk), heads)


def from_token_mask(mask: Any, block: Pair) -> BlockLayout:
    """Layout of the blocks a token mask touches: bool (Lq, Lk) or (heads, Lq, Lk) -> ``seq=(Lq, Lk)``.

    Pass the token mask's own rule (``causal``/``window``) to the attention
    call to stay token-exact inside the blocks.

    >>> import numpy as np
    >>> print(from_token_mask(np.tri(40, dtype=bool), 16).to_ascii())
    3 x 3 blocks of 16 x 16 tokens, 6 stored (66.7%)
    #..
    ##.
    ###
    """
    mask = _bool_array(mask, "mask")
    bq, bk = _pair(block, "block", 1)
    heads, lq, lk = mask.shape
    nqb, nkb = _blocks(lq, bq), _blocks(lk, bk)
    padded = np.zeros((heads, nqb * bq, nkb * bk), dtype=bool)
    padded[:, :lq, :lk] = mask
    blocks = padded.reshape(heads, nqb, bq, nkb, bk).any(axis=(2, 4))
    return from_block_mask(blocks, (bq, bk), (lq, lk))


def _bool_array(mask: Any, name: str) -> np.ndarray:
    arr = np.asarray(mask)
    if arr.dtype != bool:
        raise TypeError(f"{name} must be a boolean array, got dtype {arr.dtype.name}")
    if arr.ndim not in (2, 3):
        raise ValueError(f"{name} must have 2 axes or 3 (heads first), got shape {arr.shape}")
    return arr.reshape((1,) * (3 - arr.ndim) + arr.shape)


class MaskModLayout(BlockLayout):
    """A :class:`BlockLayout` built by :func:`from_mask_mod` that also knows which stored blocks are full.

    ``full`` (bool, one entry per stored block, in the order of
    ``indices``) is ``True`` where every pair of the block satisfies the
    ``mask_mod`` and ``False`` where only some do (a *partial* block):
    FlexAttention's split, so that a kernel can skip the element mask on
    full blocks.  Everything else, equality included, is that of
    :class:`BlockLayout`.

    >>> lay = from_mask_mod(lambda b, h, q, kv: kv <= q, 40, 16)
    >>> lay.indices, lay.full
    (array([0, 0, 1, 0, 1, 2]), array([False,  True, False,  True,  True, False]))
    """

    __slots__ = ("_full",)

    def __init__(self, indptr: Any, indices: Any, full: Any, block: Pair, seq: Pair, heads: int = 1) -> None:
        super().__init__(indptr, indices, block, seq, heads)
        full = np.array(full, dtype=bool)
        if full.shape != (self.nnz,):
            raise ValueError(f"full must have one entry per stored block ({self.nnz}), got shape {full.shape}")
        full.flags.writeable = False
        self._full = full

    full = property(lambda self: self._full, doc="Bool (nnz,): stored blocks whose every pair is in the mask.")

    def __repr__(self) -> str:
        return f"MaskModLayout{super().__repr__()[len('BlockLayout') : -1]}, full={int(self._full.sum())})"


def from_mask_mod(
    mask_mod: Callable[[Any, Any, Any, Any], Any], seq: Pair, block: Pair, heads: int = 1, *, batch: int = 0
) -> MaskModLayout:
    """Layout from a FlexAttention-style predicate ``mask_mod(b, h, q_idx, kv_idx) -> bool``, evaluated per block.

    A block is stored iff ``mask_mod`` is true for at least one of its
    (query, key) pairs; blocks with no true pair are skipped.  The result
    records which stored blocks are *full* (true for every pair) and which
    *partial* (:attr:`MaskModLayout.full`).

    ``mask_mod`` is either

    * a plain Python function written with NumPy operations: it is called
      on broadcast int64 index arrays (``q_idx`` a column, ``kv_idx`` a row;
      ``b`` and ``h`` ints) and must return booleans of that shape (use
      ``&``, ``|``, ``~``, ``np.where``, array lookups such as
      ``doc[q_idx] == doc[kv_idx]``; not ``if``/``and``/``or``), or
    * a ``numba.njit`` function of four integers, called in a compiled loop
      over the blocks (any Python that numba compiles; arrays it reads from
      globals or closures are frozen at compilation).

    Only the **block** pattern comes from here.  To mask inside the blocks
    too, pass the same predicate as a ``numba.njit`` function to
    :func:`~npsparseattn.block_sparse_attention` (``mask_mod=``): the CPU
    kernels run the full blocks without it and evaluate it on the partial
    ones (``docs/scores.md``).  Where the rule is a causal mask or a window,
    ``causal``/``window`` do that without a call per score.

    Parameters
    ----------
    mask_mod : callable (b, h, q_idx, kv_idx) -> bool
        Positions are token indices (query ``q_idx`` in ``[0, Lq)``, key
        ``kv_idx`` in ``[0, Lk)``), with no offset applied.
    seq : int or (Lq, Lk)
    block : int or (bq, bk)
    heads : int
        1 (``h = 0`` is evaluated and the layout serves every head) or the
        number of query heads (``h = 0 .. heads - 1``, one pattern each).
    batch : int
        The ``b`` passed to ``mask_mod`` (a layout serves every batch element).

    Returns
    -------
    MaskModLayout

    Examples
    --------
    Document masking (causal inside each document) of three packed documents:

    >>> import numpy as np
    >>> doc = np.repeat([0, 1, 2], [40, 50, 38])                 # document of each of 128 tokens
    >>> def document_causal(b, h, q_idx, kv_idx):
    ...     return (doc[q_idx] == doc[kv_idx]) & (kv_idx <= q_idx)
    >>> lay = from_mask_mod(document_causal, 128, 16)
    >>> print(lay.to_ascii())
    8 x 8 blocks of 16 x 16 tokens, 20 stored (31.2%)
    #.......
    ##......
    ###.....
    ..##....
    ..###...
    ..####..
    .....##.
    .....###
    >>> int(lay.full.sum())                                      # blocks that need no element mask
    3
    """
    heads = check_int(heads, "heads", 1)
    batch = check_int(batch, "batch", 0)
    if not callable(mask_mod):
        raise TypeError(f"mask_mod must be a function (b, h, q_idx, kv_idx) -> bool, got {type(mask_mod).__name__}")
    from npsparseattn._mask_blocks import block_flags

    grid = _Grid(seq, block, heads)
    stored, full = zip(*(block_flags(mask_mod, grid.seq, grid.block, batch, h) for h in range(heads)))
    stored, full = np.stack(stored), np.stack(full)
    rows, cols = np.nonzero(stored.reshape(heads * grid.nqb, grid.nkb))
    indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=heads * grid.nqb))])
    flags = full.reshape(heads * grid.nqb, grid.nkb)[rows, cols]
    return MaskModLayout(indptr, cols, flags, grid.block, grid.seq, heads)


def from_scipy(matrix: Any, block: Pair, seq: Pair | None = None, *, heads: int = 1) -> BlockLayout:
    """Layout from a SciPy sparse matrix of shape (heads * nqb, nkb); its non-zero entries are the blocks.

    ``seq`` defaults to whole blocks.  Explicit zeros are dropped, duplicates merged.

    >>> import scipy.sparse as sp
    >>> from_scipy(sp.eye(4, format="csr"), 16) == from_block_mask(np.eye(4, dtype=bool), 16)
    True
    """
    import scipy.sparse as sp

    if not sp.issparse(matrix):
        raise TypeError(f"matrix must be a scipy.sparse matrix or array, got {type(matrix).__name__}")
    heads = check_int(heads, "heads", 1)
    bq, bk = _pair(block, "block", 1)
    rows, nkb = matrix.shape
    if rows % heads:
        raise ValueError(f"matrix has {rows} rows, not a multiple of heads={heads}")
    nqb = rows // heads
    if seq is None:
        seq = (nqb * bq, nkb * bk)
    lq, lk = _pair(seq, "seq", 0)
    if (_blocks(lq, bq), _blocks(lk, bk)) != (nqb, nkb):
        raise ValueError(
            f"matrix has shape {matrix.shape} but heads={heads}, seq={(lq, lk)}, block={(bq, bk)} needs "
            f"({heads * _blocks(lq, bq)}, {_blocks(lk, bk)})"
        )
    csr = sp.csr_array(matrix, copy=True)
    csr.sum_duplicates()
    csr.eliminate_zeros()
    csr.sort_indices()
    return BlockLayout(csr.indptr, csr.indices, (bq, bk), (lq, lk), heads)


def to_scipy(layout: BlockLayout) -> Any:
    """The layout as a boolean ``scipy.sparse.csr_array`` of shape (heads * nqb, nkb).

    >>> to_scipy(causal(48, 16)).toarray().astype(int)
    array([[1, 0, 0],
           [1, 1, 0],
           [1, 1, 1]])
    """
    import scipy.sparse as sp

    _layouts([layout], "to_scipy")
    data = np.ones(layout.nnz, dtype=bool)
    return sp.csr_array((data, layout.indices.copy(), layout.indptr.copy()), shape=layout.shape)


def _layouts(items: Sequence[Any], what: str) -> list[BlockLayout]:
    for x in items:
        if not isinstance(x, BlockLayout):
            raise TypeError(f"{what} takes BlockLayout objects, got {type(x).__name__}")
    return list(items)


def _repeat_heads(layout: BlockLayout, heads: int) -> BlockLayout:
    """A one-head layout copied to ``heads`` heads (unchanged when it already has them)."""
    if layout.heads == heads:
        return layout
    nnz = layout.nnz
    indptr = np.concatenate([layout.indptr[:-1] + h * nnz for h in range(heads)] + [[heads * nnz]])
    return BlockLayout(indptr, np.tile(layout.indices, heads), layout.block, layout.seq, heads)


def _combine(layouts: Sequence[Any], what: str, op: Callable[[Any, Any], Any]) -> BlockLayout:
    items = _layouts(layouts, what)
    if not items:
        raise ValueError(f"{what} needs at least one layout")
    first = items[0]
    heads = max(x.heads for x in items)
    for x in items[1:]:
        if (x.block, x.seq) != (first.block, first.seq):
            raise ValueError(
                f"{what}: layouts must share block and seq; got block={first.block}, seq={first.seq} "
                f"and block={x.block}, seq={x.seq}"
            )
    for x in items:
        if x.heads not in (1, heads):
            raise ValueError(
                f"{what}: layouts must have heads=1 or the same number of heads; got {x.heads} and {heads}"
            )
    result = to_scipy(_repeat_heads(first, heads)).astype(np.int64)  # counts up to len(layouts), never wrapping
    for x in items[1:]:
        result = op(result, to_scipy(_repeat_heads(x, heads)).astype(np.int64))
    return from_scipy(result, first.block, first.seq, heads=heads)


def union(*layouts: BlockLayout) -> BlockLayout:
    """Blocks stored in any of the layouts (same block and seq; one-head layouts serve every head).

    >>> union(causal(48, 16), sliding_window(48, 16, 16)) == sliding_window(48, 16, (None, 16))
    True
    """
    return _combine(layouts, "union", lambda a, b: a + b)


def intersect(*layouts: BlockLayout) -> BlockLayout:
    """Blocks stored in every layout (same block and seq; one-head layouts serve every head).

    >>> intersect(causal(48, 16), sliding_window(48, 16, 16)) == sliding_window(48, 16, (16, 0))
    True
    """
    return _combine(layouts, "intersect", lambda a, b: a.multiply(b))


def stack(layouts: Sequence[BlockLayout]) -> BlockLayout:
    """One layout per head from layouts of one or more heads each (same block and seq), in order.

    >>> stack([causal(48, 16), dense(48, 16)]).heads
    2
    """
    items = _layouts(layouts, "stack")
    if not items:
        raise ValueError("stack needs at least one layout")
    first = items[0]
    for x in items[1:]:
        if (x.block, x.seq) != (first.block, first.seq):
            raise ValueError(
                f"stack: layouts must share block and seq; got block={first.block}, seq={first.seq} "
                f"and block={x.block}, seq={x.seq}"
            )
    starts = np.cumsum([0] + [x.nnz for x in items])
    indptr = np.concatenate([x.indptr[:-1] + s for x, s in zip(items, starts)] + [[starts[-1]]])
    indices = np.concatenate([x.indices for x in items])
    return BlockLayout(indptr, indices, first.block, first.seq, sum(x.heads for x in items))


def topk(q: np.ndarray, k: np.ndarray, block: Pair, top_k: int, *, causal: bool = False) -> BlockLayout:
    """Content routing (MoBA/Quest style): per head, each query block keeps its ``top_k`` best key blocks.

    A layout view of :func:`npsparseattn.routing.select_topk_blocks` with
    ``score="mean"`` and ``force=("local",)``, one pattern per query head
    (each query head routes alone with its key head; ``select_topk_blocks``
    gives one list per key head for ``sparse_attention`` instead).

    A key block's score for query block ``r`` is ``mean(q[r-block]) . mean(k[key block])``
    (means over the tokens of each block, the last one possibly partial), in
    float64.  The diagonal block(s), the key blocks that hold the aligned
    positions ``i + Lk - Lq`` of the block's queries, always count among the
    ``top_k``; ties go to the lower block number.  With ``causal``, key
    blocks wholly after the block's last aligned position are never chosen
    (pass ``causal=True`` to the attention call too, to mask inside blocks).

    Parameters
    ----------
    q : array (Hq, Lq, D), (Lq, D) or (1, Hq, Lq, D)
    k : array (Hk, Lk, D) of the same form, ``Hq % Hk == 0`` (query head
        ``h`` routes with key head ``h // (Hq // Hk)``)
    block : int or (bq, bk)
    top_k : int >= 1

    Returns
    -------
    BlockLayout with ``heads = Hq`` and ``min(top_k, eligible)`` blocks per row
    (more only where a row has more diagonal blocks than ``top_k``).

    >>> rng = np.random.default_rng(0)
    >>> q, k = rng.standard_normal((2, 1, 8 * 16, 32))
    >>> print(topk(q, k, 16, 3, causal=True).to_ascii())
    8 x 8 blocks of 16 x 16 tokens, 21 stored (32.8%)
    #.......
    ##......
    ###.....
    .###....
    .#.##...
    .#..##..
    ##....#.
    ....#.##
    """
    q, k = _routing_inputs(q, k)
    bq, bk = _pair(block, "block", 1)
    top_k = check_int(top_k, "top_k", 1)
    check_flag(causal, "causal")
    grid = _Grid((q.shape[1], k.shape[1]), (bq, bk))
    per_query_head = k[np.arange(q.shape[0]) // (q.shape[0] // k.shape[0])]
    kv_idx, kv_cnt = select_topk_blocks(
        q, per_query_head, q_block=bq, kv_block=bk, topk=top_k, score="mean", force=("local",), causal=causal
    )
    indptr = np.concatenate([[0], np.cumsum(kv_cnt.reshape(-1), dtype=np.int64)])
    return BlockLayout(indptr, kv_idx[kv_idx >= 0], (bq, bk), grid.seq, q.shape[0])


def _routing_inputs(q: Any, k: Any) -> tuple[np.ndarray, np.ndarray]:
    """``q``, ``k`` as (H, L, D) NumPy arrays for :func:`topk`."""
    for name, x in (("q", q), ("k", k)):
        if not isinstance(x, np.ndarray):
            raise TypeError(f"topk routes NumPy arrays; {name} is {type(x).__module__}.{type(x).__qualname__}")
        if x.dtype.name not in FLOAT_DTYPES:
            raise TypeError(f"topk routes real floating arrays; {name} has dtype {x.dtype.name}")
        if x.ndim not in (2, 3, 4) or (x.ndim == 4 and x.shape[0] != 1):
            raise ValueError(
                f"topk routes one sequence: {name} must be (L, D), (H, L, D) or (1, H, L, D), "
                f"got shape {x.shape}; call it once per batch element"
            )
    if q.ndim != k.ndim:
        raise ValueError(f"q has {q.ndim} axes but k has {k.ndim}; they must match")
    q3 = q.reshape((-1,) + q.shape[-2:])
    k3 = k.reshape((-1,) + k.shape[-2:])
    if q3.shape[-1] != k3.shape[-1]:
        raise ValueError(f"q and k must have the same last axis D: q {q.shape} vs k {k.shape}")
    if q3.shape[0] % k3.shape[0]:
        raise ValueError(f"query heads ({q3.shape[0]}) must be a multiple of key heads ({k3.shape[0]})")
    return q3, k3

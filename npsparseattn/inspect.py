"""How much of the dense softmax mass a sparse selection keeps: coverage per query, mass per block, recall.

A sparse attention pattern is only as good as the attention it keeps.  For a
query ``i`` of head ``h`` with visible keys ``V_i`` (the ``causal``/``window``
rule of :func:`npsparseattn.attention`), dense probabilities ``p_ij`` over
``V_i``, and a selection ``S_i`` of keys:

* :func:`coverage` -- ``sum_{j in S_i & V_i} p_ij = exp(lse_sparse_i - lse_dense_i)``,
  the fraction of query ``i``'s dense softmax mass the selection keeps,
  computed from two log-sum-exps in O(L) memory (the ``Lq x Lk``
  probabilities are never stored);
* :func:`block_mass` -- the dense probabilities summed per (query block, key
  block) and averaged over the block's queries: the *mass map* that shows
  where attention goes and what a layout misses;
* :func:`recall` -- the share of a mass map's mass inside a layout's blocks,
  per head: the mean :func:`coverage` over the queries that see a key.

Selections are :class:`~npsparseattn.layouts.BlockLayout` objects (any
builder of :mod:`npsparseattn.layouts`, ``topk`` routing included) and the
token-level :class:`LSHSelection` of :func:`lsh_selection`.  The
index-driven selections of ``sparse_attention`` (``kv_idx`` arrays) are not
accepted yet.

:func:`load_qk_sample` returns real queries and keys of a text encoder's
attention layer, shipped with the package; ``docs/inspect.md`` compares
layouts on it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from importlib import resources
from typing import Any

import numpy as np

from npsparseattn._arrays import array_module, common_kind
from npsparseattn._checks import check_backend
from npsparseattn._dispatch import available_backends
from npsparseattn.block_sparse import block_sparse_attention
from npsparseattn.exact import attention
from npsparseattn.layouts import BlockLayout, Pair, _pair
from npsparseattn.lsh import lsh_buckets, lsh_rotations
from npsparseattn.problems import AttentionProblem, attention_problem, check_layout, lse_dtype
from npsparseattn.problems.lsh import bucket_factors
from npsparseattn.sparse import sparse_attention

Window = tuple[int | None, int | None]

_TILE_CELLS = 1 << 20  # (query, key) scores a NumPy tile of block_mass and the LSH coverage holds at once

SAMPLE = "minilm_qk.npz"  # the shipped sample, in npsparseattn/data/


@dataclass(frozen=True, eq=False)
class LSHSelection:
    """Token-level selection by angular LSH: query ``i`` keeps key ``j`` iff they share a bucket in some round.

    Built by :func:`lsh_selection`; query head ``h`` uses the buckets of key
    head ``h // (Hq // Hk)`` (grouped-query attention).

    Attributes
    ----------
    q_buckets : int32 array (B, Hq, n_hashes, Lq)
    k_buckets : int32 array (B, Hk, n_hashes, Lk)
    n_buckets : int
        Buckets per round.

    Examples
    --------
    >>> import numpy as np
    >>> from npsparseattn.inspect import lsh_selection
    >>> rng = np.random.default_rng(0)
    >>> q, k = rng.standard_normal((2, 4, 256, 32))
    >>> sel = lsh_selection(q, k, 8, n_hashes=2, seed=0)
    >>> sel.q_buckets.shape
    (1, 4, 2, 256)
    >>> 0.2 < sel.density < 0.3   # about 1 - (1 - 1/8)**2 of the pairs
    True
    """

    q_buckets: np.ndarray
    k_buckets: np.ndarray
    n_buckets: int

    @property
    def n_hashes(self) -> int:
        """Hashing rounds."""
        return int(self.q_buckets.shape[2])

    def keeps(self, b: int, h: int, i0: int, i1: int) -> np.ndarray:
        """Bool (i1 - i0, Lk): the keys that queries ``i0..i1-1`` of batch element ``b``, query head ``h`` keep."""
        group = self.q_buckets.shape[1] // self.k_buckets.shape[1]
        qb, kb = self.q_buckets[b, h, :, i0:i1], self.k_buckets[b, h // group]
        keep = qb[0][:, None] == kb[0][None, :]
        for r in range(1, self.n_hashes):
            keep |= qb[r][:, None] == kb[r][None, :]
        return keep

    @cached_property
    def density(self) -> float:
        """Fraction of all (query, key) pairs kept, over every batch element and head; cached.

        Counted tile by tile (about 2**20 pairs at a time), so memory stays
        O(tile).  ``causal``/``window`` are not applied (like
        :attr:`BlockLayout.density <npsparseattn.layouts.BlockLayout.density>`).
        """
        bsz, hq, _, lq = self.q_buckets.shape
        lk = self.k_buckets.shape[3]
        if not bsz * hq * lq * lk:
            return 0.0
        rows = max(1, _TILE_CELLS // lk)
        kept = sum(
            int(np.count_nonzero(self.keeps(b, h, i0, min(i0 + rows, lq))))
            for b in range(bsz)
            for h in range(hq)
            for i0 in range(0, lq, rows)
        )
        return kept / (bsz * hq * lq * lk)


def lsh_selection(
    q: Any,
    k: Any,
    n_buckets: int | tuple[int, ...],
    *,
    n_hashes: int = 1,
    seed: int | None = 0,
    rotations: Any = None,
) -> LSHSelection:
    """Hash queries and keys with the same random rotations (the hash of :func:`npsparseattn.lsh_buckets`).

    Query ``i`` then keeps key ``j`` iff ``bucket_r(q_i) == bucket_r(k_j)``
    for some round ``r``: the pairs that Reformer's LSH attention aims at,
    without its chunking (a chunk cuts buckets at fixed sizes; with shared
    query/keys, as in :func:`npsparseattn.lsh_attention`, queries and keys
    are the same rows).  The hash is angular (``argmax(concat[xR, -xR])``),
    so each query and key is hashed by its direction.

    Parameters
    ----------
    q : NumPy array (*batch, Hq, Lq, D), (Hq, Lq, D) or (Lq, D)
    k : NumPy array (*batch, Hk, Lk, D), ``Hq % Hk == 0``
    n_buckets : even int or tuple of even ints
        Buckets per round, as :func:`npsparseattn.lsh_buckets`.
    n_hashes : int
        Rounds; a pair is kept if any round puts it in one bucket.
    seed : int or None
        Seed of the rotations (:func:`npsparseattn.lsh.lsh_rotations`).
    rotations : array (D, n_hashes, sum(factors) // 2), optional
        The rotations themselves (then pass ``seed=None``).

    Returns
    -------
    LSHSelection with ``q_buckets`` (B, Hq, n_hashes, Lq) and ``k_buckets``
    (B, Hk, n_hashes, Lk), leading batch axes flattened to ``B``.

    Examples
    --------
    >>> import numpy as np
    >>> from npsparseattn.inspect import coverage, lsh_selection
    >>> rng = np.random.default_rng(0)
    >>> q, k = rng.standard_normal((2, 2, 300, 16))
    >>> sel = lsh_selection(q, k, 4, n_hashes=2, seed=1)
    >>> coverage(q, k, sel).shape
    (2, 300)
    """
    p = _problem(q, k, False, None)
    if p.kind != "numpy":
        raise TypeError("lsh_selection hashes NumPy arrays; convert CuPy arrays with cupy.asnumpy first")
    factors = bucket_factors(n_buckets)
    if rotations is None:
        rotations = lsh_rotations(p.q.shape[3], factors, n_hashes=n_hashes, seed=seed)
        seed = None
    qb = lsh_buckets(p.q, factors, n_hashes=n_hashes, rotations=rotations, seed=seed)
    kb = lsh_buckets(p.k, factors, n_hashes=n_hashes, rotations=rotations, seed=seed)
    return LSHSelection(qb, kb, int(np.prod(factors)))


def _problem(q: Any, k: Any, causal: Any, window: Any, scale: Any = None) -> AttentionProblem:
    """Validate ``q``, ``k`` (with a stand-in ``v`` of width 1) into a canonical attention problem."""
    xp = array_module(common_kind(q=q, k=k))
    if k.ndim < 2:
        raise ValueError(f"k must have at least 2 axes (L, D), got shape {tuple(k.shape)}")
    v = xp.zeros(tuple(k.shape[:-1]) + (1,), dtype=k.dtype)
    return attention_problem(q, k, v, causal=causal, window=window, scale=scale)


def coverage(
    q: Any,
    k: Any,
    selection: BlockLayout | LSHSelection | Any,
    *,
    causal: bool = False,
    window: Window | None = None,
    scale: float | None = None,
    q_block: int = 64,
    kv_block: int = 64,
    backend: str = "auto",
) -> Any:
    """Per query, the fraction of its dense softmax mass that a sparse selection keeps.

    ``coverage[..., h, i] = exp(lse_sparse - lse_dense)``: ``lse_dense`` is
    the log-sum-exp of ``scale * q_i . k_j`` over the keys query ``i`` sees
    under ``causal``/``window`` (from :func:`npsparseattn.attention` with a
    value width of 1), ``lse_sparse`` the same over the keys the selection
    also keeps (from :func:`npsparseattn.block_sparse_attention` for a
    layout, :func:`npsparseattn.sparse_attention` for an index).  Memory is
    O(L): the probabilities are never stored.

    * A query whose selected keys hold all its mass gets 1, one whose
      selection keeps none of its visible keys gets 0.
    * A query that sees **no** key under ``causal``/``window`` loses nothing
      and gets **1.0** (not NaN), so means over queries stay defined;
      :func:`recall` leaves such queries out.
    * Rounding never takes a value above 1 (it is clipped there).

    Parameters
    ----------
    q : array (*batch, Hq, Lq, D), (Hq, Lq, D) or (Lq, D); NumPy, or CuPy for layouts
    k : array (*batch, Hk, Lk, D), ``Hq % Hk == 0`` (grouped-query attention)
    selection : BlockLayout, LSHSelection, kv_idx or (kv_idx, kv_cnt)
        A layout with ``seq == (Lq, Lk)`` and 1 or Hq heads
        (:mod:`npsparseattn.layouts`); :func:`lsh_selection`'s result
        for these ``q``/``k`` (NumPy; computed in NumPy tiles of
        ``O(tile x Lk)`` memory, dense and sparse sums in one pass); or the
        index of :func:`npsparseattn.sparse_attention`, an integer
        ``kv_idx`` array or a router's ``(kv_idx, kv_cnt)`` pair
        (:mod:`npsparseattn.routing`), with ``q_block``/``kv_block``.
    causal, window, scale :
        As :func:`npsparseattn.attention`; they define the dense mass and
        apply inside the selection.
    q_block, kv_block : int
        The block edges of an index selection (as for ``sparse_attention``).
    backend : str
        ``"auto"`` or a name from ``available_backends("attention")``: the
        backend of the attention calls (layouts and indices; an LSH selection
        is computed in NumPy whatever it says).

    Returns
    -------
    array (*batch, Hq, Lq), float64 for float64 inputs, float32 otherwise,
    values in ``[0, 1]``.

    Examples
    --------
    >>> import numpy as np
    >>> from npsparseattn import layouts
    >>> from npsparseattn.inspect import coverage
    >>> rng = np.random.default_rng(0)
    >>> q = rng.standard_normal((1, 4, 500, 32))
    >>> k = rng.standard_normal((1, 2, 500, 32))   # GQA: 2 key heads
    >>> cov = coverage(q, k, layouts.sliding_window(500, 64, 128), causal=True)
    >>> cov.shape
    (1, 4, 500)
    >>> float(cov[0, 0, :128].min().round(12)), bool(0 < cov.min() < 1)   # the first 128 queries see only window keys
    (1.0, True)
    """
    if check_backend(backend) not in ("auto", *available_backends("attention")):
        raise ValueError(f"backend must be 'auto' or one of {available_backends('attention')}, got {backend!r}")
    p = _problem(q, k, causal, window, scale)
    if isinstance(selection, BlockLayout):
        check_layout(selection, p)
        v = p.restore(p.v)
        _, lse_dense = attention(q, k, v, causal=causal, window=window, scale=scale, return_lse=True, backend=backend)
        _, lse_sparse = block_sparse_attention(
            q, k, v, selection, causal=causal, window=window, scale=scale, return_lse=True, backend=backend
        )
    elif isinstance(selection, LSHSelection):
        _check_lsh(selection, p)
        lse_dense, lse_sparse = (p.restore(x) for x in _lsh_lse(p, selection))
    elif _is_index(selection):
        kv_idx, kv_cnt = selection if isinstance(selection, tuple) else (selection, None)
        v = p.restore(p.v)
        _, lse_dense = attention(q, k, v, causal=causal, window=window, scale=scale, return_lse=True, backend=backend)
        _, lse_sparse = sparse_attention(
            q, k, v, kv_idx, kv_cnt=kv_cnt, q_block=q_block, kv_block=kv_block, causal=causal, window=window,
            scale=scale, return_lse=True, backend=backend,
        )  # fmt: skip
    else:
        raise TypeError(
            "selection must be an npsparseattn.layouts.BlockLayout, an LSHSelection from lsh_selection, or a "
            "sparse_attention index (a kv_idx integer array or a (kv_idx, kv_cnt) pair); "
            f"got {type(selection).__name__}"
        )
    xp = array_module(p.kind)
    with np.errstate(invalid="ignore"):
        kept = xp.minimum(xp.exp(lse_sparse - lse_dense), 1.0)
    return xp.where(lse_dense == -xp.inf, 1.0, kept).astype(lse_dtype(p.dtype))


def _is_index(selection: Any) -> bool:
    """A ``kv_idx`` integer array (NumPy or CuPy) or a ``(kv_idx, kv_cnt)`` pair of them."""
    parts = selection if isinstance(selection, tuple) and len(selection) == 2 else (selection,)
    return all(getattr(getattr(x, "dtype", None), "kind", None) in "iu" for x in parts if x is not None)


def _check_lsh(selection: LSHSelection, p: AttentionProblem) -> None:
    bsz, hq, lq = p.q.shape[:3]
    hk, lk = p.k.shape[1:3]
    n = selection.n_hashes
    if selection.q_buckets.shape != (bsz, hq, n, lq) or selection.k_buckets.shape != (bsz, hk, n, lk):
        raise ValueError(
            f"the LSH selection was made for other q/k: its buckets have shapes {selection.q_buckets.shape} and "
            f"{selection.k_buckets.shape}, these q/k need {(bsz, hq, n, lq)} and {(bsz, hk, n, lk)}"
        )
    if p.kind != "numpy":
        raise TypeError("coverage of an LSH selection is computed in NumPy; pass NumPy q and k")


def _tiles(p: AttentionProblem, rows: int) -> Iterator[tuple[int, int, int, int, int, int, np.ndarray, Any]]:
    """Scaled scores tile by tile: ``(b, h, i0, i1, j0, j1, s, visible)``.

    ``s`` holds ``scale * q[b, h, i0:i1] . k[b, g(h), j0:j1]`` in the compute
    dtype (float64 for float64 inputs, float32 otherwise); keys outside
    ``[j0, j1)`` are invisible to every query of the tile.  ``visible`` is a
    bool (i1 - i0, j1 - j0) mask, or ``None`` when every pair is visible.
    ``i0`` is a multiple of ``rows``.
    """
    cdtype = lse_dtype(p.dtype)
    bsz, hq, lq = p.q.shape[:3]
    lk = p.k.shape[2]
    group = hq // p.k.shape[1]
    left, right, off = p.left, p.right, p.offset
    for b in range(bsz):
        for h in range(hq):
            kh = p.k[b, h // group].astype(cdtype, copy=False)
            for i0 in range(0, lq, rows):
                i1 = min(i0 + rows, lq)
                j0 = 0 if left is None else min(max(i0 + off - left, 0), lk)
                j1 = lk if right is None else max(min(i1 - 1 + off + right + 1, lk), j0)
                qt = p.q[b, h, i0:i1].astype(cdtype, copy=False)
                s = (qt @ kh[j0:j1].T) * cdtype.type(p.scale)
                visible = None
                if left is not None or right is not None:
                    pos = np.arange(i0, i1)[:, None] + off
                    j = np.arange(j0, j1)[None, :]
                    visible = np.ones((i1 - i0, j1 - j0), dtype=bool)
                    if left is not None:
                        visible &= j >= pos - left
                    if right is not None:
                        visible &= j <= pos + right
                yield b, h, i0, i1, j0, j1, s, visible


def _softmax(s: np.ndarray, mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Masked row softmax of a tile in its dtype: ``(P, lse)``; rows with no visible key get ``P = 0``, ``-inf``."""
    if mask is not None:
        s = np.where(mask, s, -np.inf)
    m = s.max(axis=1, initial=-np.inf)
    m = np.where(np.isfinite(m), m, 0)[:, None]
    e = np.exp(s - m)
    total = e.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        probs = np.where(total > 0, e / total, 0)
        lse = np.log(total[:, 0]) + m[:, 0]
    return probs, lse


def _lsh_lse(p: AttentionProblem, selection: LSHSelection) -> tuple[np.ndarray, np.ndarray]:
    """Dense and LSH-selected ``lse`` (B, Hq, Lq), in NumPy tiles."""
    dtype = lse_dtype(p.dtype)
    shape = p.q.shape[:3]
    lse_dense, lse_sparse = np.full(shape, -np.inf, dtype), np.full(shape, -np.inf, dtype)
    rows = max(1, _TILE_CELLS // max(p.seq_k, 1))
    for b, h, i0, i1, j0, j1, s, visible in _tiles(p, rows):
        keep = selection.keeps(b, h, i0, i1)[:, j0:j1]
        lse_dense[b, h, i0:i1] = _softmax(s, visible)[1]
        lse_sparse[b, h, i0:i1] = _softmax(s, keep if visible is None else keep & visible)[1]
    return lse_dense, lse_sparse


def block_mass(
    q: Any,
    k: Any,
    block: Pair,
    *,
    causal: bool = False,
    window: Window | None = None,
    scale: float | None = None,
) -> np.ndarray:
    """The mass map: dense softmax probabilities summed per (query block, key block), averaged over the block's queries.

    ``mass[..., h, r, c] = (1 / n_r) * sum_{i in query block r} sum_{j in key block c} p_ij``
    where ``p_ij`` is the dense attention probability of key ``j`` for query
    ``i`` (under ``causal``/``window``; 0 for invisible pairs) and ``n_r``
    the number of queries in block ``r`` (``bq``, fewer in a partial last
    block).  Each row therefore sums to 1, less the share of the block's
    queries that see no key (0 for a block none of whose queries sees one).

    Computed in NumPy tiles of whole query blocks against the keys they can
    see (at most about 2**20 scores at once, plus the tile's mask), in
    float64 for float64 inputs and float32 otherwise, summed in float64.

    Parameters
    ----------
    q : NumPy array (*batch, Hq, Lq, D), (Hq, Lq, D) or (Lq, D)
    k : NumPy array (*batch, Hk, Lk, D), ``Hq % Hk == 0``
    block : int or (bq, bk)
        Block edge in query and key tokens (a layout's ``block``).
    causal, window, scale :
        As :func:`npsparseattn.attention`.

    Returns
    -------
    array (*batch, Hq, ceil(Lq/bq), ceil(Lk/bk)), float64 for float64
    inputs, float32 otherwise.

    Examples
    --------
    >>> import numpy as np
    >>> from npsparseattn.inspect import block_mass
    >>> rng = np.random.default_rng(0)
    >>> q, k = rng.standard_normal((2, 4, 200, 32))
    >>> mass = block_mass(q, k, 64, causal=True)     # 4 x 4 blocks per head
    >>> mass.shape
    (4, 4, 4)
    >>> np.allclose(mass.sum(-1), 1.0), float(mass[0, 0, 1])   # causal: nothing above the diagonal
    (True, 0.0)
    """
    p = _problem(q, k, causal, window, scale)
    if p.kind != "numpy":
        raise TypeError("block_mass computes in NumPy; convert CuPy arrays with cupy.asnumpy first")
    (bq, bk), (lq, lk) = _pair(block, "block", 1), (p.seq_q, p.seq_k)
    nqb, nkb = -(-lq // bq), -(-lk // bk)
    bsz, hq = p.q.shape[:2]
    mass = np.zeros((bsz, hq, nqb, nkb), dtype=np.float64)
    rows = bq * max(1, _TILE_CELLS // max(bq * lk, 1))
    for b, h, i0, i1, j0, j1, s, visible in _tiles(p, rows):
        if j1 == j0:
            continue
        probs = _softmax(s, visible)[0]
        c0 = j0 // bk  # sum each key block's columns; the first block may start before j0
        starts = np.maximum(np.arange(c0 * bk, j1, bk), j0) - j0
        cols = np.add.reduceat(probs, starts, axis=1, dtype=np.float64)
        blocks = np.add.reduceat(cols, np.arange(0, i1 - i0, bq), axis=0)
        r0 = i0 // bq
        mass[b, h, r0 : r0 + blocks.shape[0], c0 : c0 + blocks.shape[1]] += blocks
    sizes = np.minimum(bq, lq - bq * np.arange(nqb))
    mass /= np.maximum(sizes, 1)[:, None]
    return p.restore(mass.astype(lse_dtype(p.dtype), copy=False))


def recall(mass: Any, selection: BlockLayout) -> np.ndarray:
    """Share of the mass in a mass map that a layout's blocks hold, per head.

    ``recall[..., h] = sum_r n_r sum_{c in layout row r} mass[..., h, r, c] / sum_r n_r sum_c mass[..., h, r, c]``
    with ``n_r`` the queries in block ``r``: the mean :func:`coverage` over
    the queries that see a key, when ``mass`` and the coverage use the same
    ``causal``/``window``.  A head none of whose queries sees a key gets 1.

    Parameters
    ----------
    mass : array (*batch, Hq, nqb, nkb)
        From :func:`block_mass` with the layout's ``block``.
    selection : BlockLayout
        ``ceil(Lq/bq) == nqb``, ``ceil(Lk/bk) == nkb``, 1 or Hq heads.

    Returns
    -------
    float64 array (*batch, Hq)

    Examples
    --------
    >>> import numpy as np
    >>> from npsparseattn import layouts
    >>> from npsparseattn.inspect import block_mass, recall
    >>> rng = np.random.default_rng(0)
    >>> q, k = rng.standard_normal((2, 3, 256, 16))
    >>> mass = block_mass(q, k, 32)
    >>> recall(mass, layouts.dense(256, 32))
    array([1., 1., 1.])
    >>> bool(0 < recall(mass, layouts.sliding_window(256, 32, 32))[0] < 1)
    True
    """
    if not isinstance(selection, BlockLayout):
        raise TypeError(
            "recall takes an npsparseattn.layouts.BlockLayout (block-level mass cannot score a token-level "
            f"selection; use coverage for that), got {type(selection).__name__}"
        )
    if not isinstance(mass, np.ndarray) or mass.dtype.kind != "f" or mass.ndim < 3:
        raise TypeError(
            "mass must be a floating NumPy array (*batch, Hq, nqb, nkb) from block_mass, got "
            f"{type(mass).__name__} {getattr(mass, 'dtype', '')} {getattr(mass, 'shape', '')}"
        )
    grid = (selection.n_query_blocks, selection.n_key_blocks)
    if mass.shape[-2:] != grid:
        raise ValueError(
            f"mass has {mass.shape[-2]} x {mass.shape[-1]} blocks but the layout (seq={selection.seq}, "
            f"block={selection.block}) has {grid[0]} x {grid[1]}; compute the mass with the layout's block"
        )
    hq = mass.shape[-3]
    if selection.heads not in (1, hq):
        raise ValueError(f"the layout has {selection.heads} heads but mass has {hq}; use heads=1 or {hq}")
    bq, lq = selection.block[0], selection.seq[0]
    sizes = np.minimum(bq, lq - bq * np.arange(grid[0])).astype(np.float64)
    weighted = mass.astype(np.float64) * sizes[:, None]
    keep = selection.to_dense()  # (heads, nqb, nkb)
    total = weighted.sum(axis=(-2, -1))
    kept = np.where(keep, weighted, 0).sum(axis=(-2, -1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, kept / total, 1.0)


def plot_mass_map(
    path: Any,
    mass: Any,
    selection: BlockLayout | None = None,
    *,
    heads: Any = None,
    title: str | None = None,
    columns: int = 4,
    size: float = 2.4,
    dpi: int = 100,
) -> None:
    """Draw mass maps to a PNG, one panel per head, with a layout's blocks outlined (needs matplotlib).

    The colour of a block is its mass (:func:`block_mass`) on a log scale
    from 1e-4 to 1; blocks outside the ``causal``/``window`` rule or with no
    mass are white.  With ``selection``, the edges of the stored blocks are
    drawn in red and each panel's title gives the head's :func:`recall`.

    Parameters
    ----------
    path : str or path-like
        The PNG file.
    mass : array (Hq, nqb, nkb) or (nqb, nkb)
        One batch element's mass map.
    selection : BlockLayout, optional
        With the mass map's grid and 1 or Hq heads.
    heads : sequence of int, optional
        The heads to draw (default: every head).
    title : str, optional
        Title above the panels.
    columns : int
        Panels per row.
    size : float
        Inches per panel side.
    dpi : int
        Resolution.

    Examples
    --------
    >>> import numpy as np
    >>> from npsparseattn import layouts
    >>> from npsparseattn.inspect import block_mass, plot_mass_map
    >>> q, k = np.random.default_rng(0).standard_normal((2, 4, 256, 32))
    >>> mass = block_mass(q, k, 32)
    >>> plot_mass_map("mass.png", mass, layouts.sliding_window(256, 32, 32))  # doctest: +SKIP
    """
    try:
        from matplotlib.collections import LineCollection
        from matplotlib.colors import LogNorm
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError(
            "plot_mass_map needs matplotlib: pip install 'npsparseattn[plot]' (or pip install matplotlib)"
        ) from exc
    mass = np.asarray(mass, dtype=np.float64)
    if mass.ndim == 2:
        mass = mass[None]
    if mass.ndim != 3:
        raise ValueError(f"mass must be (Hq, nqb, nkb) or (nqb, nkb) (one batch element), got shape {mass.shape}")
    heads = list(range(mass.shape[0])) if heads is None else [int(h) for h in heads]
    bad = [h for h in heads if not 0 <= h < mass.shape[0]]
    if bad or not heads:
        raise ValueError(f"heads must name some of the {mass.shape[0]} heads (0..{mass.shape[0] - 1}), got {heads}")
    per_head = recall(mass, selection) if selection is not None else None
    stored = selection.to_dense() if selection is not None else None
    columns = max(1, min(int(columns), len(heads)))
    rows = -(-len(heads) // columns)
    fig = Figure(figsize=(size * columns + 0.9, size * rows + (0.3 if title else 0.0)), dpi=dpi, layout="constrained")
    axes = fig.subplots(rows, columns, squeeze=False)
    norm = LogNorm(vmin=1e-4, vmax=1.0)
    image = None
    for ax in axes.flat[len(heads) :]:
        ax.set_axis_off()
    for ax, h in zip(axes.flat, heads):
        image = ax.imshow(np.ma.masked_less_equal(mass[h], 0), cmap="viridis", norm=norm, interpolation="nearest")
        if stored is not None:
            edges = LineCollection(_outline(stored[h if stored.shape[0] > 1 else 0]), colors="red", lw=0.8)
            edges.set_in_layout(False)  # inside the axes: nothing for the layout engine to measure
            ax.add_collection(edges, autolim=False)
            ax.set_title(f"head {h}: recall {per_head[h]:.2f}", fontsize=8)
        else:
            ax.set_title(f"head {h}", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(image, ax=axes, shrink=0.9, label="mass per block")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.savefig(path)


def _outline(stored: np.ndarray) -> list[list[tuple[float, float]]]:
    """Segments between stored and absent blocks (and around stored blocks at the border), in imshow coordinates."""
    padded = np.pad(stored, 1)
    segments = []
    rows, cols = np.nonzero(padded[1:-1, :-1] != padded[1:-1, 1:])  # vertical edges at x = c - 0.5
    segments += [[(c - 0.5, r - 0.5), (c - 0.5, r + 0.5)] for r, c in zip(rows, cols)]
    rows, cols = np.nonzero(padded[:-1, 1:-1] != padded[1:, 1:-1])  # horizontal edges at y = r - 0.5
    segments += [[(c - 0.5, r - 0.5), (c + 0.5, r - 0.5)] for r, c in zip(rows, cols)]
    return segments


@dataclass(frozen=True, eq=False)
class QKSample:
    """Real queries and keys of one attention layer of a text encoder (see :func:`load_qk_sample`).

    Attributes
    ----------
    q, k : float32 arrays (H, L, D)
    tokens : list of str
        The L tokens, ``[CLS]`` first and ``[SEP]`` last.
    model : str
        The model the layer belongs to.
    layer : int
        The layer (0 is the first).
    """

    q: np.ndarray
    k: np.ndarray
    tokens: list[str]
    model: str
    layer: int


def load_qk_sample() -> QKSample:
    """Queries and keys of a real attention layer, shipped with the package (about 0.7 MB).

    Layer 3 (of 6) of the sentence encoder all-MiniLM-L6-v2 (12 heads of
    dimension 32, bidirectional) on 512 tokens of the Declaration of
    Independence (public domain), stored in float16 and returned as
    float32.  ``docs/make_qk_sample.py`` makes it from the model's weights.

    Examples
    --------
    >>> from npsparseattn.inspect import load_qk_sample
    >>> sample = load_qk_sample()
    >>> sample.q.shape, sample.k.shape, sample.tokens[:3]
    ((12, 512, 32), (12, 512, 32), ['[CLS]', 'in', 'congress'])
    """
    with resources.files("npsparseattn").joinpath("data", SAMPLE).open("rb") as f, np.load(f) as data:
        return QKSample(
            q=data["q"].astype(np.float32),
            k=data["k"].astype(np.float32),
            tokens=[str(t) for t in data["tokens"]],
            model=str(data["model"]),
            layer=int(data["layer"]),
        )


__all__ = [
    "LSHSelection",
    "QKSample",
    "block_mass",
    "coverage",
    "load_qk_sample",
    "lsh_selection",
    "plot_mass_map",
    "recall",
]

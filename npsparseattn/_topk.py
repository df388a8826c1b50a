"""Content routing by pooled block scores: the top-k key blocks of every query block, in ``kv_idx`` form.

This is the arithmetic behind :func:`npsparseattn.routing.select_topk_blocks`
(re-exported there) and :func:`npsparseattn.layouts.topk`; it is plain NumPy
in float64 and imports no backend, so the layout builders can use it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from npsparseattn._checks import check_flag, check_int, to_4d
from npsparseattn._dtypes import FLOAT_DTYPES

__all__ = ["FORCE_KINDS", "SCORES", "select_topk_blocks"]

SCORES = ("mean", "max")
FORCE_KINDS = ("sink", "local")
_CHUNK_CELLS = 1 << 20  # scores held at once per (batch, key head): rows of query blocks times keys


def _inputs(q: Any, k: Any) -> tuple[np.ndarray, np.ndarray]:
    """``q``, ``k`` as canonical 4-D NumPy arrays, with the shape rules of :func:`npsparseattn.attention`."""
    for name, x in (("q", q), ("k", k)):
        if not isinstance(x, np.ndarray):
            raise TypeError(
                f"select_topk_blocks routes NumPy arrays; {name} is {type(x).__module__}.{type(x).__name__}"
            )
        if x.dtype.name not in FLOAT_DTYPES:
            raise TypeError(f"select_topk_blocks routes real floating arrays; {name} has dtype {x.dtype.name}")
        if x.ndim < 2:
            raise ValueError(f"{name} must have at least 2 axes (L, D), got shape {x.shape}")
    if q.ndim != k.ndim or q.shape[:-3] != k.shape[:-3]:
        raise ValueError(f"q {q.shape} and k {k.shape} must have the same number of axes and the same batch axes")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k must have the same last axis D: q {q.shape} vs k {k.shape}")
    if q.ndim >= 3 and (k.shape[-3] < 1 or q.shape[-3] % k.shape[-3]):
        raise ValueError(f"query heads ({q.shape[-3]}) must be a multiple of key heads ({k.shape[-3]})")
    return to_4d(q), to_4d(k)


def _force(force: Any) -> frozenset[str]:
    if isinstance(force, str) or not isinstance(force, Sequence | frozenset | set):
        raise TypeError(f"force must be a sequence drawn from {FORCE_KINDS}, e.g. ('sink', 'local'), got {force!r}")
    unknown = [f for f in force if f not in FORCE_KINDS]
    if unknown:
        raise ValueError(f"force entries must be among {FORCE_KINDS}, got {unknown[0]!r}")
    return frozenset(force)


def block_means(x: np.ndarray, size: int) -> np.ndarray:
    """Mean of each block of ``size`` rows along axis -2 (the last block may be partial), in float64.

    >>> block_means(np.arange(5.0)[:, None], 2)[:, 0].tolist()
    [0.5, 2.5, 4.0]
    """
    length = x.shape[-2]
    if length == 0:
        return np.zeros(x.shape[:-2] + (0, x.shape[-1]))
    starts = np.arange(0, length, size)
    sums = np.add.reduceat(x.astype(np.float64), starts, axis=-2)
    return sums / np.minimum(size, length - starts)[:, None]


def _block_max(qm: np.ndarray, k: np.ndarray, kv_block: int) -> np.ndarray:
    """``max_{j in block c} qm[r] . k[j]`` (rows, nkb) in float64, for one key head."""
    lk = k.shape[0]
    nkb = -(-lk // kv_block)
    s = np.full((qm.shape[0], nkb * kv_block), -np.inf)
    s[:, :lk] = qm @ k.astype(np.float64).T
    return s.reshape(qm.shape[0], nkb, kv_block).max(axis=2)


def select_topk_blocks(
    q: Any,
    k: Any,
    *,
    q_block: int,
    kv_block: int,
    topk: int,
    score: str = "mean",
    force: Sequence[str] = ("sink", "local"),
    causal: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Route every query block to its ``topk`` best key blocks (MoBA, Quest style): ``(kv_idx, kv_cnt)``.

    The result feeds :func:`npsparseattn.sparse_attention` with the same
    ``q_block``/``kv_block`` (and ``causal``, to mask inside the blocks).

    Scores, in float64, per (batch, key head): the *query* of a query block
    is the mean of its rows, averaged over the query heads of the key head's
    GQA group (the group shares one selection, as the lists are per key
    head); a key block scores

    * ``score="mean"``: query . (mean of the block's keys) (MoBA);
    * ``score="max"``: max over the block's keys of query . key (costs
      ``Lk / q_block`` of dense attention's score products).

    ``force`` blocks always count among the ``topk``: ``"sink"`` is key
    block 0, ``"local"`` the block(s) holding the aligned positions ``i + Lk
    - Lq`` of the block's queries (its diagonal).  With ``causal``, key
    blocks that start after the block's last aligned position are never
    chosen, forced or not.  Ties go to the lower block number; a NaN score
    is never chosen.

    Parameters
    ----------
    q : array (*batch, Hq, Lq, D), (Hq, Lq, D) or (Lq, D), NumPy, real floating
    k : array (*batch, Hk, Lk, D) of the same form, ``Hq % Hk == 0``
    q_block, kv_block, topk : ints >= 1
    score : ``"mean"`` or ``"max"``
    force : sequence drawn from ``("sink", "local")``
    causal : bool

    Returns
    -------
    kv_idx : int32 (*batch, Hk, nqb, K), ``K = min(nkb, max(topk, most forced blocks of a list))``:
        each list's blocks ascending, ``-1`` after them (the canonical form)
    kv_cnt : int32 (*batch, Hk, nqb): ``min(max(topk, forced), eligible)`` blocks per list

    Examples
    --------
    Four query heads sharing two key heads (GQA), 256 tokens:

    >>> rng = np.random.default_rng(0)
    >>> q, k = rng.standard_normal((4, 256, 16)), rng.standard_normal((2, 256, 16))
    >>> kv_idx, kv_cnt = select_topk_blocks(q, k, q_block=64, kv_block=32, topk=3, causal=True)
    >>> kv_idx.shape, kv_cnt.tolist()
    ((2, 4, 3), [[2, 3, 3, 3], [2, 3, 3, 3]])
    >>> kv_idx[0, 0].tolist(), int(kv_idx[0, 3, 0])      # block 0: the sink and its diagonal; then the sink first
    ([0, 1, -1], 0)
    """
    q4, k4 = _inputs(q, k)
    q_block = check_int(q_block, "q_block", 1)
    kv_block = check_int(kv_block, "kv_block", 1)
    topk = check_int(topk, "topk", 1)
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    forced_kinds = _force(force)
    causal = check_flag(causal, "causal")
    n_batch, hq, lq, _ = q4.shape
    hk, lk = k4.shape[1], k4.shape[2]
    nqb, nkb = -(-lq // q_block), -(-lk // kv_block)
    off = lk - lq
    r = np.arange(nqb)
    first = r * q_block + off
    last = np.minimum(r * q_block + q_block, lq) - 1 + off
    c = np.arange(nkb)
    forced = np.zeros((nqb, nkb), dtype=bool)
    if "local" in forced_kinds:
        lo, hi = np.maximum(first, 0), np.minimum(last, lk - 1)
        forced |= (c[None, :] >= (lo // kv_block)[:, None]) & (c[None, :] <= (hi // kv_block)[:, None])
        forced &= (lo <= hi)[:, None]
    if "sink" in forced_kinds and nkb:
        forced[:, 0] = True
    eligible = np.ones((nqb, nkb), dtype=bool)
    if causal:
        eligible = c[None, :] * kv_block <= last[:, None]
    forced &= eligible
    keep = np.minimum(np.maximum(forced.sum(axis=1), topk), eligible.sum(axis=1))
    width = int(min(nkb, max(topk, forced.sum(axis=1).max(initial=0))))
    kv_idx = np.full((n_batch, hk, nqb, width), -1, np.int32)
    kv_cnt = np.zeros((n_batch, hk, nqb), np.int32)
    group = hq // hk
    q_means = block_means(q4, q_block).reshape(n_batch, hk, group, nqb, q4.shape[3]).mean(axis=2)
    k_means = block_means(k4, kv_block) if score == "mean" else None
    step = max(1, _CHUNK_CELLS // max(nkb * (kv_block if score == "max" else 1), 1))
    for b in range(n_batch):
        for h in range(hk):
            for r0 in range(0, nqb, step):
                r1 = min(r0 + step, nqb)
                qm = q_means[b, h, r0:r1]
                s = qm @ k_means[b, h].T if k_means is not None else _block_max(qm, k4[b, h], kv_block)
                s = np.where(np.isnan(s), -np.inf, s)
                s = np.where(forced[r0:r1], np.inf, np.where(eligible[r0:r1], s, -np.inf))
                order = np.argsort(-s, axis=1, kind="stable")[:, :width]
                chosen = np.take_along_axis(s, order, axis=1) > -np.inf
                chosen &= np.arange(width)[None, :] < keep[r0:r1, None]
                picked = np.sort(np.where(chosen, order, nkb), axis=1)
                kv_idx[b, h, r0:r1] = np.where(picked < nkb, picked, -1)
                kv_cnt[b, h, r0:r1] = chosen.sum(axis=1)
    lead = tuple(k.shape[:-2])
    return kv_idx.reshape(lead + (nqb, width)), kv_cnt.reshape(lead + (nqb,))

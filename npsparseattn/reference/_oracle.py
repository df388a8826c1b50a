"""The whole score matrix in float64: the arithmetic every reference kernel shares.

Written to be obviously right, not fast: the full (Lq, Lk) score matrix is
built, masked with an explicit boolean mask and softmaxed in float64.  Works on
NumPy and CuPy arrays alike (the array module is passed in).  A row with no
visible key has output 0, ``lse = -inf`` and zero gradients.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def visibility_mask(
    seq_q: int,
    seq_k: int,
    *,
    offset: int | None = None,
    left: int | None = None,
    right: int | None = None,
    xp: Any = np,
) -> Any:
    """Boolean (Lq, Lk) mask: ``mask[i, j]`` iff query ``i`` sees key ``j``.

    Query ``i`` sees key ``j`` iff ``i + offset - left <= j <= i + offset + right``;
    ``offset`` defaults to ``Lk - Lq`` (bottom-right alignment), ``None`` bounds
    are unbounded.

    >>> visibility_mask(3, 3, right=0).astype(int)
    array([[1, 0, 0],
           [1, 1, 0],
           [1, 1, 1]])
    """
    offset = seq_k - seq_q if offset is None else offset
    i = xp.arange(seq_q)[:, None] + offset
    j = xp.arange(seq_k)[None, :]
    mask = xp.ones((seq_q, seq_k), dtype=bool)
    if left is not None:
        mask &= j >= i - left
    if right is not None:
        mask &= j <= i + right
    return mask


def expand_groups(x: Any, n_heads: int) -> Any:
    """(B, Hk, L, X) -> (B, Hq, L, X): each key/value head serves its query-head group."""
    return x.repeat(n_heads // x.shape[1], axis=1)


def masked_softmax(scores: Any, mask: Any, xp: Any) -> tuple[Any, Any]:
    """Row softmax of float64 ``scores`` restricted to ``mask``; returns ``(P, lse)``.

    Empty rows give ``P = 0`` and ``lse = -inf``; a row with a NaN score
    among its visible keys gives NaN ``P`` and ``lse``.
    """
    s = xp.where(mask, scores, -xp.inf)
    if s.shape[-1] == 0:
        row_max = xp.full(s.shape[:-1] + (1,), -xp.inf)
    else:
        row_max = s.max(axis=-1, keepdims=True)
    row_max = xp.where(xp.isfinite(row_max), row_max, 0.0)
    e = xp.where(mask, xp.exp(s - row_max), 0.0)
    total = e.sum(axis=-1, keepdims=True)
    nonempty = total != 0  # a NaN total (a NaN score) stays NaN: out and lse of that row are NaN
    p = e / xp.where(nonempty, total, 1.0)
    lse = xp.where(nonempty, row_max + xp.log(xp.where(nonempty, total, 1.0)), -xp.inf)
    return p, lse[..., 0]


def scores(q: Any, k: Any, scale: float, xp: Any) -> Any:
    """float64 ``scale * q k^T`` (B, Hq, Lq, Lk), key heads repeated over their query groups."""
    k64 = expand_groups(k.astype(xp.float64), q.shape[1])
    return scale * xp.einsum("bhid,bhjd->bhij", q.astype(xp.float64), k64)


def visible_sum(w: Any, visible: Any, x: Any, xp: Any) -> Any:
    """``out[..., i, :] = sum_j w[..., i, j] * x[..., j, :]`` over the visible pairs ``(i, j)`` only.

    A matrix product would also multiply the zeros of masked pairs by their
    values, so a NaN or inf in ``x[j]`` would reach every row; the dense
    formula sums over visible pairs only, so it reaches exactly the rows
    ``i`` that see ``j`` (in the columns where it sits).  ``w`` is 0 off
    ``visible``; ``visible`` broadcasts to ``w``'s shape.
    """
    bad = ~xp.isfinite(x)
    out = xp.einsum("bhij,bhjd->bhid", w, xp.where(bad, 0.0, x))
    seen = xp.broadcast_to(visible, w.shape)
    with np.errstate(invalid="ignore"):  # 0 * inf on masked pairs is computed, then discarded by where
        for b, h, j in zip(*(np.asarray(ix) for ix in xp.nonzero(bad.any(axis=-1)))):
            column = xp.where(bad[b, h, j], x[b, h, j], 0.0)
            out[b, h] += xp.where(seen[b, h, :, j][:, None], w[b, h, :, j][:, None] * column[None, :], 0.0)
    return out


def _elementwise(fn: Any, xp: Any, *args: Any) -> Any:
    """``fn`` of scalars applied to every element of the broadcast ``args`` (its plain Python body, float64)."""
    body = np.vectorize(getattr(fn, "py_func", fn), otypes=[np.float64])
    return xp.asarray(body(*(a.get() if hasattr(a, "get") else a for a in args)))


def modified_scores(raw: Any, mods: Any, offset: int, xp: Any) -> tuple[Any, Any, Any, Any]:
    """The scores after ``mods`` (:mod:`npsparseattn.problems.scores`), from ``raw = scale * q k^T``.

    Returns ``(x, keep, d_bias, d_raw)``: the final (B, Hq, Lq, Lk) scores,
    the ``mask_mod`` mask (``None`` without one), and the derivatives of the
    final score with respect to the bias (``score_mod'``) and to ``raw``
    (``score_mod' * softcap'``), each ``1.0`` where there is nothing to differentiate.
    """
    n_batch, n_heads, seq_q, seq_k = raw.shape
    b = xp.arange(n_batch).reshape(-1, 1, 1, 1)
    h = xp.arange(n_heads).reshape(1, -1, 1, 1)
    i = xp.arange(seq_q).reshape(1, 1, -1, 1)
    j = xp.arange(seq_k).reshape(1, 1, 1, -1)
    x, d_raw, d_bias, keep = raw, 1.0, 1.0, None
    if mods.softcap is not None:
        t = xp.tanh(raw / mods.softcap)
        x, d_raw = mods.softcap * t, 1.0 - t * t
    if mods.slopes is not None:
        x = x - mods.slopes.astype(xp.float64)[:, :, None, None] * xp.abs(i + offset - j)
    if mods.bias is not None:
        x = x + mods.canonical_bias(np.float64, raw.shape)
    if mods.score_mod is not None:
        grid = xp.broadcast_arrays(x, b, h, i, j)
        if mods.score_mod_grad is not None:
            d_bias = _elementwise(mods.score_mod_grad, xp, *grid)
        x = _elementwise(mods.score_mod, xp, *grid)
    if mods.mask_mod is not None:
        keep = _elementwise(mods.mask_mod, xp, *xp.broadcast_arrays(b, h, i, j)) != 0
    return x, keep, d_bias, d_raw * d_bias


def forward(
    q: Any, k: Any, v: Any, mask: Any, scale: float, xp: Any, mods: Any = None, offset: int = 0
) -> tuple[Any, Any, Any]:
    """float64 ``(out, lse, P)``; ``mask`` broadcasts to (B, Hq, Lq, Lk); ``mods`` (with the diagonal ``offset``)
    modify the scores (:func:`modified_scores`)."""
    s = scores(q, k, scale, xp)
    if mods is not None:
        s, keep, _, _ = modified_scores(s, mods, offset, xp)
        mask = mask if keep is None else mask & keep
    p, lse = masked_softmax(s, mask, xp)
    v64 = expand_groups(v.astype(xp.float64), q.shape[1])
    return visible_sum(p, mask, v64, xp), lse, p


def backward(
    dout: Any,
    q: Any,
    k: Any,
    v: Any,
    out: Any,
    lse: Any,
    mask: Any,
    scale: float,
    xp: Any,
    mods: Any = None,
    offset: int = 0,
    dbias: Any = None,
) -> tuple[Any, Any, Any]:
    """float64 ``(dq, dk, dv)`` from the given ``out`` and ``lse`` (FlashAttention-2's formulas).

    ``P = exp(scale * q k^T - lse)`` on visible pairs, ``dS = P * (dO V^T -
    rowsum(dO * O))``; dk/dv are summed over each GQA group.  Ring attention
    relies on this: a block's contribution uses the *global* ``out``/``lse``.
    A row whose ``lse`` is ``-inf`` saw no key and has no gradient; every
    product sums over visible pairs only, so a NaN reaches what the dense
    formula's sums reach and nothing else.  With ``mods``, ``dS`` is carried
    back through them (:func:`modified_scores`) and, given a (B, Hq, Lq, Lk)
    ``dbias`` buffer, the gradient of the biased score is written there.
    """
    b, hk, lk = k.shape[:3]
    group = q.shape[1] // hk
    lse64 = lse.astype(xp.float64)[..., None]
    s = scores(q, k, scale, xp)
    d_bias = d_raw = 1.0
    if mods is not None:
        s, keep, d_bias, d_raw = modified_scores(s, mods, offset, xp)
        mask = mask if keep is None else mask & keep
    visible = xp.broadcast_to(mask, q.shape[:2] + (q.shape[2], lk)) & ~xp.isneginf(lse64)
    p = xp.where(visible, xp.exp(xp.where(visible, s - lse64, 0.0)), 0.0)
    do = dout.astype(xp.float64)
    v64 = expand_groups(v.astype(xp.float64), q.shape[1])
    dp = xp.einsum("bhid,bhjd->bhij", do, v64)
    ds = xp.where(visible, p * (dp - (do * out.astype(xp.float64)).sum(axis=-1, keepdims=True)), 0.0)
    if dbias is not None:
        dbias[...] = xp.where(visible, ds * d_bias, 0.0)
    ds = xp.where(visible, ds * d_raw, 0.0)
    k64 = expand_groups(k.astype(xp.float64), q.shape[1])
    dq = scale * visible_sum(ds, visible, k64, xp)
    flipped = visible.swapaxes(-1, -2)
    dk = scale * visible_sum(ds.swapaxes(-1, -2), flipped, q.astype(xp.float64), xp)
    dv = visible_sum(p.swapaxes(-1, -2), flipped, do, xp)
    dk = dk.reshape(b, hk, group, lk, dk.shape[-1]).sum(axis=2)
    dv = dv.reshape(b, hk, group, lk, dv.shape[-1]).sum(axis=2)
    return dq, dk, dv


def store(result: Any, buffer: Any | None) -> Any:
    """``result`` written into ``buffer`` when one is given (then returned), else ``result``."""
    if buffer is None:
        return result
    buffer[...] = result
    return buffer

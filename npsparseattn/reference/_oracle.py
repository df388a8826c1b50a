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

    Empty rows give ``P = 0`` and ``lse = -inf``.
    """
    s = xp.where(mask, scores, -xp.inf)
    if s.shape[-1] == 0:
        row_max = xp.full(s.shape[:-1] + (1,), -xp.inf)
    else:
        row_max = s.max(axis=-1, keepdims=True)
    row_max = xp.where(xp.isfinite(row_max), row_max, 0.0)
    e = xp.where(mask, xp.exp(s - row_max), 0.0)
    total = e.sum(axis=-1, keepdims=True)
    nonempty = total > 0
    p = e / xp.where(nonempty, total, 1.0)
    lse = xp.where(nonempty, row_max + xp.log(xp.where(nonempty, total, 1.0)), -xp.inf)
    return p, lse[..., 0]


def scores(q: Any, k: Any, scale: float, xp: Any) -> Any:
    """float64 ``scale * q k^T`` (B, Hq, Lq, Lk), key heads repeated over their query groups."""
    k64 = expand_groups(k.astype(xp.float64), q.shape[1])
    return scale * xp.einsum("bhid,bhjd->bhij", q.astype(xp.float64), k64)


def weighted_values(p: Any, mask: Any, v64: Any, xp: Any) -> Any:
    """``sum_j P_ij v_j`` over the keys ``j`` that row ``i`` sees, and over no other key.

    ``P @ V`` would also multiply the zeros of masked keys by their values,
    so a NaN or inf in ``v[j]`` would reach every row; the dense formula
    sums over visible keys only, so it reaches exactly the rows that see key
    ``j`` (in the columns where it sits).
    """
    bad = ~xp.isfinite(v64)
    out = xp.einsum("bhij,bhjd->bhid", p, xp.where(bad, 0.0, v64))
    visible = xp.broadcast_to(mask, p.shape)
    with np.errstate(invalid="ignore"):  # 0 * inf on masked entries is computed, then discarded by where
        for b, h, j in zip(*(np.asarray(ix) for ix in xp.nonzero(bad.any(axis=-1)))):
            column = xp.where(bad[b, h, j], v64[b, h, j], 0.0)
            out[b, h] += xp.where(visible[b, h, :, j][:, None], p[b, h, :, j][:, None] * column[None, :], 0.0)
    return out


def forward(q: Any, k: Any, v: Any, mask: Any, scale: float, xp: Any) -> tuple[Any, Any, Any]:
    """float64 ``(out, lse, P)``; ``mask`` broadcasts to (B, Hq, Lq, Lk)."""
    p, lse = masked_softmax(scores(q, k, scale, xp), mask, xp)
    v64 = expand_groups(v.astype(xp.float64), q.shape[1])
    return weighted_values(p, mask, v64, xp), lse, p


def backward(
    dout: Any, q: Any, k: Any, v: Any, out: Any, lse: Any, mask: Any, scale: float, xp: Any
) -> tuple[Any, Any, Any]:
    """float64 ``(dq, dk, dv)`` from the given ``out`` and ``lse`` (FlashAttention-2's formulas).

    ``P = exp(scale * q k^T - lse)`` on visible pairs, ``dS = P * (dO V^T -
    rowsum(dO * O))``; dk/dv are summed over each GQA group.  Ring attention
    relies on this: a block's contribution uses the *global* ``out``/``lse``.
    """
    b, hk, lk = k.shape[:3]
    group = q.shape[1] // hk
    lse64 = lse.astype(xp.float64)[..., None]
    visible = mask & xp.isfinite(lse64)
    p = xp.where(visible, xp.exp(xp.where(visible, scores(q, k, scale, xp) - lse64, 0.0)), 0.0)
    do = dout.astype(xp.float64)
    v64 = expand_groups(v.astype(xp.float64), q.shape[1])
    dp = xp.einsum("bhid,bhjd->bhij", do, v64)
    ds = p * (dp - (do * out.astype(xp.float64)).sum(axis=-1, keepdims=True))
    dq = scale * xp.einsum("bhij,bhjd->bhid", ds, expand_groups(k.astype(xp.float64), q.shape[1]))
    dk = scale * xp.einsum("bhij,bhid->bhjd", ds, q.astype(xp.float64))
    dv = xp.einsum("bhij,bhid->bhjd", p, do)
    dk = dk.reshape(b, hk, group, lk, dk.shape[-1]).sum(axis=2)
    dv = dv.reshape(b, hk, group, lk, dv.shape[-1]).sum(axis=2)
    return dq, dk, dv


def store(result: Any, buffer: Any | None) -> Any:
    """``result`` written into ``buffer`` when one is given (then returned), else ``result``."""
    if buffer is None:
        return result
    buffer[...] = result
    return buffer

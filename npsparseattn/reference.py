"""Dense float64 attention: the oracle every kernel is tested against.

Written to be obviously right, not fast: the full (Lq, Lk) score matrix is
built, masked with an explicit boolean mask, and softmaxed in float64.  Works
on NumPy and CuPy arrays alike (the array module is taken from the inputs).

Conventions (DESIGN.md section 3): query ``i`` sees key ``j`` iff
``i + off - left <= j <= i + off + right`` with ``off = Lk - Lq``
(bottom-right alignment); ``causal`` sets ``right = 0``; a row with no visible
key has output 0, ``lse = -inf`` and zero gradients.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from npsparseattn._checks import FLOAT_DTYPES, AttentionProblem, Gradients, attention_problem, output_like
from npsparseattn._dispatch import Implementation, array_module, register


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


def _expand_groups(x: Any, n_heads: int) -> Any:
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


def dense_forward(problem: AttentionProblem, mask: Any | None = None) -> tuple[Any, Any, Any]:
    """Float64 ``(out, lse, P)`` of a validated problem in canonical 4-D form.

    ``mask`` (broadcastable to (B, Hq, Lq, Lk)) replaces the causal/window
    mask when given (block-sparse and LSH references pass their own).
    """
    xp = array_module(problem.kind)
    q = problem.q.astype(xp.float64)
    k = _expand_groups(problem.k.astype(xp.float64), problem.n_heads)
    v = _expand_groups(problem.v.astype(xp.float64), problem.n_heads)
    if mask is None:
        mask = visibility_mask(problem.seq_q, problem.seq_k, left=problem.left, right=problem.right, xp=xp)
    scores = problem.scale * xp.einsum("bhid,bhjd->bhij", q, k)
    p, lse = masked_softmax(scores, mask, xp)
    return xp.einsum("bhij,bhjd->bhid", p, v), lse, p


def dense_backward(problem: AttentionProblem, dout: Any, mask: Any | None = None) -> tuple[Any, Any, Any]:
    """Float64 ``(dq, dk, dv)`` of a validated problem; ``dout`` is (B, Hq, Lq, Dv).

    Softmax is recomputed from ``q`` and ``k`` in float64; dk/dv are summed
    over each GQA group.
    """
    xp = array_module(problem.kind)
    out, _, p = dense_forward(problem, mask)
    q = problem.q.astype(xp.float64)
    k = _expand_groups(problem.k.astype(xp.float64), problem.n_heads)
    v = _expand_groups(problem.v.astype(xp.float64), problem.n_heads)
    do = dout.astype(xp.float64)
    dv = xp.einsum("bhij,bhid->bhjd", p, do)
    dp = xp.einsum("bhid,bhjd->bhij", do, v)
    ds = p * (dp - (do * out).sum(axis=-1, keepdims=True))
    dq = problem.scale * xp.einsum("bhij,bhjd->bhid", ds, k)
    dk = problem.scale * xp.einsum("bhij,bhid->bhjd", ds, q)
    b, hk, lk = problem.k.shape[:3]
    group = problem.n_heads // hk
    dk = dk.reshape(b, hk, group, lk, dk.shape[-1]).sum(axis=2)
    dv = dv.reshape(b, hk, group, lk, dv.shape[-1]).sum(axis=2)
    return dq, dk, dv


def attention(
    q: Any,
    k: Any,
    v: Any,
    *,
    causal: bool = False,
    window: tuple[int | None, int | None] | None = None,
    scale: float | None = None,
) -> tuple[Any, Any]:
    """Dense attention in float64; returns ``(out, lse)`` as float64 arrays.

    Shapes as :func:`npsparseattn.attention`: ``q`` (..., Hq, Lq, D),
    ``k`` (..., Hk, Lk, D), ``v`` (..., Hk, Lk, Dv) -> ``out`` (..., Hq, Lq, Dv),
    ``lse`` (..., Hq, Lq).

    >>> import numpy as np
    >>> x = np.eye(2)
    >>> out, lse = attention(x, x, x, scale=0.0)
    >>> out
    array([[0.5, 0.5],
           [0.5, 0.5]])
    """
    problem = attention_problem(q, k, v, causal=causal, window=window, scale=scale)
    out, lse, _ = dense_forward(problem)
    return problem.restore(out), problem.restore(lse)


def attention_backward(
    dout: Any,
    q: Any,
    k: Any,
    v: Any,
    *,
    causal: bool = False,
    window: tuple[int | None, int | None] | None = None,
    scale: float | None = None,
) -> tuple[Any, Any, Any]:
    """Float64 gradients ``(dq, dk, dv)`` of dense attention for upstream ``dout``.

    ``dout`` has the shape of the forward output; results have the shapes of
    ``q``, ``k``, ``v`` (dk/dv summed over each GQA group).
    """
    problem = attention_problem(q, k, v, causal=causal, window=window, scale=scale)
    dq, dk, dv = dense_backward(problem, output_like(problem, dout, "dout"))
    return problem.restore(dq), problem.restore(dk), problem.restore(dv)


def lse_dtype(dtype: Any) -> Any:
    """lse is float64 for float64 inputs, float32 otherwise."""
    return np.float64 if dtype == np.float64 else np.float32


def _backend_forward(problem: AttentionProblem) -> tuple[Any, Any]:
    out, lse, _ = dense_forward(problem)
    return out.astype(problem.dtype), lse.astype(lse_dtype(problem.dtype))


def _backend_backward(problem: AttentionProblem, grads: Gradients) -> tuple[Any, Any, Any]:
    return tuple(g.astype(problem.dtype) for g in dense_backward(problem, grads.dout))


register(
    "attention",
    Implementation(
        name="reference",
        kinds=("numpy", "cupy"),
        dtypes=FLOAT_DTYPES,
        forward=_backend_forward,
        backward=_backend_backward,
        auto=False,
        priority=100,
    ),
)

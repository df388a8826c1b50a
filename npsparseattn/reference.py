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
from npsparseattn.block_sparse import check_layout


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

    ``dout`` has the shape of the forward output, (..., Hq, Lq, Dv); results
    have the shapes of ``q``, ``k``, ``v`` (dk/dv summed over each GQA group).

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> q = rng.standard_normal((4, 6, 8))  # (Hq, Lq, D)
    >>> k, v = rng.standard_normal((2, 2, 6, 8))  # (Hk, Lk, D): GQA, 2 query heads per key head
    >>> dq, dk, dv = attention_backward(np.ones((4, 6, 8)), q, k, v, causal=True)
    >>> dq.shape, dk.shape, dv.dtype
    ((4, 6, 8), (2, 6, 8), dtype('float64'))
    """
    problem = attention_problem(q, k, v, causal=causal, window=window, scale=scale)
    dq, dk, dv = dense_backward(problem, output_like(problem, dout, "dout"))
    return problem.restore(dq), problem.restore(dk), problem.restore(dv)


def block_sparse_mask(problem: AttentionProblem, layout: Any) -> Any:
    """Bool (1, heads, Lq, Lk): the layout's blocks expanded to tokens, and the causal/window mask."""
    xp = array_module(problem.kind)
    blocks = xp.asarray(layout.to_token_mask())
    visible = visibility_mask(problem.seq_q, problem.seq_k, left=problem.left, right=problem.right, xp=xp)
    return (blocks & visible)[None]


def block_sparse_attention(
    q: Any,
    k: Any,
    v: Any,
    layout: Any,
    *,
    causal: bool = False,
    window: tuple[int | None, int | None] | None = None,
    scale: float | None = None,
) -> tuple[Any, Any]:
    """Block-sparse attention in float64: dense attention with mask ``expand(layout) & causal & window``.

    Shapes as :func:`npsparseattn.block_sparse_attention`; returns float64
    ``(out, lse)``.

    >>> import numpy as np
    >>> from npsparseattn import layouts
    >>> x = np.eye(4)
    >>> out, lse = block_sparse_attention(x, x, x, layouts.from_block_mask(np.eye(2, dtype=bool), 2), scale=0.0)
    >>> out[0]
    array([0.5, 0.5, 0. , 0. ])
    """
    problem = attention_problem(q, k, v, causal=causal, window=window, scale=scale)
    out, lse, _ = dense_forward(problem, block_sparse_mask(problem, check_layout(layout, problem)))
    return problem.restore(out), problem.restore(lse)


def block_sparse_attention_backward(
    dout: Any,
    q: Any,
    k: Any,
    v: Any,
    layout: Any,
    *,
    causal: bool = False,
    window: tuple[int | None, int | None] | None = None,
    scale: float | None = None,
) -> tuple[Any, Any, Any]:
    """Float64 gradients ``(dq, dk, dv)`` of :func:`block_sparse_attention` for upstream ``dout``.

    ``dout`` has the shape of the forward output, (..., Hq, Lq, Dv); results
    have the shapes of ``q``, ``k``, ``v``.

    >>> import numpy as np
    >>> from npsparseattn import layouts
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = rng.standard_normal((3, 2, 64, 8))  # (H, L, D) each
    >>> layout = layouts.sliding_window(64, block=16, window=16)
    >>> dq, dk, dv = block_sparse_attention_backward(np.ones((2, 64, 8)), q, k, v, layout, causal=True)
    >>> dq.shape, dv.shape
    ((2, 64, 8), (2, 64, 8))
    """
    problem = attention_problem(q, k, v, causal=causal, window=window, scale=scale)
    mask = block_sparse_mask(problem, check_layout(layout, problem))
    dq, dk, dv = dense_backward(problem, output_like(problem, dout, "dout"), mask)
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


def _block_sparse_backend_forward(problem: AttentionProblem, layout: Any) -> tuple[Any, Any]:
    out, lse, _ = dense_forward(problem, block_sparse_mask(problem, layout))
    return out.astype(problem.dtype), lse.astype(lse_dtype(problem.dtype))


def _block_sparse_backend_backward(problem: AttentionProblem, grads: Gradients, layout: Any) -> tuple[Any, Any, Any]:
    grads = dense_backward(problem, grads.dout, block_sparse_mask(problem, layout))
    return tuple(g.astype(problem.dtype) for g in grads)


register(
    "block_sparse_attention",
    Implementation(
        name="reference",
        kinds=("numpy", "cupy"),
        dtypes=FLOAT_DTYPES,
        forward=_block_sparse_backend_forward,
        backward=_block_sparse_backend_backward,
        auto=False,
        priority=100,
    ),
)


# --- LSH attention (Reformer, DESIGN.md section 6) ---------------------------------------------
# The whole procedure on one (batch, head) at a time, from the formulas: hash, sort, then the
# token-level mask it implies, counted: counts[r, i, j] is how many times position j is among the
# keys that position i attends in round r (a cyclic window can hold a chunk twice).


def lsh_hash(x: Any, rotations: Any, factors: tuple[int, ...]) -> Any:
    """Buckets (n_hashes, L) of the rows of ``x`` (L, D): ``argmax(concat[xR, -xR])`` per factor, in float64."""
    rotated = np.einsum("ld,dhc->hlc", np.asarray(x, np.float64), np.asarray(rotations, np.float64))
    buckets = np.zeros(rotated.shape[:2], dtype=np.int64)
    start, product = 0, 1
    for f in factors:
        part = rotated[..., start : start + f // 2]
        buckets += np.argmax(np.concatenate([part, -part], axis=-1), axis=-1) * product
        start += f // 2
        product *= f
    return buckets


def lsh_window_counts(buckets: Any, chunk_size: int, chunks_before: int, chunks_after: int) -> Any:
    """``counts[r, i, j]``: times position ``j`` is a key of position ``i`` in round ``r``; buckets (n_hashes, L)."""
    n_hashes, length = buckets.shape
    item_round = np.repeat(np.arange(n_hashes), length)
    item_pos = np.tile(np.arange(length), n_hashes)
    order = np.lexsort((item_pos, buckets.reshape(-1), item_round))  # by round, then bucket, then position
    n_chunks = order.size // chunk_size
    counts = np.zeros((n_hashes, length, length), dtype=np.int64)
    for slot, query in enumerate(order):
        chunk = slot // chunk_size
        for step in range(-chunks_before, chunks_after + 1):
            neighbour = (chunk + step) % n_chunks
            keys = order[neighbour * chunk_size : (neighbour + 1) * chunk_size]
            np.add.at(counts[item_round[query], item_pos[query]], item_pos[keys], 1)
    return counts


def lsh_logits(x: Any, *, causal: bool, exclude_self: bool) -> tuple[Any, Any, Any]:
    """Shared-QK ``(logits, keys, free)`` of (L, D) rows: ``logits = x @ keys.T`` with the masks applied.

    ``keys = x / sqrt(mean(x^2) + 1e-6) / sqrt(D)``; a causally masked logit is
    -1e9, the own position's -1e5; ``free`` marks the logits that are not constants.
    """
    x = np.asarray(x, np.float64)
    keys = x / np.sqrt(np.mean(x**2, axis=-1, keepdims=True) + 1e-6) / np.sqrt(x.shape[-1])
    logits = x @ keys.T
    i = np.arange(x.shape[0])[:, None]
    j = np.arange(x.shape[0])[None, :]
    free = np.ones(logits.shape, dtype=bool)
    if causal:
        logits = np.where(j > i, -1e9, logits)
        free &= j <= i
    if exclude_self:
        logits = np.where(j == i, -1e5, logits)
        free &= j != i
    return logits, keys, free


def _lsh_one_head(problem: Any, x: Any, values: Any) -> tuple[Any, Any, Any, Any, Any]:
    """``(out, lse, P, keys, free)`` of one head; ``P`` (L, L) sums every round's weights."""
    logits, keys, free = lsh_logits(x, causal=problem.causal, exclude_self=problem.exclude_self)
    buckets = lsh_hash(x, problem.rotations, problem.factors)
    counts = lsh_window_counts(buckets, problem.chunk_size, problem.chunks_before, problem.chunks_after)
    seen = counts > 0
    row_max = np.where(seen, logits, -np.inf).max(axis=-1, keepdims=True)
    weights = counts * np.exp(np.where(seen, logits - row_max, -np.inf))
    totals = weights.sum(axis=-1)
    lse_rounds = row_max[..., 0] + np.log(totals)
    # round weights exp(lse_r - logsumexp_r lse_r), normalised explicitly: at the -1e5 self logit the
    # lse carry an absolute rounding of 1e-11 that exp(lse_r - lse) would pass on
    round_weights = np.exp(lse_rounds - lse_rounds.max(axis=0))
    round_weights /= round_weights.sum(axis=0)
    p = (round_weights[..., None] * weights / totals[..., None]).sum(axis=0)
    out = p @ np.asarray(values, np.float64)
    return out, np.logaddexp.reduce(lse_rounds, axis=0), p, keys, free


def lsh_dense_forward(problem: Any) -> tuple[Any, Any]:
    """Float64 ``(out, lse)`` of a validated LSH problem in canonical 4-D form."""
    n_batch, n_heads, length, _ = problem.qk.shape
    out = np.empty((n_batch, n_heads, length, problem.v.shape[3]))
    lse = np.empty((n_batch, n_heads, length))
    for b in range(n_batch):
        for h in range(n_heads):
            out[b, h], lse[b, h] = _lsh_one_head(problem, problem.qk[b, h], problem.v[b, h])[:2]
    return out, lse


def lsh_dense_backward(problem: Any, dout: Any) -> tuple[Any, Any]:
    """Float64 ``(dqk, dv)`` of a validated LSH problem; ``dout`` is (B, H, L, Dv).

    The rounds combine by lse, so ``out = P @ v`` with ``P`` the sum of the
    rounds' weights ``counts * exp(logit - lse)``: the usual softmax gradient,
    with ``dlogit = 0`` on the masked (constant) logits, then both sides of the
    shared ``qk``: ``dqk = dlogit @ keys + J^T (dlogit^T @ qk)`` with ``J`` the
    Jacobian of the key normalisation.
    """
    dqk = np.empty(problem.qk.shape)
    dv = np.empty(problem.v.shape)
    d = problem.qk.shape[3]
    for b in range(problem.qk.shape[0]):
        for h in range(problem.qk.shape[1]):
            x = np.asarray(problem.qk[b, h], np.float64)
            values = np.asarray(problem.v[b, h], np.float64)
            do = np.asarray(dout[b, h], np.float64)
            out, _, p, keys, free = _lsh_one_head(problem, x, values)
            dv[b, h] = p.T @ do
            dlogits = np.where(free, p * (do @ values.T - (do * out).sum(axis=-1, keepdims=True)), 0.0)
            dkeys = dlogits.T @ x
            a = 1.0 / np.sqrt(np.mean(x**2, axis=-1, keepdims=True) + 1e-6)
            key_side = a / np.sqrt(d) * (dkeys - a**2 * (x * dkeys).sum(axis=-1, keepdims=True) / d * x)
            dqk[b, h] = dlogits @ keys + key_side
    return dqk, dv


def lsh_attention(qk: Any, v: Any, **options: Any) -> tuple[Any, Any]:
    """Float64 ``(out, lse)`` of LSH attention; arguments as :func:`npsparseattn.lsh.lsh_attention`.

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> qk, v = rng.standard_normal((2, 32, 8)), rng.standard_normal((2, 32, 8))
    >>> out, lse = lsh_attention(qk, v, n_buckets=4, n_hashes=2, chunk_size=8, seed=0)
    >>> out.shape, lse.shape
    ((2, 32, 8), (2, 32))
    """
    from npsparseattn.lsh import lsh_problem

    problem = lsh_problem(qk, v, **options)
    out, lse = lsh_dense_forward(problem)
    return problem.restore(out), problem.restore(lse)


def lsh_attention_backward(dout: Any, qk: Any, v: Any, **options: Any) -> tuple[Any, Any]:
    """Float64 ``(dqk, dv)`` of LSH attention for upstream ``dout`` (shaped like the output).

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> qk, v = rng.standard_normal((32, 8)), rng.standard_normal((32, 4))
    >>> dqk, dv = lsh_attention_backward(np.ones((32, 4)), qk, v, n_buckets=4, chunk_size=8, seed=0)
    >>> dqk.shape, dv.shape
    ((32, 8), (32, 4))
    """
    from npsparseattn.lsh import lsh_problem

    problem = lsh_problem(qk, v, **options)
    dqk, dv = lsh_dense_backward(problem, output_like(problem.dense, dout, "dout"))
    return problem.restore(dqk), problem.restore(dv)


def _lsh_backend_forward(problem: Any) -> tuple[Any, Any]:
    out, lse = lsh_dense_forward(problem)
    return out.astype(problem.dtype), lse.astype(lse_dtype(problem.dtype))


def _lsh_backend_backward(problem: Any, grads: Gradients) -> tuple[Any, Any]:
    return tuple(g.astype(problem.dtype) for g in lsh_dense_backward(problem, grads.dout))


register(
    "lsh_attention",
    Implementation(
        name="reference",
        kinds=("numpy",),
        dtypes=FLOAT_DTYPES,
        forward=_lsh_backend_forward,
        backward=_lsh_backend_backward,
        auto=False,
        priority=100,
    ),
)

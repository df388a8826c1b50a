"""Dense float64 attention: the oracle every kernel is tested against, and backend ``"reference"``.

The functions here take the public functions' arguments and return float64
results (``out``/``lse`` or gradients) computed from the formulas, with the
full score matrix: obviously right, never fast.  The same arithmetic is
registered as backend ``"reference"`` of every operation, one module per
operation (``exact``, ``block_sparse``, ``lsh_hash``, ``lsh_sort``, ``lsh``);
``backend="auto"`` never picks it.

Conventions (``docs/conventions.md``): query ``i`` sees key ``j`` iff
``i + off - left <= j <= i + off + right`` with ``off = Lk - Lq``
(bottom-right alignment); ``causal`` sets ``right = 0``; a row with no visible
key has output 0, ``lse = -inf`` and zero gradients.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from npsparseattn.problems import attention_problem, check_layout, lsh_problem, output_like
from npsparseattn.reference import block_sparse as _block_sparse
from npsparseattn.reference import exact as _exact
from npsparseattn.reference import lsh as _lsh
from npsparseattn.reference import lsh_hash as _lsh_hash
from npsparseattn.reference import lsh_sort as _lsh_sort
from npsparseattn.reference._oracle import masked_softmax, visibility_mask

Window = tuple[int | None, int | None] | None

__all__ = [
    "attention",
    "attention_backward",
    "block_sparse_attention",
    "block_sparse_attention_backward",
    "lsh_attention",
    "lsh_attention_backward",
    "lsh_window_counts",
    "masked_softmax",
    "visibility_mask",
]


def attention(q: Any, k: Any, v: Any, *, causal: bool = False, window: Window = None, scale: float | None = None):
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
    p = attention_problem(q, k, v, causal=causal, window=window, scale=scale)
    out, lse = _exact.forward(p.q, p.k, p.v, **p.visibility())
    return p.restore(out), p.restore(lse)


def attention_backward(
    dout: Any, q: Any, k: Any, v: Any, *, causal: bool = False, window: Window = None, scale: float | None = None
):
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
    p = attention_problem(q, k, v, causal=causal, window=window, scale=scale)
    do = output_like(p, dout, "dout")
    out, lse = _exact.forward(p.q, p.k, p.v, **p.visibility())
    grads = _exact.backward(do, p.q, p.k, p.v, out, lse, **p.visibility())
    return tuple(p.restore(g) for g in grads)


def block_sparse_attention(
    q: Any, k: Any, v: Any, layout: Any, *, causal: bool = False, window: Window = None, scale: float | None = None
):
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
    p = attention_problem(q, k, v, causal=causal, window=window, scale=scale)
    check_layout(layout, p)
    out, lse = _block_sparse.forward(p.q, p.k, p.v, layout, **p.visibility())
    return p.restore(out), p.restore(lse)


def block_sparse_attention_backward(
    dout: Any,
    q: Any,
    k: Any,
    v: Any,
    layout: Any,
    *,
    causal: bool = False,
    window: Window = None,
    scale: float | None = None,
):
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
    p = attention_problem(q, k, v, causal=causal, window=window, scale=scale)
    check_layout(layout, p)
    do = output_like(p, dout, "dout")
    out, lse = _block_sparse.forward(p.q, p.k, p.v, layout, **p.visibility())
    grads = _block_sparse.backward(do, p.q, p.k, p.v, out, lse, layout, **p.visibility())
    return tuple(p.restore(g) for g in grads)


def _plan(problem: Any) -> tuple[np.ndarray, np.ndarray]:
    """The float64 hashing and NumPy's stable sort of an LSH problem: (B, H, n_hashes * L) each."""
    hashing = problem.hashing()
    buckets = _lsh_hash.buckets(hashing.x, hashing.rotations, hashing.factors)
    order, inverse = _lsh_sort.sort(buckets, 0)
    shape = tuple(problem.qk.shape[:2]) + (-1,)
    return order.reshape(shape), inverse.reshape(shape)


def lsh_attention(qk: Any, v: Any, **options: Any) -> tuple[Any, Any]:
    """Float64 ``(out, lse)`` of LSH attention; arguments as :func:`npsparseattn.lsh_attention`.

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> qk, v = rng.standard_normal((2, 32, 8)), rng.standard_normal((2, 32, 8))
    >>> out, lse = lsh_attention(qk, v, n_buckets=4, n_hashes=2, chunk_size=8, seed=0)
    >>> out.shape, lse.shape
    ((2, 32, 8), (2, 32))
    """
    p = lsh_problem(qk, v, **options)
    out, lse = _lsh.forward(p.qk, p.v, *_plan(p), **p.options())
    return p.restore(out), p.restore(lse)


def lsh_attention_backward(dout: Any, qk: Any, v: Any, **options: Any) -> tuple[Any, Any]:
    """Float64 ``(dqk, dv)`` of LSH attention for upstream ``dout`` (shaped like the output).

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> qk, v = rng.standard_normal((32, 8)), rng.standard_normal((32, 4))
    >>> dqk, dv = lsh_attention_backward(np.ones((32, 4)), qk, v, n_buckets=4, chunk_size=8, seed=0)
    >>> dqk.shape, dv.shape
    ((32, 8), (32, 4))
    """
    p = lsh_problem(qk, v, **options)
    do = output_like(p.dense, dout, "dout")
    grads = _lsh.backward(do, p.qk, p.v, None, None, *_plan(p), **p.options())
    return p.restore(grads[0]), p.restore(grads[1])


def lsh_window_counts(buckets: Any, chunk_size: int, chunks_before: int, chunks_after: int) -> np.ndarray:
    """``counts[r, i, j]``: times position ``j`` is a key of position ``i`` in round ``r``; buckets (n_hashes, L).

    >>> import numpy as np
    >>> lsh_window_counts(np.array([[0, 1, 0, 1]]), 2, 0, 0)[0]
    array([[1, 0, 1, 0],
           [0, 1, 0, 1],
           [1, 0, 1, 0],
           [0, 1, 0, 1]])
    """
    buckets = np.asarray(buckets)
    order, _ = _lsh_sort.sort(buckets[None], 0)
    return _lsh.window_counts(order[0], buckets.shape[1], chunk_size, chunks_before, chunks_after)

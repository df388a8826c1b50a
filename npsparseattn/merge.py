"""Merging partial attention results exactly: ``merge_states`` (public API) and the in-place accumulation.

Attention over a key set split into disjoint parts ``A`` and ``B`` is the
merge of the two partial results, each an output ``o`` normalised over its
own keys and its log-sum-exp ``lse``:

``lse = logaddexp(lse_a, lse_b)``, ``o = exp(lse_a - lse) * o_a + exp(lse_b - lse) * o_b``.

Ring attention merges one K/V block at a time (:func:`merge_into`),
flash-decoding merges the key splits of a long cache, and cascade or
prefix-cache inference merges attention over a shared prefix with attention
over each sequence's own suffix (:func:`merge_states`; FlashInfer's
``merge_state``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from npsparseattn._arrays import array_module, common_kind
from npsparseattn._checks import check_dtypes
from npsparseattn._dtypes import FLOAT_DTYPES, lse_dtype
from npsparseattn.interop.dlpack import accepts_dlpack

__all__ = ["merge_into", "merge_states"]


def _merge(out_a: Any, lse_a: Any, out_b: Any, lse_b: Any, out: Any, lse: Any, xp: Any) -> None:
    """Write the merge of ``a`` and ``b`` into ``out``/``lse`` (which may be ``out_a``/``lse_a``)."""
    new = xp.logaddexp(lse_a, lse_b)
    safe = xp.where(xp.isfinite(new), new, 0)
    overflow = new == xp.inf
    weight_a = xp.exp(xp.where(overflow, -xp.inf, lse_a - safe))
    weight_b = xp.exp(xp.where(overflow, -xp.inf, lse_b - safe))
    # lse = +inf on a side (scores that overflowed): the limit takes that side, or the mean of two such sides
    over_a, over_b = lse_a == xp.inf, lse_b == xp.inf
    half = xp.where(over_a & over_b, 0.5, 1.0).astype(weight_a.dtype)
    weight_a = xp.where(over_a, half, weight_a)[..., None]
    weight_b = xp.where(over_b, half, weight_b)[..., None]
    zero = out.dtype.type(0)
    # a side with lse = -inf has weight exactly 0 and contributes exactly 0, whatever its output holds
    term_b = weight_b * xp.where(weight_b == 0, zero, out_b)
    out[...] = weight_a * xp.where(weight_a == 0, zero, out_a) + term_b
    lse[...] = new


def merge_into(out: Any, lse: Any, block_out: Any, block_lse: Any) -> tuple[Any, Any]:
    """Merge a partial result into an accumulator in place: ``(out, lse) <- merge((out, lse), block)``.

    ``out`` (..., L, Dv) and ``lse`` (..., L) are float32 or float64
    accumulators of one dtype (views are fine), started at ``out = 0``,
    ``lse = -inf``; the block is cast to their dtype.  No argument checks:
    this is the inner step of ring attention and of the key splits of the
    decoding kernels' callers.  Returns ``(out, lse)``.

    >>> import numpy as np
    >>> out, lse = np.zeros((1, 2)), np.full(1, -np.inf)
    >>> _ = merge_into(out, lse, np.array([[1.0, 2.0]]), np.array([0.0]))
    >>> _ = merge_into(out, lse, np.array([[3.0, 4.0]]), np.array([0.0]))
    >>> out, lse                                       # equal weights
    (array([[2., 3.]]), array([0.69314718]))
    """
    xp = array_module(common_kind(out=out, block_out=block_out))
    _merge(out, lse, block_out.astype(out.dtype, copy=False), block_lse.astype(lse.dtype, copy=False), out, lse, xp)
    return out, lse


def _check_states(out_a: Any, lse_a: Any, out_b: Any, lse_b: Any) -> np.dtype:
    kind_args = {"out_a": out_a, "lse_a": lse_a, "out_b": out_b, "lse_b": lse_b}
    common_kind(**kind_args)
    dtype = check_dtypes({"out_a": out_a, "out_b": out_b}, FLOAT_DTYPES)
    for name, x in (("lse_a", lse_a), ("lse_b", lse_b)):
        if x.dtype.name not in ("float32", "float64"):
            raise TypeError(f"{name} has dtype {x.dtype.name}; expected float32 or float64")
    if out_a.ndim < 1:
        raise ValueError(f"out_a must have at least 1 axis (..., Dv), got shape {tuple(out_a.shape)}")
    if tuple(out_b.shape) != tuple(out_a.shape):
        raise ValueError(f"out_a and out_b must have the same shape: {tuple(out_a.shape)} vs {tuple(out_b.shape)}")
    expected = tuple(out_a.shape[:-1])
    for name, x in (("lse_a", lse_a), ("lse_b", lse_b)):
        if tuple(x.shape) != expected:
            raise ValueError(
                f"{name} must have shape {expected} (the outputs' shape {tuple(out_a.shape)} without the last axis), "
                f"got {tuple(x.shape)}"
            )
    return dtype


@accepts_dlpack
def merge_states(out_a: Any, lse_a: Any, out_b: Any, lse_b: Any) -> tuple[Any, Any]:
    """Merge two partial attention results over disjoint key sets into the result over their union.

    With ``lse = logaddexp(lse_a, lse_b)``:
    ``out = exp(lse_a - lse) * out_a + exp(lse_b - lse) * out_b``, exact (no
    approximation, no overflow: every weight is at most 1).  Use it to combine
    attention over a shared prefix with attention over each sequence's own
    keys (cascade inference), or the results of any split of the keys.

    Guards: a row whose ``lse`` is ``-inf`` on one side (it saw no key) takes
    the other side exactly, whatever that side's output row holds; a row
    empty on both sides gives ``out = 0``, ``lse = -inf``; a row whose
    ``lse`` is ``+inf`` on one side (its scores overflowed) takes that side
    exactly, the limit of the formula, and on both sides their mean, with
    ``lse = +inf``; no NaN and no floating-point warning comes from the
    guard.  A NaN in a side that is not empty (in its ``lse`` or its output
    row) gives NaN in that row.

    Parameters
    ----------
    out_a, out_b : arrays, shape (..., L, Dv), one float dtype
        Partial outputs (each normalised over its own keys), e.g. from
        :func:`npsparseattn.attention` with ``return_lse=True``.
    lse_a, lse_b : arrays, shape (..., L), float32 or float64
        Their log-sum-exp; ``-inf`` for a row that saw no key.

    Returns
    -------
    out : array, shape (..., L, Dv), dtype of the outputs
    lse : array, shape (..., L), float32 (float64 for float64 outputs)

    Arithmetic is in float32 (float64 for float64 outputs).  NumPy, CuPy and
    DLPack arrays (PyTorch, JAX) are accepted; all four of one kind.

    Examples
    --------
    Attention over all keys equals the merge of attention over two halves:

    >>> import numpy as np
    >>> import npsparseattn as nsa
    >>> rng = np.random.default_rng(0)
    >>> q = rng.standard_normal((4, 3, 16))                  # (H, Lq, D)
    >>> k, v = rng.standard_normal((2, 4, 40, 16))           # (H, Lk, D)
    >>> out_a, lse_a = nsa.attention(q, k[:, :25], v[:, :25], return_lse=True)
    >>> out_b, lse_b = nsa.attention(q, k[:, 25:], v[:, 25:], return_lse=True)
    >>> out, lse = nsa.merge_states(out_a, lse_a, out_b, lse_b)
    >>> bool(np.allclose(out, nsa.attention(q, k, v)))
    True
    """
    dtype = _check_states(out_a, lse_a, out_b, lse_b)
    xp = array_module(common_kind(out_a=out_a))
    compute = lse_dtype(dtype)
    out = out_a.astype(compute, copy=True)
    lse = lse_a.astype(compute, copy=True)
    _merge(out, lse, out_b.astype(compute, copy=False), lse_b.astype(compute, copy=False), out, lse, xp)
    return out.astype(dtype, copy=False), lse

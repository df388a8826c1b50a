"""float64 Reformer LSH attention from the formulas: backend ``"reference"`` of ``lsh_attention``.

One (batch, head) at a time: the sort plan gives the token-level mask it
implies, counted: ``counts[r, i, j]`` is how many times position ``j`` is among
the keys that position ``i`` attends in round ``r`` (a cyclic window can hold a
chunk twice).  Then a dense softmax per round over the shared-QK logits, and
the rounds combined by their lse (``docs/lsh.md``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from npsparseattn._dtypes import FLOAT_DTYPES
from npsparseattn.problems.lsh import KEY_EPS, NEG_CAUSAL, NEG_SELF
from npsparseattn.reference._oracle import store

__all__ = ["DTYPES", "KINDS", "STRIDED_ROWS", "TOLERANCE", "backward", "compute_dtype", "forward", "unsupported"]

KINDS = ("numpy",)
DTYPES = FLOAT_DTYPES
STRIDED_ROWS = True
TOLERANCE = {name: 0.0 for name in DTYPES}


def compute_dtype(dtype: Any) -> np.dtype:
    """The oracle reads every input as float64."""
    return np.dtype(np.float64)


def unsupported(problem: Any) -> list[str]:
    """Every LSH problem on NumPy arrays is supported (memory permitting: O(n_hashes * L^2) per head)."""
    return []


def window_counts(order: np.ndarray, length: int, chunk_size: int, chunks_before: int, chunks_after: int) -> Any:
    """``counts[r, i, j]``: times position ``j`` is a key of ``i`` in round ``r``; ``order`` (n_hashes * L,)."""
    if length == 0:
        return np.zeros((0, 0, 0), dtype=np.int64)
    n_hashes = order.size // length
    n_chunks = order.size // chunk_size
    counts = np.zeros((n_hashes, length, length), dtype=np.int64)
    for slot, item in enumerate(order):
        chunk = slot // chunk_size
        for step in range(-chunks_before, chunks_after + 1):
            neighbour = (chunk + step) % n_chunks
            keys = order[neighbour * chunk_size : (neighbour + 1) * chunk_size] % length
            np.add.at(counts[item // length, item % length], keys, 1)
    return counts


def logits(x: Any, *, causal: bool, exclude_self: bool) -> tuple[Any, Any, Any]:
    """Shared-QK ``(logits, keys, free)`` of (L, D) rows: ``logits = x @ keys.T`` with the masks applied.

    ``keys = x / sqrt(mean(x^2) + 1e-6) / sqrt(D)``; a causally masked logit is
    -1e9, the own position's -1e5; ``free`` marks the logits that are not constants.
    """
    x = np.asarray(x, np.float64)
    keys = x / np.sqrt(np.mean(x**2, axis=-1, keepdims=True) + KEY_EPS) / np.sqrt(x.shape[-1])
    result = x @ keys.T
    i = np.arange(x.shape[0])[:, None]
    j = np.arange(x.shape[0])[None, :]
    free = np.ones(result.shape, dtype=bool)
    if causal:
        result = np.where(j > i, NEG_CAUSAL, result)
        free &= j <= i
    if exclude_self:
        result = np.where(j == i, NEG_SELF, result)
        free &= j != i
    return result, keys, free


def _one_head(x: Any, values: Any, order: Any, options: dict[str, Any]) -> tuple[Any, Any, Any, Any, Any]:
    """``(out, lse, P, keys, free)`` of one head; ``P`` (L, L) sums every round's weights."""
    scores, keys, free = logits(x, causal=options["causal"], exclude_self=options["exclude_self"])
    counts = window_counts(order, x.shape[0], options["chunk_size"], options["chunks_before"], options["chunks_after"])
    seen = counts > 0
    row_max = np.where(seen, scores, -np.inf).max(axis=-1, keepdims=True)
    weights = counts * np.exp(np.where(seen, scores - row_max, -np.inf))
    totals = weights.sum(axis=-1)
    lse_rounds = row_max[..., 0] + np.log(totals)
    # round weights exp(lse_r - logsumexp_r lse_r), normalised explicitly: at the -1e5 self logit the
    # lse carry an absolute rounding of 1e-11 that exp(lse_r - lse) would pass on
    round_weights = np.exp(lse_rounds - lse_rounds.max(axis=0))
    round_weights /= round_weights.sum(axis=0)
    p = (round_weights[..., None] * weights / totals[..., None]).sum(axis=0)
    out = p @ np.asarray(values, np.float64)
    return out, np.logaddexp.reduce(lse_rounds, axis=0), p, keys, free


def forward(
    qk, v, order, inverse, *, chunk_size, chunks_before, chunks_after, causal, exclude_self, out=None, lse=None
):
    """float64 ``(out, lse)`` of canonical ``qk`` (B, H, L, D), ``v`` (B, H, L, Dv) under the sort plan ``order``."""
    options = dict(
        chunk_size=chunk_size, chunks_before=chunks_before, chunks_after=chunks_after, causal=causal,
        exclude_self=exclude_self,
    )  # fmt: skip
    n_batch, n_heads, length, _ = qk.shape
    result = np.zeros((n_batch, n_heads, length, v.shape[3]))
    log_sum = np.zeros((n_batch, n_heads, length))
    if length == 0:
        return store(result, out), store(log_sum, lse)
    for b in range(n_batch):
        for h in range(n_heads):
            result[b, h], log_sum[b, h] = _one_head(qk[b, h], v[b, h], order[b, h], options)[:2]
    return store(result, out), store(log_sum, lse)


def backward(
    dout, qk, v, out, lse, order, inverse, *, chunk_size, chunks_before, chunks_after, causal, exclude_self, grads=None
):
    """float64 ``(dqk, dv)``; ``out`` and ``lse`` are recomputed in float64, not read.

    The rounds combine by lse, so ``out = P @ v`` with ``P`` the sum of the
    rounds' weights ``counts * exp(logit - lse)``: the usual softmax gradient,
    with ``dlogit = 0`` on the masked (constant) logits, then both sides of the
    shared ``qk``: ``dqk = dlogit @ keys + J^T (dlogit^T @ qk)`` with ``J`` the
    Jacobian of the key normalisation.
    """
    options = dict(
        chunk_size=chunk_size, chunks_before=chunks_before, chunks_after=chunks_after, causal=causal,
        exclude_self=exclude_self,
    )  # fmt: skip
    dqk = np.zeros(qk.shape)
    dv = np.zeros(v.shape)
    d = qk.shape[3]
    for b in range(qk.shape[0] if qk.shape[2] else 0):
        for h in range(qk.shape[1]):
            x = np.asarray(qk[b, h], np.float64)
            values = np.asarray(v[b, h], np.float64)
            do = np.asarray(dout[b, h], np.float64)
            result, _, p, keys, free = _one_head(x, values, order[b, h], options)
            dv[b, h] = p.T @ do
            dlogits = np.where(free, p * (do @ values.T - (do * result).sum(axis=-1, keepdims=True)), 0.0)
            dkeys = dlogits.T @ x
            a = 1.0 / np.sqrt(np.mean(x**2, axis=-1, keepdims=True) + KEY_EPS)
            key_side = a / np.sqrt(d) * (dkeys - a**2 * (x * dkeys).sum(axis=-1, keepdims=True) / d * x)
            dqk[b, h] = dlogits @ keys + key_side
    dqk_buf, dv_buf = grads or (None, None)
    return store(dqk, dqk_buf), store(dv, dv_buf)

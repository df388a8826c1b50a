"""Routers: cheap scores that choose which keys each query attends, in the ``(kv_idx, ...)`` format of
:func:`npsparseattn.sparse_attention`, so any router feeds any kernel.

* :func:`select_topk_blocks`: pooled block scores, top-k key blocks per query
  block (MoBA, Quest; the selection branch of NSA with pooled scores).
* :func:`lightning_indexer` / :func:`lightning_indexer_backward`: DeepSeek
  DSA's indexer, ``I[t, s] = sum_j w[t, j] * ReLU(q_idx[t, j] . k_idx[s])``,
  top-k tokens per query, and the gradient of the selected scores.
* :func:`indexer_kl_target`: the attention distribution over the selected
  tokens, summed over heads, that DSA trains its indexer towards.
* :func:`compressed_attention` / :func:`compressed_attention_backward`:
  NSA's compression branch, attention over mean-pooled blocks of keys and
  values.

The routers are NumPy (float64 for block scores; the indexer in the inputs'
precision, float32 for float16) and run on the host; the attention they feed
runs on any backend.  ``docs/sparse.md`` assembles NSA and MoBA from them.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from npsparseattn._checks import check_flag, check_int, to_4d
from npsparseattn._dtypes import FLOAT_DTYPES, compute_dtype
from npsparseattn._topk import select_topk_blocks
from npsparseattn.exact import attention, attention_backward
from npsparseattn.problems import attention_problem
from npsparseattn.problems.sparse import sparse_problem
from npsparseattn.reference._oracle import visibility_mask
from npsparseattn.sparse import sparse_attention, sparse_attention_backward

__all__ = [
    "compressed_attention",
    "compressed_attention_backward",
    "compressed_keys",
    "indexer_kl_target",
    "lightning_indexer",
    "lightning_indexer_backward",
    "select_topk_blocks",
]

_CHUNK_ELEMENTS = 1 << 22  # score elements held at once by the indexer (heads x query rows x keys)


# ----------------------------------------------------------------------------- DSA's lightning indexer


def _numpy(x: Any, name: str) -> np.ndarray:
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a NumPy array, got {type(x).__module__}.{type(x).__name__}")
    if x.dtype.name not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a real floating array, got dtype {x.dtype.name}")
    return x


def _indexer_inputs(q_idx: Any, k_idx: Any, weights: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple]:
    """Canonical ``q_idx`` (B, Hi, Lq, Di), ``k_idx`` (B, Lk, Di), ``weights`` (B, Hi, Lq), compute dtype; and
    the lead axes of the result (``(*batch, 1)``, ``(1,)`` or ``()``)."""
    q_idx, k_idx, weights = _numpy(q_idx, "q_idx"), _numpy(k_idx, "k_idx"), _numpy(weights, "weights")
    if q_idx.ndim < 2:
        raise ValueError(f"q_idx must be (*batch, Hi, Lq, Di), (Hi, Lq, Di) or (Lq, Di), got shape {q_idx.shape}")
    batch = q_idx.shape[:-3]
    heads = q_idx.shape[-3] if q_idx.ndim >= 3 else 1
    lq, di = q_idx.shape[-2:]
    if k_idx.ndim != len(batch) + 2 or k_idx.shape[:-2] != batch or k_idx.shape[-1] != di:
        raise ValueError(f"k_idx must be (*batch, Lk, Di) with batch {batch} and Di={di} like q_idx, got {k_idx.shape}")
    if weights.shape != q_idx.shape[:-1]:
        raise ValueError(
            f"weights must have shape {q_idx.shape[:-1]} (q_idx without its last axis), got {weights.shape}"
        )
    dtype = compute_dtype(np.result_type(q_idx.dtype, k_idx.dtype, weights.dtype))
    n = int(np.prod(batch))
    q4 = to_4d(q_idx).reshape(n, heads, lq, di).astype(dtype, copy=False)
    k3 = k_idx.reshape(n, k_idx.shape[-2], di).astype(dtype, copy=False)
    w3 = weights.reshape(n, heads, lq).astype(dtype, copy=False)
    lead = batch + (1,) if q_idx.ndim >= 3 else ()
    return q4, k3, w3, lead


def _index_scores(q: np.ndarray, k: np.ndarray, w: np.ndarray, t0: int, t1: int) -> tuple[np.ndarray, np.ndarray]:
    """``(z, I)``: ``z = q[:, t0:t1] k^T`` (Hi, rows, Lk) and ``I = sum_j w[j] * ReLU(z[j])`` (rows, Lk)."""
    z = q[:, t0:t1] @ k.T
    return z, np.einsum("hr,hrs->rs", w[:, t0:t1], np.maximum(z, 0))


def _rows_per_chunk(heads: int, n_keys: int) -> int:
    return max(1, _CHUNK_ELEMENTS // max(heads * n_keys, 1))


def _top_tokens(scores: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the ``width`` largest finite scores (ties to the lower index): ``(kv_idx, count)``, ascending."""
    rows = scores.shape[0]
    s = np.where(np.isnan(scores), -np.inf, scores)
    if width == 0:
        return np.zeros((rows, 0), np.int64), np.zeros(rows, np.int64)
    threshold = -np.partition(-s, width - 1, axis=1)[:, width - 1]
    above = s > threshold[:, None]
    tie = (s == threshold[:, None]) & (s > -np.inf)
    room = width - above.sum(axis=1)
    chosen = above | (tie & (np.cumsum(tie, axis=1) <= room[:, None]))
    slot = np.cumsum(chosen, axis=1) - 1
    kv_idx = np.full((rows, width), -1, np.int64)
    r, c = np.nonzero(chosen)
    kv_idx[r, slot[r, c]] = c
    return kv_idx, chosen.sum(axis=1)


def lightning_indexer(
    q_idx: Any, k_idx: Any, weights: Any, *, topk: int, causal: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """DSA's lightning indexer: the ``topk`` keys of each query by ``sum_j w[t,j] ReLU(dot(q[t,j], k[s]))``.

    The index scores are computed for every (query, key) pair in the inputs'
    precision (float32 for float16: the indexer is meant to be cheap, few
    heads of a small dimension), then each query keeps its ``topk`` highest
    (ties to the lower key; with ``causal``, only keys ``s <= t + Lk - Lq``).
    The result feeds :func:`npsparseattn.sparse_attention` in token mode,
    ``q_block=1, kv_block=1``; one list per query token serves every head (DSA
    runs its attention as MQA), so broadcast it over ``Hk`` key heads for a
    GQA model (``np.broadcast_to(kv_idx, (B, Hk, Lq, K))``).

    Parameters
    ----------
    q_idx : array (*batch, Hi, Lq, Di), (Hi, Lq, Di) or (Lq, Di): the indexer's queries, ``Hi`` heads
    k_idx : array (*batch, Lk, Di): its keys, one per token, shared by the heads
    weights : array (*batch, Hi, Lq): ``w[t, j]``, the per-query weight of each indexer head
    topk : int >= 1; ``K = min(topk, Lk)`` slots per query
    causal : bool

    Returns
    -------
    kv_idx : int32 (*batch, 1, Lq, K) (``(1, Lq, K)`` for 3-D inputs, ``(Lq, K)`` for 2-D):
        the chosen keys ascending, ``-1`` in slots a causal row cannot fill
    scores : (same shape), the chosen ``I[t, s]`` (``-inf`` in unused slots), float32
        (float64 for float64 inputs): the logits the indexer's loss is computed from

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> q_idx, k_idx = rng.standard_normal((4, 10, 8)), rng.standard_normal((10, 8))
    >>> kv_idx, scores = lightning_indexer(q_idx, k_idx, np.ones((4, 10)), topk=3, causal=True)
    >>> kv_idx.shape, kv_idx[0, 0].tolist(), kv_idx[0, 1].tolist()
    ((1, 10, 3), [0, -1, -1], [0, 1, -1])
    """
    q4, k3, w3, lead = _indexer_inputs(q_idx, k_idx, weights)
    topk = check_int(topk, "topk", 1)
    causal = check_flag(causal, "causal")
    n, heads, lq, _ = q4.shape
    lk = k3.shape[1]
    width = min(topk, lk)
    kv_idx = np.full((n, lq, width), -1, np.int32)
    scores = np.full((n, lq, width), -np.inf, q4.dtype)
    step = _rows_per_chunk(heads, lk)
    for b in range(n):
        for t0 in range(0, lq, step):
            t1 = min(t0 + step, lq)
            _, index = _index_scores(q4[b], k3[b], w3[b], t0, t1)
            if causal:
                index = np.where(np.arange(lk)[None, :] <= np.arange(t0, t1)[:, None] + lk - lq, index, -np.inf)
            chosen, _ = _top_tokens(index, width)
            kv_idx[b, t0:t1] = chosen
            picked = np.take_along_axis(index, np.maximum(chosen, 0), axis=1)
            scores[b, t0:t1] = np.where(chosen >= 0, picked, -np.inf)
    return kv_idx.reshape(lead + (lq, width)), scores.reshape(lead + (lq, width))


def lightning_indexer_backward(
    dscores: Any, q_idx: Any, k_idx: Any, weights: Any, kv_idx: Any
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradients ``(dq_idx, dk_idx, dweights)`` of the selected scores of :func:`lightning_indexer`.

    The selection is fixed (it has no gradient); for the chosen pairs
    ``dI[t, s] = dscores[t, slot]`` and ``I = sum_j w_j ReLU(q_j . k)`` gives
    ``dw[t, j] = sum_s dI ReLU(z)``, ``dq[t, j] = w_j sum_s dI [z > 0] k_s``,
    ``dk[s] = sum_t sum_j dI w_j [z > 0] q_j`` (``z = q[t, j] . k[s]``).
    Computed densely per chunk of queries with matrix products, in a fixed
    order: deterministic.

    Parameters
    ----------
    dscores : array shaped like ``scores`` (slots with ``kv_idx = -1`` are ignored)
    q_idx, k_idx, weights : as for the forward call
    kv_idx : the forward's ``kv_idx``

    Returns
    -------
    dq_idx, dk_idx, dweights shaped like ``q_idx``, ``k_idx``, ``weights``

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> q_idx, k_idx, w = rng.standard_normal((2, 6, 4)), rng.standard_normal((6, 4)), rng.random((2, 6))
    >>> kv_idx, scores = lightning_indexer(q_idx, k_idx, w, topk=2)
    >>> dq, dk, dw = lightning_indexer_backward(np.ones_like(scores), q_idx, k_idx, w, kv_idx)
    >>> dq.shape, dk.shape, dw.shape
    ((2, 6, 4), (6, 4), (2, 6))
    """
    q4, k3, w3, lead = _indexer_inputs(q_idx, k_idx, weights)
    n, heads, lq, _ = q4.shape
    lk = k3.shape[1]
    idx = np.asarray(kv_idx)
    if idx.dtype.kind not in "iu" or idx.shape[:-1] != lead + (lq,):
        raise ValueError(f"kv_idx must be the forward's integer array of shape {lead + (lq, 'K')}, got {idx.shape}")
    grad = np.asarray(dscores)
    if grad.shape != idx.shape:
        raise ValueError(f"dscores must have the shape of kv_idx {idx.shape}, got {grad.shape}")
    if ((idx < -1) | (idx >= lk)).any():
        raise ValueError(f"kv_idx entries must be -1 or keys in [0, {lk})")
    idx = idx.reshape(n, lq, idx.shape[-1])
    grad = np.where(idx >= 0, grad.reshape(idx.shape), 0).astype(q4.dtype)
    dq, dk, dw = np.zeros_like(q4), np.zeros_like(k3), np.zeros_like(w3)
    step = _rows_per_chunk(heads, lk)
    for b in range(n):
        for t0 in range(0, lq, step):
            t1 = min(t0 + step, lq)
            d_index = np.zeros((t1 - t0, lk), q4.dtype)
            rows = np.arange(t1 - t0)[:, None]
            np.add.at(d_index, (rows, np.maximum(idx[b, t0:t1], 0)), grad[b, t0:t1])
            z, _ = _index_scores(q4[b], k3[b], w3[b], t0, t1)
            dw[b, :, t0:t1] = np.einsum("rs,hrs->hr", d_index, np.maximum(z, 0))
            g = d_index[None] * w3[b, :, t0:t1, None] * (z > 0)
            dq[b, :, t0:t1] = g @ k3[b]
            dk[b] += np.einsum("hrs,hrd->sd", g, q4[b, :, t0:t1])
    dtype = np.result_type(np.asarray(q_idx).dtype, np.asarray(k_idx).dtype, np.asarray(weights).dtype)
    return (
        dq.reshape(np.shape(q_idx)).astype(dtype, copy=False),
        dk.reshape(np.shape(k_idx)).astype(dtype, copy=False),
        dw.reshape(np.shape(weights)).astype(dtype, copy=False),
    )


def indexer_kl_target(
    q: Any,
    k: Any,
    kv_idx: Any,
    lse: Any,
    *,
    kv_cnt: Any = None,
    causal: bool = False,
    window: Any = None,
    scale: float | None = None,
) -> np.ndarray:
    """The distribution DSA trains its indexer towards: attention over the selected tokens, summed over heads.

    For query ``t`` and slot ``m`` of its list (key ``s = kv_idx[t, m]``),
    ``p[t, m] = sum_h exp(scale q_h[t] . k[s] - lse_h[t])`` over the query
    heads ``h`` that share the list (all of them for DSA's MQA, the GQA group
    otherwise), L1-normalised over the slots (DeepSeek-V3.2: "the main
    attention scores summed across all heads, L1-normalised").  ``lse`` is the
    one :func:`npsparseattn.sparse_attention` returned for the same ``q``,
    ``k``, ``kv_idx`` with ``q_block=1, kv_block=1`` and the same mask; the
    indexer is then trained on ``KL(p || softmax(scores))`` over the same
    slots (see ``docs/sparse.md``).  No gradient flows into the target.

    Parameters
    ----------
    q : array (*batch, Hq, Lq, D) (or 3-D/2-D as in :func:`npsparseattn.attention`)
    k : array (*batch, Hk, Lk, D)
    kv_idx : integer array (*batch, Hk, Lq, K): token lists (``-1`` unused), any order
    lse : array (*batch, Hq, Lq)
    kv_cnt, causal, window, scale : as for :func:`npsparseattn.sparse_attention`

    Returns
    -------
    float64 (*batch, Hk, Lq, K) aligned with ``kv_idx``: 0 in unused or masked slots; rows summing to 1
    (or 0 where no slot is visible)

    Examples
    --------
    >>> import npsparseattn as nsa
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = rng.standard_normal((3, 4, 12, 8))                  # (H, L, D) each
    >>> kv_idx = np.argsort(rng.random((4, 12, 12)), axis=-1)[..., :5].astype(np.int32)
    >>> out, lse = nsa.sparse_attention(q, k, v, kv_idx, q_block=1, kv_block=1, return_lse=True)
    >>> p = indexer_kl_target(q, k, kv_idx, lse)
    >>> p.shape, bool(np.allclose(p.sum(-1), 1.0))
    ((4, 12, 5), True)
    """
    problem = sparse_problem(q, k, k, kv_idx, kv_cnt, q_block=1, kv_block=1, causal=causal, window=window,
                             scale=scale)  # fmt: skip
    dense = problem.dense
    lse = _numpy(lse, "lse")
    if lse.shape != dense.lse_shape():
        raise ValueError(f"lse must have shape {dense.lse_shape()} (the forward's lse), got {lse.shape}")
    n_batch, hq, lq, _ = dense.q.shape
    hk, lk = dense.k.shape[1], dense.k.shape[2]
    group = hq // hk
    slots = np.shape(kv_idx)[-1]
    idx = np.asarray(kv_idx).reshape(n_batch, hk, lq, slots).astype(np.int64)
    counts = slots if kv_cnt is None else np.asarray(kv_cnt).reshape(n_batch, hk, lq, 1)
    used = (idx >= 0) & (np.arange(slots) < counts)
    visible = visibility_mask(lq, lk, offset=dense.offset, left=dense.left, right=dense.right)
    q64, k64 = dense.q.astype(np.float64), dense.k.astype(np.float64)
    lse64 = lse.reshape(n_batch, hq, lq).astype(np.float64)
    target = np.zeros((n_batch, hk, lq, slots))
    step = max(1, _CHUNK_ELEMENTS // max(group * slots * q64.shape[3], 1))
    for b in range(n_batch):
        for h in range(hk):
            for t0 in range(0, lq, step):
                t1 = min(t0 + step, lq)
                keys = np.maximum(idx[b, h, t0:t1], 0)
                ok = used[b, h, t0:t1] & np.take_along_axis(visible[t0:t1], keys, axis=1)
                heads = slice(h * group, (h + 1) * group)
                s = np.einsum("grd,rmd->grm", q64[b, heads, t0:t1], k64[b, h][keys]) * dense.scale
                row_lse = lse64[b, heads, t0:t1, None]
                live = ok[None] & np.isfinite(row_lse)
                p = np.where(live, np.exp(np.where(live, s - row_lse, 0.0)), 0.0).sum(axis=0)
                total = p.sum(axis=1, keepdims=True)
                target[b, h, t0:t1] = np.where(total > 0, p / np.where(total > 0, total, 1.0), 0.0)
    return target.reshape(tuple(np.shape(kv_idx)))


# ----------------------------------------------------------------------------- NSA's compression branch


def _stride(kv_block: Any, stride: Any) -> tuple[int, int]:
    kv_block = check_int(kv_block, "kv_block", 1)
    stride = kv_block if stride is None else check_int(stride, "stride", 1)
    return kv_block, stride


def compressed_keys(x: Any, *, kv_block: int, stride: int | None = None) -> np.ndarray:
    """Mean-pooled blocks of ``kv_block`` rows every ``stride`` rows (NSA's compression with a mean for its MLP).

    Block ``i`` is the mean of rows ``[i * stride, i * stride + kv_block)``
    along axis -2; there are ``(L - kv_block) // stride + 1`` of them (0 when
    ``L < kv_block``).  Summed in float64, returned in ``x``'s dtype.

    >>> compressed_keys(np.arange(7.0)[:, None], kv_block=3, stride=2)[:, 0].tolist()
    [1.0, 3.0, 5.0]
    """
    x = _numpy(x, "x")
    kv_block, stride = _stride(kv_block, stride)
    length = x.shape[-2]
    n = (length - kv_block) // stride + 1 if length >= kv_block else 0
    first = np.arange(n) * stride
    total = np.zeros(x.shape[:-2] + (n, x.shape[-1]))
    for offset in range(kv_block):
        total += x[..., first + offset, :]
    return (total / kv_block).astype(x.dtype, copy=False)


def _uncompressed(grad: np.ndarray, length: int, kv_block: int, stride: int) -> np.ndarray:
    """The adjoint of :func:`compressed_keys`: block ``i`` hands ``grad[i] / kv_block`` to each of its rows.

    One pass per offset inside a block: the rows ``first + offset`` of distinct blocks are distinct, so each
    pass is a plain indexed add (float64, no running sums to cancel).
    """
    out = np.zeros(grad.shape[:-2] + (length, grad.shape[-1]))
    first = np.arange(grad.shape[-2]) * stride
    share = grad.astype(np.float64) / kv_block
    for offset in range(kv_block):
        out[..., first + offset, :] += share
    return out


def _compressed_plan(lq: int, lk: int, kv_block: int, stride: int, causal: bool, n_heads_k: int, batch: tuple):
    """How the causal compressed problem runs as ``sparse_attention``: ``(pad, kv_idx, kv_cnt)``.

    Query ``t`` (aligned position ``p = t + Lk - Lq``) sees compressed block
    ``i`` iff the block ends by ``p``: ``i * stride + kv_block - 1 <= p``.
    With ``pad`` rows in front of ``q``, every query block of ``stride``
    rows sees the same prefix of blocks, its count in ``kv_cnt``.
    """
    n = (lk - kv_block) // stride + 1 if lk >= kv_block else 0
    a = lk - lq - kv_block + 1
    pad = a % stride
    nqb = -(-(lq + pad) // stride)
    counts = np.clip(np.arange(nqb) + (a - pad) // stride + 1, 0, n) if causal else np.full(nqb, n)
    kv_idx = np.broadcast_to(np.arange(n, dtype=np.int32), batch + (n_heads_k, nqb, n))
    return pad, kv_idx, np.broadcast_to(counts.astype(np.int32), batch + (n_heads_k, nqb))


def _compressed_inputs(q, k, v, kv_block, stride, causal, scale):
    """Validated options, the pooled ``k``/``v`` and the plan of :func:`_compressed_plan`."""
    q, k, v = _numpy(q, "q"), _numpy(k, "k"), _numpy(v, "v")
    dense = attention_problem(q, k, v, causal=causal, scale=scale)
    kv_block, stride = _stride(kv_block, stride)
    causal, scale = dense.causal, dense.scale
    kc, vc = compressed_keys(k, kv_block=kv_block, stride=stride), compressed_keys(v, kv_block=kv_block, stride=stride)
    lead = tuple(k.shape[:-3]) if k.ndim >= 3 else ()
    heads_k = k.shape[-3] if k.ndim >= 3 else 1
    plan = _compressed_plan(q.shape[-2], k.shape[-2], kv_block, stride, causal, heads_k, lead)
    return (kv_block, stride, causal, scale), kc, vc, plan


def _pad_rows(x: np.ndarray, pad: int, axis: int = -2, value: float = 0.0) -> np.ndarray:
    """``x`` with ``pad`` rows of ``value`` in front along ``axis``."""
    widths = [(0, 0)] * x.ndim
    widths[axis] = (pad, 0)
    return np.pad(x, widths, constant_values=value)


def compressed_attention(
    q: Any,
    k: Any,
    v: Any,
    *,
    kv_block: int,
    stride: int | None = None,
    causal: bool = False,
    scale: float | None = None,
    return_lse: bool = False,
    backend: str = "auto",
) -> Any:
    """NSA's compression branch: attention over mean-pooled blocks of keys and values.

    Keys and values are pooled by :func:`compressed_keys` (blocks of
    ``kv_block`` tokens every ``stride``; NSA learns an MLP there, a mean is
    its parameter-free form).  With ``causal``, query ``t`` sees a pooled
    block only once the whole block is in its past: block ``i`` iff
    ``i * stride + kv_block - 1 <= t + Lk - Lq`` (NSA's rule); a query
    before the first complete block sees nothing (output 0, ``lse = -inf``).
    It runs as :func:`npsparseattn.sparse_attention` over the pooled
    sequence (or :func:`npsparseattn.attention` when ``stride = 1``), so its
    cost is that of attention over ``Lk / stride`` keys.

    Parameters
    ----------
    q : array (*batch, Hq, Lq, D), (Hq, Lq, D) or (Lq, D)
    k, v : arrays (*batch, Hk, Lk, D|Dv) of the same form, ``Hq % Hk == 0``
    kv_block : int >= 1, the pooled block length (NSA's ``l``)
    stride : int >= 1, default ``kv_block`` (NSA's ``d``)
    causal, scale, return_lse, backend : as :func:`npsparseattn.sparse_attention`

    Returns
    -------
    out : array (*batch, Hq, Lq, Dv); lse : (*batch, Hq, Lq), only if ``return_lse``

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((2, 100, 16)) for _ in range(3))
    >>> out, lse = compressed_attention(q, k, v, kv_block=32, stride=16, causal=True, return_lse=True)
    >>> out.shape, bool(np.isneginf(lse[0, 30])), bool(np.isfinite(lse[0, 31]))
    ((2, 100, 16), True, True)
    """
    (kv_block, stride, causal, scale), kc, vc, (pad, kv_idx, kv_cnt) = _compressed_inputs(
        q, k, v, kv_block, stride, causal, scale
    )
    return_lse = check_flag(return_lse, "return_lse")
    if stride == 1 or not causal:
        out, lse = attention(q, kc, vc, causal=causal, scale=scale, return_lse=True, backend=backend)
    else:
        out, lse = sparse_attention(_pad_rows(q, pad), kc, vc, kv_idx, kv_cnt=kv_cnt, q_block=stride, kv_block=1,
                                    scale=scale, return_lse=True, backend=backend)  # fmt: skip
        out, lse = out[..., pad:, :], lse[..., pad:]
    return (out, lse) if return_lse else out


def compressed_attention_backward(
    dout: Any,
    q: Any,
    k: Any,
    v: Any,
    out: Any,
    lse: Any,
    *,
    kv_block: int,
    stride: int | None = None,
    causal: bool = False,
    scale: float | None = None,
    backend: str = "auto",
) -> tuple[Any, Any, Any]:
    """Gradients ``(dq, dk, dv)`` of :func:`compressed_attention`, through the pooling.

    The attention backward gives the gradients of the pooled keys and values;
    each pooled block hands ``1 / kv_block`` of its gradient to each of its
    tokens (blocks overlap when ``stride < kv_block``).

    Parameters
    ----------
    dout : array shaped like ``out``
    q, k, v, kv_block, stride, causal, scale, backend : as for the forward call
    out, lse : the forward's results (``return_lse=True``)

    Returns
    -------
    dq, dk, dv shaped like ``q``, ``k``, ``v``

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((1, 60, 8)) for _ in range(3))
    >>> out, lse = compressed_attention(q, k, v, kv_block=16, stride=8, causal=True, return_lse=True)
    >>> dq, dk, dv = compressed_attention_backward(np.ones_like(out), q, k, v, out, lse, kv_block=16, stride=8,
    ...                                            causal=True)
    >>> dk.shape, bool(np.all(dv[0, 56:] == 0))                     # the last 4 keys are in no complete block
    ((1, 60, 8), True)
    """
    (kv_block, stride, causal, scale), kc, vc, (pad, kv_idx, kv_cnt) = _compressed_inputs(
        q, k, v, kv_block, stride, causal, scale
    )
    if stride == 1 or not causal:
        dq, dkc, dvc = attention_backward(dout, q, kc, vc, out, lse, causal=causal, scale=scale, backend=backend)
    else:
        padded = [_pad_rows(x, pad) for x in (dout, q, out)]
        lse_p = _pad_rows(lse, pad, axis=-1, value=-np.inf)
        dq, dkc, dvc = sparse_attention_backward(padded[0], padded[1], kc, vc, padded[2], lse_p, kv_idx,
                                                 kv_cnt=kv_cnt, q_block=stride, kv_block=1, scale=scale,
                                                 backend=backend)  # fmt: skip
        dq = dq[..., pad:, :]
    dk = _uncompressed(dkc.astype(np.float64), k.shape[-2], kv_block, stride).astype(k.dtype, copy=False)
    dv = _uncompressed(dvc.astype(np.float64), v.shape[-2], kv_block, stride).astype(v.dtype, copy=False)
    return dq, dk, dv

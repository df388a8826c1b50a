"""Index-driven sparse attention on tensor cores: backend ``"cupy"`` of ``sparse_attention``.

It runs the block-sparse kernels of ``kernels/block_sparse.cu``
(:mod:`~npsparseattn.cuda.cupy_raw.block_sparse`, the same instances, nothing
compiled twice) on the canonical index turned into a layout on the device
(:mod:`npsparseattn.cuda.index_runs`): the batch folded into the heads, one
layout row per query head and query block, its transpose for dK/dV.  So the
visibility rule is that of block-sparse attention: the causal/window masks
inside the selected blocks (bottom-right alignment), partial last blocks, a
query that sees no key gets output 0 and ``lse = -inf``.

The backward is deterministic: dK/dV by CTAs that own key rows walking the
transposed index, dQ by a separate pass whose CTAs own query rows
(``deterministic=True`` of the block-sparse backward), no atomics.

Refused, with the reason (:func:`unsupported`): what the ``cupy`` backend
refuses for any operation (float32/float64, ``D != Dv``, a head dimension
without an instance, no GPU), blocks below 16 (token mode ``kv_block=1``,
``q_block=1``: most of every 64-row/64-key tile would stay idle), and more
than 65535 query heads over the batch (``B * Hq``: the grid's second axis).
"""

from __future__ import annotations

from typing import Any

from npsparseattn.cuda import index_runs
from npsparseattn.cuda.cupy_raw import (
    DTYPES,
    MAX_GRID_YZ,
    STRIDED_ROWS,
    TOLERANCE,
    __getattr__,  # noqa: F401  (KINDS: read when asked, the emulation may change)
    compute_dtype,
    driver,
)
from npsparseattn.cuda.cupy_raw import unsupported as backend_reasons

__all__ = ["DTYPES", "STRIDED_ROWS", "TOLERANCE", "backward", "compute_dtype", "forward", "unsupported"]


def unsupported(problem: Any) -> list[str]:
    """Reasons this backend cannot take the :class:`~npsparseattn.problems.sparse.SparseProblem` ``problem``."""
    reasons = backend_reasons(problem.dense) + index_runs.block_reasons(problem)
    heads = problem.dense.q.shape[0] * problem.dense.q.shape[1]
    if heads > MAX_GRID_YZ:
        reasons.append(f"batch x query heads = {heads} exceeds {MAX_GRID_YZ} (the batch folds into the heads)")
    return reasons


def _layout(q: Any, k: Any, kv_idx: Any, q_block: int, kv_block: int) -> index_runs.IndexRuns:
    with driver.device_of(q):
        return index_runs.runs_for(q, k, kv_idx, q_block, kv_block)


def forward(
    q: Any,
    k: Any,
    v: Any,
    kv_idx: Any,
    kv_cnt: Any,
    *,
    q_block: int,
    kv_block: int,
    scale: float,
    offset: int,
    left: int | None,
    right: int | None,
    out: Any = None,
    lse: Any = None,
) -> tuple[Any, Any]:
    """Sparse attention forward on canonical arrays (tensor cores).

    Parameters
    ----------
    q : (B, Hq, Lq, D), k : (B, Hk, Lk, D), v : (B, Hk, Lk, D)
        float16 or bfloat16, C-contiguous, one dtype.
    kv_idx : int32 (B, Hk, ceil(Lq / q_block), K), kv_cnt : int32 (B, Hk, nqb)
        The canonical index (each list's valid key blocks ascending first, ``-1`` after), of q's array kind;
        the runs are read from ``kv_idx`` alone.
    q_block, kv_block : block edges in queries and keys (16 or more).
    scale, offset, left, right :
        As :func:`npsparseattn.cuda.cupy_raw.exact.forward`, applied inside the selected blocks.
    out, lse : arrays, optional
        Buffers (B, Hq, Lq, D) in the input dtype and (B, Hq, Lq) float32.

    Returns
    -------
    out : (B, Hq, Lq, D), lse : (B, Hq, Lq) float32; rows with no visible selected key get 0 and ``-inf``.
    """
    layout = _layout(q, k, kv_idx, q_block, kv_block)
    mask = dict(scale=scale, offset=offset, left=left, right=right)
    fold, out_f, lse_f = index_runs.fold, index_runs.fold_buffer(out), index_runs.fold_buffer(lse)
    o, s = driver.forward(fold(q), fold(k), fold(v), layout, mask, out_f, lse_f, None)
    shape = q.shape[:3]
    return index_runs.unfold(o, out, out_f, (*shape, v.shape[3])), index_runs.unfold(s, lse, lse_f, shape)


def backward(
    dout: Any,
    q: Any,
    k: Any,
    v: Any,
    out: Any,
    lse: Any,
    kv_idx: Any,
    kv_cnt: Any,
    *,
    q_block: int,
    kv_block: int,
    scale: float,
    offset: int,
    left: int | None,
    right: int | None,
    grads: tuple[Any, Any, Any] | None = None,
) -> tuple[Any, Any, Any]:
    """Sparse attention backward on canonical arrays (tensor cores), deterministic.

    ``dout``/``out`` (B, Hq, Lq, D) and ``lse`` (B, Hq, Lq) float32 come from
    :func:`forward` with the same index and options; ``grads`` optionally
    gives the ``(dq, dk, dv)`` buffers.  Returns ``(dq, dk, dv)`` shaped like
    ``q``, ``k``, ``v``; ``dk``/``dv`` are summed over each GQA group, the
    same bits on every run.
    """
    layout = _layout(q, k, kv_idx, q_block, kv_block)
    mask = dict(scale=scale, offset=offset, left=left, right=right)
    targets = (None, None, None) if grads is None else grads
    folded = tuple(index_runs.fold(x) for x in (dout, q, k, v, out, lse))
    buffers = tuple(index_runs.fold_buffer(g) for g in targets)
    results = driver.backward(folded, layout, mask, buffers, None, True)  # deterministic: dQ without atomics
    shapes = (q.shape, k.shape, v.shape)
    return tuple(index_runs.unfold(*r, s) for *r, s in zip(results, targets, buffers, shapes))

"""Index-driven sparse attention on the GPU (numba-cuda): backend ``"numba-cuda"`` of ``sparse_attention``.

It runs the block-sparse kernels (:mod:`~npsparseattn.cuda.numba_cuda.block_sparse`:
the dense attention kernels walking runs of key blocks; the same instances)
on the canonical index turned into a layout on the device
(:mod:`npsparseattn.cuda.index_runs`): the batch folded into the heads, one
layout row per query head and query block, its transpose for dK/dV.  So the
visibility rule is that of block-sparse attention: the causal/window masks
inside the selected blocks (bottom-right alignment), partial last blocks, a
query that sees no key gets output 0 and ``lse = -inf``.  The backward is
the block-sparse one, deterministic: dQ by blocks that own query rows, dK/dV
by blocks that own keys over the transposed index, no atomics.

ALiBi, softcap and an additive bias (:data:`SCORE_MODS`) are those of the
block-sparse kernels; they are numbered by the unfolded ``(b, h)`` (the
kernels' ``heads`` argument), and the backward writes the bias gradient of
every visible selected pair into the caller's ``dbias``, folded like q.

Refused, with the reason (:func:`unsupported`): what the backend refuses for
any operation (no numba-cuda, CuPy or GPU, head dimensions above 128), and
blocks below 16 (token mode ``kv_block=1``, ``q_block=1``: most of every
tile would stay idle).
"""

from __future__ import annotations

from typing import Any

from npsparseattn.cuda import index_runs
from npsparseattn.cuda.numba_cuda import DTYPES, KINDS, STRIDED_ROWS, TOLERANCE, compute_dtype, user_functions
from npsparseattn.cuda.numba_cuda import unsupported as backend_reasons
from npsparseattn.cuda.numba_cuda.attention_kernels import backward_runs, forward_runs
from npsparseattn.cuda.numba_cuda.runtime import on_device
from npsparseattn.problems.scores import ScoreMods

__all__ = [
    "DTYPES", "KINDS", "SCORE_MODS", "STRIDED_ROWS", "TOLERANCE", "backward", "compute_dtype", "forward",
    "unsupported",
]  # fmt: skip

SCORE_MODS = ("alibi_slopes", "softcap", "bias", "score_mod", "mask_mod")  # of problems/scores.py


def unsupported(problem: Any) -> list[str]:
    """Reasons this backend cannot take the :class:`~npsparseattn.problems.sparse.SparseProblem` ``problem``."""
    found = backend_reasons(problem) + index_runs.block_reasons(problem)
    return found or user_functions.reasons(problem.dense.mods)


def _layout(q: Any, k: Any, kv_idx: Any, q_block: int, kv_block: int) -> index_runs.IndexRuns:
    with on_device(q):
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
    mods: ScoreMods | None = None,
) -> tuple[Any, Any]:
    """Sparse attention forward on canonical arrays.

    Parameters
    ----------
    q : (B, Hq, Lq, D), k : (B, Hk, Lk, D), v : (B, Hk, Lk, Dv)
        C-contiguous CuPy arrays (NumPy under the simulator), one dtype:
        float16, bfloat16 or float32.
    kv_idx : int32 (B, Hk, ceil(Lq / q_block), K), kv_cnt : int32 (B, Hk, nqb)
        The canonical index (each list's valid key blocks ascending first, ``-1`` after), of q's array kind;
        the runs are read from ``kv_idx`` alone.
    q_block, kv_block : block edges in queries and keys (16 or more).
    scale, offset, left, right :
        As :func:`npsparseattn.cuda.numba_cuda.exact.forward`, applied inside the selected blocks.
    out, lse : arrays, optional
        Buffers (B, Hq, Lq, Dv) in the input dtype and (B, Hq, Lq) float32.
    mods : ScoreMods, optional
        ALiBi slopes, softcap and bias (:data:`SCORE_MODS`), as for
        :func:`npsparseattn.cuda.numba_cuda.exact.forward`.

    Returns
    -------
    out, lse; rows with no visible selected key get 0 and ``-inf``.
    """
    layout = _layout(q, k, kv_idx, q_block, kv_block)
    mask = dict(scale=scale, offset=offset, left=left, right=right, mods=mods, heads=q.shape[1])
    fold, out_f, lse_f = index_runs.fold, index_runs.fold_buffer(out), index_runs.fold_buffer(lse)
    o, s = forward_runs(fold(q), fold(k), fold(v), layout.rows, layout.heads, layout.block, mask, out_f, lse_f)
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
    mods: ScoreMods | None = None,
    dbias: Any = None,
) -> tuple[Any, Any, Any]:
    """Sparse attention backward on canonical arrays, deterministic.

    ``dout``/``out`` (B, Hq, Lq, Dv) and ``lse`` (B, Hq, Lq) float32 come from
    :func:`forward` with the same index and options; ``grads`` optionally
    gives the ``(dq, dk, dv)`` buffers; ``mods`` as for :func:`forward`, and
    with a bias ``dbias``: a zeroed C-contiguous (B, Hq, Lq, Lk) buffer in
    the input dtype that receives the gradient of each visible selected
    pair's biased score (other pairs stay 0).  Returns ``(dq, dk, dv)``
    shaped like ``q``, ``k``, ``v``; ``dk``/``dv`` are summed over each GQA group.
    """
    if dbias is not None and not dbias.flags.c_contiguous:
        raise ValueError("dbias must be a C-contiguous (B, Hq, Lq, Lk) buffer: the kernels write it folded in place")
    layout = _layout(q, k, kv_idx, q_block, kv_block)
    mask = dict(scale=scale, offset=offset, left=left, right=right, mods=mods, heads=q.shape[1])
    targets = (None, None, None) if grads is None else grads
    folded = tuple(index_runs.fold(x) for x in (dout, q, k, v, out, lse))
    buffers = tuple(index_runs.fold_buffer(g) for g in targets)
    results = backward_runs(
        folded,
        layout.rows,
        layout.columns,
        layout.heads,
        layout.block,
        mask,
        None if any(b is None for b in buffers) else buffers,
        None if dbias is None else index_runs.fold(dbias),
    )
    shapes = (q.shape, k.shape, v.shape)
    return tuple(index_runs.unfold(*r, s) for *r, s in zip(results, targets, buffers, shapes))

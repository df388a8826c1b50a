"""Block-sparse attention on the GPU (numba-cuda), forward and backward: backend ``"numba-cuda"`` of
``block_sparse_attention``.

The kernels of dense attention (:mod:`~npsparseattn.cuda.numba_cuda.attention_kernels`)
walking the layout's runs of consecutive stored key blocks instead of one run
over every key, so the work grows with the stored blocks: the forward and the
dQ pass take the layout's rows (CSR), the dK/dV pass its transpose (CSC),
each GQA group's query heads summed by the block that owns the key head.  A
layout block of ``bq`` query rows is cut into tiles of the kernel's row count
(the last may be partial); blocks narrower than a tile leave part of it idle.
The runs come from the GPU backends' one device cache
(:mod:`npsparseattn.cuda.layout_runs`).  What it takes, refuses and its
tolerances: :mod:`npsparseattn.cuda.numba_cuda`.

ALiBi, softcap and an additive bias (:data:`SCORE_MODS`) are those of dense
attention (:mod:`~npsparseattn.cuda.numba_cuda.exact`): runtime arguments of
the same kernel instances, applied to the scores of the stored blocks; the
backward writes the bias gradient of every visible stored pair.
"""

from __future__ import annotations

from typing import Any

from npsparseattn.cuda.layout_runs import device_runs
from npsparseattn.cuda.numba_cuda import DTYPES, KINDS, STRIDED_ROWS, TOLERANCE, compute_dtype, user_functions
from npsparseattn.cuda.numba_cuda import unsupported as backend_reasons
from npsparseattn.cuda.numba_cuda.attention_kernels import backward_runs, forward_runs
from npsparseattn.layouts import BlockLayout
from npsparseattn.problems.scores import ScoreMods

__all__ = [
    "DTYPES", "KINDS", "SCORE_MODS", "STRIDED_ROWS", "TOLERANCE", "backward", "compute_dtype", "forward",
    "unsupported",
]  # fmt: skip

SCORE_MODS = ("alibi_slopes", "softcap", "bias", "score_mod", "mask_mod")  # of problems/scores.py


def unsupported(problem: Any) -> list[str]:
    """The backend's reasons, then why a ``score_mod``/``mask_mod`` of ``problem`` cannot be compiled for the GPU."""
    found = backend_reasons(problem)
    return found or user_functions.reasons(problem.mods)


def forward(
    q: Any,
    k: Any,
    v: Any,
    layout: BlockLayout,
    *,
    scale: float,
    offset: int,
    left: int | None,
    right: int | None,
    out: Any = None,
    lse: Any = None,
    mods: ScoreMods | None = None,
) -> tuple[Any, Any]:
    """Block-sparse attention forward on canonical 4-D arrays.

    Parameters
    ----------
    q : (B, Hq, Lq, D), k : (B, Hk, Lk, D), v : (B, Hk, Lk, Dv)
        C-contiguous CuPy arrays (NumPy under the simulator), one dtype:
        float16, bfloat16 or float32.
    layout : BlockLayout
        ``seq == (Lq, Lk)``, ``heads`` 1 or Hq (checked by the caller).
    scale, offset, left, right :
        As :func:`npsparseattn.cuda.numba_cuda.exact.forward`, applied inside the stored blocks.
    out, lse : arrays, optional
        Buffers (B, Hq, Lq, Dv) in the input dtype and (B, Hq, Lq) float32.
    mods : ScoreMods, optional
        ALiBi slopes, softcap and bias (:data:`SCORE_MODS`), as for
        :func:`npsparseattn.cuda.numba_cuda.exact.forward`.

    Returns
    -------
    out, lse; rows with no visible stored key get 0 and ``-inf``.
    """
    mask = dict(scale=scale, offset=offset, left=left, right=right, mods=mods)
    return forward_runs(q, k, v, device_runs(layout, q), layout.heads, layout.block, mask, out, lse)


def backward(
    dout: Any,
    q: Any,
    k: Any,
    v: Any,
    out: Any,
    lse: Any,
    layout: BlockLayout,
    *,
    scale: float,
    offset: int,
    left: int | None,
    right: int | None,
    grads: tuple[Any, Any, Any] | None = None,
    mods: ScoreMods | None = None,
    dbias: Any = None,
) -> tuple[Any, Any, Any]:
    """Block-sparse attention backward on canonical 4-D arrays.

    ``dout``/``out`` (B, Hq, Lq, Dv) and ``lse`` (B, Hq, Lq) float32 come from
    :func:`forward` with the same layout and options; ``grads`` optionally
    gives the ``(dq, dk, dv)`` buffers; ``mods`` as for :func:`forward`, and
    with a bias ``dbias``: a zeroed (B, Hq, Lq, Lk) buffer in the input dtype
    that receives the gradient of each visible stored pair's biased score
    (other pairs stay 0).  Returns ``(dq, dk, dv)`` shaped like ``q``, ``k``,
    ``v``; ``dk``/``dv`` are summed over each GQA group.
    """
    mask = dict(scale=scale, offset=offset, left=left, right=right, mods=mods)
    rows, columns = device_runs(layout, q), device_runs(layout, q, transposed=True)
    arrays = (dout, q, k, v, out, lse)
    return backward_runs(arrays, rows, columns, layout.heads, layout.block, mask, grads, dbias)

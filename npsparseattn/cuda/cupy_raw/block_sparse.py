"""Block-sparse attention on tensor cores (CUDA C++, ``kernels/block_sparse.cu``): backend ``"cupy"`` of
``block_sparse_attention``.

The loops of the dense kernels walking the *runs* of consecutive stored
blocks of a :class:`~npsparseattn.layouts.BlockLayout` row: the forward walks
the runs of a query block's row (CSR), the backward those of a key block's
row in the transposed layout (CSC), so the work grows with the stored blocks.
Causal/window masks apply inside blocks; tiles fully inside both the run and
the band skip the element mask.

A block of ``bq`` query rows is covered by ``ceil(bq / 64)`` CTAs (``bk`` keys
by ``ceil(bk / 64)`` in the backward): blocks that are multiples of 64 keep
the tensor cores busy, smaller ones leave part of every CTA idle (correct,
slower).  The runs come from the GPU backends' one device cache
(:mod:`npsparseattn.cuda.layout_runs`).  The host side is the driver shared
with dense attention (:mod:`~npsparseattn.cuda.cupy_raw.driver`); it takes
and refuses what :mod:`npsparseattn.cuda.cupy_raw` says.
"""

from __future__ import annotations

from typing import Any

from npsparseattn.cuda.cupy_raw import (
    DTYPES,
    STRIDED_ROWS,
    TOLERANCE,
    __getattr__,  # noqa: F401  (KINDS: read when asked, the emulation may change)
    compute_dtype,
    driver,
    unsupported,
)
from npsparseattn.layouts import BlockLayout

__all__ = ["DTYPES", "STRIDED_ROWS", "TOLERANCE", "backward", "compute_dtype", "forward", "unsupported"]


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
    element: str | None = None,
) -> tuple[Any, Any]:
    """Block-sparse attention forward on canonical 4-D arrays (tensor cores).

    Parameters
    ----------
    q : (B, Hq, Lq, D), k : (B, Hk, Lk, D), v : (B, Hk, Lk, D)
        float16 or bfloat16, C-contiguous, one dtype.
    layout : BlockLayout
        ``seq == (Lq, Lk)``, ``heads`` 1 or Hq (checked by the caller).
    scale, offset, left, right :
        As :func:`npsparseattn.cuda.cupy_raw.exact.forward`, applied inside the stored blocks.
    out, lse : arrays, optional
        Buffers (B, Hq, Lq, D) in the input dtype and (B, Hq, Lq) float32.
    element : "bfloat16" or "float16", optional
        For uint16 arrays: the element type whose bits they hold (bfloat16 kernels
        run on uint16 buffers where CuPy has no bfloat16 dtype); results are
        uint16 bits too.

    Returns
    -------
    out : (B, Hq, Lq, D), lse : (B, Hq, Lq) float32; rows with no visible stored key get 0 and ``-inf``.
    """
    mask = dict(scale=scale, offset=offset, left=left, right=right)
    return driver.forward(q, k, v, layout, mask, out, lse, element)


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
    element: str | None = None,
    deterministic: bool = False,
) -> tuple[Any, Any, Any]:
    """Block-sparse attention backward on canonical 4-D arrays (tensor cores).

    ``dout``/``out`` (B, Hq, Lq, D) and ``lse`` (B, Hq, Lq) float32 come from
    :func:`forward` with the same layout and options; ``grads`` optionally
    gives the ``(dq, dk, dv)`` buffers.  Returns ``(dq, dk, dv)`` shaped like
    ``q``, ``k``, ``v``; ``dk``/``dv`` are summed over each GQA group.
    ``element``: as for :func:`forward`.  ``deterministic=True``: dQ without atomics, in a separate pass
    whose blocks own query rows (the same bits on every run, about a third more work); by default dQ is
    summed with float32 atomics in an order that may vary between runs.  dK and dV are deterministic either
    way.
    """
    mask = dict(scale=scale, offset=offset, left=left, right=right)
    return driver.backward((dout, q, k, v, out, lse), layout, mask, grads, element, deterministic)

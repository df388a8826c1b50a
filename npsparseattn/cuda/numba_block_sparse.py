"""Block-sparse attention on the GPU (numba-cuda), forward and backward: backend ``"numba-cuda"`` of
``block_sparse_attention``.

The kernels are those of dense attention (:mod:`npsparseattn.cuda.numba_attention`)
walking the layout's runs of consecutive stored key blocks instead of one run
over every key, so the work grows with the stored blocks: the forward and the
dQ pass take the layout's rows (CSR), the dK/dV pass its transpose (CSC),
each GQA group's query heads summed by the block that owns the key head.  A
layout block of ``bq`` query rows is cut into tiles of the kernel's row count
(the last may be partial); blocks narrower than a tile leave part of it idle.

The runs are uploaded once per layout and device and kept while the layout is
among the :data:`CACHED_LAYOUTS` most recently used (layouts are immutable,
so the cache is keyed by the object).  Refuses, tolerances and dtypes: those
of :mod:`npsparseattn.cuda.numba_exact`.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import numpy as np

from npsparseattn.cuda import numba_attention
from npsparseattn.cuda.numba_exact import STRIDED_ROWS, TOLERANCE, unsupported
from npsparseattn.cuda.numba_runtime import DTYPES, KINDS, compute_dtype, device_key, upload
from npsparseattn.layouts import BlockLayout

__all__ = ["DTYPES", "KINDS", "STRIDED_ROWS", "TOLERANCE", "backward", "compute_dtype", "forward", "unsupported"]

CACHED_LAYOUTS = 32
_RUNS: OrderedDict[tuple[int, int | None, str], tuple[BlockLayout, tuple[Any, Any, Any]]] = OrderedDict()


def device_runs(layout: BlockLayout, like: Any, which: str = "rows") -> tuple[Any, Any, Any]:
    """The runs of ``layout`` (``which="rows"``) or of its transpose (``"columns"``) on the device of ``like``.

    int32 ``(ptr, start, stop)`` arrays, uploaded on first use and cached.
    """
    key = (id(layout), device_key(like), which)
    hit = _RUNS.get(key)
    if hit is not None and hit[0] is layout:
        _RUNS.move_to_end(key)
        return hit[1]
    source = layout if which == "rows" else layout.transpose()
    runs = tuple(upload(like, np.ascontiguousarray(a, np.int32)) for a in source.runs())
    _RUNS[key] = (layout, runs)
    while len(_RUNS) > CACHED_LAYOUTS:
        _RUNS.popitem(last=False)
    return runs


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
        As :func:`npsparseattn.cuda.numba_exact.forward`, applied inside the stored blocks.
    out, lse : arrays, optional
        Buffers (B, Hq, Lq, Dv) in the input dtype and (B, Hq, Lq) float32.

    Returns
    -------
    out, lse; rows with no visible stored key get 0 and ``-inf``.
    """
    return numba_attention.forward(
        q, k, v, device_runs(layout, q), layout.heads, layout.block, scale=scale, offset=offset, left=left,
        right=right, out=out, lse=lse,
    )  # fmt: skip


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
) -> tuple[Any, Any, Any]:
    """Block-sparse attention backward on canonical 4-D arrays.

    ``dout``/``out`` (B, Hq, Lq, Dv) and ``lse`` (B, Hq, Lq) float32 come from
    :func:`forward` with the same layout and options; ``grads`` optionally
    gives the ``(dq, dk, dv)`` buffers.  Returns ``(dq, dk, dv)`` shaped like
    ``q``, ``k``, ``v``; ``dk``/``dv`` are summed over each GQA group.
    """
    return numba_attention.backward(
        dout, q, k, v, out, lse, device_runs(layout, q), device_runs(layout, q, "columns"), layout.heads,
        layout.block, scale=scale, offset=offset, left=left, right=right, grads=grads,
    )  # fmt: skip

"""Block-sparse attention on tensor cores (CUDA C++, ``kernels/block_sparse.cu``): backend ``"cupy"`` of
``block_sparse_attention``.

The loops of the dense kernels (:mod:`~npsparseattn.cuda.raw_exact`) walking
the *runs* of consecutive stored blocks of a :class:`~npsparseattn.layouts.BlockLayout`
row: the forward walks the runs of a query block's row (CSR), the backward
those of a key block's row in the transposed layout (CSC), so the work grows
with the stored blocks.  Causal/window masks apply inside blocks; tiles fully
inside both the run and the band skip the element mask.

A block of ``bq`` query rows is covered by ``ceil(bq / 64)`` CTAs (``bk`` keys by
``ceil(bk / 64)`` in the backward): blocks that are multiples of 64 keep the
tensor cores busy, smaller ones leave part of every CTA idle (correct, slower).
The layout's run arrays are converted to int32 and, for CuPy arrays, copied
to the device once per layout (a small cache keeps the last few).

Takes what :mod:`~npsparseattn.cuda.raw_exact` takes; dQ is accumulated with
float32 atomics (not bitwise deterministic).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import numpy as np

from npsparseattn._arrays import array_module
from npsparseattn.cuda import raw_common, raw_loader, raw_sources
from npsparseattn.cuda.raw_common import (
    DTYPES,
    NTHREADS,
    STRIDED_ROWS,
    TOLERANCE,
    blocks,
    compute_dtype,
    finish,
    output_buffer,
    unsupported,
)
from npsparseattn.layouts import BlockLayout

__all__ = ["DTYPES", "STRIDED_ROWS", "TOLERANCE", "backward", "compute_dtype", "forward", "unsupported"]

BK = 64  # keys per backward CTA
_RUNS_CACHE: OrderedDict[tuple[int, bool, str, int], tuple[BlockLayout, tuple[Any, Any, Any]]] = OrderedDict()
_RUNS_CACHE_SIZE = 8


def __getattr__(name: str) -> Any:
    """``KINDS`` is read when asked (``raw_common.kinds``): ``NPSPARSEATTN_CUDA_EMULATE`` may change after import."""
    if name == "KINDS":
        return raw_common.kinds()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _runs(layout: BlockLayout, transposed: bool, like: Any) -> tuple[Any, Any, Any]:
    """``(ptr, start, stop)`` of the layout's runs (of its transpose if ``transposed``), int32, where ``like`` lives.

    Cached per layout object (the cache holds the layout, so its id is not reused while the entry lives).
    """
    kind = "numpy" if isinstance(like, np.ndarray) else "cupy"
    device = -1 if kind == "numpy" else int(like.device.id)
    key = (id(layout), transposed, kind, device)
    hit = _RUNS_CACHE.get(key)
    if hit is not None and hit[0] is layout:
        _RUNS_CACHE.move_to_end(key)
        return hit[1]
    runs = (layout.transpose() if transposed else layout).runs()
    if runs[0][-1] >= 2**31:
        raise ValueError(f"layout has {runs[0][-1]} runs; the cupy kernels index them with int32")
    xp = array_module(kind)
    arrays = tuple(xp.asarray(np.ascontiguousarray(a, dtype=np.int32)) for a in runs)
    _RUNS_CACHE[key] = (layout, arrays)
    while len(_RUNS_CACHE) > _RUNS_CACHE_SIZE:
        _RUNS_CACHE.popitem(last=False)
    return arrays


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
    """Block-sparse attention forward on canonical 4-D arrays (tensor cores).

    Parameters
    ----------
    q : (B, Hq, Lq, D), k : (B, Hk, Lk, D), v : (B, Hk, Lk, D)
        float16 or bfloat16, C-contiguous, one dtype.
    layout : BlockLayout
        ``seq == (Lq, Lk)``, ``heads`` 1 or Hq (checked by the caller).
    scale, offset, left, right :
        As :func:`npsparseattn.cuda.raw_exact.forward`, applied inside the stored blocks.
    out, lse : arrays, optional
        Buffers (B, Hq, Lq, D) in the input dtype and (B, Hq, Lq) float32.

    Returns
    -------
    out : (B, Hq, Lq, D), lse : (B, Hq, Lq) float32; rows with no visible stored key get 0 and ``-inf``.
    """
    xp = array_module("numpy" if isinstance(q, np.ndarray) else "cupy")
    raw_common.check_arrays(q.dtype, q=q, k=k, v=v)
    n_batch, hq, lq, d = q.shape
    hk, lk = k.shape[1], k.shape[2]
    out_t, out_k = output_buffer(out, (n_batch, hq, lq, d), q.dtype, xp)
    lse_t, lse_k = output_buffer(lse, (n_batch, hq, lq), np.float32, xp)
    if lq > 0:
        bq, bk = layout.block
        nqb, chunks = layout.n_query_blocks, blocks(bq, raw_common.fwd_rows(d, sparse=True))
        masked, left_b, right_b = raw_common.window_args(left, right, lq, lk)
        ints = (lq, lk, hq, hk, bq, bk, nqb, layout.heads, chunks, offset, left_b, right_b)
        raw_loader.launcher().launch(
            raw_sources.instance("npsa_bsa_fwd", q.dtype.name, d, masked),
            (nqb * chunks, hq, n_batch),
            (NTHREADS,),
            raw_common.fwd_shared_bytes(d),
            [q, k, v, out_k, lse_k, *_runs(layout, False, q), *map(np.int32, ints),
             np.float32(scale * raw_common.LOG2E)],
        )  # fmt: skip
    return finish(out_t, out_k), finish(lse_t, lse_k)


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
    """Block-sparse attention backward on canonical 4-D arrays (tensor cores).

    ``dout``/``out`` (B, Hq, Lq, D) and ``lse`` (B, Hq, Lq) float32 come from
    :func:`forward` with the same layout and options; ``grads`` optionally
    gives the ``(dq, dk, dv)`` buffers.  Returns ``(dq, dk, dv)`` shaped like
    ``q``, ``k``, ``v``; ``dk``/``dv`` are summed over each GQA group.
    """
    xp = array_module("numpy" if isinstance(q, np.ndarray) else "cupy")
    raw_common.check_arrays(q.dtype, lse, q=q, k=k, v=v, dout=dout, out=out)
    n_batch, hq, lq, d = q.shape
    hk, lk = k.shape[1], k.shape[2]
    targets = (None, None, None) if grads is None else grads
    bufs = [output_buffer(g, x.shape, x.dtype, xp) for g, x in zip(targets, (q, k, v))]
    dq, dk, dv = (b[1] for b in bufs)
    if lq == 0 or lk == 0:
        for g in (dq, dk, dv):
            g[...] = 0
    else:
        dtype = q.dtype.name
        lse2, delta, dq_acc = raw_common.backward_prepare(dout, out, lse, dtype, d)
        bq, bk = layout.block
        nkb, chunks = layout.n_key_blocks, blocks(bk, BK)
        masked, left_b, right_b = raw_common.window_args(left, right, lq, lk)
        ints = (lq, lk, hq, hk, bq, bk, nkb, layout.heads, chunks, offset, left_b, right_b)
        raw_loader.launcher().launch(
            raw_sources.instance("npsa_bsa_bwd", dtype, d, masked),
            (nkb * chunks, hk, n_batch),
            (NTHREADS,),
            raw_common.bwd_shared_bytes(d),
            [q, k, v, dout, lse2, delta, dq_acc, dk, dv, *_runs(layout, True, q), *map(np.int32, ints),
             np.float32(scale * raw_common.LOG2E), np.float32(scale)],
        )  # fmt: skip
        raw_common.store_dq(dq_acc, dq, dtype, scale)
    return tuple(finish(t, c) for t, c in bufs)

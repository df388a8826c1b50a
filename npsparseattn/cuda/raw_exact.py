"""Tiled exact attention on tensor cores (CUDA C++, ``kernels/attention.cu``): backend ``"cupy"`` of ``attention``.

Forward: one CTA of 4 warps per (128 query rows for D <= 64, else 64; query
head; batch), each warp 32 or 16 rows; Q stays in registers as mma fragments,
K and V tiles of 64 keys are double-buffered in shared memory with
``cp.async``; ``S = Q K^T`` and ``O += P V`` run as ``mma.sync.m16n8k16``
with float32 accumulators, the online softmax in registers (base 2).  Key tiles outside the causal/window band are never
visited; tiles fully inside it skip the element mask.

Backward (FlashAttention-2): ``npsa_bwd_prep`` computes ``delta = rowsum(dO * O)``
and ``lse * log2 e``; one CTA per (64 keys, key head, batch) walks the query
tiles of every query head of its GQA group, recomputes ``P``, accumulates dK
and dV in registers and adds ``dQ = dS K`` to a float32 buffer with atomics
(so dQ is summed in an order that may vary between runs: not bitwise
deterministic); ``npsa_dq_store`` scales and rounds it.

Takes float16 and bfloat16 with ``D == Dv`` in 32, 64, 96, 128 (others are
refused with the reason, see :mod:`~npsparseattn.cuda.raw_common`); CuPy arrays
on a GPU of compute capability 8.0 or newer, or NumPy arrays under
``NPSPARSEATTN_CUDA_EMULATE=1`` (the same sources compiled for the host).
"""

from __future__ import annotations

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

__all__ = ["DTYPES", "STRIDED_ROWS", "TOLERANCE", "backward", "compute_dtype", "forward", "unsupported"]

BK = 64  # npsa::BwdShape<D>::BK: keys per backward CTA


def __getattr__(name: str) -> Any:
    """``KINDS`` is read when asked (``raw_common.kinds``): ``NPSPARSEATTN_CUDA_EMULATE`` may change after import."""
    if name == "KINDS":
        return raw_common.kinds()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _xp(x: Any):
    return array_module("numpy" if isinstance(x, np.ndarray) else "cupy")


def forward(
    q: Any,
    k: Any,
    v: Any,
    *,
    scale: float,
    offset: int,
    left: int | None,
    right: int | None,
    out: Any = None,
    lse: Any = None,
) -> tuple[Any, Any]:
    """Tiled attention forward on canonical 4-D arrays (tensor cores).

    Parameters
    ----------
    q : (B, Hq, Lq, D), k : (B, Hk, Lk, D), v : (B, Hk, Lk, D)
        float16 or bfloat16, C-contiguous, one dtype; ``Hq % Hk == 0``.
    scale, offset, left, right :
        Query ``i`` sees key ``j`` iff ``i+offset-left <= j <= i+offset+right``
        (``None``: unbounded); scores are ``scale * q . k``.
    out, lse : arrays, optional
        Buffers (B, Hq, Lq, D) in the input dtype and (B, Hq, Lq) float32.

    Returns
    -------
    out : (B, Hq, Lq, D) input dtype, lse : (B, Hq, Lq) float32; a row with no visible key gets 0 and ``-inf``.
    """
    xp = _xp(q)
    raw_common.check_arrays(q.dtype, q=q, k=k, v=v)
    n_batch, hq, lq, d = q.shape
    hk, lk = k.shape[1], k.shape[2]
    out_t, out_k = output_buffer(out, (n_batch, hq, lq, d), q.dtype, xp)
    lse_t, lse_k = output_buffer(lse, (n_batch, hq, lq), np.float32, xp)
    if lq > 0:
        masked, left_b, right_b = raw_common.window_args(left, right, lq, lk)
        raw_loader.launcher().launch(
            raw_sources.instance("npsa_attn_fwd", q.dtype.name, d, masked),
            (blocks(lq, raw_common.fwd_rows(d)), hq, n_batch),
            (NTHREADS,),
            raw_common.fwd_shared_bytes(d),
            [q, k, v, out_k, lse_k, *map(np.int32, (lq, lk, hq, hk, offset, left_b, right_b)),
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
    *,
    scale: float,
    offset: int,
    left: int | None,
    right: int | None,
    grads: tuple[Any, Any, Any] | None = None,
) -> tuple[Any, Any, Any]:
    """Tiled attention backward on canonical 4-D arrays (tensor cores).

    ``dout``/``out`` (B, Hq, Lq, D) and ``lse`` (B, Hq, Lq) float32 come from
    :func:`forward` with the same options; ``grads`` optionally gives the
    ``(dq, dk, dv)`` buffers.  Returns ``(dq, dk, dv)`` shaped like ``q``,
    ``k``, ``v`` in the input dtype; ``dk``/``dv`` are summed over each GQA group.
    """
    xp = _xp(q)
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
        masked, left_b, right_b = raw_common.window_args(left, right, lq, lk)
        raw_loader.launcher().launch(
            raw_sources.instance("npsa_attn_bwd", dtype, d, masked),
            (blocks(lk, BK), hk, n_batch),
            (NTHREADS,),
            raw_common.bwd_shared_bytes(d),
            [q, k, v, dout, lse2, delta, dq_acc, dk, dv, *map(np.int32, (lq, lk, hq, hk, offset, left_b, right_b)),
             np.float32(scale * raw_common.LOG2E), np.float32(scale)],
        )  # fmt: skip
        raw_common.store_dq(dq_acc, dq, dtype, scale)
    return tuple(finish(t, c) for t, c in bufs)

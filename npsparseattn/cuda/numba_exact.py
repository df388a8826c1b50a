"""Tiled exact attention on the GPU (numba-cuda), forward and backward: backend ``"numba-cuda"`` of ``attention``.

The kernels are those of :mod:`npsparseattn.cuda.numba_attention`, walking
one run that covers every key: one thread block per (query tile, query
head, batch), K/V tiles staged in shared memory, online softmax in float32
registers, causal and windowed masks clipped to the visible key range before
any tile is loaded; the backward in two deterministic passes (dQ, then dK/dV
with the GQA group summed by the block that owns the key head).

Takes CuPy arrays on a GPU of compute capability 8.0 or newer (NumPy arrays
under the CUDA simulator); float16, bfloat16 and float32 storage, float32
arithmetic; head dimensions up to 128.  Tolerances against the float64
reference: those of float32 accumulation, plus the rounding of the output to
its storage dtype.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from npsparseattn.cuda import numba_attention
from npsparseattn.cuda.numba_runtime import DTYPES, KINDS, compute_dtype, device_key, head_dims, reasons, upload

__all__ = ["DTYPES", "KINDS", "STRIDED_ROWS", "TOLERANCE", "backward", "compute_dtype", "forward", "unsupported"]

STRIDED_ROWS = False
TOLERANCE = {"float16": 2e-3, "bfloat16": 8e-3, "float32": 1e-5}

_ONE_RUN: dict[int | None, tuple[Any, Any, Any]] = {}


def unsupported(problem: Any) -> list[str]:
    """Environment reasons (numba-cuda, CuPy, a GPU of compute capability 8.0+) and head dimensions above 128."""
    return reasons(head_dims(problem))


def _one_run(like: Any) -> tuple[Any, Any, Any]:
    """Runs of a one-block layout (every key of every query), on the device of ``like``; uploaded once."""
    key = device_key(like)
    if key not in _ONE_RUN:
        _ONE_RUN[key] = tuple(upload(like, np.array(a, np.int32)) for a in ([0, 1], [0], [1]))
    return _ONE_RUN[key]


def _whole(q: Any, k: Any) -> tuple[int, int]:
    """The block of the one-block layout: all queries by all keys."""
    return max(q.shape[2], 1), max(k.shape[2], 1)


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
    """Tiled attention forward on canonical 4-D arrays.

    Parameters
    ----------
    q : (B, Hq, Lq, D), k : (B, Hk, Lk, D), v : (B, Hk, Lk, Dv)
        C-contiguous CuPy arrays (NumPy under the simulator), one dtype:
        float16, bfloat16 or float32.
    scale, offset, left, right :
        Query ``i`` sees key ``j`` iff ``i+offset-left <= j <= i+offset+right``
        (``None``: unbounded); scores are ``scale * q . k``.
    out, lse : arrays, optional
        Buffers (B, Hq, Lq, Dv) in the input dtype and (B, Hq, Lq) float32.

    Returns
    -------
    out : (B, Hq, Lq, Dv) in the input dtype, lse : (B, Hq, Lq) float32.
    """
    return numba_attention.forward(
        q, k, v, _one_run(q), 1, _whole(q, k), scale=scale, offset=offset, left=left, right=right, out=out, lse=lse
    )


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
    """Tiled attention backward on canonical 4-D arrays.

    ``dout``/``out`` (B, Hq, Lq, Dv) in the input dtype and ``lse``
    (B, Hq, Lq) float32 from :func:`forward`; the other arguments as there;
    ``grads`` optionally gives the ``(dq, dk, dv)`` buffers.  Returns
    ``(dq, dk, dv)`` shaped like ``q``, ``k``, ``v``; ``dk``/``dv`` are summed
    over each GQA group.
    """
    runs = _one_run(q)
    return numba_attention.backward(
        dout, q, k, v, out, lse, runs, runs, 1, _whole(q, k), scale=scale, offset=offset, left=left, right=right,
        grads=grads,
    )  # fmt: skip

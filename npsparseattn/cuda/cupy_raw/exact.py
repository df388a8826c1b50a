"""Tiled exact attention on tensor cores (CUDA C++, ``kernels/attention.cu``): backend ``"cupy"`` of ``attention``.

Forward: one CTA of 4 warps per (128 query rows, query head, batch), each
warp 32 rows (two m-tiles); Q stays in registers as mma fragments for
D <= 64 and in shared memory above (its fragments reloaded per k-step), K and
V tiles of 64 keys are double-buffered in shared memory with ``cp.async``;
``S = Q K^T`` and ``O += P V`` run as ``mma.sync.m16n8k16`` with float32
accumulators, the online softmax in registers (base 2).  Key tiles outside
the causal/window band are never visited; tiles fully inside it skip the
element mask.

Backward (FlashAttention-2): the steps of :mod:`~npsparseattn.cuda.cupy_raw.driver`;
dQ is summed with atomics, in an order that may vary between runs (not
bitwise deterministic), unless ``deterministic=True`` (a separate dQ pass).

ALiBi and softcap (:data:`SCORE_MODS`) are runtime arguments of the same
instances (a null slopes pointer and a softcap of 0 turn them off); an
additive bias is refused (the registry names it).

What it takes and refuses, and its tolerances: :mod:`npsparseattn.cuda.cupy_raw`
(float16 and bfloat16 with ``D == Dv`` in 32, 64, 96, 128).
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

__all__ = ["DTYPES", "SCORE_MODS", "STRIDED_ROWS", "TOLERANCE", "backward", "compute_dtype", "forward", "unsupported"]

SCORE_MODS = ("alibi_slopes", "softcap")  # the modifications of problems/scores.py these kernels apply


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
    element: str | None = None,
    mods: Any = None,
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
    element : "bfloat16" or "float16", optional
        For uint16 arrays: the element type whose bits they hold (bfloat16 kernels
        run on uint16 buffers where CuPy has no bfloat16 dtype); results are
        uint16 bits too.
    mods : ScoreMods, optional
        ALiBi slopes and softcap (:data:`SCORE_MODS`; no bias), in the order of
        :mod:`npsparseattn.problems.scores`; ``lse`` is that of the modified scores.

    Returns
    -------
    out : (B, Hq, Lq, D) input dtype, lse : (B, Hq, Lq) float32; a row with no visible key gets 0 and ``-inf``.
    """
    mask = dict(scale=scale, offset=offset, left=left, right=right, mods=mods)
    return driver.forward(q, k, v, None, mask, out, lse, element)


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
    element: str | None = None,
    deterministic: bool = False,
    mods: Any = None,
) -> tuple[Any, Any, Any]:
    """Tiled attention backward on canonical 4-D arrays (tensor cores).

    ``dout``/``out`` (B, Hq, Lq, D) and ``lse`` (B, Hq, Lq) float32 come from
    :func:`forward` with the same options; ``grads`` optionally gives the
    ``(dq, dk, dv)`` buffers.  Returns ``(dq, dk, dv)`` shaped like ``q``,
    ``k``, ``v`` in the input dtype; ``dk``/``dv`` are summed over each GQA group.
    ``element``: as for :func:`forward`.  ``deterministic=True``: dQ without atomics, in a separate pass
    whose blocks own query rows (the same bits on every run, about a third more work); by default dQ is
    summed with float32 atomics in an order that may vary between runs.  dK and dV are deterministic either
    way.  ``mods``: as for :func:`forward`.
    """
    mask = dict(scale=scale, offset=offset, left=left, right=right, mods=mods)
    return driver.backward((dout, q, k, v, out, lse), None, mask, grads, element, deterministic)

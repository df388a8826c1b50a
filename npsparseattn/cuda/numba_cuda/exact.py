"""Tiled exact attention on the GPU (numba-cuda), forward and backward: backend ``"numba-cuda"`` of ``attention``.

The kernels are those of :mod:`~npsparseattn.cuda.numba_cuda.attention_kernels`,
walking one run that covers every key: one thread block per (query tile,
query head, batch), K/V tiles staged in shared memory, online softmax in
float32 registers, causal and windowed masks clipped to the visible key range
before any tile is loaded; the backward in two deterministic passes (dQ, then
dK/dV with the GQA group summed by the block that owns the key head).
ALiBi, softcap and an additive bias (:data:`SCORE_MODS`) are applied to each
score in the kernels, as runtime arguments of the same kernel instances
(:mod:`~npsparseattn.cuda.numba_cuda.score_terms`); the backward writes the
bias gradient of every visible pair into the caller's ``dbias`` buffer.
What it takes, refuses and its tolerances: :mod:`npsparseattn.cuda.numba_cuda`.
"""

from __future__ import annotations

from typing import Any

from npsparseattn.cuda.layout_runs import single_run
from npsparseattn.cuda.numba_cuda import DTYPES, KINDS, STRIDED_ROWS, TOLERANCE, compute_dtype, user_functions
from npsparseattn.cuda.numba_cuda import unsupported as backend_reasons
from npsparseattn.cuda.numba_cuda.attention_kernels import backward_runs, forward_runs
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
    mods: ScoreMods | None = None,
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
    mods : ScoreMods, optional
        ALiBi slopes, softcap and bias (:data:`SCORE_MODS`), applied in the
        order of :mod:`npsparseattn.problems.scores`; ``lse`` is that of the
        modified scores.

    Returns
    -------
    out : (B, Hq, Lq, Dv) in the input dtype, lse : (B, Hq, Lq) float32.

    Examples
    --------
    Under the simulator (``NUMBA_ENABLE_CUDASIM=1``) on NumPy arrays, on a GPU on CuPy arrays::

        out, lse = forward(q, k, v, scale=0.125, offset=0, left=None, right=0)  # causal
    """
    mask = dict(scale=scale, offset=offset, left=left, right=right, mods=mods)
    return forward_runs(q, k, v, single_run(q), 1, _whole(q, k), mask, out, lse)


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
    mods: ScoreMods | None = None,
    dbias: Any = None,
) -> tuple[Any, Any, Any]:
    """Tiled attention backward on canonical 4-D arrays.

    ``dout``/``out`` (B, Hq, Lq, Dv) in the input dtype and ``lse``
    (B, Hq, Lq) float32 from :func:`forward`; the other arguments as there;
    ``grads`` optionally gives the ``(dq, dk, dv)`` buffers; ``mods`` as
    for :func:`forward`, and with a bias ``dbias``: a zeroed (B, Hq, Lq, Lk)
    buffer in the input dtype that receives the gradient of each visible
    pair's biased score (masked pairs stay 0).  Returns ``(dq, dk, dv)``
    shaped like ``q``, ``k``, ``v``; ``dk``/``dv`` are summed over each GQA group.
    """
    runs = single_run(q)
    mask = dict(scale=scale, offset=offset, left=left, right=right, mods=mods)
    return backward_runs((dout, q, k, v, out, lse), runs, runs, 1, _whole(q, k), mask, grads, dbias)

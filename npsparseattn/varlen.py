"""Packed variable-length attention: ``attention_varlen`` and ``attention_varlen_backward`` (public API)."""

from __future__ import annotations

from typing import Any

from npsparseattn._checks import check_backend, check_flag
from npsparseattn._dispatch import select
from npsparseattn._glue import cast_grads, cast_outputs, kernel_inputs, kernel_lse
from npsparseattn.interop.dlpack import accepts_dlpack
from npsparseattn.problems import varlen_gradient_inputs, varlen_problem

Window = tuple[int | None, int | None]

__all__ = ["attention_varlen", "attention_varlen_backward"]


@accepts_dlpack
def attention_varlen(
    q: Any,
    k: Any,
    v: Any,
    cu_seqlens_q: Any,
    cu_seqlens_k: Any,
    *,
    causal: bool = False,
    window: Window | None = None,
    scale: float | None = None,
    return_lse: bool = False,
    backend: str = "auto",
) -> Any:
    """Exact attention over a batch of sequences of different lengths, packed end to end.

    Sequence ``s`` is rows ``cu_seqlens_q[s]:cu_seqlens_q[s+1]`` of ``q`` and
    attends only rows ``cu_seqlens_k[s]:cu_seqlens_k[s+1]`` of ``k`` and
    ``v`` (flash-attn's ``flash_attn_varlen_func``, heads first).  The work
    follows the real lengths: nothing is padded to the longest sequence.

    Parameters
    ----------
    q : array, shape (Hq, total_q, D)
    k : array, shape (Hk, total_k, D), ``Hq % Hk == 0`` (GQA/MQA as in :func:`npsparseattn.attention`)
    v : array, shape (Hk, total_k, Dv)
    cu_seqlens_q, cu_seqlens_k : integer arrays, shape (n_seqs + 1,)
        Offsets of the sequences: start at 0, non-decreasing, end at
        ``total_q`` and ``total_k``.  int32 as in flash-attn (any integer
        dtype is accepted).  Empty sequences are allowed.
    causal : bool
        Per sequence, aligned bottom-right: query ``i`` of sequence ``s``
        sees key ``j <= i + (Lk_s - Lq_s)``.
    window : (left, right) or None
        Per sequence, as in :func:`npsparseattn.attention`.
    scale : float, optional
        Score multiplier, default ``1/sqrt(D)``.
    return_lse : bool
        Also return ``lse`` (Hq, total_q): float32 (float64 for float64
        inputs), ``-inf`` for a query that sees no key (its output is 0).
    backend : str
        ``"auto"`` (the numba CPU kernels for NumPy arrays), ``"numba"`` or
        ``"reference"`` (dense float64, sequence by sequence).

    Returns
    -------
    out : array, shape (Hq, total_q, Dv), dtype of ``q``
    lse : array, shape (Hq, total_q), only if ``return_lse``

    Examples
    --------
    Three sequences of lengths 5, 0 and 3, equal to separate calls:

    >>> import numpy as np
    >>> import npsparseattn as nsa
    >>> rng = np.random.default_rng(0)
    >>> cu = np.array([0, 5, 5, 8], dtype=np.int32)
    >>> q = rng.standard_normal((4, 8, 16), dtype=np.float32)     # (Hq, total, D)
    >>> k, v = rng.standard_normal((2, 2, 8, 16), dtype=np.float32)  # (Hk, total, D): GQA
    >>> out = nsa.attention_varlen(q, k, v, cu, cu, causal=True)
    >>> out.shape
    (4, 8, 16)
    >>> first = nsa.attention(q[:, :5], k[:, :5], v[:, :5], causal=True)
    >>> bool(np.allclose(out[:, :5], first, atol=1e-6))
    True
    """
    check_backend(backend)
    return_lse = check_flag(return_lse, "return_lse")
    p = varlen_problem(q, k, v, cu_seqlens_q, cu_seqlens_k, causal=causal, window=window, scale=scale)
    impl = select("attention_varlen", p, backend)
    out, lse = impl.module.forward(*kernel_inputs(impl, p.dtype, p.q, p.k, p.v), *p.kernel_offsets(), **p.visibility())
    out, lse = cast_outputs(p.dtype, out, lse)
    return (out, lse) if return_lse else out


@accepts_dlpack
def attention_varlen_backward(
    dout: Any,
    q: Any,
    k: Any,
    v: Any,
    out: Any,
    lse: Any,
    cu_seqlens_q: Any,
    cu_seqlens_k: Any,
    *,
    causal: bool = False,
    window: Window | None = None,
    scale: float | None = None,
    backend: str = "auto",
) -> tuple[Any, Any, Any]:
    """Gradients of :func:`attention_varlen` (FlashAttention-2 backward, sequence by sequence).

    Parameters
    ----------
    dout : array, shape (Hq, total_q, Dv)
        Gradient of the loss with respect to ``out``.
    q, k, v, cu_seqlens_q, cu_seqlens_k : as for :func:`attention_varlen`
    out, lse : the forward's ``out`` (Hq, total_q, Dv) and ``lse`` (Hq, total_q)
    causal, window, scale, backend : as for the forward call

    Returns
    -------
    dq : array shaped like ``q``
    dk, dv : arrays shaped like ``k`` and ``v``, summed over each GQA group;
        rows of keys no query sees are 0

    Examples
    --------
    >>> import numpy as np
    >>> import npsparseattn as nsa
    >>> rng = np.random.default_rng(0)
    >>> cu_q = np.array([0, 1, 7], dtype=np.int32)
    >>> cu_k = np.array([0, 4, 10], dtype=np.int32)
    >>> q = rng.standard_normal((2, 7, 8))
    >>> k, v = rng.standard_normal((2, 2, 10, 8))
    >>> out, lse = nsa.attention_varlen(q, k, v, cu_q, cu_k, causal=True, return_lse=True)
    >>> dq, dk, dv = nsa.attention_varlen_backward(np.ones_like(out), q, k, v, out, lse, cu_q, cu_k, causal=True)
    >>> dq.shape, dk.shape
    ((2, 7, 8), (2, 10, 8))
    """
    check_backend(backend)
    p = varlen_problem(q, k, v, cu_seqlens_q, cu_seqlens_k, causal=causal, window=window, scale=scale)
    g = varlen_gradient_inputs(p, dout, out, lse)
    impl = select("attention_varlen", p, backend)
    dout_k, q_k, k_k, v_k, out_k = kernel_inputs(impl, p.dtype, g.dout, p.q, p.k, p.v, g.out)
    lse_k = kernel_lse(impl, p.dtype, g.lse)
    grads = impl.module.backward(dout_k, q_k, k_k, v_k, out_k, lse_k, *p.kernel_offsets(), **p.visibility())
    return cast_grads(p.dtype, grads)

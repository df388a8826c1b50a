"""Exact attention: ``attention`` and ``attention_backward`` (public API)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from npsparseattn._checks import check_backend, check_flag
from npsparseattn._dispatch import select
from npsparseattn._glue import cast_grads, cast_outputs, kernel_inputs, kernel_lse
from npsparseattn.interop.dlpack import accepts_dlpack
from npsparseattn.problems import attention_problem, gradient_inputs
from npsparseattn.problems.scores import (
    backward_extras,
    bias_grad_buffer,
    check_backward_mods,
    with_bias_grad,
    with_score_mods,
)

Window = tuple[int | None, int | None]


@accepts_dlpack
def attention(
    q: Any,
    k: Any,
    v: Any,
    *,
    causal: bool = False,
    window: Window | None = None,
    scale: float | None = None,
    return_lse: bool = False,
    alibi_slopes: Any = None,
    softcap: float | None = None,
    bias: Any = None,
    score_mod: Callable[..., float] | None = None,
    mask_mod: Callable[..., bool] | None = None,
    backend: str = "auto",
) -> Any:
    """Exact softmax attention, tiled with an online softmax (O(L) extra memory).

    ``out[..., h, i, :] = sum_j softmax_j(scale * q[..., h, i, :] . k[..., g(h), j, :]) v[..., g(h), j, :]``
    over the keys ``j`` that query ``i`` can see.

    Parameters
    ----------
    q : array, shape (*batch, Hq, Lq, D), (Hq, Lq, D) or (Lq, D)
    k : array, shape (*batch, Hk, Lk, D) with ``Hq % Hk == 0``
        Grouped-query attention: query head ``h`` uses key head
        ``g(h) = h // (Hq // Hk)``; ``Hk == 1`` is multi-query attention.
    v : array, shape (*batch, Hk, Lk, Dv)
        ``Dv`` may differ from ``D``.
    causal : bool
        Query ``i`` sees key ``j`` iff ``j <= i + (Lk - Lq)``.  The diagonal
        is aligned bottom-right, as in flash-attn >= 2.1: with ``Lq=2, Lk=5``::

            keys     0 1 2 3 4
            query 0  x x x x .
            query 1  x x x x x

    window : (left, right) or None
        Query ``i`` sees keys ``i+(Lk-Lq)-left <= j <= i+(Lk-Lq)+right``;
        ``None`` on a side is unbounded.  ``causal=True`` sets ``right=0``.
    scale : float, optional
        Score multiplier, default ``1/sqrt(D)``.
    return_lse : bool
        Also return ``lse`` (*batch, Hq, Lq): natural log of the softmax
        denominator, float32 (float64 for float64 inputs); ``-inf`` for a
        query that sees no key (its output row is 0).
    alibi_slopes : array (Hq,) or (*batch, Hq), optional
        ALiBi: ``-slope[h] * |i + Lk - Lq - j|`` is added to the score (flash-attn's meaning).
    softcap : float, optional
        The score ``x = scale * q.k`` becomes ``softcap * tanh(x / softcap)`` (before ALiBi and
        bias; ``0`` or ``None``: off).
    bias : array broadcastable to (*batch, Hq, Lq, Lk), optional
        Added to the score; :func:`attention_backward` returns its gradient.
    score_mod : numba.njit function ``(score, b, h, q_idx, kv_idx) -> score``, optional
        Applied last to each score (FlexAttention's ``score_mod``), compiled into the CPU kernels
        (one compilation per function, cached).
    mask_mod : numba.njit function ``(b, h, q_idx, kv_idx) -> bool``, optional
        Query ``q_idx`` sees key ``kv_idx`` only where it is true (and ``causal``/``window`` allow).
        The order of the modifications and their gradients: ``docs/scores.md``.
    backend : str
        ``"auto"`` (the first registered implementation that fits), or a
        name from :func:`npsparseattn.available_backends`: ``"numba"``
        (CPU), ``"reference"`` (dense float64 oracle, O(Lq*Lk) memory), the
        GPU backends where installed.

    Returns
    -------
    out : array, shape (*batch, Hq, Lq, Dv), dtype of ``q``
    lse : array, shape (*batch, Hq, Lq), only if ``return_lse``

    Examples
    --------
    >>> import numpy as np
    >>> import npsparseattn as nsa
    >>> rng = np.random.default_rng(0)
    >>> q = rng.standard_normal((2, 8, 100, 64), dtype=np.float32)  # (B, Hq, L, D)
    >>> k = rng.standard_normal((2, 2, 100, 64), dtype=np.float32)  # GQA: 2 KV heads
    >>> v = rng.standard_normal((2, 2, 100, 32), dtype=np.float32)
    >>> out, lse = nsa.attention(q, k, v, causal=True, return_lse=True)
    >>> out.shape, lse.shape
    ((2, 8, 100, 32), (2, 8, 100))
    """
    check_backend(backend)
    return_lse = check_flag(return_lse, "return_lse")
    p = attention_problem(q, k, v, causal=causal, window=window, scale=scale)
    p = with_score_mods(
        p, alibi_slopes=alibi_slopes, softcap=softcap, bias=bias, score_mod=score_mod, mask_mod=mask_mod
    )
    impl = select("attention", p, backend)
    out, lse = impl.module.forward(*kernel_inputs(impl, p.dtype, p.q, p.k, p.v), **p.visibility())
    out, lse = cast_outputs(p.dtype, out, lse)
    return (p.restore(out), p.restore(lse)) if return_lse else p.restore(out)


@accepts_dlpack
def attention_backward(
    dout: Any,
    q: Any,
    k: Any,
    v: Any,
    out: Any,
    lse: Any,
    *,
    causal: bool = False,
    window: Window | None = None,
    scale: float | None = None,
    alibi_slopes: Any = None,
    softcap: float | None = None,
    bias: Any = None,
    score_mod: Callable[..., float] | None = None,
    score_mod_grad: Callable[..., float] | None = None,
    mask_mod: Callable[..., bool] | None = None,
    backend: str = "auto",
) -> tuple[Any, ...]:
    """Gradients of :func:`attention` (FlashAttention-2 backward).

    Recomputes the probabilities tile by tile from ``lse``:
    ``P = exp(scale*q.k - lse)``, ``dV = P^T dO``,
    ``dS = P * (dO V^T - rowsum(dO * O))``, ``dQ = scale * dS K``,
    ``dK = scale * dS^T Q``.

    Parameters
    ----------
    dout : array, shape (*batch, Hq, Lq, Dv)
        Gradient of the loss with respect to ``out``.
    q, k, v : arrays as for :func:`attention`
    out, lse : the forward's ``out`` and ``lse`` (``return_lse=True``)
    causal, window, scale, alibi_slopes, softcap, bias, score_mod, mask_mod, backend : as for the forward call
    score_mod_grad : numba.njit function ``(score, b, h, q_idx, kv_idx) -> float``
        ``d score_mod / d score``; required with ``score_mod``.

    Returns
    -------
    dq : array shaped like ``q``
    dk, dv : arrays shaped like ``k`` and ``v``, summed over each GQA group
    dbias : array shaped like ``bias``, only when a ``bias`` is given (summed over the axes it broadcasts along)

    Examples
    --------
    >>> import numpy as np
    >>> import npsparseattn as nsa
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((4, 50, 16)) for _ in range(3))
    >>> out, lse = nsa.attention(q, k, v, causal=True, return_lse=True)
    >>> dq, dk, dv = nsa.attention_backward(np.ones_like(out), q, k, v, out, lse, causal=True)
    >>> dq.shape == q.shape and dk.shape == k.shape
    True
    """
    check_backend(backend)
    p = attention_problem(q, k, v, causal=causal, window=window, scale=scale)
    p = with_score_mods(
        p, alibi_slopes=alibi_slopes, softcap=softcap, bias=bias, score_mod=score_mod,
        score_mod_grad=score_mod_grad, mask_mod=mask_mod,
    )  # fmt: skip
    check_backward_mods(p.mods)
    g = gradient_inputs(p, dout, out, lse)
    impl = select("attention", p, backend)
    dout_k, q_k, k_k, v_k, out_k = kernel_inputs(impl, p.dtype, g.dout, p.q, p.k, p.v, g.out)
    dbias = bias_grad_buffer(p, impl.compute_dtype(p.dtype))
    grads = impl.module.backward(
        dout_k, q_k, k_k, v_k, out_k, kernel_lse(impl, p.dtype, g.lse), **p.visibility(), **backward_extras(dbias)
    )
    return with_bias_grad(tuple(p.restore(x) for x in cast_grads(p.dtype, grads)), p, dbias)

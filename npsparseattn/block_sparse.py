"""Block-sparse attention: ``block_sparse_attention`` and its backward (public API)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from npsparseattn._checks import check_backend, check_flag
from npsparseattn._dispatch import select
from npsparseattn._glue import cast_grads, cast_outputs, kernel_inputs, kernel_lse
from npsparseattn.interop.dlpack import accepts_dlpack
from npsparseattn.layouts import BlockLayout
from npsparseattn.problems import attention_problem, check_layout, gradient_inputs
from npsparseattn.problems.scores import (
    backward_extras,
    bias_grad_buffer,
    check_backward_mods,
    with_bias_grad,
    with_score_mods,
)

Window = tuple[int | None, int | None]


@accepts_dlpack
def block_sparse_attention(
    q: Any,
    k: Any,
    v: Any,
    layout: BlockLayout,
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
    """Exact attention restricted to the stored blocks of a layout; cost grows with the stored blocks.

    Query ``i`` attends key ``j`` iff the block pair ``(i // bq, j // bk)``
    is stored in ``layout`` (for the query's head) **and** the ``causal`` /
    ``window`` element masks allow the pair; those have the meaning of
    :func:`npsparseattn.attention` (bottom-right alignment, offset
    ``Lk - Lq``), so with ``layouts.dense`` this *is* ``attention``::

        block_sparse_attention(q, k, v, layouts.dense(seq, block), causal=c, window=w)
            == attention(q, k, v, causal=c, window=w)

    Parameters
    ----------
    q : array, shape (*batch, Hq, Lq, D), (Hq, Lq, D) or (Lq, D)
    k : array, shape (*batch, Hk, Lk, D), ``Hq % Hk == 0`` (grouped-query attention)
    v : array, shape (*batch, Hk, Lk, Dv)
    layout : BlockLayout
        ``layout.seq == (Lq, Lk)``; ``layout.heads`` is 1 (one pattern for
        every head) or Hq (one per query head).  Build one with
        :mod:`npsparseattn.layouts`.
    causal, window, scale :
        As :func:`npsparseattn.attention`, applied inside the stored blocks.
    return_lse : bool
        Also return ``lse`` (*batch, Hq, Lq).
    alibi_slopes, softcap, bias, score_mod, mask_mod : optional
        Score modifications, as for :func:`npsparseattn.attention` (``docs/scores.md``); they change the scores
        of the keys the layout selects (``bias`` is still indexed (*batch, Hq, Lq, Lk)).
    backend : str
        ``"auto"`` or a name from ``available_backends("block_sparse_attention")``:
        ``"numba"`` (CPU), ``"reference"`` (dense float64 oracle), the GPU
        backends where installed.

    Returns
    -------
    out : array (*batch, Hq, Lq, Dv), dtype of ``q``; rows that see no key are 0
    lse : array (*batch, Hq, Lq), ``-inf`` for those rows, only if ``return_lse``

    Examples
    --------
    >>> import numpy as np
    >>> import npsparseattn as nsa
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((1, 4, 1000, 64), dtype=np.float32) for _ in range(3))
    >>> layout = nsa.layouts.bigbird(1000, 64, seed=0)   # window + global + random blocks
    >>> out = nsa.block_sparse_attention(q, k, v, layout)
    >>> out.shape
    (1, 4, 1000, 64)
    """
    check_backend(backend)
    return_lse = check_flag(return_lse, "return_lse")
    p = attention_problem(q, k, v, causal=causal, window=window, scale=scale)
    check_layout(layout, p)
    p = with_score_mods(
        p, alibi_slopes=alibi_slopes, softcap=softcap, bias=bias, score_mod=score_mod, mask_mod=mask_mod
    )
    impl = select("block_sparse_attention", p, backend)
    out, lse = impl.module.forward(*kernel_inputs(impl, p.dtype, p.q, p.k, p.v), layout, **p.visibility())
    out, lse = cast_outputs(p.dtype, out, lse)
    return (p.restore(out), p.restore(lse)) if return_lse else p.restore(out)


@accepts_dlpack
def block_sparse_attention_backward(
    dout: Any,
    q: Any,
    k: Any,
    v: Any,
    out: Any,
    lse: Any,
    layout: BlockLayout,
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
    """Gradients ``(dq, dk, dv)`` of :func:`block_sparse_attention` (FlashAttention-2 scheme).

    Parameters
    ----------
    dout : array (*batch, Hq, Lq, Dv), gradient of the loss with respect to ``out``
    q, k, v, layout : as for the forward call
    out, lse : the forward's results (``return_lse=True``)
    causal, window, scale, alibi_slopes, softcap, bias, score_mod, mask_mod, backend : as for the forward call
    score_mod_grad : the derivative of ``score_mod`` (required with it)

    Returns
    -------
    dq shaped like ``q``; dk, dv shaped like ``k``, ``v`` (summed over each GQA group); dbias shaped like
    ``bias``, only when a ``bias`` is given

    Examples
    --------
    >>> import numpy as np
    >>> import npsparseattn as nsa
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((2, 300, 32)) for _ in range(3))
    >>> layout = nsa.layouts.sliding_window(300, 32, (64, 0))
    >>> out, lse = nsa.block_sparse_attention(q, k, v, layout, causal=True, return_lse=True)
    >>> dq, dk, dv = nsa.block_sparse_attention_backward(np.ones_like(out), q, k, v, out, lse, layout, causal=True)
    >>> dq.shape == q.shape and dk.shape == k.shape
    True
    """
    check_backend(backend)
    p = attention_problem(q, k, v, causal=causal, window=window, scale=scale)
    check_layout(layout, p)
    p = with_score_mods(
        p, alibi_slopes=alibi_slopes, softcap=softcap, bias=bias, score_mod=score_mod,
        score_mod_grad=score_mod_grad, mask_mod=mask_mod,
    )  # fmt: skip
    check_backward_mods(p.mods)
    g = gradient_inputs(p, dout, out, lse)
    impl = select("block_sparse_attention", p, backend)
    dout_k, q_k, k_k, v_k, out_k = kernel_inputs(impl, p.dtype, g.dout, p.q, p.k, p.v, g.out)
    lse_k = kernel_lse(impl, p.dtype, g.lse)
    dbias = bias_grad_buffer(p, impl.compute_dtype(p.dtype))
    grads = impl.module.backward(
        dout_k, q_k, k_k, v_k, out_k, lse_k, layout, **p.visibility(), **backward_extras(dbias)
    )
    return with_bias_grad(tuple(p.restore(x) for x in cast_grads(p.dtype, grads)), p, dbias)

"""Index-driven sparse attention: ``sparse_attention``, its varlen form and their backwards (public API)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from npsparseattn._checks import check_backend, check_flag
from npsparseattn._dispatch import select
from npsparseattn._glue import cast_grads, cast_outputs, kernel_inputs, kernel_lse
from npsparseattn.interop.dlpack import accepts_dlpack
from npsparseattn.problems import gradient_inputs, varlen_gradient_inputs
from npsparseattn.problems.scores import (
    backward_extras,
    bias_grad_buffer,
    check_backward_mods,
    with_bias_grad,
    with_score_mods,
)
from npsparseattn.problems.sparse import sparse_problem, sparse_varlen_problem

Window = tuple[int | None, int | None]

__all__ = [
    "sparse_attention",
    "sparse_attention_backward",
    "sparse_attention_varlen",
    "sparse_attention_varlen_backward",
]


@accepts_dlpack
def sparse_attention(
    q: Any,
    k: Any,
    v: Any,
    kv_idx: Any,
    *,
    kv_cnt: Any = None,
    q_block: int = 64,
    kv_block: int = 64,
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
    """Exact attention over the key blocks each query block selects (NSA, MoBA, DSA style); cost follows the index.

    Query ``i`` attends key ``j`` iff key block ``j // kv_block`` is listed
    in ``kv_idx`` for query block ``i // q_block`` (of the query's key/value
    head) **and** the ``causal``/``window`` masks of
    :func:`npsparseattn.attention` allow the pair (bottom-right alignment,
    offset ``Lk - Lq``, applied inside the selected blocks).  A query that
    sees no key gets output 0 and ``lse = -inf``.

    ``kv_block=1`` selects single tokens (DeepSeek's DSA after its lightning
    indexer); ``q_block=1`` gives every query its own list (NSA's selection
    branch).  The routers of :mod:`npsparseattn.routing` return ``(kv_idx,
    kv_cnt)`` in exactly this format.

    Parameters
    ----------
    q : array (*batch, Hq, Lq, D), (Hq, Lq, D) or (Lq, D)
    k : array (*batch, Hk, Lk, D) of the same form, ``Hq % Hk == 0``
    v : array (*batch, Hk, Lk, Dv)
    kv_idx : integer array (*batch, Hk, ceil(Lq / q_block), K)
        (``(Hk, nqb, K)`` for 3-D inputs, ``(nqb, K)`` for 2-D ones.)  The key
        blocks, in ``[0, ceil(Lk / kv_block))``, that each query block
        attends, in any order; ``-1`` marks an unused slot.  The query heads
        of a GQA group share their key head's lists.  A block listed twice in
        one list is refused (``ValueError`` naming the list and both slots).
        int32 is the native type; other integer types are accepted.
    kv_cnt : integer array (*batch, Hk, nqb), optional
        Slots in use at the front of each list (the rest are ignored,
        whatever they hold); default: every slot.
    q_block, kv_block : int
        Block edges in queries and keys (the last block of each may be partial).
    causal, window, scale :
        As :func:`npsparseattn.attention`.
    return_lse : bool
        Also return ``lse`` (*batch, Hq, Lq).
    alibi_slopes, softcap, bias, score_mod, mask_mod : optional
        Score modifications, as for :func:`npsparseattn.attention` (``docs/scores.md``); they change the scores
        of the keys the index selects (``bias`` is still indexed (*batch, Hq, Lq, Lk)).
    backend : str
        ``"auto"`` or a name from ``available_backends("sparse_attention")``:
        ``"numba"`` (CPU), ``"cupy"`` and ``"numba-cuda"`` (CuPy arrays; blocks of
        at least 16 queries and keys: no token mode or per-query lists;
        compiled and emulated/simulated, not yet run on a GPU), ``"reference"``
        (dense float64 oracle).

    Returns
    -------
    out : array (*batch, Hq, Lq, Dv), dtype of ``q``
    lse : array (*batch, Hq, Lq), float32 (float64 for float64), only if ``return_lse``

    Examples
    --------
    Every query block of 64 attends its own block and block 0 (a sink):

    >>> import numpy as np
    >>> import npsparseattn as nsa
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((1, 2, 256, 32), dtype=np.float32) for _ in range(3))
    >>> r = np.arange(4)
    >>> kv_idx = np.stack([np.zeros(4), r], axis=-1).astype(np.int32)   # (nqb, K) = (4, 2)
    >>> kv_idx[0, 1] = -1                                               # block 0 needs no second entry
    >>> kv_idx = np.broadcast_to(kv_idx, (1, 2, 4, 2))                  # (B, Hk, nqb, K)
    >>> out = nsa.sparse_attention(q, k, v, kv_idx, causal=True)
    >>> out.shape
    (1, 2, 256, 32)
    """
    check_backend(backend)
    return_lse = check_flag(return_lse, "return_lse")
    p = sparse_problem(
        q, k, v, kv_idx, kv_cnt, q_block=q_block, kv_block=kv_block, causal=causal, window=window, scale=scale
    )
    p = with_score_mods(
        p, alibi_slopes=alibi_slopes, softcap=softcap, bias=bias, score_mod=score_mod, mask_mod=mask_mod
    )
    impl = select("sparse_attention", p, backend)
    d = p.dense
    out, lse = impl.module.forward(*kernel_inputs(impl, d.dtype, d.q, d.k, d.v), *p.kernel_index(), **p.options())
    out, lse = cast_outputs(d.dtype, out, lse)
    return (d.restore(out), d.restore(lse)) if return_lse else d.restore(out)


@accepts_dlpack
def sparse_attention_backward(
    dout: Any,
    q: Any,
    k: Any,
    v: Any,
    out: Any,
    lse: Any,
    kv_idx: Any,
    *,
    kv_cnt: Any = None,
    q_block: int = 64,
    kv_block: int = 64,
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
    """Gradients ``(dq, dk, dv)`` of :func:`sparse_attention` (FlashAttention-2 scheme), deterministic.

    dK/dV are accumulated through the transposed index (the query blocks
    that chose each key block), built once per call, without atomics: two
    calls give bitwise equal gradients, whatever the number of threads.

    Parameters
    ----------
    dout : array (*batch, Hq, Lq, Dv), gradient of the loss with respect to ``out``
    q, k, v, kv_idx, kv_cnt : as for the forward call
    out, lse : the forward's results (``return_lse=True``)
    q_block, kv_block, causal, window, scale, alibi_slopes, softcap, bias, score_mod, mask_mod, backend :
        as for the forward call
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
    >>> q, k, v = (rng.standard_normal((2, 100, 16)) for _ in range(3))                # (H, L, D)
    >>> kv_idx = np.argsort(rng.random((2, 100, 100)), axis=-1)[..., :8].astype(np.int32)  # 8 keys per query
    >>> out, lse = nsa.sparse_attention(q, k, v, kv_idx, q_block=1, kv_block=1, return_lse=True)
    >>> dq, dk, dv = nsa.sparse_attention_backward(np.ones_like(out), q, k, v, out, lse, kv_idx,
    ...                                            q_block=1, kv_block=1)
    >>> dq.shape, dk.shape
    ((2, 100, 16), (2, 100, 16))
    """
    check_backend(backend)
    p = sparse_problem(
        q, k, v, kv_idx, kv_cnt, q_block=q_block, kv_block=kv_block, causal=causal, window=window, scale=scale
    )
    p = with_score_mods(
        p, alibi_slopes=alibi_slopes, softcap=softcap, bias=bias, score_mod=score_mod,
        score_mod_grad=score_mod_grad, mask_mod=mask_mod,
    )  # fmt: skip
    check_backward_mods(p.mods)
    d = p.dense
    g = gradient_inputs(d, dout, out, lse)
    impl = select("sparse_attention", p, backend)
    dout_k, q_k, k_k, v_k, out_k = kernel_inputs(impl, d.dtype, g.dout, d.q, d.k, d.v, g.out)
    lse_k = kernel_lse(impl, d.dtype, g.lse)
    dbias = bias_grad_buffer(p, impl.compute_dtype(d.dtype))
    grads = impl.module.backward(
        dout_k, q_k, k_k, v_k, out_k, lse_k, *p.kernel_index(), **p.options(), **backward_extras(dbias)
    )
    return with_bias_grad(tuple(d.restore(x) for x in cast_grads(d.dtype, grads)), p, dbias)


@accepts_dlpack
def sparse_attention_varlen(
    q: Any,
    k: Any,
    v: Any,
    cu_seqlens_q: Any,
    cu_seqlens_k: Any,
    kv_idx: Any,
    *,
    kv_cnt: Any = None,
    q_block: int = 64,
    kv_block: int = 64,
    causal: bool = False,
    window: Window | None = None,
    scale: float | None = None,
    return_lse: bool = False,
    backend: str = "auto",
) -> Any:
    """:func:`sparse_attention` over packed sequences of different lengths (the layout of :func:`attention_varlen`).

    Sequence ``s`` is rows ``cu_seqlens_q[s]:cu_seqlens_q[s+1]`` of ``q``
    and attends rows ``cu_seqlens_k[s]:cu_seqlens_k[s+1]`` of ``k``/``v``
    only.  Its queries are cut into blocks of ``q_block`` from the
    sequence's first query (the last block of each sequence may be partial),
    and the lists of all sequences follow one another in ``kv_idx``: list
    ``qb_offset[s] + r`` belongs to query block ``r`` of sequence ``s``, with
    ``qb_offset[s] = sum_{t < s} ceil(Lq_t / q_block)``.  Its indices count
    key blocks of ``kv_block`` from the sequence's first key.  Masks are
    aligned per sequence (offset ``Lk_s - Lq_s``).

    Parameters
    ----------
    q : array (Hq, total_q, D); k : array (Hk, total_k, D); v : array (Hk, total_k, Dv)
    cu_seqlens_q, cu_seqlens_k : integer arrays (n_seqs + 1,), offsets from 0
    kv_idx : integer array (Hk, NQB, K), ``NQB = sum_s ceil(Lq_s / q_block)``; ``-1`` unused
    kv_cnt : integer array (Hk, NQB), optional
    q_block, kv_block, causal, window, scale, return_lse, backend :
        As :func:`sparse_attention`.

    Returns
    -------
    out : array (Hq, total_q, Dv); lse : array (Hq, total_q), only if ``return_lse``

    Examples
    --------
    Two sequences of 100 and 60 tokens, each query block of 32 attending the
    first and its own key block of 32:

    >>> import numpy as np
    >>> import npsparseattn as nsa
    >>> rng = np.random.default_rng(0)
    >>> cu = np.array([0, 100, 160], dtype=np.int32)
    >>> q = rng.standard_normal((2, 160, 16))                # (Hq, total, D)
    >>> k, v = rng.standard_normal((2, 1, 160, 16))          # (Hk, total, D): one key head
    >>> own = np.array([0, 1, 2, 3, 0, 1])                  # 4 + 2 query blocks
    >>> kv_idx = np.stack([np.zeros(6, int), own], -1)[None].astype(np.int32)
    >>> kv_idx[0, [0, 4], 1] = -1                            # block 0 is already listed
    >>> out = nsa.sparse_attention_varlen(q, k, v, cu, cu, kv_idx, q_block=32, kv_block=32, causal=True)
    >>> out.shape
    (2, 160, 16)
    """
    check_backend(backend)
    return_lse = check_flag(return_lse, "return_lse")
    p = sparse_varlen_problem(
        q, k, v, cu_seqlens_q, cu_seqlens_k, kv_idx, kv_cnt, q_block=q_block, kv_block=kv_block, causal=causal,
        window=window, scale=scale,
    )  # fmt: skip
    impl = select("sparse_attention_varlen", p, backend)
    pk = p.packed
    arrays = kernel_inputs(impl, pk.dtype, pk.q, pk.k, pk.v)
    out, lse = impl.module.forward(*arrays, *pk.kernel_offsets(), *p.kernel_index(), **p.options())
    out, lse = cast_outputs(pk.dtype, out, lse)
    return (out, lse) if return_lse else out


@accepts_dlpack
def sparse_attention_varlen_backward(
    dout: Any,
    q: Any,
    k: Any,
    v: Any,
    out: Any,
    lse: Any,
    cu_seqlens_q: Any,
    cu_seqlens_k: Any,
    kv_idx: Any,
    *,
    kv_cnt: Any = None,
    q_block: int = 64,
    kv_block: int = 64,
    causal: bool = False,
    window: Window | None = None,
    scale: float | None = None,
    backend: str = "auto",
) -> tuple[Any, Any, Any]:
    """Gradients ``(dq, dk, dv)`` of :func:`sparse_attention_varlen`, deterministic.

    Parameters
    ----------
    dout : array (Hq, total_q, Dv)
    q, k, v, cu_seqlens_q, cu_seqlens_k, kv_idx, kv_cnt : as for the forward call
    out, lse : the forward's ``out`` (Hq, total_q, Dv) and ``lse`` (Hq, total_q)
    q_block, kv_block, causal, window, scale, backend : as for the forward call

    Returns
    -------
    dq shaped like ``q``; dk, dv shaped like ``k``, ``v`` (summed over each GQA group)

    Examples
    --------
    >>> import numpy as np
    >>> import npsparseattn as nsa
    >>> rng = np.random.default_rng(0)
    >>> cu = np.array([0, 5, 12], dtype=np.int32)
    >>> q, k, v = (rng.standard_normal((1, 12, 8)) for _ in range(3))
    >>> kv_idx = np.zeros((1, 12, 1), np.int32)              # every query its sequence's first key
    >>> out, lse = nsa.sparse_attention_varlen(q, k, v, cu, cu, kv_idx, q_block=1, kv_block=1, return_lse=True)
    >>> dq, dk, dv = nsa.sparse_attention_varlen_backward(np.ones_like(out), q, k, v, out, lse, cu, cu, kv_idx,
    ...                                                   q_block=1, kv_block=1)
    >>> dv[0, [0, 5], 0].tolist(), bool(np.abs(dq).max() < 1e-12)    # one key per query: no gradient for q
    ([5.0, 7.0], True)
    """
    check_backend(backend)
    p = sparse_varlen_problem(
        q, k, v, cu_seqlens_q, cu_seqlens_k, kv_idx, kv_cnt, q_block=q_block, kv_block=kv_block, causal=causal,
        window=window, scale=scale,
    )  # fmt: skip
    pk = p.packed
    g = varlen_gradient_inputs(pk, dout, out, lse)
    impl = select("sparse_attention_varlen", p, backend)
    dout_k, q_k, k_k, v_k, out_k = kernel_inputs(impl, pk.dtype, g.dout, pk.q, pk.k, pk.v, g.out)
    lse_k = kernel_lse(impl, pk.dtype, g.lse)
    grads = impl.module.backward(
        dout_k, q_k, k_k, v_k, out_k, lse_k, *pk.kernel_offsets(), *p.kernel_index(), **p.options()
    )
    return cast_grads(pk.dtype, grads)

"""Reformer LSH attention: hashing, sort plan and chunked shared-QK attention (public API).

The semantics are those of google/trax and HF transformers' ``LSHSelfAttention``
(the user guide is ``docs/lsh.md``):

1. :func:`lsh_buckets` hashes every row ``x`` by a random rotation ``R``:
   ``bucket = argmax(concat[xR, -xR])``; a tuple ``n_buckets`` factorizes the
   hash.
2. :func:`lsh_sort` sorts the ``n_hashes * L`` (round, position) items by
   (round, bucket, position) and gives the inverse permutation.
3. :func:`lsh_attention` splits the sorted items into chunks; each chunk
   attends itself and its cyclic neighbours with shared-QK logits
   ``q . normalize(k)``, and the rounds are combined by their lse.

Each step is its own registered operation (``lsh_buckets``, ``lsh_sort``,
``lsh_attention``): :func:`lsh_attention` computes the plan through the first
two with the same ``backend`` and hands it to the third.

Rotations are shared by every batch entry and head (as trax and HF share them
per layer).  From ``seed`` they are drawn as
``np.random.default_rng(seed).standard_normal((D, n_hashes, sum(factors) // 2))``
(float64); with neither ``seed`` nor ``rotations`` a fresh random draw is used.
"""

from __future__ import annotations

from typing import Any

from npsparseattn._checks import check_backend, check_flag
from npsparseattn._dispatch import select
from npsparseattn._glue import cast_grads, cast_outputs, kernel_inputs, kernel_lse
from npsparseattn.interop.dlpack import accepts_dlpack
from npsparseattn.problems import LSHProblem, buckets_problem, gradient_inputs, lsh_problem, lsh_rotations, sort_problem
from npsparseattn.problems.lsh import NBuckets, bucket_factors

__all__ = ["bucket_factors", "lsh_attention", "lsh_attention_backward", "lsh_buckets", "lsh_rotations", "lsh_sort"]


def _sort_plan(problem: LSHProblem, backend: str) -> tuple[Any, Any]:
    """``(order, inverse)`` (B, H, n_hashes * L) of a problem's ``qk``, through ``lsh_buckets`` and ``lsh_sort``."""
    hashing = problem.hashing()
    impl = select("lsh_buckets", hashing, backend)
    (rows,) = kernel_inputs(impl, hashing.dtype, hashing.x)
    buckets = impl.module.buckets(rows, hashing.rotations, hashing.factors)
    sorting = problem.sorting(buckets)
    impl = select("lsh_sort", sorting, backend)
    (ids,) = kernel_inputs(impl, sorting.dtype, sorting.buckets)
    order, inverse = impl.module.sort(ids, sorting.n_values)
    return hashing.restore(order), hashing.restore(inverse)


@accepts_dlpack
def lsh_buckets(
    x: Any,
    n_buckets: NBuckets,
    *,
    n_hashes: int = 1,
    rotations: Any = None,
    seed: int | None = None,
    backend: str = "auto",
) -> Any:
    """Random-rotation LSH buckets (Reformer): ``argmax(concat[xR, -xR])`` per round.

    Parameters
    ----------
    x : array, shape (*lead, L, D)
        Rows to hash; any float dtype (the product ``xR`` is taken in float64,
        so float32 and float64 copies of the same values hash alike).
    n_buckets : even int or tuple of even ints
        Buckets per round.  A tuple ``(f1, f2, ...)`` factorizes the hash:
        the rotation's columns are cut into consecutive groups of ``f/2`` and
        ``bucket = sum_f argmax_f * prod(previous factors)`` (``prod(f)``
        buckets from ``sum(f)/2`` columns).
    n_hashes : int
        Independent hashing rounds.
    rotations : array, shape (D, n_hashes, sum(factors) // 2), optional
        The rotation ``R`` of every round, shared by all leading indices.
    seed : int, optional
        Draws ``R = np.random.default_rng(seed).standard_normal(shape)``
        (see :func:`lsh_rotations`).  With neither ``rotations`` nor ``seed``
        a fresh random ``R`` is drawn.
    backend : str
        ``"auto"`` or a name from ``available_backends("lsh_buckets")``.

    Returns
    -------
    buckets : int32 array, shape (*lead, n_hashes, L), values in ``[0, prod(factors))``

    Examples
    --------
    >>> import numpy as np
    >>> x = np.random.default_rng(0).standard_normal((4, 128, 64))  # (H, L, D)
    >>> b = lsh_buckets(x, 16, n_hashes=2, seed=1)
    >>> b.shape, b.dtype, int(b.min()) >= 0, int(b.max()) < 16
    ((4, 2, 128), dtype('int32'), True, True)
    """
    check_backend(backend)
    p = buckets_problem(x, n_buckets, n_hashes=n_hashes, rotations=rotations, seed=seed)
    impl = select("lsh_buckets", p, backend)
    (rows,) = kernel_inputs(impl, p.dtype, p.x)
    return p.restore(impl.module.buckets(rows, p.rotations, p.factors))


@accepts_dlpack
def lsh_sort(buckets: Any, *, backend: str = "auto") -> tuple[Any, Any]:
    """The sort plan of LSH attention: items sorted by (round, bucket, position).

    Item ``r * L + p`` is position ``p`` in round ``r`` (HF's
    ``sorted_bucket_idx``).  The sort is stable, so within a bucket positions
    stay in increasing order, and round ``r`` fills sorted slots
    ``[r*L, (r+1)*L)`` (the same order as offsetting round ``r``'s buckets by
    ``r * n_buckets``).

    Parameters
    ----------
    buckets : integer array, shape (*lead, n_hashes, L), values >= 0
        As returned by :func:`lsh_buckets`.
    backend : str
        ``"auto"`` or a name from ``available_backends("lsh_sort")``.

    Returns
    -------
    order : int32 array, shape (*lead, n_hashes * L)
        ``order[..., s]`` is the item in sorted slot ``s``; its position is
        ``order % L`` and its round ``order // L``.
    inverse : int32 array, shape (*lead, n_hashes * L)
        ``inverse[..., order[..., s]] == s``.

    Examples
    --------
    >>> import numpy as np
    >>> order, inverse = lsh_sort(np.array([[1, 0, 1, 0]]))
    >>> order, inverse
    (array([1, 3, 0, 2], dtype=int32), array([2, 0, 3, 1], dtype=int32))

    Bucket occupancy of chunk ``c`` of size ``n`` in the sorted order:
    ``np.take_along_axis(buckets.reshape(..., -1), order, -1)[..., c*n:(c+1)*n]``.
    """
    check_backend(backend)
    p = sort_problem(buckets)
    impl = select("lsh_sort", p, backend)
    (ids,) = kernel_inputs(impl, p.dtype, p.buckets)
    order, inverse = impl.module.sort(ids, p.n_values)
    return p.restore(order), p.restore(inverse)


@accepts_dlpack
def lsh_attention(
    qk: Any,
    v: Any,
    *,
    n_buckets: NBuckets,
    n_hashes: int = 1,
    chunk_size: int = 64,
    chunks_before: int = 1,
    chunks_after: int = 0,
    causal: bool = False,
    exclude_self: bool = True,
    rotations: Any = None,
    seed: int | None = None,
    return_lse: bool = False,
    backend: str = "auto",
) -> Any:
    """Reformer LSH self-attention with shared query/key vectors.

    For every round ``r`` the positions are hashed (:func:`lsh_buckets` of
    ``qk``), stably sorted by bucket (:func:`lsh_sort`; round ``r`` after
    round ``r-1``) and cut into chunks of ``chunk_size`` sorted items.  A chunk
    attends itself, the ``chunks_before`` previous and the ``chunks_after``
    next chunks of the whole sorted sequence of ``n_hashes * L`` items,
    cyclically (the first chunk looks back at the last; a window that wraps
    past itself counts a key once per appearance)::

        logit(i, j) = qk_i . key_j,   key_j = qk_j / sqrt(mean(qk_j^2) + 1e-6) / sqrt(D)
        logit       = -1e9  where causal and pos_j > pos_i
        logit       = -1e5  where exclude_self and pos_j == pos_i   (not -inf:
                            a token that sees nothing else attends to itself)

    Each round gives ``o_r`` and ``lse_r`` per position; the rounds combine
    as ``o = sum_r exp(lse_r - logsumexp_r lse_r) * o_r``.  Extra memory is
    O(n_hashes * L * Dv) plus one (chunk, window) score tile per thread.

    Parameters
    ----------
    qk : array, shape (*batch, H, L, D), (H, L, D) or (L, D)
        Shared query/key vectors; ``L`` must be a multiple of ``chunk_size``.
    v : array, shape (*batch, H, L, Dv)
    n_buckets : even int or tuple of even ints
        Buckets per round; a tuple factorizes the hash (see :func:`lsh_buckets`).
    n_hashes : int
        Hashing rounds.
    chunk_size, chunks_before, chunks_after : int
        Chunk length in sorted order and the neighbouring chunks each attends.
    causal : bool
        Mask keys at a later original position (logit -1e9).
    exclude_self : bool
        Give a query's own position the logit -1e5.
    rotations : array (D, n_hashes, sum(factors) // 2), optional
        Hash rotations, shared by every batch entry and head.
    seed : int, optional
        Draw the rotations with ``np.random.default_rng(seed)`` (see
        :func:`lsh_rotations`).  With neither, fresh random rotations are drawn
        and the call cannot be differentiated later: the backward needs them.
    return_lse : bool
        Also return ``lse`` (*batch, H, L): ``logsumexp_r lse_r``, the natural
        log of the summed exp-logits of all rounds' window entries (the masked
        constants included), float32 (float64 for float64 inputs).
    backend : str
        ``"auto"`` or a name from ``available_backends("lsh_attention")``:
        ``"numba"`` (CPU), ``"reference"`` (dense float64 oracle).  The sort
        plan is computed by the same backend's ``lsh_buckets`` and ``lsh_sort``.

    Returns
    -------
    out : array, shape (*batch, H, L, Dv), dtype of ``qk``
    lse : array, shape (*batch, H, L), only if ``return_lse``

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> qk = rng.standard_normal((2, 4, 1024, 64), dtype=np.float32)  # (B, H, L, D)
    >>> v = rng.standard_normal((2, 4, 1024, 64), dtype=np.float32)
    >>> out, lse = lsh_attention(qk, v, n_buckets=32, n_hashes=2, causal=True, seed=0, return_lse=True)
    >>> out.shape, lse.shape
    ((2, 4, 1024, 64), (2, 4, 1024))
    """
    check_backend(backend)
    return_lse = check_flag(return_lse, "return_lse")
    problem = lsh_problem(
        qk, v, n_buckets=n_buckets, n_hashes=n_hashes, chunk_size=chunk_size, chunks_before=chunks_before,
        chunks_after=chunks_after, causal=causal, exclude_self=exclude_self, rotations=rotations, seed=seed,
    )  # fmt: skip
    impl = select("lsh_attention", problem, backend)
    order, inverse = _sort_plan(problem, backend)
    qk_k, v_k = kernel_inputs(impl, problem.dtype, problem.qk, problem.v)
    out, lse = impl.module.forward(qk_k, v_k, order, inverse, **problem.options())
    out, lse = cast_outputs(problem.dtype, out, lse)
    return (problem.restore(out), problem.restore(lse)) if return_lse else problem.restore(out)


@accepts_dlpack
def lsh_attention_backward(
    dout: Any,
    qk: Any,
    v: Any,
    out: Any,
    lse: Any,
    *,
    n_buckets: NBuckets,
    n_hashes: int = 1,
    chunk_size: int = 64,
    chunks_before: int = 1,
    chunks_after: int = 0,
    causal: bool = False,
    exclude_self: bool = True,
    rotations: Any = None,
    seed: int | None = None,
    backend: str = "auto",
) -> tuple[Any, Any]:
    """Gradients ``(dqk, dv)`` of :func:`lsh_attention`.

    The hashing and sorting are recomputed from ``rotations``/``seed`` (they
    have no gradient), so pass the forward's ``rotations`` or ``seed``.  The
    gradient flows through both the query side (``qk_i``) and the normalised
    key side (``key_j``) of the shared ``qk``.  Because the rounds combine by
    their lse, the output is a single softmax over the entries of all rounds
    with weights ``P = exp(logit - lse)``, and ``dlogit = P * (dout . v_j -
    dout . out)`` on unmasked entries (masked logits are constants); this
    contains the terms through ``lse_r`` of the round combination.

    Parameters
    ----------
    dout : array, shape (*batch, H, L, Dv)
        Gradient of the loss with respect to ``out``.
    qk, v : as for :func:`lsh_attention`
    out, lse : the forward's ``out`` and ``lse`` (``return_lse=True``);
        ``lse`` is checked for shape, the kernels recompute the per-round lse.
    n_buckets, n_hashes, chunk_size, chunks_before, chunks_after, causal, exclude_self, backend
        As for the forward call.
    rotations, seed
        The forward's; one of them is required.

    Returns
    -------
    dqk : array shaped like ``qk``
    dv : array shaped like ``v``

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> qk, v = rng.standard_normal((2, 4, 256, 32)), rng.standard_normal((2, 4, 256, 32))
    >>> kw = dict(n_buckets=8, n_hashes=2, chunk_size=32, causal=True, seed=3)
    >>> out, lse = lsh_attention(qk, v, return_lse=True, **kw)
    >>> dqk, dv = lsh_attention_backward(np.ones_like(out), qk, v, out, lse, **kw)
    >>> dqk.shape, dv.shape
    ((2, 4, 256, 32), (2, 4, 256, 32))
    """
    check_backend(backend)
    if rotations is None and seed is None:
        raise ValueError(
            "lsh_attention_backward needs the forward's hashing: pass the same rotations= or seed= as the "
            "forward call (with neither, the forward drew random rotations that cannot be recovered)"
        )
    problem = lsh_problem(
        qk, v, n_buckets=n_buckets, n_hashes=n_hashes, chunk_size=chunk_size, chunks_before=chunks_before,
        chunks_after=chunks_after, causal=causal, exclude_self=exclude_self, rotations=rotations, seed=seed,
    )  # fmt: skip
    g = gradient_inputs(problem.dense, dout, out, lse)
    impl = select("lsh_attention", problem, backend)
    order, inverse = _sort_plan(problem, backend)
    dout_k, qk_k, v_k, out_k = kernel_inputs(impl, problem.dtype, g.dout, problem.qk, problem.v, g.out)
    lse_k = kernel_lse(impl, problem.dtype, g.lse)
    grads = impl.module.backward(dout_k, qk_k, v_k, out_k, lse_k, order, inverse, **problem.options())
    dqk, dv = cast_grads(problem.dtype, grads)
    return problem.restore(dqk), problem.restore(dv)

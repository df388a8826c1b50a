"""Reformer LSH attention: hashing, sort plan and chunked shared-QK attention (public API).

The semantics are those of google/trax and HF transformers' ``LSHSelfAttention``
(DESIGN.md section 6; the user guide is ``docs/lsh.md``):

1. :func:`lsh_buckets` hashes every row ``x`` by a random rotation ``R``:
   ``bucket = argmax(concat[xR, -xR])``; a tuple ``n_buckets`` factorizes the
   hash.
2. :func:`lsh_sort` sorts the ``n_hashes * L`` (round, position) items by
   (round, bucket, position) and gives the inverse permutation.
3. :func:`lsh_attention` splits the sorted items into chunks; each chunk
   attends itself and its cyclic neighbours with shared-QK logits
   ``q . normalize(k)``, and the rounds are combined by their lse.

Rotations are shared by every batch entry and head (as trax and HF share them
per layer).  From ``seed`` they are drawn as
``np.random.default_rng(seed).standard_normal((D, n_hashes, sum(factors) // 2))``
(float64); with neither ``seed`` nor ``rotations`` a fresh random draw is used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from npsparseattn._checks import (
    AttentionProblem,
    check_backend,
    check_dtypes,
    check_flag,
    check_int,
    check_ndim,
    gradient_inputs,
    is_int,
    to_4d,
)
from npsparseattn._dispatch import BackendError, common_kind, select
from npsparseattn.cpu import lsh as _kernels

NBuckets = int | tuple[int, ...]

_INT32_LIMIT = 2**31


@dataclass(frozen=True)
class LSHProblem:
    """Validated LSH attention inputs in canonical 4-D form, plus the options.

    ``dense`` holds ``qk`` (as both q and k) and ``v`` as an
    :class:`AttentionProblem`, which gives the shape helpers (``restore``,
    ``output_shape``, ``lse_shape``) and the checks of backward inputs.
    ``rotations`` is the float64 (D, n_hashes, sum(factors) // 2) array.
    """

    dense: AttentionProblem
    factors: tuple[int, ...]
    n_hashes: int
    chunk_size: int
    chunks_before: int
    chunks_after: int
    exclude_self: bool
    rotations: np.ndarray

    @property
    def qk(self) -> Any:
        return self.dense.q

    @property
    def v(self) -> Any:
        return self.dense.v

    @property
    def kind(self) -> str:
        return self.dense.kind

    @property
    def dtype(self) -> np.dtype:
        return self.dense.dtype

    @property
    def causal(self) -> bool:
        return self.dense.causal

    def restore(self, x: Any) -> Any:
        """Map a canonical (B, H, L, ...) result back to the caller's axes."""
        return self.dense.restore(x)


def bucket_factors(n_buckets: Any) -> tuple[int, ...]:
    """``8`` -> ``(8,)``; ``(4, 8)`` -> ``(4, 8)``; every factor an even int >= 2.

    >>> bucket_factors((4, 8))
    (4, 8)
    """
    if isinstance(n_buckets, (tuple, list)):
        if not n_buckets:
            raise ValueError("n_buckets must be an even int or a non-empty tuple of even ints, got ()")
        factors = tuple(check_int(f, "every factor of n_buckets", 2) for f in n_buckets)
        odd = [f for f in factors if f % 2]
        if odd:
            raise ValueError(
                f"every factor of n_buckets must be even (argmax over [xR, -xR] gives an even count), "
                f"got n_buckets={tuple(n_buckets)!r} with odd factor {odd[0]}"
            )
    else:
        factors = (check_int(n_buckets, "n_buckets", 2),)
        if factors[0] % 2:
            raise ValueError(f"n_buckets must be even (argmax over [xR, -xR] gives an even count), got {factors[0]}")
    if math.prod(factors) >= _INT32_LIMIT:
        raise ValueError(f"n_buckets={math.prod(factors)} does not fit the int32 bucket ids")
    return factors


def _check_seed(seed: Any) -> int | None:
    if seed is None:
        return None
    if not is_int(seed):
        raise TypeError(f"seed must be a non-negative int or None, got {seed!r}")
    if seed < 0:
        raise ValueError(f"seed must be a non-negative int or None, got {seed}")
    return int(seed)


def _rotation_shape(head_dim: int, n_hashes: int, factors: tuple[int, ...]) -> tuple[int, int, int]:
    return (head_dim, n_hashes, sum(factors) // 2)


def lsh_rotations(head_dim: int, n_buckets: NBuckets, *, n_hashes: int = 1, seed: int | None = None) -> np.ndarray:
    """The random rotations that ``seed`` stands for, float64 ``(D, n_hashes, sum(factors) // 2)``.

    ``np.random.default_rng(seed).standard_normal(shape)``; ``seed=None``
    draws fresh ones.  Passing the result as ``rotations=`` is the same as
    passing ``seed=``.

    >>> lsh_rotations(64, (4, 8), n_hashes=2, seed=0).shape
    (64, 2, 6)
    """
    head_dim = check_int(head_dim, "head_dim", 1)
    factors = bucket_factors(n_buckets)
    n_hashes = check_int(n_hashes, "n_hashes", 1)
    seed = _check_seed(seed)
    return np.random.default_rng(seed).standard_normal(_rotation_shape(head_dim, n_hashes, factors))


def _resolve_rotations(rotations: Any, seed: Any, head_dim: int, n_hashes: int, factors: tuple[int, ...]) -> np.ndarray:
    """Validated float64 rotations: the ones given, or drawn from ``seed``."""
    seed = _check_seed(seed)
    shape = _rotation_shape(head_dim, n_hashes, factors)
    if rotations is None:
        return np.random.default_rng(seed).standard_normal(shape)
    if seed is not None:
        raise ValueError("pass either rotations or seed, not both (seed only draws rotations)")
    if not isinstance(rotations, np.ndarray):
        raise TypeError(
            f"rotations must be a NumPy array of shape {shape}, got {type(rotations).__module__}."
            f"{type(rotations).__qualname__}"
        )
    if rotations.dtype.kind != "f":
        raise TypeError(f"rotations has dtype {rotations.dtype.name}; expected a real floating dtype")
    if tuple(rotations.shape) != shape:
        what = "n_buckets//2" if len(factors) == 1 else "sum(n_buckets factors)//2"
        raise ValueError(
            f"rotations must have shape (D, n_hashes, {what}) = {shape} for D={head_dim}, n_hashes={n_hashes}, "
            f"n_buckets={factors[0] if len(factors) == 1 else factors}; got {tuple(rotations.shape)}"
        )
    return np.ascontiguousarray(rotations, dtype=np.float64)


def _numpy_only(kind: str, what: str) -> None:
    if kind != "numpy":
        raise BackendError(f"{what} takes NumPy arrays in this release (GPU kernels for it are not built yet)")


def lsh_problem(
    qk: Any,
    v: Any,
    *,
    n_buckets: Any,
    n_hashes: Any = 1,
    chunk_size: Any = 64,
    chunks_before: Any = 1,
    chunks_after: Any = 0,
    causal: Any = False,
    exclude_self: Any = True,
    rotations: Any = None,
    seed: Any = None,
) -> LSHProblem:
    """Validate the arguments of :func:`lsh_attention`; nothing is computed before all rules pass."""
    arrays = {"qk": qk, "v": v}
    kind = common_kind(**arrays)
    ndim = check_ndim(arrays)
    dtype = check_dtypes(arrays)
    if qk.shape[:-1] != v.shape[:-1]:
        raise ValueError(
            f"qk and v must have the same leading axes and length: qk {tuple(qk.shape)} vs v {tuple(v.shape)} "
            f"(only the last axis, Dv, may differ)"
        )
    if qk.shape[-1] < 1 or v.shape[-1] < 1:
        raise ValueError(f"head dimensions must be >= 1: qk {tuple(qk.shape)}, v {tuple(v.shape)}")
    factors = bucket_factors(n_buckets)
    n_hashes = check_int(n_hashes, "n_hashes", 1)
    chunk_size = check_int(chunk_size, "chunk_size", 1)
    chunks_before = check_int(chunks_before, "chunks_before", 0)
    chunks_after = check_int(chunks_after, "chunks_after", 0)
    length = qk.shape[-2]
    if length % chunk_size:
        raise ValueError(
            f"the sequence length L={length} (axis -2 of qk) must be a multiple of chunk_size={chunk_size}; "
            f"pad the sequence or pick a chunk_size that divides it"
        )
    if n_hashes * length >= _INT32_LIMIT:
        raise ValueError(f"n_hashes * L = {n_hashes * length} items do not fit the int32 sort plan")
    causal = check_flag(causal, "causal")
    exclude_self = check_flag(exclude_self, "exclude_self")
    rotations = _resolve_rotations(rotations, seed, qk.shape[-1], n_hashes, factors)
    dense = AttentionProblem(
        q=to_4d(qk),
        k=to_4d(qk),
        v=to_4d(v),
        kind=kind,
        dtype=dtype,
        batch_shape=tuple(qk.shape[:-3]),
        ndim=ndim,
        scale=1.0,
        causal=causal,
        left=None,
        right=0 if causal else None,
    )
    return LSHProblem(
        dense=dense,
        factors=factors,
        n_hashes=n_hashes,
        chunk_size=chunk_size,
        chunks_before=chunks_before,
        chunks_after=chunks_after,
        exclude_self=exclude_self,
        rotations=rotations,
    )


def lsh_buckets(
    x: Any,
    n_buckets: NBuckets,
    *,
    n_hashes: int = 1,
    rotations: Any = None,
    seed: int | None = None,
) -> np.ndarray:
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
    kind = common_kind(x=x)
    if x.ndim < 2:
        raise ValueError(f"x must have at least 2 axes (L, D), got shape {tuple(x.shape)}")
    check_dtypes({"x": x})
    if x.shape[-1] < 1:
        raise ValueError(f"x must have a last axis D >= 1, got shape {tuple(x.shape)}")
    factors = bucket_factors(n_buckets)
    n_hashes = check_int(n_hashes, "n_hashes", 1)
    rot = _resolve_rotations(rotations, seed, x.shape[-1], n_hashes, factors)
    _numpy_only(kind, "lsh_buckets")
    lead, length, d = tuple(x.shape[:-2]), x.shape[-2], x.shape[-1]
    compute = np.float64 if x.dtype == np.float64 else np.float32
    rows = np.ascontiguousarray(x, dtype=compute).reshape(math.prod(lead), length, d)
    return _kernels.hash_buckets(rows, rot, factors).reshape(lead + (n_hashes, length))


def lsh_sort(buckets: Any) -> tuple[np.ndarray, np.ndarray]:
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
    kind = common_kind(buckets=buckets)
    if buckets.ndim < 2:
        raise ValueError(f"buckets must have at least 2 axes (n_hashes, L), got shape {tuple(buckets.shape)}")
    if buckets.dtype.kind not in "iu":
        raise TypeError(f"buckets has dtype {buckets.dtype.name}; expected an integer dtype")
    _numpy_only(kind, "lsh_sort")
    lead, n_hashes, length = tuple(buckets.shape[:-2]), buckets.shape[-2], buckets.shape[-1]
    if n_hashes * length >= _INT32_LIMIT:
        raise ValueError(f"n_hashes * L = {n_hashes * length} items do not fit the int32 sort plan")
    n_values = 0
    if buckets.size:
        low, high = int(buckets.min()), int(buckets.max())
        if low < 0:
            raise ValueError(f"buckets must be >= 0, got {low}")
        if high >= _INT32_LIMIT:
            raise ValueError(f"buckets must be < 2**31, got {high}")
        n_values = high + 1
    order, inverse = _kernels.sort_buckets(buckets.reshape((math.prod(lead), n_hashes, length)), n_values)
    shape = lead + (n_hashes * length,)
    return order.reshape(shape), inverse.reshape(shape)


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
        ``"auto"``, ``"numba"`` (CPU) or ``"reference"`` (dense float64 oracle).

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
    out, lse = impl.forward(problem)
    out = problem.restore(out)
    return (out, problem.restore(lse)) if return_lse else out


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
    grads = gradient_inputs(problem.dense, dout, out, lse)
    impl = select("lsh_attention", problem, backend)
    dqk, dv = impl.backward(problem, grads)
    return problem.restore(dqk), problem.restore(dv)

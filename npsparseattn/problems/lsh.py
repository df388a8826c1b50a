"""The LSH problems: hashing (:class:`BucketsProblem`), the sort plan (:class:`SortProblem`) and
Reformer attention (:class:`LSHProblem`), with the rules for buckets, rotations and chunks.

The semantics are those of google/trax and HF transformers' ``LSHSelfAttention``
(``docs/lsh.md``): ``bucket = argmax(concat[xR, -xR])`` per round (a tuple of
even factors factorizes it), items sorted stably by (round, bucket, position),
chunks attending themselves and their cyclic neighbours with shared-QK logits
``q . key``, ``key = qk / sqrt(mean(qk^2) + KEY_EPS) / sqrt(D)``, masked
logits :data:`NEG_CAUSAL` and :data:`NEG_SELF`, rounds combined by their lse.

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

from npsparseattn._arrays import common_kind
from npsparseattn._checks import check_dtypes, check_flag, check_int, check_ndim, is_int, to_4d
from npsparseattn._dtypes import FLOAT_DTYPES
from npsparseattn.problems.attention import AttentionProblem

NBuckets = int | tuple[int, ...]

NEG_CAUSAL = -1e9  # logit of a key after the query (causal)
NEG_SELF = -1e5  # logit of the query's own position (exclude_self)
KEY_EPS = 1e-6  # keys = x / sqrt(mean(x^2) + KEY_EPS) / sqrt(D)
INT32_LIMIT = 2**31
MAX_ROTATION_ELEMENTS = 2**28  # 2 GiB of float64: more rounds or buckets than any Reformer uses
MAX_WINDOW_WRAPS = 4  # a chunk's window may wrap around the sorted sequence at most this many times
INTEGER_DTYPES = ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64")


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
    if math.prod(factors) >= INT32_LIMIT:
        raise ValueError(f"n_buckets={math.prod(factors)} does not fit the int32 bucket ids")
    return factors


def check_seed(seed: Any) -> int | None:
    """``None`` or a non-negative int."""
    if seed is None:
        return None
    if not is_int(seed):
        raise TypeError(f"seed must be a non-negative int or None, got {seed!r}")
    if seed < 0:
        raise ValueError(f"seed must be a non-negative int or None, got {seed}")
    return int(seed)


def rotation_shape(head_dim: int, n_hashes: int, factors: tuple[int, ...]) -> tuple[int, int, int]:
    """``(D, n_hashes, sum(factors) // 2)``, refused before anything is allocated if it is absurdly large."""
    shape = (head_dim, n_hashes, sum(factors) // 2)
    if math.prod(shape) > MAX_ROTATION_ELEMENTS:
        raise ValueError(
            f"the rotations would have shape {shape} ({math.prod(shape)} values, D x n_hashes x "
            f"sum(n_buckets factors) / 2); more than 2**28 is refused: use fewer hashes or buckets"
        )
    return shape


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
    seed = check_seed(seed)
    return np.random.default_rng(seed).standard_normal(rotation_shape(head_dim, n_hashes, factors))


def resolve_rotations(rotations: Any, seed: Any, head_dim: int, n_hashes: int, factors: tuple[int, ...]) -> np.ndarray:
    """Validated float64 rotations: the ones given, or drawn from ``seed``."""
    seed = check_seed(seed)
    shape = rotation_shape(head_dim, n_hashes, factors)
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


@dataclass(frozen=True)
class BucketsProblem:
    """Rows to hash in canonical form: ``x`` (M, L, D) with the caller's leading axes flattened to ``M``."""

    x: Any
    kind: str
    dtype: np.dtype
    lead: tuple[int, ...]
    factors: tuple[int, ...]
    rotations: np.ndarray

    @property
    def n_hashes(self) -> int:
        return self.rotations.shape[1]

    def restore(self, buckets: Any) -> Any:
        """(M, n_hashes, L) -> (*lead, n_hashes, L)."""
        return buckets.reshape(self.lead + tuple(buckets.shape[1:]))


def buckets_problem(x: Any, n_buckets: Any, *, n_hashes: Any, rotations: Any, seed: Any) -> BucketsProblem:
    """Validate the arguments of :func:`npsparseattn.lsh_buckets`."""
    kind = common_kind(x=x)
    if x.ndim < 2:
        raise ValueError(f"x must have at least 2 axes (L, D), got shape {tuple(x.shape)}")
    dtype = check_dtypes({"x": x}, FLOAT_DTYPES)
    if x.shape[-1] < 1:
        raise ValueError(f"x must have a last axis D >= 1, got shape {tuple(x.shape)}")
    factors = bucket_factors(n_buckets)
    n_hashes = check_int(n_hashes, "n_hashes", 1)
    rot = resolve_rotations(rotations, seed, x.shape[-1], n_hashes, factors)
    lead = tuple(x.shape[:-2])
    rows = x.reshape((math.prod(lead),) + tuple(x.shape[-2:]))
    return BucketsProblem(x=rows, kind=kind, dtype=dtype, lead=lead, factors=factors, rotations=rot)


@dataclass(frozen=True)
class SortProblem:
    """Buckets to sort in canonical form: (M, n_hashes, L) with values in ``[0, n_values)``."""

    buckets: Any
    kind: str
    dtype: np.dtype
    lead: tuple[int, ...]
    n_values: int

    def restore(self, x: Any) -> Any:
        """(M, n_hashes * L) -> (*lead, n_hashes * L)."""
        return x.reshape(self.lead + tuple(x.shape[1:]))


def sort_problem(buckets: Any) -> SortProblem:
    """Validate the argument of :func:`npsparseattn.lsh_sort`: integer buckets ``(*lead, n_hashes, L)``, >= 0."""
    kind = common_kind(buckets=buckets)
    if buckets.ndim < 2:
        raise ValueError(f"buckets must have at least 2 axes (n_hashes, L), got shape {tuple(buckets.shape)}")
    if buckets.dtype.name not in INTEGER_DTYPES:
        raise TypeError(f"buckets has dtype {buckets.dtype.name}; expected an integer dtype")
    lead, n_hashes, length = tuple(buckets.shape[:-2]), buckets.shape[-2], buckets.shape[-1]
    if n_hashes * length >= INT32_LIMIT:
        raise ValueError(f"n_hashes * L = {n_hashes * length} items do not fit the int32 sort plan")
    n_values = 0
    if buckets.size:
        low, high = int(buckets.min()), int(buckets.max())
        if low < 0:
            raise ValueError(f"buckets must be >= 0, got {low}")
        if high >= INT32_LIMIT:
            raise ValueError(f"buckets must be < 2**31, got {high}")
        n_values = high + 1
    rows = buckets.reshape((math.prod(lead), n_hashes, length))
    return SortProblem(buckets=rows, kind=kind, dtype=buckets.dtype, lead=lead, n_values=n_values)


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

    def options(self) -> dict[str, Any]:
        """The chunking and masking keywords of the LSH kernel contract."""
        return dict(
            chunk_size=self.chunk_size,
            chunks_before=self.chunks_before,
            chunks_after=self.chunks_after,
            causal=self.causal,
            exclude_self=self.exclude_self,
        )

    def hashing(self) -> BucketsProblem:
        """The hashing of ``qk``: its (B*H, L, D) rows with this problem's rotations."""
        qk = self.qk
        rows = qk.reshape((qk.shape[0] * qk.shape[1],) + tuple(qk.shape[2:]))
        return BucketsProblem(
            x=rows, kind=self.kind, dtype=self.dtype, lead=tuple(qk.shape[:2]), factors=self.factors,
            rotations=self.rotations,
        )  # fmt: skip

    def sorting(self, buckets: Any) -> SortProblem:
        """The sort of the (B*H, n_hashes, L) ``buckets`` of :meth:`hashing`."""
        return SortProblem(
            buckets=buckets, kind=self.kind, dtype=buckets.dtype, lead=tuple(self.qk.shape[:2]),
            n_values=math.prod(self.factors),
        )  # fmt: skip


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
    """Validate the arguments of :func:`npsparseattn.lsh_attention`; nothing is computed before all rules pass."""
    arrays = {"qk": qk, "v": v}
    kind = common_kind(**arrays)
    ndim = check_ndim(arrays)
    dtype = check_dtypes(arrays, FLOAT_DTYPES)
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
    if n_hashes * length >= INT32_LIMIT:
        raise ValueError(f"n_hashes * L = {n_hashes * length} items do not fit the int32 sort plan")
    n_chunks = n_hashes * length // chunk_size
    window = 1 + chunks_before + chunks_after
    if n_chunks and window > MAX_WINDOW_WRAPS * n_chunks:
        raise ValueError(
            f"each chunk attends 1 + chunks_before + chunks_after = {window} chunks, more than "
            f"{MAX_WINDOW_WRAPS} times the {n_chunks} chunks of the sorted sequence (n_hashes * L / chunk_size); "
            f"a window that long only repeats every key: lower chunks_before/chunks_after"
        )
    causal = check_flag(causal, "causal")
    exclude_self = check_flag(exclude_self, "exclude_self")
    rotations = resolve_rotations(rotations, seed, qk.shape[-1], n_hashes, factors)
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

"""Decoding with a KV cache, contiguous or paged: ``attention_with_kvcache`` (public API)."""

from __future__ import annotations

from typing import Any

from npsparseattn._arrays import array_module
from npsparseattn._checks import check_backend, check_flag
from npsparseattn._dispatch import Implementation, select
from npsparseattn._glue import cast_outputs, kernel_array, kernel_inputs
from npsparseattn.interop.dlpack import accepts_dlpack
from npsparseattn.problems import KVCacheProblem, kvcache_problem

Window = tuple[int | None, int | None]

__all__ = ["attention_with_kvcache"]


def append_new_tokens(problem: KVCacheProblem) -> None:
    """Write ``k_new``/``v_new`` into the caches, in place, at positions ``[cache_seqlens, cache_seqlens + Lnew)``."""
    if not problem.n_new:
        return
    xp = array_module(problem.kind)
    pages, slots = (xp.asarray(x) for x in problem.new_token_slots())
    for new, cache in ((problem.k_new, problem.k_cache), (problem.v_new, problem.v_cache)):
        # (B, Hk, Lnew, X) -> (B * Lnew, Hk, X), b-major like the slots
        rows = new.transpose(0, 2, 1, 3).reshape(-1, new.shape[1], new.shape[3])
        cache[pages, :, slots] = rows


def cache_inputs(impl: Implementation, dtype: Any, *caches: Any) -> list[Any]:
    """The caches as ``impl``'s kernels read them: as stored if its module lists ``dtype`` in ``CACHE_DTYPES``.

    A backend that reads half-precision pages itself (widening them tile by
    tile, the pages in use only) declares so; any other reads its compute
    dtype, and a float16 cache is then converted whole (as for any input).
    """
    stored = dtype.name in getattr(impl.module, "CACHE_DTYPES", ())
    read_as = dtype if stored else impl.compute_dtype(dtype)
    return [kernel_array(cache, read_as, impl.strided_rows) for cache in caches]


@accepts_dlpack(writes=("k_cache", "v_cache"))
def attention_with_kvcache(
    q: Any,
    k_cache: Any,
    v_cache: Any,
    *,
    cache_seqlens: Any,
    k_new: Any = None,
    v_new: Any = None,
    block_table: Any = None,
    causal: bool = True,
    window: Window | None = None,
    scale: float | None = None,
    return_lse: bool = False,
    backend: str = "auto",
) -> Any:
    """Attention of new queries over a KV cache, contiguous or paged, after appending new keys and values.

    flash-attn's ``flash_attn_with_kvcache``, in this library's heads-first layout.
    Sequence ``b`` holds ``cache_seqlens[b]`` valid keys.  ``k_new``/``v_new``
    are written into the cache **in place** at positions
    ``[cache_seqlens[b], cache_seqlens[b] + Lnew)``; then each query attends
    the first ``n_b = cache_seqlens[b] + Lnew`` keys, the ``Lq`` queries
    being the last ``Lq`` positions (query ``i`` aligned with key
    ``i + n_b - Lq``).  ``cache_seqlens`` is not advanced: add ``Lnew`` for
    the next step.  Long caches with few queries are split across threads and
    merged (flash-decoding), so ``Lq = 1`` uses every core.

    Parameters
    ----------
    q : array, shape (B, Hq, Lq, D)
    k_cache, v_cache : arrays
        Contiguous: (B, Hk, Lmax, D) and (B, Hk, Lmax, Dv).  Paged (with
        ``block_table``): (num_pages, Hk, page_size, D) and
        (num_pages, Hk, page_size, Dv).  ``Hq % Hk == 0`` (GQA/MQA).
    cache_seqlens : int or integer array, shape (B,)
        Valid keys of each sequence before the call (int32 as in flash-attn).
    k_new, v_new : arrays, shape (B, Hk, Lnew, D) and (B, Hk, Lnew, Dv), optional
        Keys and values to append (both or neither).  If any sequence would
        exceed the cache's capacity (``Lmax``, or ``max_pages * page_size``),
        ``ValueError`` is raised before anything is written.
    block_table : integer array, shape (B, max_pages), optional
        Paged cache: position ``p`` of sequence ``b`` is slot
        ``p % page_size`` of page ``block_table[b, p // page_size]``.  Only
        the entries of pages in use are read (they must be valid pages).
    causal : bool
        Default ``True``: query ``i`` sees keys ``j <= i + n_b - Lq``.
    window : (left, right) or None
        As for :func:`npsparseattn.attention`, aligned the same way
        (``left`` bounds a sliding window over the cache).
    scale : float, optional
        Score multiplier, default ``1/sqrt(D)``.
    return_lse : bool
        Also return ``lse`` (B, Hq, Lq), float32 (float64 for float64 inputs).
    backend : str
        ``"auto"`` (the numba CPU kernels for NumPy arrays), ``"numba"`` or
        ``"reference"``.

    Returns
    -------
    out : array, shape (B, Hq, Lq, Dv), dtype of ``q``
    lse : array, shape (B, Hq, Lq), only if ``return_lse``

    Examples
    --------
    One decoding step for two sequences holding 5 and 9 tokens:

    >>> import numpy as np
    >>> import npsparseattn as nsa
    >>> rng = np.random.default_rng(0)
    >>> k_cache = np.zeros((2, 2, 16, 8), np.float32)      # (B, Hk, Lmax, D)
    >>> v_cache = np.zeros((2, 2, 16, 8), np.float32)
    >>> lengths = np.array([5, 9], dtype=np.int32)
    >>> k_cache[0, :, :5], k_cache[1, :, :9] = rng.standard_normal((2, 5, 8)), rng.standard_normal((2, 9, 8))
    >>> q = rng.standard_normal((2, 4, 1, 8), dtype=np.float32)           # (B, Hq, Lq=1, D)
    >>> k_new, v_new = rng.standard_normal((2, 2, 2, 1, 8), dtype=np.float32)
    >>> out = nsa.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=lengths, k_new=k_new, v_new=v_new)
    >>> out.shape
    (2, 4, 1, 8)
    >>> bool((k_cache[0, :, 5] == k_new[0, :, 0]).all())    # written in place at position 5
    True
    >>> lengths += 1                                          # the caller advances the lengths
    """
    check_backend(backend)
    return_lse = check_flag(return_lse, "return_lse")
    p = kvcache_problem(
        q, k_cache, v_cache, cache_seqlens=cache_seqlens, k_new=k_new, v_new=v_new, block_table=block_table,
        causal=causal, window=window, scale=scale,
    )  # fmt: skip
    impl = select("attention_with_kvcache", p, backend)
    seqlens, table = p.kernel_index_arrays()
    (q_k,) = kernel_inputs(impl, p.dtype, p.q)
    append_new_tokens(p)  # every check and conversion that can fail is behind us
    k_k, v_k = cache_inputs(impl, p.dtype, p.k_cache, p.v_cache)
    out, lse = impl.module.forward(q_k, k_k, v_k, seqlens, table, **p.visibility())
    out, lse = cast_outputs(p.dtype, out, lse)
    return (out, lse) if return_lse else out

"""The KV-cache problem: queries against a contiguous or paged cache, with new tokens to append first.

flash-attn's ``flash_attn_with_kvcache`` in heads-first layout:

* ``q`` (B, Hq, Lq, D);
* a contiguous cache ``k_cache`` (B, Hk, Lmax, D), ``v_cache`` (B, Hk, Lmax, Dv),
  or a paged cache (num_pages, Hk, page_size, D|Dv) with ``block_table``
  (B, max_pages): logical position ``p`` of sequence ``b`` lives in page
  ``block_table[b, p // page_size]``, slot ``p % page_size``;
* ``cache_seqlens`` (B,): keys valid in each sequence before the call;
* ``k_new``/``v_new`` (B, Hk, Lnew, D|Dv): written at positions
  ``[cache_seqlens[b], cache_seqlens[b] + Lnew)`` before attending.

Query ``i`` of sequence ``b`` attends the first ``n_b = cache_seqlens[b] +
Lnew`` keys, aligned with key ``i + n_b - Lq`` (bottom-right: the queries are
the last ``Lq`` positions).  A contiguous cache is the paged cache with one
page of ``Lmax`` slots per sequence and ``block_table[b] = [b]``, which is how
the kernels receive it.  Every rule, capacity included, is checked before
anything is written: sequence ``b`` uses the first ``ceil((cache_seqlens[b] +
Lnew) / page_size)`` entries of its ``block_table`` row, which must be
distinct pages of the cache; sequences may share pages for reading, but a page
a sequence appends into is in use by no other sequence of the call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from npsparseattn._arrays import array_module, common_kind
from npsparseattn._checks import check_dtypes, check_flag, check_scale, check_window, is_int
from npsparseattn._dtypes import FLOAT_DTYPES
from npsparseattn.problems.varlen import INT32_MAX, check_heads, host_indices


@dataclass(frozen=True)
class KVCacheProblem:
    """Validated KV-cache inputs.

    ``cache_seqlens`` is the host (NumPy int64) length of each sequence before
    the call, ``block_table`` the host page table (``None`` for a contiguous
    cache); ``k_new``/``v_new`` are ``None`` when nothing is appended.
    """

    q: Any
    k_cache: Any
    v_cache: Any
    k_new: Any
    v_new: Any
    cache_seqlens: np.ndarray
    block_table: np.ndarray | None
    kind: str
    dtype: np.dtype
    scale: float
    causal: bool
    left: int | None
    right: int | None

    @property
    def paged(self) -> bool:
        return self.block_table is not None

    @property
    def n_new(self) -> int:
        return 0 if self.k_new is None else self.k_new.shape[2]

    @property
    def page_size(self) -> int:
        return self.k_cache.shape[2]

    @property
    def capacity(self) -> int:
        """Keys each sequence can hold: ``Lmax``, or ``max_pages * page_size`` for a paged cache."""
        return self.page_size * (1 if self.block_table is None else self.block_table.shape[1])

    @property
    def seqlens(self) -> np.ndarray:
        """Keys each query attends (host int64): ``cache_seqlens + Lnew``."""
        return self.cache_seqlens + self.n_new

    def visibility(self) -> dict[str, Any]:
        """The keywords of the kernel contract: ``scale``, ``left``, ``right`` (offsets are per sequence)."""
        return dict(scale=self.scale, left=self.left, right=self.right)

    def kernel_index_arrays(self) -> tuple[Any, Any]:
        """``(seqlens, block_table)`` as the kernels read them: int32 arrays of the problem's kind."""
        xp = array_module(self.kind)
        if self.block_table is None:
            table = np.arange(self.q.shape[0], dtype=np.int32)[:, None]
        else:
            table = self.block_table.astype(np.int32)
        return xp.asarray(self.seqlens.astype(np.int32)), xp.asarray(table)

    def new_token_slots(self) -> tuple[np.ndarray, np.ndarray]:
        """Host ``(page, slot)`` index arrays, (B * Lnew,) each, where ``k_new[b, :, t]`` is written (b-major)."""
        batch = self.q.shape[0]
        pos = self.cache_seqlens[:, None] + np.arange(self.n_new)[None, :]
        if self.block_table is None:
            pages = np.broadcast_to(np.arange(batch)[:, None], pos.shape)
            return pages.reshape(-1), pos.reshape(-1)
        rows = np.broadcast_to(np.arange(batch)[:, None], pos.shape)
        pages = self.block_table[rows, pos // self.page_size]
        return pages.reshape(-1), (pos % self.page_size).reshape(-1)


def _check_cache_seqlens(cache_seqlens: Any, batch: int, kind: str) -> np.ndarray:
    if is_int(cache_seqlens):
        host = np.full(batch, int(cache_seqlens), dtype=np.int64)
    else:
        host = host_indices(cache_seqlens, "cache_seqlens", kind)
        if host.shape != (batch,):
            raise ValueError(f"cache_seqlens must have shape ({batch},) (one length per sequence), got {host.shape}")
    if (host < 0).any():
        b = int(np.argmax(host < 0))
        raise ValueError(f"cache_seqlens must be >= 0, got cache_seqlens[{b}] = {host[b]}")
    return host


def _host_block_table(block_table: Any, batch: int, kind: str) -> np.ndarray:
    """The page table on the host (int64), shape ``(B, max_pages)``."""
    host = host_indices(block_table, "block_table", kind)
    if host.ndim != 2 or host.shape[0] != batch:
        raise ValueError(f"block_table must have shape ({batch}, max_pages), got {tuple(block_table.shape)}")
    return host


def _check_pages(host: np.ndarray, n_pages: int, seqlens: np.ndarray, n_new: int, page_size: int) -> None:
    """The pages each sequence uses are pages of the cache, distinct, and shared only for reading.

    Sequence ``b`` *uses* the first ``ceil((cache_seqlens[b] + Lnew) / page_size)``
    entries of ``block_table[b]``; later entries are never read.  See
    :func:`_check_page_sharing` for the sharing rules.
    """
    needed = -(-(seqlens + n_new) // page_size)
    used = np.arange(host.shape[1])[None, :] < needed[:, None]
    bad = used & ((host < 0) | (host >= n_pages))
    if bad.any():
        b, p = (int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"block_table[{b}, {p}] = {host[b, p]} is not a page of the cache (0 <= page < {n_pages}); "
            f"sequence {b} uses its first {int(needed[b])} pages"
        )
    _check_page_sharing(host, used, needed, seqlens // page_size if n_new else None)


def _check_page_sharing(table: np.ndarray, used: np.ndarray, needed: np.ndarray, first_written: Any) -> None:
    """Refuse a page listed twice among one sequence's pages in use, and an append into a page another reads.

    Two sequences may read the same pages (a shared prefix), but the pages a
    sequence appends into (those holding its positions ``[cache_seqlens[b],
    cache_seqlens[b] + Lnew)``, from column ``first_written[b]`` on; ``None``
    when nothing is appended) must be in use by no other sequence of the call:
    the new tokens would overwrite keys the other one attends in this very
    call.  The caller copies a shared page first (copy-on-write).
    """
    rows, cols = np.nonzero(used)
    pages = table[rows, cols]
    key = np.sort(rows * (int(pages.max(initial=0)) + 1) + pages)
    if (key[1:] == key[:-1]).any():
        for b in np.unique(rows):
            own = table[b, : int(needed[b])]
            values, counts = np.unique(own, return_counts=True)
            if (counts > 1).any():
                page = values[counts > 1][0]
                at = np.flatnonzero(own == page)[:2]
                raise ValueError(
                    f"block_table[{b}] lists page {page} twice among the {int(needed[b])} pages sequence {b} uses "
                    f"(block_table[{b}, {at[0]}] and block_table[{b}, {at[1]}]): two positions would share one "
                    f"slot; nothing was written"
                )
    if first_written is None:
        return
    values, counts = np.unique(pages, return_counts=True)
    shared = values[counts > 1]
    if not shared.size:
        return
    writes = used & (np.arange(table.shape[1])[None, :] >= first_written[:, None])
    hit = writes & np.isin(table, shared)
    if hit.any():
        b, p = (int(i) for i in np.argwhere(hit)[0])
        page = table[b, p]
        other = (rows != b) & (pages == page)
        b2, p2 = int(rows[other][0]), int(cols[other][0])
        raise ValueError(
            f"sequence {b} appends into page {page} (block_table[{b}, {p}]), which sequence {b2} also uses "
            f"(block_table[{b2}, {p2}]): the new tokens would overwrite keys it reads in this call; a page a "
            f"sequence appends into must be its own (copy a shared page before appending into it); nothing was "
            f"written"
        )


def kvcache_problem(
    q: Any,
    k_cache: Any,
    v_cache: Any,
    *,
    cache_seqlens: Any,
    k_new: Any = None,
    v_new: Any = None,
    block_table: Any = None,
    causal: Any = True,
    window: Any = None,
    scale: Any = None,
) -> KVCacheProblem:
    """Validate a KV-cache call into a :class:`KVCacheProblem`; nothing is written."""
    if (k_new is None) != (v_new is None):
        raise ValueError("pass k_new and v_new together (or neither)")
    arrays = {"q": q, "k_cache": k_cache, "v_cache": v_cache}
    if k_new is not None:
        arrays.update(k_new=k_new, v_new=v_new)
    kind = common_kind(**arrays)
    for name, x in arrays.items():
        if x.ndim != 4:
            layout = "(B, Hq, Lq, D)" if name == "q" else "(B, Hk, Lnew, D)" if "new" in name else "(*, Hk, L, D)"
            raise ValueError(f"{name} must have 4 axes {layout}, got shape {tuple(x.shape)}")
    dtype = check_dtypes(arrays, FLOAT_DTYPES)
    check_heads(q, k_cache, v_cache, 1)
    batch = q.shape[0]
    if block_table is None and k_cache.shape[0] != batch:
        raise ValueError(
            f"a contiguous cache must have one row per sequence: k_cache {tuple(k_cache.shape)} for q "
            f"{tuple(q.shape)} (pass block_table for a paged cache)"
        )
    n_new = 0
    if k_new is not None:
        for name, x, cache in (("k_new", k_new, k_cache), ("v_new", v_new, v_cache)):
            expected = (batch, cache.shape[1], x.shape[2], cache.shape[3])
            if tuple(x.shape) != expected or x.shape[2] != k_new.shape[2]:
                raise ValueError(
                    f"{name} must have shape (B, Hk, Lnew, {'D' if name == 'k_new' else 'Dv'}) = "
                    f"({batch}, {cache.shape[1]}, Lnew, {cache.shape[3]}) with the same Lnew as k_new, "
                    f"got {tuple(x.shape)}"
                )
        n_new = k_new.shape[2]
        for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
            if isinstance(cache, np.ndarray) and not cache.flags.writeable:
                raise ValueError(f"{name} is read-only (a JAX array, say); new tokens cannot be written into it")
    seqlens = _check_cache_seqlens(cache_seqlens, batch, kind)
    page_size = k_cache.shape[2]
    if block_table is not None and page_size < 1:
        raise ValueError(
            f"a paged cache's axis 2 is page_size, which must be >= 1: k_cache has shape {tuple(k_cache.shape)}"
        )
    table = None if block_table is None else _host_block_table(block_table, batch, kind)
    capacity = page_size * (1 if table is None else table.shape[1])
    over = seqlens + n_new > capacity
    if over.any():
        b = int(np.argmax(over))
        raise ValueError(
            f"the cache holds {capacity} keys per sequence but sequence {b} needs cache_seqlens[{b}] + Lnew = "
            f"{seqlens[b]} + {n_new} = {seqlens[b] + n_new}; nothing was written"
        )
    if capacity > INT32_MAX:
        raise ValueError(f"a cache of {capacity} keys per sequence does not fit int32 positions")
    if table is not None:
        _check_pages(table, k_cache.shape[0], seqlens, n_new, page_size)
    causal = check_flag(causal, "causal")
    left, right = check_window(window, causal)
    return KVCacheProblem(
        q=q,
        k_cache=k_cache,
        v_cache=v_cache,
        k_new=k_new,
        v_new=v_new,
        cache_seqlens=seqlens,
        block_table=table,
        kind=kind,
        dtype=dtype,
        scale=check_scale(scale, q.shape[-1], dtype),
        causal=causal,
        left=left,
        right=right,
    )

"""Dense float64 attention over a KV cache: backend ``"reference"`` of ``attention_with_kvcache``.

The kernels receive the cache after the new tokens were written, as pages
(a contiguous cache is one page per sequence): the first ``seqlens[b]`` keys
of sequence ``b`` are gathered through ``block_table`` and attended by the
dense oracle with offset ``seqlens[b] - Lq``.  Never chosen by
``backend="auto"``.
"""

from __future__ import annotations

from typing import Any

from npsparseattn._arrays import array_module, common_kind
from npsparseattn.reference import _oracle
from npsparseattn.reference.exact import DTYPES, KINDS, STRIDED_ROWS, TOLERANCE, compute_dtype, unsupported

__all__ = ["DTYPES", "KINDS", "STRIDED_ROWS", "TOLERANCE", "compute_dtype", "forward", "gather", "unsupported"]


def gather(cache: Any, table_row: Any, n: int, xp: Any) -> Any:
    """The first ``n`` positions of one sequence, (H, n, X), from pages (P, H, page_size, X) and its table row."""
    pos = xp.arange(n)
    page_size = cache.shape[2]
    return cache[table_row[pos // page_size], :, pos % page_size].transpose(1, 0, 2)


def forward(q, k_cache, v_cache, seqlens, block_table, *, scale, left, right, out=None, lse=None):
    """float64 ``(out, lse)`` of ``q`` (B, Hq, Lq, D) against paged caches (P, Hk, page_size, D|Dv)."""
    xp = array_module(common_kind(q=q, k_cache=k_cache, v_cache=v_cache))
    batch, _, lq, _ = q.shape
    result = xp.zeros(q.shape[:3] + (v_cache.shape[3],), xp.float64)
    log_sum = xp.full(q.shape[:3], -xp.inf)
    lengths = seqlens.tolist()
    for b in range(batch):
        n = lengths[b]
        k = gather(k_cache, block_table[b], n, xp)
        v = gather(v_cache, block_table[b], n, xp)
        mask = _oracle.visibility_mask(lq, n, offset=n - lq, left=left, right=right, xp=xp)
        o, s, _ = _oracle.forward(q[b : b + 1], k[None], v[None], mask, scale, xp)
        result[b] = o[0]
        log_sum[b] = s[0]
    return _oracle.store(result, out), _oracle.store(log_sum, lse)

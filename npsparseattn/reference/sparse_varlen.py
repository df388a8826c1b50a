"""Dense float64 packed sparse attention: backend ``"reference"`` of ``sparse_attention_varlen``.

Each sequence is cut out of the packed arrays, with its lists of ``kv_idx``,
and run through the dense oracle under ``expand(kv_idx) & visibility`` with
its own bottom-right offset ``Lk_s - Lq_s``.  Never chosen by
``backend="auto"``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from npsparseattn._arrays import array_module, common_kind
from npsparseattn.problems.sparse import query_block_offsets
from npsparseattn.reference import _oracle
from npsparseattn.reference.exact import DTYPES, KINDS, STRIDED_ROWS, TOLERANCE, compute_dtype, unsupported
from npsparseattn.reference.sparse import token_mask

__all__ = ["DTYPES", "KINDS", "STRIDED_ROWS", "TOLERANCE", "backward", "compute_dtype", "forward", "unsupported"]


def _sequences(cu_q: Any, cu_k: Any, q_block: int):
    """``(rows of q, rows of k, lists of kv_idx)`` slices of each sequence, from the offsets (read on the host)."""
    host_q, host_k = cu_q.tolist(), cu_k.tolist()
    first = query_block_offsets(np.diff(host_q), q_block).tolist()
    for s in range(len(host_q) - 1):
        yield slice(host_q[s], host_q[s + 1]), slice(host_k[s], host_k[s + 1]), slice(first[s], first[s + 1])


def _mask(kv_idx, kv_cnt, n_heads, rows, keys, lists, q_block, kv_block, left, right, xp):
    lq, lk = rows.stop - rows.start, keys.stop - keys.start
    idx, cnt = kv_idx[None, :, lists], kv_cnt[None, :, lists]
    return token_mask(idx, cnt, n_heads, lq, lk, q_block, kv_block, lk - lq, left, right, xp)


def forward(q, k, v, cu_seqlens_q, cu_seqlens_k, kv_idx, kv_cnt, *, q_block, kv_block, scale, left, right,
            out=None, lse=None):  # fmt: skip
    """float64 ``(out, lse)`` of packed ``q`` (Hq, Tq, D), ``k`` (Hk, Tk, D), ``v`` (Hk, Tk, Dv)."""
    xp = array_module(common_kind(q=q, k=k, v=v))
    result = xp.zeros((q.shape[0], q.shape[1], v.shape[2]), xp.float64)
    log_sum = xp.full((q.shape[0], q.shape[1]), -xp.inf)
    for rows, keys, lists in _sequences(cu_seqlens_q, cu_seqlens_k, q_block):
        mask = _mask(kv_idx, kv_cnt, q.shape[0], rows, keys, lists, q_block, kv_block, left, right, xp)
        o, s, _ = _oracle.forward(q[None, :, rows], k[None, :, keys], v[None, :, keys], mask, scale, xp)
        result[:, rows] = o[0]
        log_sum[:, rows] = s[0]
    return _oracle.store(result, out), _oracle.store(log_sum, lse)


def backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, kv_idx, kv_cnt, *, q_block, kv_block, scale,
             left, right, grads=None):  # fmt: skip
    """float64 ``(dq, dk, dv)`` from the given ``out`` (Hq, Tq, Dv) and ``lse`` (Hq, Tq), sequence by sequence."""
    xp = array_module(common_kind(q=q, k=k, v=v))
    dq = xp.zeros(q.shape, xp.float64)
    dk = xp.zeros(k.shape, xp.float64)
    dv = xp.zeros(v.shape, xp.float64)
    for rows, keys, lists in _sequences(cu_seqlens_q, cu_seqlens_k, q_block):
        mask = _mask(kv_idx, kv_cnt, q.shape[0], rows, keys, lists, q_block, kv_block, left, right, xp)
        g = _oracle.backward(dout[None, :, rows], q[None, :, rows], k[None, :, keys], v[None, :, keys],
                             out[None, :, rows], lse[None, :, rows], mask, scale, xp)  # fmt: skip
        dq[:, rows] = g[0][0]
        dk[:, keys] = g[1][0]
        dv[:, keys] = g[2][0]
    return tuple(_oracle.store(g, buf) for g, buf in zip((dq, dk, dv), grads or (None, None, None)))

"""Dense float64 packed variable-length attention: backend ``"reference"`` of ``attention_varlen``.

Each sequence is cut out of the packed arrays and run through the dense
oracle with its own bottom-right offset ``Lk_s - Lq_s``; rows of empty
sequences are never touched because there are none.  Never chosen by
``backend="auto"``.
"""

from __future__ import annotations

from typing import Any

from npsparseattn._arrays import array_module, common_kind
from npsparseattn.reference import _oracle
from npsparseattn.reference.exact import DTYPES, KINDS, STRIDED_ROWS, TOLERANCE, compute_dtype, unsupported

__all__ = ["DTYPES", "KINDS", "STRIDED_ROWS", "TOLERANCE", "backward", "compute_dtype", "forward", "unsupported"]


def _sequences(cu_q: Any, cu_k: Any):
    """``(rows of q, rows of k)`` slices of each sequence, from the offsets (read on the host)."""
    host_q = cu_q.tolist()
    host_k = cu_k.tolist()
    for s in range(len(host_q) - 1):
        yield slice(host_q[s], host_q[s + 1]), slice(host_k[s], host_k[s + 1])


def _mask(rows: slice, keys: slice, left: Any, right: Any, xp: Any) -> Any:
    lq, lk = rows.stop - rows.start, keys.stop - keys.start
    return _oracle.visibility_mask(lq, lk, offset=lk - lq, left=left, right=right, xp=xp)


def forward(q, k, v, cu_seqlens_q, cu_seqlens_k, *, scale, left, right, out=None, lse=None):
    """float64 ``(out, lse)`` of packed ``q`` (Hq, Tq, D), ``k`` (Hk, Tk, D), ``v`` (Hk, Tk, Dv)."""
    xp = array_module(common_kind(q=q, k=k, v=v))
    result = xp.zeros((q.shape[0], q.shape[1], v.shape[2]), xp.float64)
    log_sum = xp.full((q.shape[0], q.shape[1]), -xp.inf)
    for rows, keys in _sequences(cu_seqlens_q, cu_seqlens_k):
        mask = _mask(rows, keys, left, right, xp)
        o, s, _ = _oracle.forward(q[None, :, rows], k[None, :, keys], v[None, :, keys], mask, scale, xp)
        result[:, rows] = o[0]
        log_sum[:, rows] = s[0]
    return _oracle.store(result, out), _oracle.store(log_sum, lse)


def backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, *, scale, left, right, grads=None):
    """float64 ``(dq, dk, dv)`` from the given ``out`` (Hq, Tq, Dv) and ``lse`` (Hq, Tq), sequence by sequence."""
    xp = array_module(common_kind(q=q, k=k, v=v))
    dq = xp.zeros(q.shape, xp.float64)
    dk = xp.zeros(k.shape, xp.float64)
    dv = xp.zeros(v.shape, xp.float64)
    for rows, keys in _sequences(cu_seqlens_q, cu_seqlens_k):
        mask = _mask(rows, keys, left, right, xp)
        parts = (x[None, :, rows] for x in (dout, q))
        g = _oracle.backward(*parts, k[None, :, keys], v[None, :, keys], out[None, :, rows], lse[None, :, rows],
                             mask, scale, xp)  # fmt: skip
        dq[:, rows] = g[0][0]
        dk[:, keys] = g[1][0]
        dv[:, keys] = g[2][0]
    return tuple(_oracle.store(g, buf) for g, buf in zip((dq, dk, dv), grads or (None, None, None)))

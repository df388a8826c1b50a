"""Dense float64 index-driven sparse attention: backend ``"reference"`` of ``sparse_attention``.

The canonical index is expanded to a token mask (query ``i`` of head ``h``
sees key ``j`` iff key block ``j // kv_block`` is among the ``kv_cnt``
listed for query block ``i // q_block`` of key head ``h // G``), combined
with the causal/window mask, and the dense oracle runs:
``mask = expand(kv_idx) & visibility``.  Never chosen by ``backend="auto"``.
"""

from __future__ import annotations

from typing import Any

from npsparseattn._arrays import array_module, common_kind
from npsparseattn.reference import _oracle
from npsparseattn.reference.exact import (
    DTYPES,
    KINDS,
    SCORE_MODS,
    STRIDED_ROWS,
    TOLERANCE,
    compute_dtype,
    unsupported,
)

__all__ = [
    "DTYPES",
    "KINDS",
    "SCORE_MODS",
    "STRIDED_ROWS",
    "TOLERANCE",
    "backward",
    "block_mask",
    "compute_dtype",
    "forward",
    "unsupported",
]


def block_mask(kv_idx: Any, kv_cnt: Any, n_key_blocks: int, xp: Any) -> Any:
    """Bool (..., nqb, n_key_blocks): ``True`` where a list holds the key block among its first ``kv_cnt`` slots.

    Slots past ``kv_cnt`` and ``-1`` entries select nothing.

    >>> import numpy as np
    >>> block_mask(np.array([[2, 0, -1]]), np.array([2]), 3, np).astype(int)
    array([[1, 0, 1]])
    """
    slots = kv_idx.shape[-1]
    used = (xp.arange(slots) < kv_cnt[..., None]) & (kv_idx >= 0)
    column = xp.where(used, kv_idx, n_key_blocks).astype(xp.int64)
    mask = xp.zeros(kv_idx.shape[:-1] + (n_key_blocks + 1,), dtype=bool)
    lead = xp.indices(kv_idx.shape[:-1] + (slots,), sparse=True)[:-1]
    mask[(*lead, column)] = True
    return mask[..., :n_key_blocks]


def token_mask(kv_idx, kv_cnt, n_heads, seq_q, seq_k, q_block, kv_block, offset, left, right, xp) -> Any:
    """Bool (B, Hq, Lq, Lk): the selected blocks expanded to tokens and heads, and the causal/window mask."""
    blocks = block_mask(kv_idx, kv_cnt, -(-seq_k // kv_block), xp)
    tokens = blocks.repeat(q_block, axis=-2)[..., :seq_q, :].repeat(kv_block, axis=-1)[..., :seq_k]
    tokens = tokens.repeat(n_heads // kv_idx.shape[1], axis=1)
    visible = _oracle.visibility_mask(seq_q, seq_k, offset=offset, left=left, right=right, xp=xp)
    return tokens & visible


def forward(q, k, v, kv_idx, kv_cnt, *, q_block, kv_block, scale, offset, left, right, out=None, lse=None, mods=None):
    """float64 ``(out, lse)``: dense attention masked by ``expand(kv_idx) & visibility``."""
    xp = array_module(common_kind(q=q, k=k, v=v))
    mask = token_mask(kv_idx, kv_cnt, q.shape[1], q.shape[2], k.shape[2], q_block, kv_block, offset, left, right, xp)
    result, log_sum, _ = _oracle.forward(q, k, v, mask, scale, xp, mods, offset)
    return _oracle.store(result, out), _oracle.store(log_sum, lse)


def backward(
    dout, q, k, v, out, lse, kv_idx, kv_cnt, *, q_block, kv_block, scale, offset, left, right, grads=None,
    mods=None, dbias=None,
):  # fmt: skip
    """float64 ``(dq, dk, dv)`` under the same mask, from the given ``out`` and ``lse``."""
    xp = array_module(common_kind(q=q, k=k, v=v))
    mask = token_mask(kv_idx, kv_cnt, q.shape[1], q.shape[2], k.shape[2], q_block, kv_block, offset, left, right, xp)
    result = _oracle.backward(dout, q, k, v, out, lse, mask, scale, xp, mods, offset, dbias)
    return tuple(_oracle.store(g, buf) for g, buf in zip(result, grads or (None, None, None)))

"""Dense float64 block-sparse attention: backend ``"reference"`` of ``block_sparse_attention``.

The layout is expanded to a token mask and combined with the causal/window
mask, then the dense oracle runs: ``mask = expand(layout) & visibility``.
"""

from __future__ import annotations

from typing import Any

from npsparseattn._arrays import array_module, common_kind
from npsparseattn.layouts import BlockLayout
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
    "compute_dtype",
    "forward",
    "unsupported",
]


def token_mask(layout: BlockLayout, seq_q: int, seq_k: int, offset: int, left: Any, right: Any, xp: Any) -> Any:
    """Bool (1, heads, Lq, Lk): the layout's blocks expanded to tokens, and the causal/window mask."""
    blocks = xp.asarray(layout.to_token_mask())
    visible = _oracle.visibility_mask(seq_q, seq_k, offset=offset, left=left, right=right, xp=xp)
    return (blocks & visible)[None]


def forward(q, k, v, layout, *, scale, offset, left, right, out=None, lse=None, mods=None):
    """float64 ``(out, lse)``: dense attention masked by ``expand(layout) & visibility``."""
    xp = array_module(common_kind(q=q, k=k, v=v))
    mask = token_mask(layout, q.shape[2], k.shape[2], offset, left, right, xp)
    result, log_sum, _ = _oracle.forward(q, k, v, mask, scale, xp, mods, offset)
    return _oracle.store(result, out), _oracle.store(log_sum, lse)


def backward(dout, q, k, v, out, lse, layout, *, scale, offset, left, right, grads=None, mods=None, dbias=None):
    """float64 ``(dq, dk, dv)`` under the same mask, from the given ``out`` and ``lse``."""
    xp = array_module(common_kind(q=q, k=k, v=v))
    mask = token_mask(layout, q.shape[2], k.shape[2], offset, left, right, xp)
    result = _oracle.backward(dout, q, k, v, out, lse, mask, scale, xp, mods, offset, dbias)
    return tuple(_oracle.store(g, buf) for g, buf in zip(result, grads or (None, None, None)))

"""Dense float64 attention: backend ``"reference"`` of ``attention`` (and of ring attention's blocks).

Never chosen by ``backend="auto"``: it builds the (Lq, Lk) score matrix.
Reads NumPy or CuPy arrays of any float dtype as float64 and returns float64.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from npsparseattn._arrays import array_module, common_kind
from npsparseattn._dtypes import FLOAT_DTYPES
from npsparseattn.problems.scores import FEATURES
from npsparseattn.reference import _oracle

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

KINDS = ("numpy", "cupy")
DTYPES = FLOAT_DTYPES
STRIDED_ROWS = True
TOLERANCE = {name: 0.0 for name in DTYPES}  # the oracle itself
SCORE_MODS = FEATURES  # every score modification, from its formula


def compute_dtype(dtype: Any) -> np.dtype:
    """The oracle reads every input as float64."""
    return np.dtype(np.float64)


def unsupported(problem: Any) -> list[str]:
    """Every problem is supported (memory permitting: O(Lq * Lk) per head)."""
    return []


def forward(q, k, v, *, scale, offset, left, right, out=None, lse=None, mods=None):
    """float64 ``(out, lse)`` of canonical ``q`` (B, Hq, Lq, D), ``k`` (B, Hk, Lk, D), ``v`` (B, Hk, Lk, Dv)."""
    xp = array_module(common_kind(q=q, k=k, v=v))
    mask = _oracle.visibility_mask(q.shape[2], k.shape[2], offset=offset, left=left, right=right, xp=xp)
    result, log_sum, _ = _oracle.forward(q, k, v, mask, scale, xp, mods, offset)
    return _oracle.store(result, out), _oracle.store(log_sum, lse)


def backward(dout, q, k, v, out, lse, *, scale, offset, left, right, grads=None, mods=None, dbias=None):
    """float64 ``(dq, dk, dv)`` from the given ``out`` (B, Hq, Lq, Dv) and ``lse`` (B, Hq, Lq); with ``mods``,
    the gradient of the biased score into the (B, Hq, Lq, Lk) buffer ``dbias`` if one is given."""
    xp = array_module(common_kind(q=q, k=k, v=v))
    mask = _oracle.visibility_mask(q.shape[2], k.shape[2], offset=offset, left=left, right=right, xp=xp)
    result = _oracle.backward(dout, q, k, v, out, lse, mask, scale, xp, mods, offset, dbias)
    return tuple(_oracle.store(g, buf) for g, buf in zip(result, grads or (None, None, None)))

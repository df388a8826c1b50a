"""Score modifications in the numba-cuda attention kernels: ALiBi, softcap and an additive bias.

The kernels keep scores in base-2 units (``x = scale * log2(e) * q . k``),
so the modifications of :mod:`npsparseattn.problems.scores` are applied in
those units too: a softcap ``c`` becomes ``c2 = c * log2(e)`` (then
``c2 * tanh(x / c2)`` is ``log2(e)`` times the natural one), the slopes and
the bias are multiplied by ``log2(e)``.

Every kernel instance takes the modifications as *runtime* arguments,
``flags, cap2, slopes, bias, sb, sh, si, sj, hm`` (:func:`score_args`), with
small placeholders when a modification is absent, so one compiled kernel
per storage dtype and tile size serves every call and a plain call pays a
single uniform branch per score:

* ``flags``: :data:`ALIBI` | :data:`BIAS` | :data:`SOFTCAP` (0: none);
* ``cap2``: the softcap in base-2 units (0: off);
* ``slopes``: (B * Hq,) float32, the ALiBi slopes times ``log2(e)``;
* ``bias``: float32, one dimension, holding the caller's bias without its
  broadcast axes; element ``(b, h, i, j)`` is
  ``bias[b*sb + h*sh + i*si + j*sj]`` (a stride of 0 along a broadcast axis:
  the (B, Hq, Lq, Lk) bias is never materialised);
* ``hm``: the query heads Hq of the problem the modifications are numbered
  in.  The kernels' own head index may fold the batch into the heads
  (sparse attention reads (B, Hq) as (1, B*Hq)); the pair ``(b, h)`` of the
  modifications is ``divmod(b_k * Hq_k + h_k, hm)`` of the kernel's
  ``(b_k, h_k)`` (:func:`bias_offset`), the same for an unfolded call.

The backward writes the gradient of the biased score (``dS``) of each
visible pair into a (B, Hq, Lq, Lk) ``dbias`` buffer (a 1-element
placeholder without a bias) and carries ``dS * (1 - tanh^2)`` on to dQ and dK
under a softcap.
"""

from __future__ import annotations

import math
from functools import cache
from typing import Any

import numpy as np

from npsparseattn.cuda.constants import LOG2E
from npsparseattn.cuda.numba_cuda.runtime import array_module, device_function, empty, kernel_view

ALIBI = 1
BIAS = 2
SOFTCAP = 4


def score_args(mods: Any, like: Any, shape: tuple[int, int, int, int]) -> tuple[Any, ...]:
    """The kernels' ``(flags, cap2, slopes, bias, sb, sh, si, sj, hm)`` for ``mods`` (a ScoreMods or None).

    ``like``: an array of the kind and device the kernels read; ``shape``: the
    problem's (B, Hq, Lq, Lk) as the modifications number it (unfolded).

    >>> score_args(None, np.zeros(1), (1, 2, 3, 4))[:2]
    (0, 0.0)
    """
    xp = array_module(like)
    flags, cap2 = 0, 0.0
    slopes = bias = None
    strides = (0, 0, 0, 0)
    if mods is not None:
        if mods.softcap is not None:
            flags, cap2 = flags | SOFTCAP, float(mods.softcap) * LOG2E
        if mods.slopes is not None:
            flags, slopes = flags | ALIBI, (mods.slopes * LOG2E).astype(np.float32).reshape(-1)
        if mods.bias is not None:
            flags |= BIAS
            bias, strides = _compact_bias(mods.canonical_bias(np.float32, shape), xp)
    slopes = xp.zeros(1, np.float32) if slopes is None else xp.ascontiguousarray(slopes)
    bias = xp.zeros(1, np.float32) if bias is None else bias
    return (flags, cap2, slopes, bias, *strides, shape[1])


def _compact_bias(view: Any, xp: Any) -> tuple[Any, tuple[int, ...]]:
    """A (B, Hq, Lq, Lk) float32 view with stride-0 broadcast axes as ``(flat, element strides)``.

    Only the broadcast axes' first slice is kept (a C-contiguous copy of
    that, or the caller's memory itself when it already is one; a NumPy
    array is copied if read-only: the simulator writes its arguments back).
    """
    broadcast = [st == 0 and n > 1 for st, n in zip(view.strides, view.shape, strict=True)]
    compact = xp.ascontiguousarray(view[tuple(slice(0, 1) if b else slice(None) for b in broadcast)])
    if isinstance(compact, np.ndarray) and not compact.flags.writeable:
        compact = compact.copy()
    strides = tuple(0 if b else st // compact.itemsize for b, st in zip(broadcast, compact.strides, strict=True))
    return compact.reshape(-1), strides


def bias_grad_arg(dbias: Any, like: Any) -> Any:
    """``dbias`` as the kernels write it (bfloat16 viewed as uint16), or a 1-element placeholder of ``like``'s dtype."""
    if dbias is None:
        dbias = empty(like, (1, 1, 1, 1), like.dtype)
    return kernel_view(dbias)


@cache
def bias_offset() -> Any:
    """The device function ``bias_offset(bh, hm, sb, sh)``: where head ``bh = b * Hq + h`` starts in the flat bias.

    ``bh`` counts the kernel's (possibly folded) heads; ``hm`` is the
    unfolded Hq, so ``(b, h) = divmod(bh, hm)`` (one division per thread block and head).
    """

    def offset(bh, hm, sb, sh):
        b = bh // hm
        return b * sb + (bh - b * hm) * sh

    return device_function(offset)


@cache
def modifier() -> Any:
    """The device function ``modify(x, cap2, slope2, bias, at, dist) -> (x', d)``.

    ``x``: the base-2 score ``scale * log2(e) * q . k`` of a visible pair;
    ``slope2``: its head's slope times ``log2(e)`` (0 without ALiBi);
    ``at``: the pair's element of the flat ``bias``, or -1 without a bias;
    ``dist``: ``|i + offset - j|``.  Returns the modified base-2 score and
    ``d = d x' / d x`` (``1 - tanh^2`` under a softcap, else 1).
    """
    from numba import float32

    def modify(x, cap2, slope2, bias, at, dist):
        d = float32(1.0)
        if cap2 > float32(0.0):
            e = float32(math.exp2(float32(-2.0 * LOG2E) * abs(x / cap2)))  # tanh through one exp2
            t = math.copysign((float32(1.0) - e) / (float32(1.0) + e), x)
            x = cap2 * t
            d = float32(1.0) - t * t
        x -= slope2 * float32(dist)
        if at >= 0:
            x += bias[at] * float32(LOG2E)
        return x, d

    return device_function(modify)

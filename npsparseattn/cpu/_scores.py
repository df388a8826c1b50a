"""Score modifications inside the CPU tile steps: ALiBi, softcap, bias, ``score_mod``, ``mask_mod``.

The order and the gradients are those of :mod:`npsparseattn.problems.scores`.
The kernels carry the modifications as the last element of the tile
geometry (``geo[6]``, :func:`~npsparseattn.cpu._tiles.geometry_with`), a
tuple built by :func:`kernel_mods`::

    (slopes (B, Hq) float64, softcap, bias (B, Hq, Lq, Lk), dbias (B, Hq, Lq, Lk),
     score_mod, score_mod_grad, mask_mod)

with empty arrays for an absent ALiBi, bias or ``dbias``, ``0.0`` for no
softcap and ``None`` for an absent function.  Plain attention passes
``None`` instead of the tuple: every function here then compiles to nothing,
so the plain kernels keep their code and their compile time.  A user
function is compiled into the kernel (one kernel version per function, on
first use, cached on disk like every kernel).

The score tiles hold base-2 scores (``scale * log2(e) * q.k``,
``cpu/_tiles.py``): ALiBi, softcap and bias work in those units (a cap ``c``
is ``c * log2(e)`` there, a slope or a bias is multiplied by ``log2(e)``),
one vectorised pass over each row per modification (numpy's error model:
numba's zero-division check on the softcap's ``tanh`` would stop LLVM from
vectorising the loop, 6x slower); a user function gets natural units.
The backward keeps the unmodified scores of a tile in the right half of its
``dp`` scratch tile, twice as wide when there are modifications
(:func:`scratch_width`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import njit, types
from numba.core.dispatcher import Dispatcher
from numba.extending import overload

from npsparseattn.cpu._tiles import FASTMATH, LN2, LOG2E, key_position, like
from npsparseattn.cpu._vecmath import exp2

__all__ = ["backward_mods", "jit_functions_only", "kernel_mods", "modify_scores", "score_grads", "scratch_width"]


def jit_functions_only(mods: Any) -> list[str]:
    """Reasons the numba kernels cannot take ``mods``: a function that is not a ``numba.njit`` function."""
    names = ("score_mod", "score_mod_grad", "mask_mod")
    return [
        f"{name} is not a numba.njit function (the CPU kernels compile it in; decorate it with @numba.njit)"
        for name in names
        if mods is not None and getattr(mods, name) is not None and not isinstance(getattr(mods, name), Dispatcher)
    ]


def kernel_mods(mods: Any, dtype: Any, shape: tuple[int, int, int, int], dbias: Any = None, grad: bool = False):
    """The kernels' tuple for the :class:`~npsparseattn.problems.scores.ScoreMods` ``mods`` (``None``: none).

    ``shape`` is the canonical (B, Hq, Lq, Lk); ``dbias`` the backward's
    buffer for the bias gradient (or ``None``); ``grad`` includes
    ``score_mod_grad`` (the backward; the forward leaves it out so that it
    compiles one version per ``score_mod``).
    """
    if mods is None:
        return None
    dtype = np.dtype(dtype)
    slopes = np.zeros((0, 0)) if mods.slopes is None else np.ascontiguousarray(mods.slopes, np.float64)
    bias = np.zeros((0, 0, 0, 0), dtype) if mods.bias is None else mods.canonical_bias(dtype, shape).view()
    bias.flags.writeable = False  # one kernel type whether the caller's bias is writeable or a broadcast
    dbias = np.zeros((0, 0, 0, 0), dtype) if dbias is None else dbias
    cap = float(mods.softcap or 0.0)
    return (slopes, cap, bias, dbias, mods.score_mod, mods.score_mod_grad if grad else None, mods.mask_mod)


def backward_mods(mods: Any, dtype: Any, shape: tuple[int, int, int, int], dbias: Any = None):
    """The backward's two tuples of :func:`kernel_mods`: the dK/dV pass's (with ``dbias``, which it writes once
    per visible pair) and the two-pass scheme's dQ pass's (the same type, an empty ``dbias``)."""
    no_dbias = None if dbias is None else np.zeros((0, 0, 0, 0), dtype)
    return (
        kernel_mods(mods, dtype, shape, dbias, grad=True),
        kernel_mods(mods, dtype, shape, no_dbias, grad=True),
    )


def _key(geo, j):
    """Position of key column ``j`` (compiled code only): ``j``, or ``kpos[j]`` for keys gathered into a tile."""
    raise TypeError("compiled code only")


@overload(_key, inline="always")
def _key_overload(geo, j):
    if isinstance(geo.types[5], types.NoneType):
        return lambda geo, j: j
    return lambda geo, j: key_position(geo, j)  # a call (inlined, the conditional lost its phi: numba warns)


def _row_position(geo, h, i):
    """``(query head, position)`` of row ``i`` of query head ``h`` of the query array (compiled code only)."""
    raise TypeError("compiled code only")


@overload(_row_position, inline="always")
def _row_position_overload(geo, h, i):
    if isinstance(geo.types[4], types.NoneType):
        return lambda geo, h, i: (h, i)
    # qdiv query heads of a GQA group stacked position by position (cpu/sparse.py: stack)
    return lambda geo, h, i: (h * geo[4] + i % geo[4], i // geo[4])


def _tanh(x):
    """``tanh(x)`` (compiled code only): vectorisable through ``exp2`` in float32, libm in float64."""
    raise TypeError("compiled code only")


@overload(_tanh, inline="always")
def _tanh_overload(x):
    if x == types.float32:
        two_log2e = np.float32(-2.0 * LOG2E)
        one = np.float32(1.0)

        def tanh_f32(x):
            e = exp2(abs(x) * two_log2e)  # e^(-2|x|): no overflow
            t = (one - e) / (one + e)
            return t if x >= 0 else -t

        return tanh_f32
    return lambda x: np.tanh(x)


def _score_functions(fn, mask, mods, geo, row, n, b, h, i, j0):
    """Apply ``score_mod`` ``fn`` and ``mask_mod`` ``mask`` to a row of base-2 scores (compiled code only)."""
    raise TypeError("compiled code only")


@overload(_score_functions, inline="always")
def _score_functions_overload(fn, mask, mods, geo, row, n, b, h, i, j0):
    if isinstance(fn, types.NoneType) and isinstance(mask, types.NoneType):
        return lambda fn, mask, mods, geo, row, n, b, h, i, j0: None
    return lambda fn, mask, mods, geo, row, n, b, h, i, j0: _apply_functions(fn, mask, row, n, b, h, i, j0, geo)


@njit(fastmath=FASTMATH, error_model="numpy")
def _apply_functions(fn, mask, row, n, b, h, i, j0, geo):
    """The per-score calls: ``x = score_mod(x, ...)`` (in natural units), ``-inf`` where ``mask_mod`` is false."""
    for col in range(n):
        j = _key(geo, j0 + col)
        row[col] = _score_mod(fn, row[col], b, h, i, j) if _keeps(mask, b, h, i, j) else -np.inf


def _score_mod(fn, x, b, h, i, j):
    """``score_mod`` of the base-2 score ``x``, in base-2 units (``x`` itself without one; compiled code only)."""
    raise TypeError("compiled code only")


@overload(_score_mod, inline="always")
def _score_mod_overload(fn, x, b, h, i, j):
    if isinstance(fn, types.NoneType):
        return lambda fn, x, b, h, i, j: x
    return lambda fn, x, b, h, i, j: like(LOG2E, x) * like(fn(x * like(LN2, x), b, h, i, j), x)


def _keeps(fn, b, h, i, j):
    raise TypeError("compiled code only")


@overload(_keeps, inline="always")
def _keeps_overload(fn, b, h, i, j):
    if isinstance(fn, types.NoneType):
        return lambda fn, b, h, i, j: True
    return lambda fn, b, h, i, j: bool(fn(b, h, i, j))


def _score_mod_slopes(fn, mods, geo, raw, g, n, b, h, i, j0):
    """``g *= score_mod'(x)`` along a row, ``x`` recomputed from the base-2 ``raw`` (compiled code only)."""
    raise TypeError("compiled code only")


@overload(_score_mod_slopes, inline="always")
def _score_mod_slopes_overload(fn, mods, geo, raw, g, n, b, h, i, j0):
    if isinstance(fn, types.NoneType):
        return lambda fn, mods, geo, raw, g, n, b, h, i, j0: None
    return lambda fn, mods, geo, raw, g, n, b, h, i, j0: _apply_slopes(fn, mods, geo, raw, g, n, b, h, i, j0)


@njit(fastmath=FASTMATH, error_model="numpy")
def _apply_slopes(fn, mods, geo, raw, g, n, b, h, i, j0):
    """:func:`_score_mod_slopes`: softcap, ALiBi and bias recomputed per score, then ``score_mod_grad``."""
    slopes, cap, bias = mods[0], mods[1], mods[2]
    ln2 = like(LN2, raw)
    p = i + geo[0]
    for col in range(n):
        j = _key(geo, j0 + col)
        x = raw[col] * ln2
        if cap > 0:
            c = like(cap, raw)
            x = c * _tanh(x / c)
        if slopes.shape[0] > 0:
            x -= like(slopes[b, h] * abs(p - j), raw)
        if bias.shape[0] > 0:
            x += bias[b, h, i, j]
        g[col] *= like(fn(x, b, h, i, j), raw)


@njit(fastmath=FASTMATH, error_model="numpy")
def _modify(geo, s, m, n, b, h, i0, j0, keep):
    """Base-2 scores ``s[:m, :n]`` (rows ``i0..``, key columns ``j0..``) modified in place; with ``keep``
    (``dp``, twice as wide), the unmodified ones copied into its right half first.

    One pass per modification over each row (ALiBi, softcap and bias vectorise), in base-2 units: a softcap
    ``c`` is ``c * log2(e)`` there, a slope or a bias is multiplied by ``log2(e)``.
    """
    mods = geo[6]
    slopes, cap, bias = mods[0], mods[1], mods[2]
    l2e = like(LOG2E, s)
    cap2 = like(cap * LOG2E, s)
    inv_cap2 = like(1.0 / (cap * LOG2E) if cap > 0 else 0.0, s)
    half = keep.shape[1] // 2
    for r in range(m):
        hh, i = _row_position(geo, h, i0 + r)
        row = s[r, :n]
        if half > 0:
            saved = keep[r, half : half + n]
            for col in range(n):
                saved[col] = row[col]
        if cap > 0:
            for col in range(n):
                row[col] = cap2 * _tanh(row[col] * inv_cap2)
        if slopes.shape[0] > 0:
            slope = like(slopes[b, hh] * LOG2E, s)
            p = i + geo[0]
            for col in range(n):
                row[col] -= slope * like(abs(p - _key(geo, j0 + col)), s)
        if bias.shape[0] > 0:
            brow = bias[b, hh, i]
            for col in range(n):
                row[col] += l2e * brow[_key(geo, j0 + col)]
        _score_functions(mods[4], mods[6], mods, geo, row, n, b, hh, i, j0)


@njit(fastmath=FASTMATH, error_model="numpy")
def _carry_back(geo, dp, m, n, b, h, i0, j0):
    """``dp[:m, :n]`` (dS of the final scores) -> dS of ``scale * q.k``; the biased score's gradient into
    ``dbias`` when there is one.  The unmodified base-2 scores are in ``dp``'s right half."""
    mods = geo[6]
    cap, dbias = mods[1], mods[3]
    inv_cap2 = like(1.0 / (cap * LOG2E) if cap > 0 else 0.0, dp)
    one = like(1.0, dp)
    half = dp.shape[1] // 2
    for r in range(m):
        hh, i = _row_position(geo, h, i0 + r)
        g = dp[r, :n]
        raw = dp[r, half : half + n]
        _score_mod_slopes(mods[5], mods, geo, raw, g, n, b, hh, i, j0)
        if dbias.shape[0] > 0:
            drow = dbias[b, hh, i]
            for col in range(n):
                drow[_key(geo, j0 + col)] = g[col]
        if cap > 0:
            for col in range(n):
                t = _tanh(raw[col] * inv_cap2)
                g[col] *= one - t * t


def modify_scores(geo, s, m, n, b, h, i0, j0):
    """Apply ``geo``'s score modifications to the base-2 score tile ``s[:m, :n]`` (compiled code only)."""
    raise TypeError("compiled code only")


@overload(modify_scores, inline="always")
def _modify_scores_overload(geo, s, m, n, b, h, i0, j0):
    if isinstance(geo.types[6], types.NoneType):
        return lambda geo, s, m, n, b, h, i0, j0: None
    return lambda geo, s, m, n, b, h, i0, j0: _modify(geo, s, m, n, b, h, i0, j0, s[:, :0])


def modify_scores_keeping(geo, s, dp, m, n, b, h, i0, j0):
    """:func:`modify_scores`, keeping the unmodified tile in ``dp``'s right half (the backward)."""
    raise TypeError("compiled code only")


@overload(modify_scores_keeping, inline="always")
def _modify_scores_keeping_overload(geo, s, dp, m, n, b, h, i0, j0):
    if isinstance(geo.types[6], types.NoneType):
        return lambda geo, s, dp, m, n, b, h, i0, j0: None
    return lambda geo, s, dp, m, n, b, h, i0, j0: _modify(geo, s, m, n, b, h, i0, j0, dp)


def score_grads(geo, dp, m, n, b, h, i0, j0):
    """Carry the final scores' gradients ``dp[:m, :n]`` back through ``geo``'s modifications (compiled code only)."""
    raise TypeError("compiled code only")


@overload(score_grads, inline="always")
def _score_grads_overload(geo, dp, m, n, b, h, i0, j0):
    if isinstance(geo.types[6], types.NoneType):
        return lambda geo, dp, m, n, b, h, i0, j0: None
    return lambda geo, dp, m, n, b, h, i0, j0: _carry_back(geo, dp, m, n, b, h, i0, j0)


def scratch_width(mods, keys):
    """Columns of the backward's ``dp`` tile for ``keys`` keys: twice as many with modifications."""
    raise TypeError("compiled code only")


@overload(scratch_width, inline="always")
def _scratch_width_overload(mods, keys):
    if isinstance(mods, types.NoneType):
        return lambda mods, keys: keys
    return lambda mods, keys: 2 * keys

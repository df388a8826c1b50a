"""Scalar math for numba loops that LLVM can vectorise: ``exp2`` and ``maxnum``.

numba's ``np.exp`` on a scalar is a call into libm unless llvmlite was built
with Intel SVML, which the PyPI wheels are not; a call per attention score costs
as much as the matrix products.  :func:`exp2_f32` is a branch-free polynomial
(range reduction ``x = n + f``, ``|f| <= 1/2``, degree-6 fit of ``2**f``,
``2**n`` built from the exponent bits) whose relative error is below 1.2e-7,
i.e. float32 rounding.  Arguments below -126.5 give exactly 0 (denormal
results only for ``-126.5 <= x < -126``), from 127.5 on infinity; NaN gives
NaN.  :func:`exp2_f64` keeps full float64 accuracy through libm.

A running maximum written with ``max`` or a conditional does not vectorise:
numba puts no fast-math flags on the ``select`` LLVM needs to recognise a
max-reduction.  :func:`maxnum` emits ``llvm.maxnum`` (NaN-ignoring), which
LLVM turns into packed ``vmaxps`` reductions.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload

_C1 = np.float32(0.6931471824645996)
_C2 = np.float32(0.24022646248340607)
_C3 = np.float32(0.05550329014658928)
_C4 = np.float32(0.009618519805371761)
_C5 = np.float32(0.0013399859890341759)
_C6 = np.float32(0.00015337577497120947)
_LOWEST = np.float32(-127.0)
_HIGHEST = np.float32(128.0)
_ONE = np.float32(1.0)


@intrinsic
def _int32_bits_as_float32(typingctx, bits):
    """Reinterpret the bits of an int32 as a float32 (an LLVM bitcast)."""
    sig = types.float32(types.int32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return sig, codegen


@njit(fastmath={"contract", "arcp", "nsz"})
def exp2_f32(x):
    """``2**x`` in float32 (vectorisable; relative error < 1.2e-7).

    Thirteen vector operations: clamp to ``[-127, 128]`` (``-127`` gives a
    zero exponent field, so 0; ``128`` an all-ones one, so infinity; the
    comparisons are written so that NaN passes: ``vmaxps(-127, x)``,
    ``vminps(128, x)``), round to nearest, six multiply-adds, and ``2**n``
    built from its bits.
    """
    x = _LOWEST if _LOWEST > x else x
    x = _HIGHEST if x > _HIGHEST else x
    n = np.rint(x)
    f = x - n
    p = _C6 * f + _C5
    p = p * f + _C4
    p = p * f + _C3
    p = p * f + _C2
    p = p * f + _C1
    p = p * f + _ONE
    scale = _int32_bits_as_float32((np.int32(n) + np.int32(127)) << np.int32(23))
    return p * scale


@njit
def exp2_f64(x):
    """``2**x`` in float64 through libm."""
    return np.exp2(x)


def exp2(x):
    """``2**x`` for a float32 or float64 scalar (dispatches on the type in jitted code)."""
    return np.exp2(x)


@overload(exp2, inline="always")
def _exp2_overload(x):
    if x == types.float32:
        return lambda x: exp2_f32(x)
    return lambda x: exp2_f64(x)


@intrinsic
def maxnum(typingctx, a, b):
    """``max(a, b)`` ignoring NaN (LLVM ``maxnum``); vectorises in reductions."""
    sig = a(a, b)

    def codegen(context, builder, signature, args):
        fty = context.get_value_type(signature.args[0])
        fn = builder.module.declare_intrinsic("llvm.maxnum", [fty], ir.FunctionType(fty, [fty, fty]))
        other = context.cast(builder, args[1], signature.args[1], signature.args[0])
        return builder.call(fn, [args[0], other], fastmath=("nnan", "nsz"))

    return sig, codegen

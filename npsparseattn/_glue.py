"""From a validated problem to a backend's kernel arguments and back: written once for every operation.

The kernels of a backend read its compute dtype
(:meth:`~npsparseattn._dispatch.Implementation.compute_dtype`) and either any
row-strided array (``STRIDED_ROWS``: unit stride on the last axis, rows apart
by at least a row, non-negative strides that are whole items) or C-contiguous
arrays; :func:`kernel_array` copies an input only when it must.  Results come
back in the compute dtype and are cast to the input dtype (``lse`` to
float32, float64 for float64 inputs) by :func:`cast_outputs` and
:func:`cast_grads`; the public functions then restore the caller's axes.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from npsparseattn._arrays import array_module, common_kind
from npsparseattn._dispatch import Implementation
from npsparseattn._dtypes import lse_dtype


def rows_readable(x: Any) -> bool:
    """True if ``x`` can be read in place as rows: unit last-axis stride, whole-item strides, rows apart.

    "Rows apart" is BLAS's rule for a leading dimension (at least the row
    length), checked even for a single row: BLAS refuses a smaller one.
    """
    item = x.itemsize
    strides = x.strides
    if any(s < 0 or s % item for s in strides):
        return False
    if x.shape[-1] > 1 and strides[-1] != item:
        return False
    return strides[-2] >= x.shape[-1] * item


def kernel_array(x: Any, dtype: Any, strided_rows: bool) -> Any:
    """``x`` as ``dtype`` (native byte order), copied only when the backend cannot read it in place."""
    xp = array_module(common_kind(x=x))
    x = x.astype(np.dtype(dtype).newbyteorder("="), copy=False)
    if strided_rows and rows_readable(x):
        return x
    if x.flags.c_contiguous and all(s >= 0 for s in x.strides) and (x.ndim < 2 or rows_readable(x)):
        return x
    # a fresh C-ordered copy: ascontiguousarray may keep odd strides on axes of length 1
    return xp.array(x, order="C", copy=True)


def kernel_inputs(impl: Implementation, dtype: Any, *arrays: Any) -> list[Any]:
    """``arrays`` as ``impl``'s kernels read them for a problem of input ``dtype``."""
    compute = impl.compute_dtype(dtype)
    return [kernel_array(x, compute, impl.strided_rows) for x in arrays]


def kernel_lse(impl: Implementation, dtype: Any, lse: Any) -> Any:
    """The forward's ``lse`` as the backward kernels read it: float32 (float64 for float64), C-contiguous."""
    xp = array_module(common_kind(lse=lse))
    return xp.ascontiguousarray(lse, dtype=lse_dtype(impl.compute_dtype(dtype)))


def cast_outputs(dtype: Any, out: Any, lse: Any) -> tuple[Any, Any]:
    """``out`` in the input ``dtype``, ``lse`` in float32 (float64 for float64 inputs)."""
    return out.astype(dtype, copy=False), lse.astype(lse_dtype(dtype), copy=False)


def cast_grads(dtype: Any, grads: Any) -> tuple[Any, ...]:
    """Gradients in the input ``dtype``."""
    return tuple(g.astype(dtype, copy=False) for g in grads)

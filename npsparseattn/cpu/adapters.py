"""Glue between validated problems and the numba kernels.

The kernels take float32/float64 arrays whose last axis has unit stride and
whose rows do not overlap; :func:`kernel_array` makes that so (float16 is
computed in float32, anything else is copied only when it must be).
"""

from __future__ import annotations

import numpy as np

from npsparseattn._checks import AttentionProblem, Gradients
from npsparseattn.cpu import attention as dense


def compute_dtype(dtype: np.dtype) -> np.dtype:
    """float64 stays float64; float16 and float32 compute in float32."""
    return np.dtype(np.float64) if dtype == np.float64 else np.dtype(np.float32)


def kernel_array(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``x`` as ``dtype`` with unit last-axis stride and non-overlapping, non-negative row strides."""
    x = x.astype(dtype, copy=False)
    item = x.itemsize
    rows_ok = x.shape[-2] <= 1 or x.strides[-2] >= x.shape[-1] * item
    if x.strides[-1] != item or not rows_ok or any(s < 0 for s in x.strides):
        x = np.ascontiguousarray(x)
    return x


def kernel_inputs(problem: AttentionProblem) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``q``, ``k``, ``v`` of a problem ready for the kernels (see :func:`kernel_array`)."""
    dt = compute_dtype(problem.dtype)
    return kernel_array(problem.q, dt), kernel_array(problem.k, dt), kernel_array(problem.v, dt)


def attention_forward(problem: AttentionProblem) -> tuple[np.ndarray, np.ndarray]:
    """``(out, lse)`` in canonical form: out in the input dtype, lse float32/float64."""
    q, k, v = kernel_inputs(problem)
    out, lse = dense.forward(
        q, k, v, scale=problem.scale, offset=problem.offset, left=problem.left, right=problem.right
    )
    return out.astype(problem.dtype, copy=False), lse


def attention_backward(problem: AttentionProblem, grads: Gradients) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(dq, dk, dv)`` in canonical form and the input dtype."""
    q, k, v = kernel_inputs(problem)
    dt = q.dtype
    dq, dk, dv = dense.backward(
        kernel_array(grads.dout, dt),
        q,
        k,
        v,
        kernel_array(grads.out, dt),
        np.ascontiguousarray(grads.lse, dtype=dt),
        scale=problem.scale,
        offset=problem.offset,
        left=problem.left,
        right=problem.right,
    )
    return tuple(x.astype(problem.dtype, copy=False) for x in (dq, dk, dv))

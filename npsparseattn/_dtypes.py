"""The dtype rules of every operation, in one place.

* Inputs: :data:`FLOAT_DTYPES` (a backend narrows this list with its own
  ``DTYPES``).
* Outputs (``out``, gradients) have the input dtype.
* ``lse`` is float32, float64 for float64 inputs (:func:`lse_dtype`).
* Accumulation is in float32, float64 for float64 inputs.  What a kernel
  *reads* is its backend's choice (:func:`compute_dtype` is the default:
  float16 and bfloat16 are widened to float32 once, up front; GPU backends
  keep half-precision storage and widen in registers).
"""

from __future__ import annotations

from typing import Any

import numpy as np

FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


def lse_dtype(dtype: Any) -> np.dtype:
    """float64 for float64 inputs, float32 otherwise."""
    return np.dtype(np.float64) if np.dtype(dtype).name == "float64" else np.dtype(np.float32)


def compute_dtype(dtype: Any) -> np.dtype:
    """The default kernel input dtype: float64 stays float64, everything narrower is read as float32."""
    return lse_dtype(dtype)

"""npsparseattn: exact and sparse attention kernels for NumPy and CuPy arrays.

Public API
----------
attention, attention_backward
    Tiled exact attention (online softmax, O(L) memory), forward and backward.
available_backends
    Which implementations exist for an operation and why one can't run here.
reference
    Dense float64 oracle (module).
"""

from __future__ import annotations

from npsparseattn import cpu as _cpu  # noqa: F401  (registers the numba backend)
from npsparseattn import reference
from npsparseattn._dispatch import BackendError, implementations
from npsparseattn.exact import attention, attention_backward

__version__ = "0.1.0"


def available_backends(op: str = "attention") -> list[str]:
    """Names of the implementations registered for ``op``, in auto-selection order.

    >>> available_backends("attention")
    ['numba', 'reference']
    """
    return [impl.name for impl in implementations(op)]


__all__ = [
    "BackendError",
    "__version__",
    "attention",
    "attention_backward",
    "available_backends",
    "reference",
]

"""Array kinds: which array module an input belongs to, without importing CuPy.

An array is recognised as CuPy only if the ``cupy`` module is already in
``sys.modules`` (the array-api-compat habit): whoever holds a CuPy array has
imported CuPy, and everyone else never pays for the import.  This module is
the bottom of the import chain: argument checks, problems, backends and the
registry all build on it.
"""

from __future__ import annotations

import sys
from types import ModuleType
from typing import Any

import numpy as np

KIND_NAMES = {"numpy": "NumPy", "cupy": "CuPy"}


def is_cupy_array(x: Any) -> bool:
    """True for a ``cupy.ndarray``, without importing CuPy."""
    cupy = sys.modules.get("cupy")
    return cupy is not None and isinstance(x, cupy.ndarray)


def array_kind(x: Any, name: str) -> str:
    """``"numpy"`` or ``"cupy"``; ``TypeError`` naming ``name`` for anything else."""
    if isinstance(x, np.ndarray):
        return "numpy"
    if is_cupy_array(x):
        return "cupy"
    raise TypeError(f"{name} must be a NumPy or CuPy array, got {type(x).__module__}.{type(x).__qualname__}")


def common_kind(**arrays: Any) -> str:
    """The array kind shared by all ``arrays``; ``TypeError`` naming two that differ."""
    kinds = {name: array_kind(x, name) for name, x in arrays.items()}
    first_name, first_kind = next(iter(kinds.items()))
    for name, kind in kinds.items():
        if kind != first_kind:
            raise TypeError(
                f"{first_name} is a {KIND_NAMES[first_kind]} array but {name} is a "
                f"{KIND_NAMES[kind]} array; pass all arrays as NumPy (CPU) or all as CuPy (GPU)"
            )
    return first_kind


def array_module(kind: str) -> ModuleType:
    """The array module (``numpy`` or ``cupy``) for an array kind."""
    if kind == "cupy":
        import cupy

        return cupy
    return np

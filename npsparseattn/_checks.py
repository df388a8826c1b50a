"""Argument validation rules shared by every public function.

Every rule is one small function that raises ``TypeError`` (wrong kind of
thing) or ``ValueError`` (right kind, wrong value) with a message naming the
argument, the value it got and what was expected.  Nothing is computed or
written before all rules pass.

These rules know nothing about attention: the problem types
(:mod:`npsparseattn.problems`) combine them into the canonical form of each
operation.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np

from npsparseattn._dtypes import lse_dtype


def is_int(value: Any) -> bool:
    """True for a Python or NumPy integer that is not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def check_int(value: Any, name: str, minimum: int) -> int:
    """``value`` is an int (not a bool) and at least ``minimum``."""
    if not is_int(value):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_flag(value: Any, name: str) -> bool:
    """``value`` must be a Python or NumPy bool."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return bool(value)


LOG2E = 1.4426950408889634


def check_scale(scale: Any, head_dim: int, dtype: Any) -> float:
    """``None`` (``1/sqrt(D)``) or a finite real number whose base-2 score factor fits ``dtype``.

    Kernels multiply scores by ``scale * log2(e)`` in the accumulation dtype
    (float32 for every input narrower than float64), so that product must be
    finite there.  ``dtype`` is the inputs' dtype; every operation with a
    ``scale`` passes it (it has no default, so none can skip the rule).
    """
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, (bool, np.bool_)) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a real number or None, got {scale!r}")
    value = float(scale)
    if not math.isfinite(value):
        raise ValueError(f"scale must be finite, got {value}")
    accumulate = np.dtype(np.float64 if np.dtype(dtype).name == "float64" else np.float32)
    largest = float(np.finfo(accumulate).max)
    if abs(value) * LOG2E > largest:
        raise ValueError(
            f"scale={value:g} is too large for {np.dtype(dtype).name} inputs: scores are accumulated in "
            f"{accumulate.name}, where scale * log2(e) must stay below {largest:.3g}"
        )
    return value


UNBOUNDED_FROM = 1 << 40  # a window bound this large reaches past any sequence an array can hold


def _window_side(value: Any, side: str) -> int | None:
    if value is None:
        return None
    if not is_int(value):
        raise TypeError(f"window {side} bound must be a non-negative int or None, got {value!r}")
    if value < 0:
        raise ValueError(f"window {side} bound must be >= 0 (None for unbounded), got {value}")
    return None if value >= UNBOUNDED_FROM else int(value)


def check_window(window: Any, causal: bool) -> tuple[int | None, int | None]:
    """``None`` or a pair ``(left, right)`` -> ``(left, right)`` with causal folded in.

    ``causal=True`` caps the right bound at 0 (query ``i`` sees no key after
    ``i + Lk - Lq``).  A bound of ``2**40`` or more means unbounded and
    becomes ``None`` (``sys.maxsize`` is a common way to say "no limit").
    """
    if window is None:
        left = right = None
    else:
        if not isinstance(window, (tuple, list)) or len(window) != 2:
            raise TypeError(f"window must be None or a pair (left, right) as a tuple or list, got {window!r}")
        left, right = _window_side(window[0], "left"), _window_side(window[1], "right")
    if causal:
        right = 0
    return left, right


def clamp_window(left: int | None, right: int | None, seq_q: int, seq_k: int, offset: int) -> tuple[Any, Any]:
    """Window bounds no larger than needed to be unbounded for ``seq_q`` queries, ``seq_k`` keys and ``offset``.

    Query ``i`` sees keys ``i + offset - left .. i + offset + right``; a bound
    of ``seq_q + seq_k + |offset|`` already reaches every key, so larger ones
    are cut to it (the kernels then never add huge integers).

    >>> clamp_window(10**12, None, 4, 6, 2)
    (12, None)
    """
    limit = seq_q + seq_k + abs(offset)
    return (None if left is None else min(left, limit)), (None if right is None else min(right, limit))


def check_lse(lse: Any, shape: tuple[int, ...], dtype: Any) -> Any:
    """``lse`` handed to a backward has the forward's shape and dtype: float32, float64 for float64 inputs.

    A float32 ``lse`` for float64 inputs is refused rather than silently
    costing seven digits of the gradients (``docs/conventions.md``).
    """
    if tuple(lse.shape) != tuple(shape):
        raise ValueError(f"lse must have shape {tuple(shape)}, got {tuple(lse.shape)}")
    expected = lse_dtype(dtype)
    if lse.dtype.name != expected.name:
        raise TypeError(
            f"lse has dtype {lse.dtype.name}; expected {expected.name}, the dtype of the forward's lse for "
            f"{np.dtype(dtype).name} inputs"
        )
    return lse


def check_dtypes(arrays: dict[str, Any], allowed: tuple[str, ...]) -> np.dtype:
    """All arrays share one dtype from ``allowed`` (byte order aside); returns it in native byte order."""
    names = list(arrays)
    first = arrays[names[0]].dtype
    for name in names:
        dt = arrays[name].dtype
        if dt.name not in allowed:
            raise TypeError(f"{name} has dtype {dt.name}; expected one of {', '.join(allowed)}")
        if dt.name != first.name:
            raise TypeError(f"{names[0]} has dtype {first.name} but {name} has dtype {dt.name}; they must match")
    return native(first)


def native(dtype: Any) -> np.dtype:
    """``dtype`` in the machine's byte order (a big-endian float64 is computed and returned as float64)."""
    dtype = np.dtype(dtype)
    return dtype if dtype.isnative else dtype.newbyteorder("=")


def check_ndim(arrays: dict[str, Any]) -> int:
    """Each array has at least 2 axes and all have the same number."""
    ndims = {name: x.ndim for name, x in arrays.items()}
    for name, x in arrays.items():
        if x.ndim < 2:
            raise ValueError(f"{name} must have at least 2 axes (L, D), got shape {tuple(x.shape)}")
    names = list(arrays)
    for name in names[1:]:
        if ndims[name] != ndims[names[0]]:
            raise ValueError(
                f"{names[0]} has {ndims[names[0]]} axes (shape {tuple(arrays[names[0]].shape)}) but {name} "
                f"has {ndims[name]} (shape {tuple(arrays[name].shape)}); they must match"
            )
    return ndims[names[0]]


def check_backend(backend: Any) -> str:
    """``backend`` is a string (the registry checks the name)."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string such as 'auto' or 'numba', got {backend!r}")
    return backend


def to_4d(x: Any) -> Any:
    """(L, D) -> (1, 1, L, D); (H, L, D) -> (1, H, L, D); (*b, H, L, D) -> (prod b, H, L, D)."""
    if x.ndim == 2:
        return x[None, None]
    if x.ndim == 3:
        return x[None]
    return x.reshape((math.prod(x.shape[:-3]),) + tuple(x.shape[-3:]))

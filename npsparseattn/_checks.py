"""Argument validation and the canonical 4-D form of attention inputs.

Every rule is one small function that raises ``TypeError`` (wrong kind of
thing) or ``ValueError`` (right kind, wrong value) with a message naming the
argument, the value it got and what was expected.  Nothing is computed or
written before all rules pass.

Canonical form: ``q`` (B, Hq, Lq, D), ``k`` (B, Hk, Lk, D), ``v`` (B, Hk, Lk, Dv)
where ``B`` flattens the leading batch axes; 2-D ``(L, D)`` and 3-D
``(H, L, D)`` inputs get unit axes.  :meth:`AttentionProblem.restore` maps
results back to the caller's layout.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

import numpy as np

from npsparseattn._dispatch import common_kind

FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


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


def check_scale(scale: Any, head_dim: int) -> float:
    """``None`` (``1/sqrt(D)``) or a finite real number."""
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, (bool, np.bool_)) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a real number or None, got {scale!r}")
    value = float(scale)
    if not math.isfinite(value):
        raise ValueError(f"scale must be finite, got {value}")
    return value


def _window_side(value: Any, side: str) -> int | None:
    if value is None:
        return None
    if not is_int(value):
        raise TypeError(f"window {side} bound must be a non-negative int or None, got {value!r}")
    if value < 0:
        raise ValueError(f"window {side} bound must be >= 0 (None for unbounded), got {value}")
    return int(value)


def check_window(window: Any, causal: bool) -> tuple[int | None, int | None]:
    """``None`` or ``(left, right)`` -> ``(left, right)`` with causal folded in.

    ``causal=True`` caps the right bound at 0 (query ``i`` sees no key after
    ``i + Lk - Lq``).
    """
    if window is None:
        left = right = None
    else:
        if isinstance(window, (str, bytes)) or not hasattr(window, "__len__") or len(window) != 2:
            raise TypeError(f"window must be None or a pair (left, right), got {window!r}")
        left, right = _window_side(window[0], "left"), _window_side(window[1], "right")
    if causal:
        right = 0
    return left, right


def check_dtypes(arrays: dict[str, Any], allowed: tuple[str, ...] = FLOAT_DTYPES) -> np.dtype:
    """All arrays share one floating dtype from ``allowed``."""
    names = list(arrays)
    first = arrays[names[0]].dtype
    for name in names:
        dt = arrays[name].dtype
        if dt.name not in allowed:
            raise TypeError(f"{name} has dtype {dt.name}; expected one of {', '.join(allowed)}")
        if dt != first:
            raise TypeError(f"{names[0]} has dtype {first.name} but {name} has dtype {dt.name}; they must match")
    return first


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
    return x.reshape((-1,) + tuple(x.shape[-3:]))


@dataclass(frozen=True)
class AttentionProblem:
    """Validated attention inputs in canonical 4-D form, plus the options.

    ``offset`` aligns query ``i`` with key ``i + offset`` (``Lk - Lq``,
    bottom-right); ``left``/``right`` are the window bounds with causal folded
    in (``None`` = unbounded).
    """

    q: Any
    k: Any
    v: Any
    kind: str
    dtype: np.dtype
    batch_shape: tuple[int, ...]
    ndim: int
    scale: float
    causal: bool
    left: int | None
    right: int | None

    @property
    def offset(self) -> int:
        return self.k.shape[2] - self.q.shape[2]

    @property
    def n_heads(self) -> int:
        return self.q.shape[1]

    @property
    def seq_q(self) -> int:
        return self.q.shape[2]

    @property
    def seq_k(self) -> int:
        return self.k.shape[2]

    def restore(self, x: Any) -> Any:
        """Map a canonical (B, H, L, ...) result (out, lse, a gradient) back to the caller's axes."""
        tail = tuple(x.shape[2:])
        if self.ndim == 2:
            return x.reshape(tail)
        if self.ndim == 3:
            return x.reshape((x.shape[1],) + tail)
        return x.reshape(self.batch_shape + (x.shape[1],) + tail)

    def output_shape(self) -> tuple[int, ...]:
        """Shape of ``out`` in the caller's layout."""
        return self._lead() + (self.seq_q, self.v.shape[3])

    def lse_shape(self) -> tuple[int, ...]:
        """Shape of ``lse`` in the caller's layout."""
        return self._lead() + (self.seq_q,)

    def _lead(self) -> tuple[int, ...]:
        if self.ndim == 2:
            return ()
        if self.ndim == 3:
            return (self.n_heads,)
        return self.batch_shape + (self.n_heads,)


def attention_problem(
    q: Any,
    k: Any,
    v: Any,
    *,
    causal: Any = False,
    window: Any = None,
    scale: Any = None,
) -> AttentionProblem:
    """Validate ``q``, ``k``, ``v`` and options; see DESIGN.md section 3 for the rules."""
    arrays = {"q": q, "k": k, "v": v}
    kind = common_kind(**arrays)
    ndim = check_ndim(arrays)
    dtype = check_dtypes(arrays)
    if q.shape[:-3] != k.shape[:-3] or q.shape[:-3] != v.shape[:-3]:
        raise ValueError(
            f"batch axes must match: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} "
            f"(leading axes before (H, L, D))"
        )
    if k.shape[:-1] != v.shape[:-1]:
        raise ValueError(
            f"k and v must have the same heads and length: k {tuple(k.shape)} vs v {tuple(v.shape)} "
            f"(only the last axis, Dv, may differ)"
        )
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k must have the same last axis D: q {tuple(q.shape)} vs k {tuple(k.shape)}")
    if q.shape[-1] < 1 or v.shape[-1] < 1:
        raise ValueError(f"head dimensions must be >= 1: q {tuple(q.shape)}, v {tuple(v.shape)}")
    if ndim >= 3:
        hq, hk = q.shape[-3], k.shape[-3]
        if hk < 1 or hq % hk != 0:
            raise ValueError(
                f"query heads ({hq}) must be a multiple of key/value heads ({hk}) for grouped-query attention"
            )
    causal = check_flag(causal, "causal")
    left, right = check_window(window, causal)
    scale = check_scale(scale, q.shape[-1])
    return AttentionProblem(
        q=to_4d(q),
        k=to_4d(k),
        v=to_4d(v),
        kind=kind,
        dtype=dtype,
        batch_shape=tuple(q.shape[:-3]),
        ndim=ndim,
        scale=scale,
        causal=causal,
        left=left,
        right=right,
    )


@dataclass(frozen=True)
class Gradients:
    """Validated backward inputs in canonical form: dout/out (B, Hq, Lq, Dv), lse (B, Hq, Lq)."""

    dout: Any
    out: Any
    lse: Any


def output_like(problem: AttentionProblem, x: Any, name: str) -> Any:
    """Check that ``x`` is shaped and typed like the forward output; return it as (B, Hq, Lq, Dv)."""
    common_kind(q=problem.q, **{name: x})
    expected = problem.output_shape()
    if tuple(x.shape) != expected:
        raise ValueError(f"{name} must have shape {expected} (like the forward output), got {tuple(x.shape)}")
    if x.dtype != problem.dtype:
        raise TypeError(f"{name} has dtype {x.dtype.name}; expected {problem.dtype.name} like q")
    return x.reshape(problem.q.shape[:2] + tuple(x.shape[-2:]))


def gradient_inputs(problem: AttentionProblem, dout: Any, out: Any, lse: Any) -> Gradients:
    """Check ``dout``, ``out``, ``lse`` against the forward problem they belong to."""
    dout4 = output_like(problem, dout, "dout")
    out4 = output_like(problem, out, "out")
    common_kind(q=problem.q, lse=lse)
    if tuple(lse.shape) != problem.lse_shape():
        raise ValueError(f"lse must have shape {problem.lse_shape()}, got {tuple(lse.shape)}")
    if lse.dtype.name not in ("float32", "float64"):
        raise TypeError(f"lse has dtype {lse.dtype.name}; expected float32 or float64")
    return Gradients(dout=dout4, out=out4, lse=lse.reshape(problem.q.shape[:3]))

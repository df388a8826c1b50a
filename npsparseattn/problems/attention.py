"""The canonical exact-attention problem: validated ``q``, ``k``, ``v`` as 4-D arrays plus the visibility rule.

Canonical form: ``q`` (B, Hq, Lq, D), ``k`` (B, Hk, Lk, D), ``v`` (B, Hk, Lk, Dv)
where ``B`` flattens the leading batch axes; 2-D ``(L, D)`` and 3-D
``(H, L, D)`` inputs get unit axes.  :meth:`AttentionProblem.restore` maps
results back to the caller's axes.  The conventions (bottom-right causal
alignment, windows, empty rows, GQA) are those of ``docs/conventions.md``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from npsparseattn._arrays import common_kind
from npsparseattn._checks import (
    check_dtypes,
    check_flag,
    check_lse,
    check_ndim,
    check_scale,
    check_window,
    clamp_window,
    to_4d,
)
from npsparseattn._dtypes import FLOAT_DTYPES


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
    mods: Any = None  # a ScoreMods (problems/scores.py) or None

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

    def visibility(self) -> dict[str, Any]:
        """The keywords of the kernel contract: ``scale``, ``offset``, ``left``, ``right`` (and ``mods`` if any)."""
        extra = {} if self.mods is None else {"mods": self.mods}
        return dict(scale=self.scale, offset=self.offset, left=self.left, right=self.right, **extra)

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
    clamp: bool = True,
) -> AttentionProblem:
    """Validate ``q``, ``k``, ``v`` and options into an :class:`AttentionProblem` (rules: ``docs/conventions.md``).

    ``clamp`` cuts window bounds longer than these sequences to the length
    that already reaches every key (:func:`~npsparseattn._checks.clamp_window`);
    ring attention passes ``False``, its bounds being in global positions.
    """
    arrays = {"q": q, "k": k, "v": v}
    kind = common_kind(**arrays)
    ndim = check_ndim(arrays)
    dtype = check_dtypes(arrays, FLOAT_DTYPES)
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
    if clamp:
        seq_q, seq_k = q.shape[-2], k.shape[-2]
        left, right = clamp_window(left, right, seq_q, seq_k, seq_k - seq_q)
    scale = check_scale(scale, q.shape[-1], dtype)
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
    if x.dtype.name != problem.dtype.name:
        raise TypeError(f"{name} has dtype {x.dtype.name}; expected {problem.dtype.name} like q")
    return x.reshape(problem.q.shape[:2] + tuple(x.shape[-2:]))


def gradient_inputs(problem: AttentionProblem, dout: Any, out: Any, lse: Any) -> Gradients:
    """Check ``dout``, ``out``, ``lse`` against the forward problem they belong to."""
    dout4 = output_like(problem, dout, "dout")
    out4 = output_like(problem, out, "out")
    common_kind(q=problem.q, lse=lse)
    check_lse(lse, problem.lse_shape(), problem.dtype)
    return Gradients(dout=dout4, out=out4, lse=lse.reshape(problem.q.shape[:3]))

"""Score modifications of exact attention: ALiBi, softcap, an additive bias, user ``score_mod``/``mask_mod``.

The score of query ``i`` and key ``j`` (batch ``b``, query head ``h``,
``offset = Lk - Lq``) is built in this order, then masked by
``causal``/``window`` and softmaxed::

    x = scale * q[b, h, i] . k[b, g(h), j]
    x = softcap * tanh(x / softcap)                 softcap
    x = x - slopes[b, h] * |i + offset - j|         alibi_slopes
    x = x + bias[b, h, i, j]                        bias
    x = score_mod(x, b, h, i, j)                    score_mod
    x = -inf unless mask_mod(b, h, i, j)            mask_mod

(flash-attn's meanings for ALiBi and softcap; FlexAttention's for
``score_mod``/``mask_mod``, with ``q_idx``/``kv_idx`` counted from 0 in the
call's own sequences).  ``lse`` is that of the final scores.  The backward
carries ``dS`` (the gradient of the final score) back through the chain:
``d bias = dS * score_mod'(x)``, and the gradient of ``scale * q.k`` is
``d bias * (1 - tanh^2)`` under a softcap.  A ``score_mod`` is differentiable
only with its derivative ``score_mod_grad(x, b, h, i, j) = d score_mod / d x``.

:class:`ScoreMods` is the validated, canonical form a backend's kernels take
(``mods=`` of the ``attention`` kernel contract); ``FEATURES`` names what a
backend module may declare in its ``SCORE_MODS``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from npsparseattn._arrays import array_module, common_kind
from npsparseattn._dtypes import FLOAT_DTYPES

__all__ = [
    "FEATURES",
    "ScoreMods",
    "backward_extras",
    "bias_grad_buffer",
    "check_backward_mods",
    "score_mods",
    "with_bias_grad",
    "with_score_mods",
]

FEATURES = ("alibi_slopes", "softcap", "bias", "score_mod", "mask_mod")


@dataclass(frozen=True)
class ScoreMods:
    """Validated score modifications for one canonical (B, Hq, Lq, Lk) problem.

    ``slopes`` (B, Hq) float64 on q's device or ``None``; ``softcap`` a
    positive float or ``None``; ``bias`` the caller's array (its own shape
    ``bias_shape``, broadcastable to the caller's ``(*batch, Hq, Lq, Lk)``)
    or ``None``; the functions or ``None``.
    """

    slopes: Any
    softcap: float | None
    bias: Any
    target: tuple[int, ...]
    score_mod: Callable[..., Any] | None
    score_mod_grad: Callable[..., Any] | None
    mask_mod: Callable[..., Any] | None

    def features(self) -> tuple[str, ...]:
        """The modifications in use, named as in :data:`FEATURES`."""
        values = (self.slopes, self.softcap, self.bias, self.score_mod, self.mask_mod)
        return tuple(name for name, value in zip(FEATURES, values, strict=True) if value is not None)

    def canonical_bias(self, dtype: Any, shape: tuple[int, int, int, int]) -> Any:
        """``bias`` in ``dtype`` as a (B, Hq, Lq, Lk) view ``shape`` (broadcast axes have stride 0).

        The dtype is converted on the caller's array before broadcasting (no
        copy of the broadcast); several batch axes are merged, which copies
        only when their strides cannot be merged.
        """
        xp = array_module(common_kind(bias=self.bias))
        small = self.bias.astype(dtype, copy=False)
        return xp.broadcast_to(small, self.target).reshape(shape)

    def reduce_bias_grad(self, full: Any) -> Any:
        """The gradient of ``bias`` from ``full`` (B, Hq, Lq, Lk): summed over the axes ``bias`` broadcast along."""
        g = full.reshape(self.target)
        shape = tuple(self.bias.shape)
        lead = len(self.target) - len(shape)
        axes = tuple(range(lead)) + tuple(
            lead + a for a, n in enumerate(shape) if n == 1 and self.target[lead + a] != 1
        )
        if axes:
            g = g.sum(axis=axes, keepdims=True)
        return g.reshape(shape).astype(self.bias.dtype, copy=False)


def _check_function(fn: Any, name: str) -> Callable[..., Any] | None:
    if fn is not None and not callable(fn):
        raise TypeError(f"{name} must be a function (a numba.njit function for the compiled kernels), got {fn!r}")
    return fn


def _check_softcap(softcap: Any) -> float | None:
    if softcap is None:
        return None
    if isinstance(softcap, (bool, np.bool_)) or not isinstance(softcap, numbers.Real):
        raise TypeError(f"softcap must be a positive real number, 0 or None, got {softcap!r}")
    value = float(softcap)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"softcap must be a finite number >= 0 (0 or None: off), got {softcap!r}")
    return value or None


def _lead(q_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The caller's ``(*batch, Hq)`` axes (``()`` for 2-D inputs)."""
    return tuple(q_shape[:-2])


def _check_slopes(slopes: Any, kind: str, q_shape: tuple[int, ...], n_batch: int, n_heads: int) -> Any:
    if slopes is None:
        return None
    if common_kind(alibi_slopes=slopes) != kind:
        raise TypeError(f"alibi_slopes must be the same kind of array as q ({kind})")
    lead = _lead(q_shape) or (1,)
    if slopes.dtype.kind != "f":
        raise TypeError(f"alibi_slopes must be a float array, got dtype {slopes.dtype}")
    if slopes.ndim < 1 or slopes.shape[-1] != lead[-1]:
        raise ValueError(f"alibi_slopes must have shape (Hq,) or (*batch, Hq) = {lead}, got {tuple(slopes.shape)}")
    try:
        full = array_module(kind).broadcast_to(slopes, lead)
    except ValueError:
        raise ValueError(f"alibi_slopes of shape {tuple(slopes.shape)} does not broadcast to {lead}") from None
    out = full.astype(np.float64).reshape(n_batch, n_heads).copy()
    if not bool(array_module(kind).isfinite(out).all()):
        raise ValueError("alibi_slopes must be finite")
    return out


def _check_bias(bias: Any, kind: str, target: tuple[int, ...]) -> Any:
    if bias is None:
        return None
    if common_kind(bias=bias) != kind:
        raise TypeError(f"bias must be the same kind of array as q ({kind})")
    if bias.dtype.name not in FLOAT_DTYPES:
        raise TypeError(f"bias must have a float dtype ({', '.join(FLOAT_DTYPES)}), got {bias.dtype}")
    try:
        shape = np.broadcast_shapes(tuple(bias.shape), target)
    except ValueError:
        shape = None
    if shape != target:
        raise ValueError(f"bias of shape {tuple(bias.shape)} does not broadcast to (*batch, Hq, Lq, Lk) = {target}")
    return bias


def score_mods(
    problem: Any,
    *,
    alibi_slopes: Any = None,
    softcap: Any = None,
    bias: Any = None,
    score_mod: Any = None,
    score_mod_grad: Any = None,
    mask_mod: Any = None,
) -> ScoreMods | None:
    """Validate the score modifications of an attention ``problem``; ``None`` when there are none."""
    if score_mod_grad is not None and score_mod is None:
        raise ValueError("score_mod_grad is the derivative of a score_mod; pass score_mod too")
    n_batch, n_heads, seq_q = problem.q.shape[:3]
    seq_k = problem.k.shape[2]
    target = _lead(problem.output_shape()) + (seq_q, seq_k)
    q_shape = problem.output_shape()
    mods = ScoreMods(
        slopes=_check_slopes(alibi_slopes, problem.kind, q_shape, n_batch, n_heads),
        softcap=_check_softcap(softcap),
        bias=_check_bias(bias, problem.kind, target),
        target=target,
        score_mod=_check_function(score_mod, "score_mod"),
        score_mod_grad=_check_function(score_mod_grad, "score_mod_grad"),
        mask_mod=_check_function(mask_mod, "mask_mod"),
    )
    return mods if mods.features() else None


def check_backward_mods(mods: ScoreMods | None) -> None:
    """A backward through ``score_mod`` needs its derivative."""
    if mods is not None and mods.score_mod is not None and mods.score_mod_grad is None:
        raise ValueError(
            "the backward through a score_mod needs its derivative: pass score_mod_grad(score, b, h, q_idx, kv_idx)"
            " = d score_mod / d score (a numba.njit function like score_mod)"
        )


def with_score_mods(problem: Any, **mods: Any) -> Any:
    """``problem`` with its validated :class:`ScoreMods` (keywords of :func:`score_mods`; ``None`` when none).

    A sparse problem (one with a ``dense`` attention problem) gets them on its dense problem.
    """
    if hasattr(problem, "dense"):
        return replace(problem, dense=with_score_mods(problem.dense, **mods))
    return replace(problem, mods=score_mods(problem, **mods))


def bias_grad_buffer(problem: Any, dtype: Any) -> Any:
    """A zero (B, Hq, Lq, Lk) ``dtype`` buffer for the kernels' ``dbias`` when ``problem`` has a bias, else ``None``."""
    dense = getattr(problem, "dense", problem)
    if dense.mods is None or dense.mods.bias is None:
        return None
    xp = array_module(dense.kind)
    return xp.zeros(dense.q.shape[:3] + (dense.k.shape[2],), dtype)


def backward_extras(dbias: Any) -> dict[str, Any]:
    """The backward kernels' extra keywords: ``dbias`` when there is a bias."""
    return {} if dbias is None else {"dbias": dbias}


def with_bias_grad(grads: tuple[Any, ...], problem: Any, dbias: Any) -> tuple[Any, ...]:
    """``grads`` (already in the caller's shapes), followed by the bias's gradient when there is a bias."""
    if dbias is None:
        return grads
    return grads + (getattr(problem, "dense", problem).mods.reduce_bias_grad(dbias),)

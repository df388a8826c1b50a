"""A user's ``score_mod``/``mask_mod`` compiled into the numba-cuda attention kernels.

numba-cuda cannot pass a function to a kernel, so the kernel factories of
:mod:`~npsparseattn.cuda.numba_cuda.attention_kernels` take a
:class:`UserFunctions` (or ``None``) and build kernels that call the user's
functions as device functions, captured at build time.  The factories cache
per :class:`UserFunctions`, so per function object: a second call with the
same functions reuses the compiled kernels, and the plain kernels
(``None``) are untouched: the user's code sits in branches on constants of
the factory that numba removes before typing when they are off.

The user passes what the CPU backend takes, ``numba.njit`` functions of
scalars (a plain Python function also works here); the same Python body is
compiled for the device (``numba.cuda.jit(device=True)`` of its ``py_func``;
the simulator calls it as Python):

* ``score_mod(score, b, h, q_idx, kv_idx) -> float`` and its derivative
  ``score_mod_grad`` (same arguments) for the backward; ``score`` is a
  float32 in natural units (the kernels convert from their base-2 units),
  the result is rounded to float32;
* ``mask_mod(b, h, q_idx, kv_idx) -> bool``: ``False`` hides the pair.

``b``, ``h`` are the caller's (unfolded) batch and query head, ``q_idx``,
``kv_idx`` count from 0 in the call's sequences (int64).  Functions that
numba-cuda cannot compile for these argument types are refused before any
launch (:func:`reasons`), with numba's message.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache
from typing import Any

from npsparseattn.cuda import _env
from npsparseattn.cuda.constants import LN2, LOG2E
from npsparseattn.cuda.numba_cuda.runtime import cuda, device_function, stand_in_device

__all__ = ["UserFunctions", "reasons", "user_functions", "user_step"]


@dataclass(frozen=True)
class UserFunctions:
    """The user's functions of one call (hashed by identity: the key of the kernel caches)."""

    score_mod: Any
    score_mod_grad: Any
    mask_mod: Any


def user_functions(mods: Any) -> UserFunctions | None:
    """The :class:`UserFunctions` of ``mods`` (a ScoreMods or None); ``None`` when it has neither function."""
    if mods is None or (mods.score_mod is None and mods.mask_mod is None):
        return None
    return UserFunctions(mods.score_mod, mods.score_mod_grad, mods.mask_mod)


def _python(fn: Any) -> Any:
    """The Python body of a numba dispatcher, or ``fn`` itself."""
    return getattr(fn, "py_func", fn)


@cache
def _device(fn: Any) -> Any:
    """``fn`` as a device function inlined into the kernels (its Python body under the simulator), one per function.

    Inlined like the kernels' own helpers: a call would keep the register
    tiles live across it, in local memory.
    """
    return None if fn is None else device_function(_python(fn))


@cache
def user_step(user: UserFunctions | None) -> Any:
    """The device function ``step(x, b, h, i, j) -> (x', g, keep)`` of ``user``'s functions (``None`` for None).

    ``x``: a visible pair's base-2 score after ALiBi, softcap and bias;
    ``x'``: after ``score_mod`` (base-2 units); ``g = score_mod'`` at the
    natural score (1 without a ``score_mod`` or its derivative); ``keep``:
    ``mask_mod`` holds and ``x'`` is not ``-inf``.
    """
    if user is None:
        return None
    from numba import float32

    score_fn, grad_fn, mask_fn = (_device(f) for f in (user.score_mod, user.score_mod_grad, user.mask_mod))
    has_score, has_grad, has_mask = score_fn is not None, grad_fn is not None, mask_fn is not None

    def step(x, b, h, i, j):
        g = float32(1.0)
        keep = True
        if has_score:
            xn = x * float32(LN2)
            if has_grad:
                g = float32(grad_fn(xn, b, h, i, j))
            x = float32(score_fn(xn, b, h, i, j)) * float32(LOG2E)
            keep = x != float32(-math.inf)
        if has_mask:
            if not mask_fn(b, h, i, j):
                keep = False
        return x, g, keep

    return device_function(step)


def _signature(name: str) -> str:
    ints = "int64, int64, int64, int64"
    return f"({ints})" if name == "mask_mod" else f"(float32, {ints})"


@cache
def _compile_reason(fn: Any, name: str) -> str | None:
    """Why numba-cuda cannot compile ``fn`` as ``name`` for the device (``None``: it can)."""
    from numba.core import types

    try:
        with stand_in_device((8, 0)):  # typing may ask for the current device: none is needed to compile
            _, result = cuda().compile_ptx(_python(fn), _signature(name), device=True, cc=(8, 0))
    except Exception as error:  # numba's typing and lowering errors have no common base
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        said = " ".join(lines[:3])[:400] or type(error).__name__
        return f"{name} {fn!r} cannot be compiled for the GPU by numba-cuda: {said}"
    wanted = (types.Boolean, types.Integer) if name == "mask_mod" else (types.Float, types.Integer)
    if not isinstance(result, wanted):
        kind = "a bool" if name == "mask_mod" else "a number"
        return f"{name} {fn!r} must return {kind} on the GPU, returns {result}"
    return None


def reasons(mods: Any) -> list[str]:
    """Why the kernels cannot take the user functions of ``mods`` (empty: they can).

    Each function is compiled once for the device (cached per function
    object); under the simulator, which runs them as Python, nothing is compiled.
    """
    user = user_functions(mods)
    if user is None or _env.simulator():
        return []
    named = (("score_mod", user.score_mod), ("score_mod_grad", user.score_mod_grad), ("mask_mod", user.mask_mod))
    return [r for name, fn in named if fn is not None for r in [_compile_reason(fn, name)] if r]

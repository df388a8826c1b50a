"""JAX adapter: :func:`attention` as a ``jax.custom_vjp``, usable under ``jax.jit``, ``grad`` and ``vmap``.

The forward and the backward are host callbacks (``jax.pure_callback``) into
:func:`npsparseattn.attention` and :func:`npsparseattn.attention_backward`:
XLA hands the callback NumPy arrays, the numba kernels run, the results come
back as arrays of the declared shapes.  On a GPU JAX copies the operands to
the host and back.  Arguments are checked when the function is traced, so a
bad shape is a clear ``ValueError`` at ``jit`` time, not an error inside XLA.
Importing this module imports JAX; importing :mod:`npsparseattn` does not.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from npsparseattn.exact import attention as _attention
from npsparseattn.exact import attention_backward as _attention_backward
from npsparseattn.problems import attention_problem, lse_dtype

__all__ = ["attention"]

Window = tuple[int | None, int | None]


def _placeholder(x: Any) -> np.ndarray:
    """A NumPy array of ``x``'s shape and dtype that holds no memory (for checking arguments at trace time)."""
    return np.broadcast_to(np.zeros((), dtype=x.dtype), x.shape)


@functools.cache
def _attention_vjp(causal: bool, window: Window | None, scale: float | None, backend: str) -> Callable[..., Any]:
    """The ``custom_vjp`` attention for one set of options (cached: one trace per set)."""
    options = dict(causal=causal, window=window, scale=scale, backend=backend)

    def host_forward(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return _attention(q, k, v, return_lse=True, **options)

    def host_backward(*arrays: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return _attention_backward(*arrays, **options)

    def call_forward(q: Any, k: Any, v: Any) -> tuple[Any, Any]:
        attention_problem(*(_placeholder(x) for x in (q, k, v)), causal=causal, window=window, scale=scale)
        shapes = (
            jax.ShapeDtypeStruct(q.shape[:-1] + v.shape[-1:], q.dtype),
            jax.ShapeDtypeStruct(q.shape[:-1], lse_dtype(q.dtype)),
        )
        return jax.pure_callback(host_forward, shapes, q, k, v, vmap_method="broadcast_all")

    @jax.custom_vjp
    def attention_vjp(q: Any, k: Any, v: Any) -> Any:
        return call_forward(q, k, v)[0]

    def forward(q: Any, k: Any, v: Any) -> tuple[Any, tuple[Any, ...]]:
        out, lse = call_forward(q, k, v)
        return out, (q, k, v, out, lse)

    def backward(residuals: tuple[Any, ...], dout: Any) -> tuple[Any, Any, Any]:
        q, k, v, out, lse = residuals
        shapes = tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (q, k, v))
        return jax.pure_callback(host_backward, shapes, dout, q, k, v, out, lse, vmap_method="broadcast_all")

    attention_vjp.defvjp(forward, backward)
    return attention_vjp


def attention(
    q: Any,
    k: Any,
    v: Any,
    *,
    causal: bool = False,
    window: Window | None = None,
    scale: float | None = None,
    backend: str = "auto",
) -> Any:
    """:func:`npsparseattn.attention` on JAX arrays, differentiable and traceable (``jit``, ``grad``, ``vmap``).

    Parameters
    ----------
    q : array, shape (*batch, Hq, Lq, D), (Hq, Lq, D) or (Lq, D)
    k : array, shape (*batch, Hk, Lk, D), ``Hq % Hk == 0`` (GQA/MQA)
    v : array, shape (*batch, Hk, Lk, Dv)
        float16, bfloat16, float32 (float64 with ``jax_enable_x64``).
    causal, window, scale, backend
        As for :func:`npsparseattn.attention`; static (Python values, not
        traced: a traced ``scale`` is a ``TypeError`` saying so).

    Returns
    -------
    array, shape (*batch, Hq, Lq, Dv), dtype of ``q``
        Its vector-Jacobian product is :func:`npsparseattn.attention_backward`.

    Examples
    --------
    >>> import jax
    >>> import jax.numpy as jnp
    >>> from npsparseattn.interop import jax as nsa_jax
    >>> q, k, v = jax.random.normal(jax.random.key(0), (3, 4, 50, 16))   # (H, L, D) each
    >>> loss = jax.jit(lambda q, k, v: nsa_jax.attention(q, k, v, causal=True).sum())
    >>> dq, dk, dv = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
    >>> dq.shape, dk.dtype
    ((4, 50, 16), dtype('float32'))
    """
    if isinstance(window, list):
        window = tuple(window)
    options = dict(causal=causal, window=window, scale=scale, backend=backend)
    for name, value in options.items():
        _check_static(value, name)
    return _attention_vjp(causal, window, scale, backend)(q, k, v)


def _check_static(value: Any, name: str) -> None:
    """The options select a traced function, so they must be Python values (hashable), not traced arrays."""
    parts = value if isinstance(value, tuple) else (value,)
    if any(isinstance(part, jax.core.Tracer) for part in parts):
        raise TypeError(
            f"{name} must be static (a Python value), but it is traced by jax.jit/grad/vmap; pass it as a "
            f"Python value (jax.jit(..., static_argnames=...), or close over it)"
        )
    try:
        hash(value)
    except TypeError:
        raise TypeError(
            f"{name} must be static (a hashable Python value such as a float or a tuple), got {type(value).__name__}"
        ) from None

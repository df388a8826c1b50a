"""JAX adapters: :func:`attention` and :func:`sparse_attention` as ``jax.custom_vjp`` s (``jit``, ``grad``, ``vmap``).

The forward and the backward are host callbacks (``jax.pure_callback``) into
:func:`npsparseattn.attention` and :func:`npsparseattn.attention_backward`
(:func:`npsparseattn.sparse_attention` and its backward): XLA hands the
callback NumPy arrays, the numba kernels run, the results come back as arrays
of the declared shapes.  On a GPU JAX copies the operands to the host and
back.  Arguments are checked when the function is traced, so a bad shape is a
clear ``ValueError`` at ``jit`` time, not an error inside XLA.  Index arrays
(``kv_idx``, ``kv_cnt``) are traced integer inputs without a gradient (their
cotangents are zeros of ``float0``); the values of a traced index can only
be checked when the callback runs.  Importing this module imports JAX;
importing :mod:`npsparseattn` does not.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from npsparseattn.interop._kernels import ATTENTION, SPARSE_ATTENTION, Kernel
from npsparseattn.problems import lse_dtype

__all__ = ["attention", "sparse_attention"]

Window = tuple[int | None, int | None]
Options = tuple[tuple[str, Any], ...]


def _placeholder(x: Any) -> np.ndarray:
    """A NumPy array of ``x``'s shape and dtype that holds no memory (for checking arguments at trace time)."""
    return np.broadcast_to(np.zeros((), dtype=x.dtype), x.shape)


def _index_for_check(x: Any, fill: int) -> Any:
    """An index array to check: its values when concrete; when traced, ``fill`` in its shape (int32 if integer)."""
    if x is None or not isinstance(x, jax.core.Tracer):
        return None if x is None else np.asarray(x)
    dtype = np.dtype(x.dtype)
    value = np.array(fill, np.int32) if dtype.kind in "iu" else np.zeros((), dtype)  # a float one is refused
    return np.broadcast_to(value, x.shape)


@functools.cache
def _kernel_vjp(kernel: Kernel, options: Options) -> Callable[..., Any]:
    """``kernel`` as a ``custom_vjp`` of ``(q, k, v, *index)`` for one set of options (cached: one trace per set)."""
    keywords = dict(options)

    def host_forward(*arrays: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return kernel.forward(*arrays, **keywords)

    def host_backward(*arrays: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return kernel.backward(*arrays, **keywords)

    def call_forward(q: Any, k: Any, v: Any, *index: Any) -> tuple[Any, Any]:
        shapes = (
            jax.ShapeDtypeStruct(q.shape[:-1] + v.shape[-1:], q.dtype),
            jax.ShapeDtypeStruct(q.shape[:-1], lse_dtype(q.dtype)),
        )
        return jax.pure_callback(host_forward, shapes, q, k, v, *index, vmap_method="broadcast_all")

    @jax.custom_vjp
    def kernel_vjp(q: Any, k: Any, v: Any, *index: Any) -> Any:
        return call_forward(q, k, v, *index)[0]

    def forward(q: Any, k: Any, v: Any, *index: Any) -> tuple[Any, tuple[Any, ...]]:
        out, lse = call_forward(q, k, v, *index)
        return out, (q, k, v, out, lse, index)

    def backward(residuals: tuple[Any, ...], dout: Any) -> tuple[Any, ...]:
        q, k, v, out, lse, index = residuals
        shapes = tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (q, k, v))
        grads = jax.pure_callback(host_backward, shapes, dout, q, k, v, out, lse, *index, vmap_method="broadcast_all")
        return (*grads, *(None for _ in index))  # None: a zero (float0) cotangent for an integer index

    kernel_vjp.defvjp(forward, backward)
    return kernel_vjp


def _apply(kernel: Kernel, options: dict[str, Any], q: Any, k: Any, v: Any, *index: Any) -> Any:
    """Check the static options and the arguments' shapes (values of concrete indices too), then run ``kernel``."""
    if isinstance(options.get("window"), list):
        options["window"] = tuple(options["window"])
    for name, value in options.items():
        _check_static(value, name)
    kernel.check(
        *(_placeholder(x) for x in (q, k, v)),
        *(_index_for_check(x, fill) for x, fill in zip(index, kernel.index_fill)),
        **options,
    )
    return _kernel_vjp(kernel, tuple(options.items()))(q, k, v, *index)


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
    options = dict(causal=causal, window=window, scale=scale, backend=backend)
    return _apply(ATTENTION, options, q, k, v)


def sparse_attention(
    q: Any,
    k: Any,
    v: Any,
    kv_idx: Any,
    *,
    kv_cnt: Any = None,
    q_block: int = 64,
    kv_block: int = 64,
    causal: bool = False,
    window: Window | None = None,
    scale: float | None = None,
    backend: str = "auto",
) -> Any:
    """:func:`npsparseattn.sparse_attention` on JAX arrays, differentiable and traceable (``jit``, ``grad``, ``vmap``).

    Parameters
    ----------
    q : array, shape (*batch, Hq, Lq, D), (Hq, Lq, D) or (Lq, D)
    k : array, shape (*batch, Hk, Lk, D), ``Hq % Hk == 0`` (GQA/MQA)
    v : array, shape (*batch, Hk, Lk, Dv)
        float16, bfloat16, float32 (float64 with ``jax_enable_x64``).
    kv_idx : integer array, shape (*batch, Hk, ceil(Lq / q_block), K)
        The key blocks each query block attends, ``-1`` for an unused slot
        (as for :func:`npsparseattn.sparse_attention`).  Traced (it may come
        from a router inside ``jit``), not differentiated: its cotangent is
        zero (``float0``).  Its shape and dtype are checked at trace time;
        the values of a traced index (range, repeats) when the callback
        runs, where a bad one fails the computation with the
        ``ValueError``'s message.
    kv_cnt : integer array, shape (*batch, Hk, ceil(Lq / q_block)), optional
        Slots in use at the front of each list; traced, not differentiated.
    q_block, kv_block, causal, window, scale, backend
        As for :func:`npsparseattn.sparse_attention`; static (Python values).

    Returns
    -------
    array, shape (*batch, Hq, Lq, Dv), dtype of ``q``
        Its vector-Jacobian product is
        :func:`npsparseattn.sparse_attention_backward`.

    Examples
    --------
    Every query block of 16 attends block 0 and its own block:

    >>> import jax
    >>> import jax.numpy as jnp
    >>> from npsparseattn.interop import jax as nsa_jax
    >>> q, k, v = jax.random.normal(jax.random.key(0), (3, 2, 64, 16))   # (H, L, D) each
    >>> kv_idx = jnp.array([[[0, -1], [0, 1], [0, 2], [0, 3]]] * 2, dtype=jnp.int32)   # (Hk, nqb, K)
    >>> loss = jax.jit(lambda q, k, v, i: nsa_jax.sparse_attention(q, k, v, i, q_block=16, kv_block=16).sum())
    >>> dq, dk, dv = jax.grad(loss, argnums=(0, 1, 2))(q, k, v, kv_idx)
    >>> dq.shape, dk.dtype
    ((2, 64, 16), dtype('float32'))
    """
    options = dict(q_block=q_block, kv_block=kv_block, causal=causal, window=window, scale=scale, backend=backend)
    return _apply(SPARSE_ATTENTION, options, q, k, v, kv_idx, kv_cnt)


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

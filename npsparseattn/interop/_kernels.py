"""The operations the framework adapters wrap: forward, backward and argument checks, one calling convention.

Each :class:`Kernel` calls a public function of npsparseattn with the
adapters' convention: ``forward(q, k, v, *index, **options) -> (out, lse)``
and ``backward(dout, q, k, v, out, lse, *index, **options) -> (dq, dk,
dv)``, where ``index`` holds the operation's integer arrays (none for
:func:`npsparseattn.attention`; ``kv_idx, kv_cnt`` for
:func:`npsparseattn.sparse_attention`, ``kv_cnt`` possibly None) and
``options`` its keyword options.  ``check`` validates the same arguments
without computing anything (the JAX adapter runs it at trace time, on
placeholders).  :mod:`npsparseattn.interop.torch` and
:mod:`npsparseattn.interop.jax` build their autograd wrappers from these, so
an operation is added to both adapters by adding one :class:`Kernel`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from npsparseattn._checks import check_backend
from npsparseattn.exact import attention, attention_backward
from npsparseattn.problems import attention_problem, sparse_problem
from npsparseattn.sparse import sparse_attention, sparse_attention_backward

__all__ = ["ATTENTION", "SPARSE_ATTENTION", "Kernel"]


@dataclass(frozen=True)
class Kernel:
    """An operation as the adapters call it (see the module docstring).

    ``index_fill`` holds, per index array, a value that passes every rule
    whatever the shape (an empty slot, a count of 0): the JAX adapter checks
    traced index arrays' shapes and dtypes with placeholders of that value.
    ``torch_alternative`` names the PyTorch function to use for higher
    derivatives.
    """

    name: str
    forward: Callable[..., tuple[Any, Any]]
    backward: Callable[..., tuple[Any, Any, Any]]
    check: Callable[..., None]
    index_fill: tuple[int, ...] = ()
    torch_alternative: str = "torch.nn.functional.scaled_dot_product_attention"


def _attention_forward(q: Any, k: Any, v: Any, **options: Any) -> tuple[Any, Any]:
    return attention(q, k, v, return_lse=True, **options)


def _attention_check(q: Any, k: Any, v: Any, *, causal: Any, window: Any, scale: Any, backend: Any) -> None:
    check_backend(backend)
    attention_problem(q, k, v, causal=causal, window=window, scale=scale)


def _sparse_forward(q: Any, k: Any, v: Any, kv_idx: Any, kv_cnt: Any, **options: Any) -> tuple[Any, Any]:
    return sparse_attention(q, k, v, kv_idx, kv_cnt=kv_cnt, return_lse=True, **options)


def _sparse_backward(*arrays: Any, **options: Any) -> tuple[Any, Any, Any]:
    *arrays, kv_cnt = arrays
    return sparse_attention_backward(*arrays, kv_cnt=kv_cnt, **options)


def _sparse_check(q: Any, k: Any, v: Any, kv_idx: Any, kv_cnt: Any, *, backend: Any, **options: Any) -> None:
    check_backend(backend)
    sparse_problem(q, k, v, kv_idx, kv_cnt, **options)


ATTENTION = Kernel("attention", _attention_forward, attention_backward, _attention_check)
SPARSE_ATTENTION = Kernel(
    "sparse_attention",
    _sparse_forward,
    _sparse_backward,
    _sparse_check,
    index_fill=(-1, 0),
    torch_alternative="torch.nn.attention.flex_attention with a block mask",
)

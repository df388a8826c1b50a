"""PyTorch adapters: :func:`attention` and :func:`sparse_attention` as ``torch.autograd.Function`` s.

Tensors travel by DLPack without a copy (CPU tensors as NumPy arrays, CUDA
tensors as CuPy arrays, see :mod:`npsparseattn.interop.dlpack`); the forward
runs :func:`npsparseattn.attention` (or :func:`npsparseattn.sparse_attention`)
and keeps ``out`` and ``lse`` for the backward, which runs
:func:`npsparseattn.attention_backward` (:func:`npsparseattn.sparse_attention_backward`):
FlashAttention-2, no score matrix is stored.  Index arrays (``kv_idx``,
``kv_cnt``) are integer tensors that get no gradient.  Importing this module
imports PyTorch; importing :mod:`npsparseattn` does not.

The backward is differentiable once: differentiating its gradients again
(``create_graph=True``, a gradient penalty) raises ``RuntimeError`` instead of
giving gradients that silently miss the second-order terms.  Under
``torch.compile`` the call is a graph break (``torch.compiler.disable``): it
runs eagerly, autograd included, and the code around it is compiled.
"""

from __future__ import annotations

from typing import Any

import torch

from npsparseattn.interop._kernels import ATTENTION, SPARSE_ATTENTION, Kernel

__all__ = ["attention", "sparse_attention"]

Window = tuple[int | None, int | None]
_SAVED = object()  # marks an index argument kept by save_for_backward


class _Attention(torch.autograd.Function):
    """One attention kernel of npsparseattn (``kernel``) whose backward is npsparseattn's.

    ``q``, ``k``, ``v`` are differentiable; the ``index`` arguments (integer
    tensors, NumPy arrays, None) are passed to both passes and get no
    gradient.  Index tensors are saved with ``save_for_backward``, so one
    changed in place before the backward is an error, not a wrong gradient.
    """

    @staticmethod
    def forward(
        ctx: Any, kernel: Kernel, options: dict[str, Any], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
        *index: Any,
    ) -> torch.Tensor:  # fmt: skip
        index = tuple(x.detach() if isinstance(x, torch.Tensor) else x for x in index)
        out, lse = kernel.forward(q.detach(), k.detach(), v.detach(), *index, **options)
        ctx.save_for_backward(q, k, v, out, lse, *(x for x in index if isinstance(x, torch.Tensor)))
        ctx.index = tuple(_SAVED if isinstance(x, torch.Tensor) else x for x in index)
        ctx.kernel, ctx.options = kernel, options
        return out

    @staticmethod
    def backward(ctx: Any, dout: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        saved = ctx.saved_tensors
        q, k, v, out, lse = (x.detach() for x in saved[:5])
        tensors = iter(saved[5:])
        index = tuple(next(tensors) if x is _SAVED else x for x in ctx.index)
        dq, dk, dv = ctx.kernel.backward(dout.detach(), q, k, v, out, lse, *index, **ctx.options)
        if torch.is_grad_enabled() and any(x.requires_grad for x in (dout, *saved[:3])):
            # create_graph=True: the gradients must carry a graph, and ours has no second derivative
            dq, dk, dv = _FirstOrderOnly.apply(ctx.kernel, dq, dk, dv, dout, *saved[:3])
        return (None, None, dq, dk, dv) + (None,) * len(index)


class _FirstOrderOnly(torch.autograd.Function):
    """Passes gradients through, tied to the tensors they depend on; differentiating them again raises.

    PyTorch's ``once_differentiable`` ties its error only to the incoming
    gradient, which is often a constant (``out.sum()``): the gradients would
    then carry no graph at all and a gradient penalty would silently lose its
    second-order terms.
    """

    @staticmethod
    def forward(
        ctx: Any, kernel: Kernel, dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, *depends_on: torch.Tensor
    ) -> Any:
        ctx.kernel = kernel
        return dq.view_as(dq), dk.view_as(dk), dv.view_as(dv)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> Any:
        raise RuntimeError(
            f"npsparseattn.interop.torch.{ctx.kernel.name} is differentiable once: its gradients were "
            f"differentiated again (create_graph=True: a gradient penalty, a Hessian-vector product); use a "
            f"PyTorch implementation ({ctx.kernel.torch_alternative}) for higher derivatives"
        )


@torch.compiler.disable
def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    window: Window | None = None,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """:func:`npsparseattn.attention` on PyTorch tensors, differentiable with ``torch.autograd``.

    Parameters
    ----------
    q : tensor, shape (*batch, Hq, Lq, D), (Hq, Lq, D) or (Lq, D)
    k : tensor, shape (*batch, Hk, Lk, D), ``Hq % Hk == 0`` (GQA/MQA)
    v : tensor, shape (*batch, Hk, Lk, Dv)
        CPU tensors (float16, bfloat16, float32, float64) run the numba
        kernels; CUDA tensors go to CuPy and need a GPU backend.
    causal, window, scale, backend
        As for :func:`npsparseattn.attention`.

    Returns
    -------
    tensor, shape (*batch, Hq, Lq, Dv), dtype of ``q``
        ``backward()`` through it gives ``q.grad``, ``k.grad``, ``v.grad``
        from :func:`npsparseattn.attention_backward` (summed over GQA groups).
        Differentiable once: backpropagating through those gradients
        (``create_graph=True``) raises ``RuntimeError``.

    Examples
    --------
    >>> import torch
    >>> from npsparseattn.interop import torch as nsa_torch
    >>> q = torch.randn(4, 50, 16, dtype=torch.float64, requires_grad=True)
    >>> k = torch.randn(2, 50, 16, dtype=torch.float64, requires_grad=True)   # GQA: 2 KV heads
    >>> v = torch.randn(2, 50, 16, dtype=torch.float64, requires_grad=True)
    >>> out = nsa_torch.attention(q, k, v, causal=True)
    >>> out.sum().backward()
    >>> q.grad.shape, k.grad.shape
    (torch.Size([4, 50, 16]), torch.Size([2, 50, 16]))
    """
    options = dict(causal=causal, window=window, scale=scale, backend=backend)
    return _Attention.apply(ATTENTION, options, q, k, v)


@torch.compiler.disable
def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_idx: Any,
    *,
    kv_cnt: Any = None,
    q_block: int = 64,
    kv_block: int = 64,
    causal: bool = False,
    window: Window | None = None,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """:func:`npsparseattn.sparse_attention` on PyTorch tensors, differentiable with ``torch.autograd``.

    Parameters
    ----------
    q : tensor, shape (*batch, Hq, Lq, D), (Hq, Lq, D) or (Lq, D)
    k : tensor, shape (*batch, Hk, Lk, D), ``Hq % Hk == 0`` (GQA/MQA)
    v : tensor, shape (*batch, Hk, Lk, Dv)
        CPU tensors (float16, bfloat16, float32, float64) run the numba
        kernels.
    kv_idx : integer tensor, shape (*batch, Hk, ceil(Lq / q_block), K)
        The key blocks each query block attends, ``-1`` for an unused slot
        (as for :func:`npsparseattn.sparse_attention`); no gradient.  A
        NumPy array is accepted with CPU tensors.
    kv_cnt : integer tensor, shape (*batch, Hk, ceil(Lq / q_block)), optional
        Slots in use at the front of each list; no gradient.
    q_block, kv_block, causal, window, scale, backend
        As for :func:`npsparseattn.sparse_attention`.

    Returns
    -------
    tensor, shape (*batch, Hq, Lq, Dv), dtype of ``q``
        ``backward()`` through it gives ``q.grad``, ``k.grad``, ``v.grad``
        from :func:`npsparseattn.sparse_attention_backward` (summed over GQA
        groups, deterministic).  Differentiable once: backpropagating through
        those gradients (``create_graph=True``) raises ``RuntimeError``.

    Examples
    --------
    Every query block of 16 attends block 0 and its own block:

    >>> import torch
    >>> from npsparseattn.interop import torch as nsa_torch
    >>> q = torch.randn(4, 64, 16, dtype=torch.float64, requires_grad=True)
    >>> k = torch.randn(2, 64, 16, dtype=torch.float64, requires_grad=True)   # GQA: 2 KV heads
    >>> v = torch.randn(2, 64, 16, dtype=torch.float64, requires_grad=True)
    >>> kv_idx = torch.tensor([[0, -1], [0, 1], [0, 2], [0, 3]], dtype=torch.int32).expand(2, 4, 2)
    >>> out = nsa_torch.sparse_attention(q, k, v, kv_idx, q_block=16, kv_block=16, causal=True)
    >>> out.sum().backward()
    >>> q.grad.shape, k.grad.shape
    (torch.Size([4, 64, 16]), torch.Size([2, 64, 16]))
    """
    options = dict(
        q_block=q_block, kv_block=kv_block, causal=causal, window=window, scale=scale, backend=backend
    )  # fmt: skip
    return _Attention.apply(SPARSE_ATTENTION, options, q, k, v, kv_idx, kv_cnt)

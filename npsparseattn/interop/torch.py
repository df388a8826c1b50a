"""PyTorch adapter: :func:`attention` as a ``torch.autograd.Function`` (gradients through our backward).

Tensors travel by DLPack without a copy (CPU tensors as NumPy arrays, CUDA
tensors as CuPy arrays, see :mod:`npsparseattn.interop.dlpack`); the forward
runs :func:`npsparseattn.attention` and keeps ``out`` and ``lse`` for the
backward, which runs :func:`npsparseattn.attention_backward` (FlashAttention-2:
no score matrix is stored).  Importing this module imports PyTorch; importing
:mod:`npsparseattn` does not.

The backward is differentiable once: differentiating its gradients again
(``create_graph=True``, a gradient penalty) raises ``RuntimeError`` instead of
giving gradients that silently miss the second-order terms.  Under
``torch.compile`` the call is a graph break (``torch.compiler.disable``): it
runs eagerly, autograd included, and the code around it is compiled.
"""

from __future__ import annotations

from typing import Any

import torch

from npsparseattn.exact import attention as _attention
from npsparseattn.exact import attention_backward as _attention_backward

__all__ = ["attention"]

Window = tuple[int | None, int | None]


class _Attention(torch.autograd.Function):
    """Exact attention whose backward is npsparseattn's."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, options: dict[str, Any]) -> torch.Tensor:
        out, lse = _attention(q.detach(), k.detach(), v.detach(), return_lse=True, **options)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.options = options
        return out

    @staticmethod
    def backward(ctx: Any, dout: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        saved = ctx.saved_tensors
        q, k, v, out, lse = (x.detach() for x in saved)
        dq, dk, dv = _attention_backward(dout.detach(), q, k, v, out, lse, **ctx.options)
        if torch.is_grad_enabled() and any(x.requires_grad for x in (dout, *saved[:3])):
            # create_graph=True: the gradients must carry a graph, and ours has no second derivative
            dq, dk, dv = _FirstOrderOnly.apply(dq, dk, dv, dout, *saved[:3])
        return dq, dk, dv, None


class _FirstOrderOnly(torch.autograd.Function):
    """Passes gradients through, tied to the tensors they depend on; differentiating them again raises.

    PyTorch's ``once_differentiable`` ties its error only to the incoming
    gradient, which is often a constant (``out.sum()``): the gradients would
    then carry no graph at all and a gradient penalty would silently lose its
    second-order terms.
    """

    @staticmethod
    def forward(ctx: Any, dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, *depends_on: torch.Tensor) -> Any:
        return dq.view_as(dq), dk.view_as(dk), dv.view_as(dv)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> Any:
        raise RuntimeError(
            "npsparseattn.interop.torch.attention is differentiable once: its gradients were differentiated "
            "again (create_graph=True: a gradient penalty, a Hessian-vector product); use a PyTorch "
            "implementation (torch.nn.functional.scaled_dot_product_attention) for higher derivatives"
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
    return _Attention.apply(q, k, v, options)

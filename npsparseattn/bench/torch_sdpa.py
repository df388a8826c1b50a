"""``--compare torch``: the same attention problems through PyTorch's ``scaled_dot_product_attention``.

The tensors share the benchmark's data: ``torch.from_numpy`` for NumPy arrays
(CPU tensors; bfloat16 goes through float32, which NumPy cannot hand over
directly), DLPack for CuPy arrays (CUDA tensors on the same GPU).  The
forward runs under ``torch.no_grad()``; forward + backward runs the forward
with autograd and ``out.backward(dout)``.  PyTorch's CPU thread count is set
to numba's, so both sides use the same cores.  Grouped-query attention goes
through ``enable_gqa=True``.  PyTorch's ``is_causal`` aligns the diagonal
top-left; this package aligns it bottom-right, which is the same mask when
``Lq == Lk`` (the only case the benchmark compares).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from npsparseattn.bench.device import Device

COMPARE_CHOICES = ("torch",)


def torch_missing(kind: str = "numpy") -> str | None:
    """Why PyTorch cannot be compared here on arrays of ``kind`` (``None`` when it can)."""
    try:
        import torch
    except ImportError as exc:
        return f"PyTorch is not installed ({exc}); pip install torch to compare with its SDPA"
    if kind == "cupy" and not torch.cuda.is_available():
        return f"PyTorch {torch.__version__} cannot use a CUDA device here; CuPy arrays need a CUDA build of PyTorch"
    return None


def _tensor(torch: Any, device: Device, x: Any) -> Any:
    """A tensor holding ``x``'s values on ``x``'s device (sharing its memory where the dtype allows)."""
    if device.kind == "cupy":
        return torch.from_dlpack(x)
    if x.dtype.name == "bfloat16":
        return torch.from_numpy(np.asarray(x, dtype=np.float32)).to(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(x))


class TorchAttention:
    """``scaled_dot_product_attention`` forward and forward + backward on the benchmark's arrays.

    ``q`` (B, Hq, L, D), ``k`` (B, Hk, L, D), ``v`` (B, Hk, L, Dv) and
    ``dout`` (B, Hq, L, Dv) on ``device``; ``threads``: PyTorch's CPU
    threads (numba's count).
    """

    def __init__(self, device: Device, q: Any, k: Any, v: Any, dout: Any, *, causal: bool, threads: int):
        import torch

        if causal and q.shape[-2] != k.shape[-2]:
            raise ValueError("PyTorch's is_causal aligns top-left: compared only for Lq == Lk")
        self.torch = torch
        self.device = device
        if device.kind == "numpy":
            torch.set_num_threads(threads)
        self.q, self.k, self.v, self.dout = (_tensor(torch, device, x) for x in (q, k, v, dout))
        self.causal = causal
        self.gqa = q.shape[1] != k.shape[1]
        self.leaves = [x.detach().clone().requires_grad_(True) for x in (self.q, self.k, self.v)]

    def _sync(self) -> None:
        if self.device.kind == "cupy":
            self.torch.cuda.synchronize()

    def _sdpa(self, q: Any, k: Any, v: Any) -> Any:
        return self.torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=self.causal, enable_gqa=self.gqa
        )

    def forward(self) -> Any:
        """Output, without autograd."""
        with self.torch.no_grad():
            out = self._sdpa(self.q, self.k, self.v)
        self._sync()
        return out

    def forward_backward(self) -> tuple[Any, ...]:
        """Forward with autograd, then ``out.backward(dout)``; returns ``(dq, dk, dv)``."""
        for leaf in self.leaves:
            leaf.grad = None
        out = self._sdpa(*self.leaves)
        out.backward(self.dout)
        self._sync()
        return tuple(leaf.grad for leaf in self.leaves)

    def calls(self, *, backward: bool = True) -> dict[str, Callable[[], Any]]:
        """The calls the benchmark times, by result key (the forward alone unless ``backward``)."""
        calls: dict[str, Callable[[], Any]] = {"torch_forward_s": self.forward}
        if backward:
            calls["torch_forward_backward_s"] = self.forward_backward
        return calls

    def version(self) -> str:
        """``'PyTorch 2.x.y (CPU, 2 threads)'`` or ``'PyTorch 2.x.y (CUDA)'``."""
        where = "CUDA" if self.device.kind == "cupy" else f"CPU, {self.torch.get_num_threads()} threads"
        return f"PyTorch {self.torch.__version__} ({where})"

"""Exact tiled attention (``npsparseattn.attention``): forward and backward.

Swept over sequence length, head dimension, causal masking and backend, at
batch 1, 4 heads, float32 (float16 on a half-precision backend).  ``track_*_gflops`` reports the attention FLOP
rate; ``track_*_vs_matmul`` divides it by the rate of a square matrix product
measured in the same call, which cancels most of the machine's speed (and its
neighbours) out of the history.
"""

# ruff: noqa: RUF012  (asv reads params and param_names from class attributes)
from __future__ import annotations

import numpy as np

import npsparseattn as nsa
from npsparseattn.bench.common import attention_flops

from .common import Backend, backends, forward_backward_suite, sizes

HEADS = 4


class Attention(forward_backward_suite("GFLOP/s")):
    params = [
        sizes([1024, 4096], [256]),
        sizes([64, 128], [64]),
        sizes([False, True], [True]),
        backends("attention"),
    ]
    param_names = ["seq", "dim", "causal", "backend"]
    timeout = 600

    def setup(self, seq, dim, causal, backend):
        self.backend = Backend(backend, "attention")
        rng = np.random.default_rng(seq + dim)
        shape = (1, HEADS, seq, dim)
        self.q, self.k, self.v = (self.backend.random(rng, shape) for _ in range(3))
        self.dout = self.backend.random(rng, shape)
        self.kwargs = {"causal": causal, "backend": backend}
        small = [self.backend.random(rng, (1, HEADS, 100, dim)) for _ in range(4)]
        out, lse = nsa.attention(*small[:3], return_lse=True, **self.kwargs)  # compiles, or loads the cache
        nsa.attention_backward(small[3], *small[:3], out, lse, **self.kwargs)
        self.out, self.lse = nsa.attention(self.q, self.k, self.v, return_lse=True, **self.kwargs)
        self.backend.sync()
        self.flops = attention_flops(1, HEADS, seq, seq, dim, causal=causal)

    def forward(self):
        return nsa.attention(self.q, self.k, self.v, **self.kwargs)

    def backward(self):
        return nsa.attention_backward(self.dout, self.q, self.k, self.v, self.out, self.lse, **self.kwargs)

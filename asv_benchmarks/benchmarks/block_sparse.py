"""Block-sparse attention (``npsparseattn.block_sparse_attention``): forward and backward.

Swept over sequence length, layout density (a seeded random block mask that
always keeps the diagonal; density 1 is the dense layout), causal masking and
backend, at batch 1, 4 heads, D=64, 64x64 blocks, float32 (float16 on a half-precision backend).  The FLOP count
is that of the stored blocks, so ``track_*_gflops`` stays comparable across
densities: the cost must follow the number of stored blocks, not ``L^2``.
"""

# ruff: noqa: RUF012  (asv reads params and param_names from class attributes)
from __future__ import annotations

import numpy as np

import npsparseattn as nsa
from npsparseattn import layouts

from .common import Backend, backends, forward_backward_suite, sizes

HEADS = 4
DIM = 64
BLOCK = 64


def random_layout(seq: int, density: float, causal: bool, seed: int = 0) -> layouts.BlockLayout:
    """Random block mask of about ``density`` (diagonal always kept), lower triangle if ``causal``."""
    n = -(-seq // BLOCK)
    mask = np.random.default_rng(seed).random((n, n)) < density
    mask |= np.eye(n, dtype=bool)
    if causal:
        mask &= np.tri(n, dtype=bool)
    return layouts.from_block_mask(mask, BLOCK, (seq, seq))


class BlockSparseAttention(forward_backward_suite("GFLOP/s (stored blocks)")):
    params = [
        sizes([2048, 8192], [512]),
        sizes([0.05, 0.25, 1.0], [0.25]),
        sizes([False, True], [True]),
        backends("block_sparse_attention"),
    ]
    param_names = ["seq", "density", "causal", "backend"]
    timeout = 600

    def setup(self, seq, density, causal, backend):
        self.backend = Backend(backend, "block_sparse_attention")
        rng = np.random.default_rng(seq)
        shape = (1, HEADS, seq, DIM)
        self.q, self.k, self.v = (self.backend.random(rng, shape) for _ in range(3))
        self.dout = self.backend.random(rng, shape)
        self.layout = random_layout(seq, density, causal)
        self.kwargs = {"causal": causal, "backend": backend}
        small = [self.backend.random(rng, (1, HEADS, 200, DIM)) for _ in range(4)]
        small_layout = random_layout(200, density, causal)
        out, lse = nsa.block_sparse_attention(*small[:3], small_layout, return_lse=True, **self.kwargs)
        nsa.block_sparse_attention_backward(small[3], *small[:3], out, lse, small_layout, **self.kwargs)
        self.out, self.lse = nsa.block_sparse_attention(
            self.q, self.k, self.v, self.layout, return_lse=True, **self.kwargs
        )
        self.layout.transpose()  # the backward's CSC view, built once and cached by the layout
        self.backend.sync()
        self.flops = 4.0 * HEADS * self.layout.nnz * BLOCK * BLOCK * DIM

    def forward(self):
        return nsa.block_sparse_attention(self.q, self.k, self.v, self.layout, **self.kwargs)

    def backward(self):
        return nsa.block_sparse_attention_backward(
            self.dout, self.q, self.k, self.v, self.out, self.lse, self.layout, **self.kwargs
        )


class LayoutBuild:
    """Building layouts (host-side, no backend): sliding window, BigBird, and content routing."""

    params = [sizes([8192, 65536], [1024])]
    param_names = ["seq"]

    def setup(self, seq):
        rng = np.random.default_rng(0)
        self.q = rng.standard_normal((1, seq, DIM)).astype(np.float32)
        self.k = rng.standard_normal((1, seq, DIM)).astype(np.float32)

    def time_sliding_window(self, seq):
        layouts.sliding_window(seq, BLOCK, (4 * BLOCK, 0))

    def time_bigbird(self, seq):
        layouts.bigbird(seq, BLOCK, random_blocks=3, seed=0)

    def time_topk(self, seq):
        layouts.topk(self.q, self.k, BLOCK, 8, causal=True)

    def time_transpose(self, seq):
        layouts.sliding_window(seq, BLOCK, (4 * BLOCK, 0)).transpose()

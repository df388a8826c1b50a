"""LSH attention (``npsparseattn.lsh.lsh_attention``, Reformer): forward and backward.

Swept over sequence length, number of hash rounds, causal masking and
backend, at batch 1, 4 heads, D=64, chunks of 64 attending themselves and
one chunk back, with ``n_buckets = L / 64`` so every bucket fills about one
chunk (the Reformer setting; the cost is linear in ``L``).  The FLOP count
is that of the chunked attention (``4 * H * L * n_hashes * 2 * 64 * D``);
hashing and sorting are extra work not counted.
"""

# ruff: noqa: RUF012  (asv reads params and param_names from class attributes)
from __future__ import annotations

import numpy as np

from npsparseattn import lsh

from .common import Backend, backends, forward_backward_suite, sizes

HEADS = 4
DIM = 64
CHUNK = 64


class LSHAttention(forward_backward_suite("GFLOP/s (chunked attention)")):
    params = [
        sizes([4096, 16384], [512]),
        sizes([1, 4], [2]),
        sizes([False, True], [True]),
        backends("lsh_attention"),
    ]
    param_names = ["seq", "n_hashes", "causal", "backend"]
    timeout = 600

    def setup(self, seq, n_hashes, causal, backend):
        self.backend = Backend(backend, "lsh_attention")
        rng = np.random.default_rng(seq)
        shape = (1, HEADS, seq, DIM)
        self.qk, self.v = (self.backend.random(rng, shape) for _ in range(2))
        self.dout = self.backend.random(rng, shape)
        self.kwargs = {
            "n_buckets": max(2, seq // CHUNK),
            "n_hashes": n_hashes,
            "chunk_size": CHUNK,
            "causal": causal,
            "seed": 0,
            "backend": backend,
        }
        small = [self.backend.random(rng, (1, HEADS, 2 * CHUNK, DIM)) for _ in range(3)]
        small_kwargs = {**self.kwargs, "n_buckets": 2}
        out, lse = lsh.lsh_attention(*small[:2], return_lse=True, **small_kwargs)  # compiles, or loads the cache
        lsh.lsh_attention_backward(small[2], *small[:2], out, lse, **small_kwargs)
        self.out, self.lse = lsh.lsh_attention(self.qk, self.v, return_lse=True, **self.kwargs)
        self.backend.sync()
        self.flops = 4.0 * HEADS * seq * n_hashes * 2 * CHUNK * DIM

    def forward(self):
        return lsh.lsh_attention(self.qk, self.v, **self.kwargs)

    def backward(self):
        return lsh.lsh_attention_backward(self.dout, self.qk, self.v, self.out, self.lse, **self.kwargs)


class Hashing:
    """Bucket assignment and the stable sort, on the host (no backend parameter)."""

    params = [sizes([16384, 65536], [1024]), sizes([1, 4], [2])]
    param_names = ["seq", "n_hashes"]

    def setup(self, seq, n_hashes):
        self.qk = np.random.default_rng(0).standard_normal((HEADS, seq, DIM)).astype(np.float32)
        self.n_buckets = max(2, seq // CHUNK)
        self.buckets = lsh.lsh_buckets(self.qk, self.n_buckets, n_hashes=n_hashes, seed=0)

    def time_buckets(self, seq, n_hashes):
        lsh.lsh_buckets(self.qk, self.n_buckets, n_hashes=n_hashes, seed=0)

    def time_sort(self, seq, n_hashes):
        lsh.lsh_sort(self.buckets)

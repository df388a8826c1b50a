"""Exact attention with score modifications (ALiBi + softcap, a padding bias) against plain attention.

Batch 1, 4 heads, D 64, causal, float32 on the CPU backend; ``track_*_vs_plain``
divides the time of each modification by that of plain attention measured in
the same call (which cancels the machine's speed out of the history).
"""

# ruff: noqa: RUF012  (asv reads params and param_names from class attributes)
from __future__ import annotations

import numpy as np

import npsparseattn as nsa
from npsparseattn.bench.common import best_time

from .common import sizes

HEADS = 4


class Scores:
    params = [sizes([1024, 4096], [256]), ["alibi+softcap", "bias"]]
    param_names = ["seq", "mods"]
    timeout = 600

    def setup(self, seq, mods):
        rng = np.random.default_rng(seq)
        shape = (1, HEADS, seq, 64)
        self.q, self.k, self.v, self.dout = (rng.standard_normal(shape, dtype=np.float32) for _ in range(4))
        if mods == "bias":
            pad = np.zeros((1, 1, 1, seq), np.float32)
            pad[..., -seq // 8 :] = -1e4
            self.mods = {"bias": pad}
        else:
            self.mods = {"alibi_slopes": 2.0 ** -np.arange(1, HEADS + 1), "softcap": 30.0}
        self.out, self.lse = nsa.attention(self.q, self.k, self.v, causal=True, return_lse=True, **self.mods)

    def forward(self, **mods):
        return nsa.attention(self.q, self.k, self.v, causal=True, **mods)

    def backward(self, **mods):
        return nsa.attention_backward(self.dout, self.q, self.k, self.v, self.out, self.lse, causal=True, **mods)

    def time_forward(self, seq, mods):
        self.forward(**self.mods)

    def time_backward(self, seq, mods):
        self.backward(**self.mods)

    def track_forward_vs_plain(self, seq, mods):
        return best_time(lambda: self.forward(**self.mods)) / best_time(self.forward)

    def track_backward_vs_plain(self, seq, mods):
        return best_time(lambda: self.backward(**self.mods)) / best_time(self.backward)

    track_forward_vs_plain.unit = "ratio"
    track_backward_vs_plain.unit = "ratio"

"""Sparse-pattern insight (host side, NumPy): ``layouts.from_mask_mod``, ``inspect.coverage``, ``inspect.block_mass``.

``from_mask_mod`` evaluates its predicate on every (query, key) pair, so its
time grows with ``L^2``: a plain NumPy function (vectorised calls) against
the same rule as a ``numba.njit`` function (a compiled block loop), 64-token
blocks.  ``coverage`` runs two attention calls with a value width of 1;
``block_mass`` is dense work in NumPy tiles.  4 heads, D=64, float32.
"""

# ruff: noqa: RUF012  (asv reads params and param_names from class attributes)
from __future__ import annotations

import numba
import numpy as np

from npsparseattn import inspect, layouts

from .common import sizes

BLOCK = 64


def _document_of(seq: int) -> np.ndarray:
    return np.repeat(np.arange(16), -(-seq // 16))[:seq]


class MaskModBuild:
    """The block layout of a causal document mask (16 documents), NumPy function vs numba function."""

    params = [sizes([4096, 16384], [1024]), ["numpy", "numba"]]
    param_names = ["seq", "mask_mod"]
    timeout = 300

    def setup(self, seq, kind):
        doc = _document_of(seq)

        def document_causal(b, h, q_idx, kv_idx):
            return (doc[q_idx] == doc[kv_idx]) & (kv_idx <= q_idx)

        @numba.njit
        def document_causal_jit(b, h, q_idx, kv_idx):
            return doc[q_idx] == doc[kv_idx] and kv_idx <= q_idx

        self.mask_mod = document_causal if kind == "numpy" else document_causal_jit
        layouts.from_mask_mod(self.mask_mod, 256, BLOCK)  # compile the numba loop outside the timing

    def time_from_mask_mod(self, seq, kind):
        layouts.from_mask_mod(self.mask_mod, seq, BLOCK)


class Inspect:
    """Coverage of a sliding window and the mass map, on seeded random q/k."""

    params = [sizes([2048, 8192], [512])]
    param_names = ["seq"]
    timeout = 300

    def setup(self, seq):
        rng = np.random.default_rng(0)
        self.q, self.k = (rng.standard_normal((1, 4, seq, 64)).astype(np.float32) for _ in range(2))
        self.layout = layouts.sliding_window(seq, BLOCK, 256)
        inspect.coverage(self.q[..., :200, :], self.k[..., :200, :], layouts.sliding_window(200, BLOCK, 256))

    def time_coverage(self, seq):
        inspect.coverage(self.q, self.k, self.layout)

    def time_block_mass(self, seq):
        inspect.block_mass(self.q, self.k, BLOCK)

"""Ring attention on the numba-cuda attention kernels in the CUDA simulator: one rank, every block call."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import SoloComm, random_array, random_qkv, rel_err

import npsparseattn as nsa
from npsparseattn import reference


@pytest.mark.parametrize("sharding", ["zigzag", "contiguous"])
def test_ring_of_one_matches_reference(rng, sharding):
    """The ring's per-block calls (diagonal offsets, windows) through the numba-cuda attention module."""
    q, k, v = random_qkv(rng, hq=2, hk=1, lq=22, d=8, dtype=np.float32)
    kw = dict(causal=True, sharding=sharding, backend="numba-cuda")
    out, lse = nsa.ring_attention(q, k, v, SoloComm(), return_lse=True, **kw)
    ref_out, ref_lse = reference.attention(q, k, v, causal=True)
    assert rel_err(out, ref_out) < 1e-5
    np.testing.assert_allclose(lse, ref_lse, rtol=0, atol=1e-5)
    dout = random_array(rng, out.shape, np.float32)
    grads = nsa.ring_attention_backward(dout, q, k, v, out, lse, SoloComm(), **kw)
    for g, r in zip(grads, reference.attention_backward(dout, q, k, v, causal=True)):
        assert rel_err(g, r, floor=1.0) < 4e-5

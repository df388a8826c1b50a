"""numba-cuda block-sparse attention in the CUDA simulator, through the public API, against the float64 reference."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import BackendCase, random_qkv, rel_err
from test_block_sparse import check_against_reference

import npsparseattn as nsa
from npsparseattn import layouts

CUDA = BackendCase("block_sparse_attention", "numba-cuda")


def per_head_layout(rng, heads, seq, block, density=0.4):
    """A random layout with one pattern per query head (rows may be empty)."""
    grid = (heads, -(-seq[0] // block[0]), -(-seq[1] // block[1]))
    return layouts.from_block_mask(rng.random(grid) < density, block=block, seq=seq)


@pytest.mark.parametrize(
    "mask",
    [dict(), dict(causal=True), dict(window=(7, 3))],
    ids=["none", "causal", "window"],
)
def test_per_head_layout_with_gqa_and_partial_blocks(rng, mask):
    q, k, v = random_qkv(rng, hq=4, hk=2, lq=23, lk=29, d=8, dv=6, dtype=np.float32)
    layout = per_head_layout(rng, 4, (23, 29), (5, 6))
    check_against_reference(q, k, v, layout, mask, np.float32, CUDA)


def test_blocks_taller_and_narrower_than_a_tile(rng):
    """Query blocks of 20 rows span three 8-row tiles; key blocks of 3 keys are narrower than a tile."""
    q, k, v = random_qkv(rng, hq=2, lq=41, lk=30, d=12, dtype=np.float32)
    layout = layouts.bigbird((41, 30), (20, 3), window=(1, 1), random_blocks=2, seed=3)
    check_against_reference(q, k, v, layout, dict(causal=True), np.float32, CUDA)


def test_float16(rng):
    q, k, v = random_qkv(rng, hq=2, lq=24, lk=24, d=8, dtype=np.float16)
    check_against_reference(q, k, v, layouts.sliding_window(24, 8, (1, 0)), dict(causal=True), np.float16, CUDA)


def test_dense_layout_equals_attention(rng):
    q, k, v = random_qkv(rng, hq=2, hk=1, lq=19, lk=25, d=8, dtype=np.float32)
    out, lse = nsa.block_sparse_attention(
        q, k, v, layouts.dense((19, 25), (7, 4)), causal=True, return_lse=True, backend="numba-cuda"
    )
    att_out, att_lse = nsa.attention(q, k, v, causal=True, return_lse=True, backend="numba-cuda")
    assert rel_err(out, att_out) < 1e-6
    assert np.array_equal(np.isneginf(lse), np.isneginf(att_lse))


def test_keys_of_unstored_blocks_are_never_read(rng):
    """NaN in keys/values that no stored block covers cannot reach the results."""
    mask = np.zeros((3, 4), dtype=bool)
    mask[:, [0, 2]] = True
    mask[1, 1] = True
    layout = layouts.from_block_mask(mask, 8, seq=(24, 30))
    q, k, v = random_qkv(rng, hq=1, lq=24, lk=30, d=8, dtype=np.float32)
    unused = np.r_[24:30]
    k[:, unused] = np.nan
    v[:, unused] = np.nan
    out, lse = nsa.block_sparse_attention(q, k, v, layout, return_lse=True, backend="numba-cuda")
    grads = nsa.block_sparse_attention_backward(np.ones_like(out), q, k, v, out, lse, layout, backend="numba-cuda")
    dq, dk, dv = grads
    assert np.isfinite(out).all() and np.isfinite(lse).all() and np.isfinite(dq).all()
    assert np.all(dk[:, unused] == 0) and np.all(dv[:, unused] == 0)

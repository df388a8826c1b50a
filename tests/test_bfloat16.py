"""bfloat16 on the CPU: ``ml_dtypes.bfloat16`` arrays (the dtype CuPy and JAX use), computed in float32.

The flash-attn rule: the error against the float64 reference is at most twice
the error of a naive implementation that rounds every step to bfloat16.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import random_qkv, rel_err

import npsparseattn as nsa
from npsparseattn import layouts, reference
from npsparseattn.problems import compute_dtype, lse_dtype

ml_dtypes = pytest.importorskip("ml_dtypes", reason="ml_dtypes is not installed (pip install npsparseattn[interop])")
BF16 = np.dtype(ml_dtypes.bfloat16)


def bf16(x):
    return np.asarray(x, dtype=np.float32).astype(BF16)


def naive_bf16_attention(q, k, v, mask, scale):
    """Every intermediate rounded to bfloat16 (products accumulated in float32, as a bfloat16 GEMM does)."""
    f32 = [x.astype(np.float32) for x in (q, k, v)]
    s = bf16(f32[0] @ f32[1].swapaxes(-1, -2) * scale).astype(np.float32)
    s = np.where(mask, s, -np.inf)
    p = bf16(np.exp(s - s.max(-1, keepdims=True))).astype(np.float32)
    p = bf16(p / bf16(p.sum(-1, keepdims=True)).astype(np.float32)).astype(np.float32)
    return bf16(p @ f32[2]).astype(np.float64)


def test_dtype_rules():
    assert compute_dtype(BF16) == np.float32 and lse_dtype(BF16) == np.float32
    assert "bfloat16" in nsa._dispatch.implementations("attention")[0].dtypes


def test_attention_within_twice_the_naive_bfloat16_error(rng):
    q, k, v = (x.astype(BF16) for x in random_qkv(rng, hq=4, hk=2, lq=150, lk=150, d=64))
    out, lse = nsa.attention(q, k, v, causal=True, return_lse=True)
    assert out.dtype == BF16 and lse.dtype == np.float32
    ref_out, ref_lse = reference.attention(q, k, v, causal=True)
    kv = [np.repeat(x, 2, axis=0) for x in (k, v)]
    naive = naive_bf16_attention(q, *kv, reference.visibility_mask(150, 150, right=0), 0.125)
    naive_err = np.abs(naive - ref_out).max()
    assert np.abs(out.astype(np.float64) - ref_out).max() <= 2 * naive_err
    np.testing.assert_allclose(lse, ref_lse, rtol=0, atol=1e-5)


def test_backward_is_the_float32_backward_rounded(rng):
    q, k, v = (x.astype(BF16) for x in random_qkv(rng, hq=2, lq=70, lk=90, d=16))
    out, lse = nsa.attention(q, k, v, causal=True, return_lse=True)
    dout = np.ones_like(out)
    grads = nsa.attention_backward(dout, q, k, v, out, lse, causal=True)
    wide = [x.astype(np.float32) for x in (dout, q, k, v, out)]
    expected = nsa.attention_backward(*wide, lse, causal=True)
    for g, e in zip(grads, expected):
        assert g.dtype == BF16
        np.testing.assert_array_equal(g, e.astype(BF16))


def test_reference_and_block_sparse_take_bfloat16(rng):
    q, k, v = (x.astype(BF16) for x in random_qkv(rng, hq=2, lq=64, lk=64, d=8))
    ref = nsa.attention(q, k, v, backend="reference")
    assert ref.dtype == BF16
    sparse = nsa.block_sparse_attention(q, k, v, layouts.dense(64, 16))
    assert rel_err(sparse.astype(np.float64), ref.astype(np.float64)) < 1e-2


def test_varlen_in_bfloat16(rng):
    cu = np.array([0, 40, 41, 100], np.int32)
    q, k, v = (x[:, 0].astype(BF16) for x in random_qkv(rng, batch=(2,), hq=1, lq=100, d=16))
    out = nsa.attention_varlen(q, k, v, cu, cu, causal=True)
    wide = nsa.attention_varlen(*(x.astype(np.float32) for x in (q, k, v)), cu, cu, causal=True)
    assert out.dtype == BF16
    np.testing.assert_array_equal(out, wide.astype(BF16))


def test_kvcache_in_bfloat16_writes_bfloat16_tokens(rng):
    k_cache, v_cache = (x.astype(BF16) for x in random_qkv(rng, batch=(2,), hq=2, lq=30, d=8)[1:])
    q = rng.standard_normal((2, 4, 1, 8)).astype(BF16)
    k_new, v_new = rng.standard_normal((2, 2, 2, 1, 8)).astype(BF16)
    lengths = np.array([3, 20], np.int32)
    wide = [x.astype(np.float32) for x in (k_cache, v_cache)]
    expected = nsa.attention_with_kvcache(q.astype(np.float32), *wide, cache_seqlens=lengths,
                                          k_new=k_new.astype(np.float32), v_new=v_new.astype(np.float32))  # fmt: skip
    out = nsa.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=lengths, k_new=k_new, v_new=v_new)
    assert out.dtype == BF16 and k_cache.dtype == BF16
    np.testing.assert_array_equal(k_cache[1, :, 20], k_new[1, :, 0])
    np.testing.assert_array_equal(out, expected.astype(BF16))

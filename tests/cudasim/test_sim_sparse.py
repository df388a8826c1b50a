"""numba-cuda sparse attention (the block-sparse kernels on the index) in the CUDA simulator, against the float64
reference: one small case with everything at once (batch 2, GQA, causal, an unused slot, counts, partial blocks)."""

from __future__ import annotations

import numpy as np
from conftest import random_array, random_qkv, rel_err

import npsparseattn as nsa


def test_batch_gqa_causal_unused_slots_forward_and_backward(rng):
    q, k, v = random_qkv(rng, batch=(2,), hq=2, hk=1, lq=40, lk=45, d=8, dtype=np.float32)
    dout = random_array(rng, q.shape, np.float32)
    kv_idx = np.argsort(rng.random((2, 1, 3, 3)), axis=-1)[..., :2].astype(np.int32)  # 3 query x 3 key blocks
    kv_idx[0, 0, 2, 0] = -1  # an unused slot before a used one
    kv_cnt = np.full((2, 1, 3), 2, np.int32)
    kv_cnt[1, 0, 1] = 0  # a list with nothing: those queries see no key
    kw = dict(kv_cnt=kv_cnt, q_block=16, kv_block=16, causal=True)
    out, lse = nsa.sparse_attention(q, k, v, kv_idx, return_lse=True, backend="numba-cuda", **kw)
    grads = nsa.sparse_attention_backward(dout, q, k, v, out, lse, kv_idx, backend="numba-cuda", **kw)
    f64 = [x.astype(np.float64) for x in (q, k, v, dout)]
    ref_out, ref_lse = nsa.sparse_attention(*f64[:3], kv_idx, return_lse=True, backend="reference", **kw)
    ref_grads = nsa.sparse_attention_backward(f64[3], *f64[:3], ref_out, ref_lse, kv_idx, backend="reference", **kw)
    empty = np.isneginf(ref_lse)
    assert empty[1, :2, 16:32].all()  # the empty list reaches both query heads of its group
    np.testing.assert_array_equal(np.isneginf(lse), empty)
    assert np.all(out[empty] == 0)
    np.testing.assert_allclose(lse[~empty], ref_lse[~empty], rtol=0, atol=1e-5)
    assert rel_err(out, ref_out) < 1e-5
    for got, ref in zip(grads, ref_grads):
        assert rel_err(got, ref, floor=1.0) < 4e-5

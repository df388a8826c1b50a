"""Sparse attention on the GPU backends: the index as block-sparse runs, the ``cupy`` backend end to end (host
emulation in every CI run, a GPU where there is one), ``numba-cuda`` on a GPU, and what both refuse.

The bound of the ``cupy`` results is flash-attn's: twice the error of a naive same-precision implementation
with the same token mask, plus a small epsilon (as ``test_raw_block_sparse.py``).
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import random_array, random_qkv, rel_err
from raw_support import DTYPES, MODES, RawMode, assert_within_twice_naive, naive_attention

import npsparseattn as nsa
from npsparseattn import BackendError, layouts
from npsparseattn.cuda import _env
from npsparseattn.cuda.cupy_raw import sparse as raw_sparse
from npsparseattn.cuda.index_runs import index_runs
from npsparseattn.cuda.numba_cuda import sparse as numba_sparse
from npsparseattn.problems.sparse import sparse_problem
from npsparseattn.reference import sparse as reference_sparse


def test_index_runs_are_the_runs_of_the_equal_layout(rng):
    """Rows and transpose of the folded index equal those of a BlockLayout with one pattern per query head."""
    n_batch, hk, group, nqb, nkb = 2, 2, 3, 5, 7
    kv_idx = np.sort(np.argsort(rng.random((n_batch, hk, nqb, nkb)), axis=-1)[..., :4], axis=-1).astype(np.int32)
    kv_idx[rng.random(kv_idx.shape) < 0.3] = nkb  # unused slots, moved to the back below
    kv_idx = np.sort(kv_idx, axis=-1)
    kv_idx[kv_idx == nkb] = -1
    runs = index_runs(kv_idx, hq=hk * group, n_key_blocks=nkb)
    blocks = reference_sparse.block_mask(kv_idx, (kv_idx >= 0).sum(-1), nkb, np)  # (B, Hk, nqb, nkb)
    per_head = np.repeat(blocks, group, axis=1).reshape(n_batch * hk * group, nqb, nkb)
    layout = layouts.from_block_mask(per_head, 16, (16 * nqb, 16 * nkb))
    for got, want in zip(runs.rows + runs.columns, layout.runs() + layout.transpose().runs()):
        np.testing.assert_array_equal(got, want)
        assert got.dtype == np.int32


def _case(rng, dtype):
    """Batch 2, GQA 2:1, causal, an unused slot, an empty list, partial last blocks, q_block 16 != kv_block 32."""
    q, k, v = random_qkv(rng, batch=(2,), hq=4, hk=2, lq=50, lk=70, d=32, dtype=DTYPES[dtype])
    dout = random_array(rng, q.shape, DTYPES[dtype])
    kv_idx = np.argsort(rng.random((2, 2, 4, 3)), axis=-1)[..., :2].astype(np.int32)  # 4 query x 3 key blocks
    kv_idx[0, 1, 2, 0] = -1
    kv_cnt = np.full((2, 2, 4), 2, np.int32)
    kv_cnt[1, 0, 1] = 0
    return (q, k, v, dout, kv_idx), dict(kv_cnt=kv_cnt, q_block=16, kv_block=32, causal=True)


@pytest.mark.parametrize("mode", MODES)
def test_cupy_matches_reference_within_twice_naive(rng, monkeypatch, mode):
    mode = RawMode(mode, monkeypatch)
    (q, k, v, dout, kv_idx), kw = _case(rng, "float16")
    arrays = mode.put(q, k, v, dout, kv_idx, kw["kv_cnt"])
    kw_dev = dict(kw, kv_cnt=arrays[5])
    out, lse = nsa.sparse_attention(*arrays[:3], arrays[4], return_lse=True, backend="cupy", **kw_dev)
    grads = nsa.sparse_attention_backward(arrays[3], *arrays[:3], out, lse, arrays[4], backend="cupy", **kw_dev)
    out, lse, grads = mode.get(out), mode.get(lse), [mode.get(g) for g in grads]
    f64 = [x.astype(np.float64) for x in (q, k, v, dout)]
    ref_out, ref_lse = nsa.sparse_attention(*f64[:3], kv_idx, return_lse=True, backend="reference", **kw)
    ref_grads = nsa.sparse_attention_backward(f64[3], *f64[:3], ref_out, ref_lse, kv_idx, backend="reference", **kw)
    mask = reference_sparse.token_mask(kv_idx, kw["kv_cnt"], 4, 50, 70, 16, 32, 20, None, 0, np)  # (B, Hq, Lq, Lk)
    naive = naive_attention(q, k, v, dout, mask, 32**-0.5, q.dtype)
    assert_within_twice_naive([out, *grads], naive, [ref_out, *ref_grads])
    empty = np.isneginf(ref_lse)
    assert empty[1, :2, 16:32].all()  # the empty list reaches both query heads of its group
    np.testing.assert_array_equal(np.isneginf(lse), empty)
    np.testing.assert_allclose(lse[~empty], ref_lse[~empty], rtol=0, atol=1e-5)
    assert np.all(out[empty] == 0)


@pytest.mark.gpu
def test_numba_cuda_on_a_gpu_matches_reference(rng):
    reasons = _env.numba_cuda_reasons()
    if reasons or _env.simulator():
        pytest.skip("numba-cuda cannot run here: " + "; ".join(reasons or ["simulator mode"]))
    import cupy

    (q, k, v, dout, kv_idx), kw = _case(rng, "float16")
    q, k, v, dout = (x.astype(np.float32) for x in (q, k, v, dout))
    put = cupy.asarray
    kw_dev = dict(kw, kv_cnt=put(kw["kv_cnt"]))
    out, lse = nsa.sparse_attention(put(q), put(k), put(v), put(kv_idx), return_lse=True, backend="numba-cuda",
                                    **kw_dev)  # fmt: skip
    grads = nsa.sparse_attention_backward(put(dout), put(q), put(k), put(v), out, lse, put(kv_idx),
                                          backend="numba-cuda", **kw_dev)  # fmt: skip
    f64 = [x.astype(np.float64) for x in (q, k, v, dout)]
    ref_out, ref_lse = nsa.sparse_attention(*f64[:3], kv_idx, return_lse=True, backend="reference", **kw)
    ref_grads = nsa.sparse_attention_backward(f64[3], *f64[:3], ref_out, ref_lse, kv_idx, backend="reference", **kw)
    np.testing.assert_array_equal(np.isneginf(cupy.asnumpy(lse)), np.isneginf(ref_lse))
    assert rel_err(cupy.asnumpy(out), ref_out) < 1e-5
    for got, ref in zip(grads, ref_grads):
        assert rel_err(cupy.asnumpy(got), ref, floor=1.0) < 4e-5


@pytest.mark.parametrize(("q_block", "kv_block", "words"), [(16, 1, "kv_block=1 (token mode)"),
                                                             (1, 32, "q_block=1 (one list per query)"),
                                                             (16, 8, "kv_block=8 is below 16")])  # fmt: skip
def test_small_blocks_are_refused_with_the_reason(rng, monkeypatch, q_block, kv_block, words):
    monkeypatch.setenv("NPSPARSEATTN_CUDA_EMULATE", "1")
    q, k, v = random_qkv(rng, hq=2, lq=40, lk=40, d=32, dtype=np.float16)
    kv_idx = np.zeros((2, -(-40 // q_block), 1), np.int32)
    problem = sparse_problem(q, k, v, kv_idx, q_block=q_block, kv_block=kv_block)
    for module in (raw_sparse, numba_sparse):
        assert any(words in reason for reason in module.unsupported(problem)), module.__name__
    with pytest.raises(BackendError, match=r"(?s)cupy.*" + words.replace("(", r"\(").replace(")", r"\)")):
        nsa.sparse_attention(q, k, v, kv_idx, q_block=q_block, kv_block=kv_block, backend="cupy")

"""The ``cupy`` backend's block-sparse attention end to end, against the float64 reference.

As ``test_raw_attention.py``: ``emulated`` runs the CUDA C++ of
``kernels/block_sparse.cu`` on the host in every CI run, ``gpu`` (marker) on a
CUDA GPU; the bound is twice the error of a naive same-precision
implementation with the same token mask, plus a small epsilon.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import random_array
from raw_support import DTYPE_NAMES, DTYPES, MODES, RawMode, assert_within_twice_naive, naive_attention

import npsparseattn as nsa
from npsparseattn import layouts, reference
from npsparseattn.cuda import layout_runs
from npsparseattn.cuda.cupy_raw import block_sparse as raw_block_sparse
from npsparseattn.cuda.cupy_raw.emulate import host

BUILDERS = {
    "random-40%": lambda lq, lk, block, hq: layouts.from_block_mask(
        np.random.default_rng(7).random((hq, -(-lq // block[0]), -(-lk // block[1]))) < 0.4, block, (lq, lk)
    ),
    "strided": lambda lq, lk, block, hq: layouts.strided((lq, lk), block, 3),
    "sliding-window": lambda lq, lk, block, hq: layouts.sliding_window((lq, lk), block, (70, 10)),
    "bigbird-per-head": lambda lq, lk, block, hq: layouts.bigbird((lq, lk), block, random_blocks=1, heads=hq, seed=2),
    "empty-rows": lambda lq, lk, block, hq: layouts.from_block_mask(
        np.arange(-(-lq // block[0]))[:, None] % 2 == np.arange(-(-lk // block[1]))[None, :] % 3, block, (lq, lk)
    ),
}
CASES = [  # (builder, shape, block): every builder, block sizes below, at and above the 64 of a CTA
    pytest.param("random-40%", dict(hq=2, hk=1, lq=200, lk=200, d=64), (64, 64), id="random-gqa-64x64-d64"),
    pytest.param("strided", dict(hq=2, hk=2, lq=150, lk=230, d=32), (128, 64), id="strided-128x64-lq<lk-d32"),
    pytest.param("sliding-window", dict(hq=4, hk=2, lq=170, lk=100, d=128), (32, 48), id="window-32x48-lq>lk-d128"),
    pytest.param("bigbird-per-head", dict(hq=2, hk=1, lq=96, lk=160, d=96), (16, 80), id="bigbird-heads-16x80-d96"),
    pytest.param("empty-rows", dict(hq=2, hk=1, lq=150, lk=130, d=32), (48, 32), id="empty-rows-48x32-d32"),
]
MASKS = [
    pytest.param(dict(), id="full"),
    pytest.param(dict(causal=True), id="causal"),
    pytest.param(dict(window=(45, 12)), id="window"),
]


@pytest.fixture(params=MODES)
def mode(request, monkeypatch):
    return RawMode(request.param, monkeypatch)


def _inputs(rng, dtype, hq, hk, lq, lk, d):
    shapes = [(1, hq, lq, d), (1, hk, lk, d), (1, hk, lk, d), (1, hq, lq, d)]
    return [random_array(rng, s).astype(DTYPES[dtype]) for s in shapes]


def check(mode, q, k, v, dout, layout, kw):
    """Forward and backward of backend "cupy" against the float64 reference with the same layout."""
    out, lse = nsa.block_sparse_attention(*mode.put(q, k, v), layout, return_lse=True, backend="cupy", **kw)
    grads = nsa.block_sparse_attention_backward(*mode.put(dout, q, k, v), out, lse, layout, backend="cupy", **kw)
    out, lse, grads = mode.get(out), mode.get(lse), [mode.get(g) for g in grads]
    q64, k64, v64, do64 = (x.astype(np.float64) for x in (q, k, v, dout))
    ref_out, ref_lse = reference.block_sparse_attention(q64, k64, v64, layout, **kw)
    ref_grads = reference.block_sparse_attention_backward(do64, q64, k64, v64, layout, **kw)
    lq, lk = q.shape[-2], k.shape[-2]
    left, right = kw.get("window") or (None, None)
    visible = reference.visibility_mask(lq, lk, left=left, right=0 if kw.get("causal") else right)
    mask = layout.to_token_mask() & visible  # (layout heads, Lq, Lk)
    naive = naive_attention(q, k, v, dout, mask, q.shape[-1] ** -0.5, q.dtype)
    assert_within_twice_naive([out, *grads], naive, [ref_out, *ref_grads])
    empty = ~np.isfinite(ref_lse)
    np.testing.assert_array_equal(np.isneginf(lse), empty)
    np.testing.assert_allclose(lse[~empty], ref_lse[~empty], rtol=0, atol=1e-5)
    assert np.all(out[empty] == 0)
    return out, lse, grads


@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize(("builder", "shape", "block"), CASES)
@pytest.mark.parametrize("dtype", DTYPE_NAMES)
def test_matches_reference_within_twice_naive(rng, mode, dtype, builder, shape, block, mask):
    q, k, v, dout = _inputs(rng, dtype, **shape)
    layout = BUILDERS[builder](shape["lq"], shape["lk"], block, shape["hq"])
    check(mode, q, k, v, dout, layout, mask)


def test_rows_without_blocks_give_zero_output_and_gradients(rng, mode):
    q, k, v, dout = _inputs(rng, "float16", hq=2, hk=1, lq=130, lk=130, d=64)
    blocks = np.zeros((3, 3), bool)
    blocks[1, 0] = blocks[2, 2] = True  # query block 0 stores nothing; key block 1 is never attended
    layout = layouts.from_block_mask(blocks, 64, 130)
    out, lse, (dq, dk, dv) = check(mode, q, k, v, dout, layout, dict())
    assert np.all(out[:, :, :64] == 0) and np.all(np.isneginf(lse[:, :, :64])) and np.all(dq[:, :, :64] == 0)
    assert np.all(dk[:, :, 64:128] == 0) and np.all(dv[:, :, 64:128] == 0)


@pytest.mark.parametrize("causal", [False, True])
def test_dense_layout_gives_the_bits_of_dense_attention(rng, monkeypatch, causal):
    """With 64 x 64 blocks the dense layout's single run is walked tile for tile as the dense kernels walk it."""
    RawMode("emulated", monkeypatch)
    q, k, v, dout = _inputs(rng, "bfloat16", hq=4, hk=2, lq=192, lk=192, d=32)
    layout = layouts.dense(192, 64)
    sparse = nsa.block_sparse_attention(q, k, v, layout, causal=causal, return_lse=True, backend="cupy")
    dense = nsa.attention(q, k, v, causal=causal, return_lse=True, backend="cupy")
    sparse_grads = nsa.block_sparse_attention_backward(dout, q, k, v, *sparse, layout, causal=causal, backend="cupy")
    dense_grads = nsa.attention_backward(dout, q, k, v, *dense, causal=causal, backend="cupy")
    for a, b in zip([*sparse, *sparse_grads], [*dense, *dense_grads]):
        np.testing.assert_array_equal(a, b)


def test_kernels_write_every_output_element(rng, mode):
    q, k, v, dout = mode.put(*_inputs(rng, "bfloat16", hq=4, hk=2, lq=100, lk=120, d=64))
    layout = layouts.strided((100, 120), (32, 64), 2, causal=False)
    kw = dict(scale=0.3, offset=20, left=50, right=0)
    nan = np.float32(np.nan)
    out, lse = mode.put(np.full(dout.shape, nan).astype(DTYPES["bfloat16"]), np.full(dout.shape[:3], nan, np.float32))
    raw_block_sparse.forward(q, k, v, layout, out=out, lse=lse, **kw)
    assert not np.isnan(mode.get(out).astype(np.float32)).any() and not np.isnan(mode.get(lse)).any()
    grads = mode.put(*(np.full(x.shape, nan).astype(DTYPES["bfloat16"]) for x in (q, k, v)))
    raw_block_sparse.backward(dout, q, k, v, out, lse, layout, grads=grads, **kw)
    for g in grads:
        assert not np.isnan(mode.get(g).astype(np.float32)).any()


@pytest.mark.parametrize("schedule", [host.REVERSE, host.GREEDY | host.EAGER_COPIES], ids=["reverse", "greedy-eager"])
def test_other_thread_schedules_give_the_same_bits(rng, monkeypatch, schedule):
    RawMode("emulated", monkeypatch)
    q, k, v, dout = _inputs(rng, "float16", hq=2, hk=1, lq=300, lk=300, d=32)
    layout = layouts.bigbird(300, (32, 32), random_blocks=2, seed=5)

    def run():
        out, lse = nsa.block_sparse_attention(q, k, v, layout, causal=True, return_lse=True, backend="cupy")
        grads = nsa.block_sparse_attention_backward(dout, q, k, v, out, lse, layout, causal=True, backend="cupy")
        return [out, lse, *grads]

    first = run()
    monkeypatch.setattr(host, "SCHEDULE", schedule)
    for a, b in zip(first, run()):
        np.testing.assert_array_equal(a, b)


def test_layout_runs_are_cached_per_layout_object_and_device(monkeypatch):
    """One cache for both GPU backends: runs made once per (layout, transposition, device), evicted oldest first."""
    monkeypatch.setattr(layout_runs, "_CACHE", type(layout_runs._CACHE)())
    like = np.zeros(1, np.float32)
    layout = layouts.causal(128, 32)
    first = layout_runs.device_runs(layout, like)
    assert layout_runs.device_runs(layout, like) is first
    transposed = layout_runs.device_runs(layout, like, transposed=True)
    assert transposed is not first
    assert [a.dtype for a in first + transposed] == [np.int32] * 6
    np.testing.assert_array_equal(first[0], layout.runs()[0])
    np.testing.assert_array_equal(transposed[0], layout.transpose().runs()[0])
    for _ in range(layout_runs.CACHED):
        layout_runs.device_runs(layouts.causal(128, 32), like)
    assert layout_runs.device_runs(layout, like) is not first  # evicted by newer layouts

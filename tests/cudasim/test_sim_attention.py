"""numba-cuda tiled attention in the CUDA simulator, through the public API, against the float64 reference.

The kernels run with the simulator's small tiles (4 x 4 threads, 8 x 8 score
tiles), so a few dozen rows already span several partial tiles; two tests
run the GPU's own tile sizes (64 and 128 head-dimension columns) on a few
rows.  Every case checks the forward (out, lse, empty rows) and the backward.
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest
from conftest import BackendCase, random_array, random_qkv, rel_err
from test_attention import check_against_reference

import npsparseattn as nsa
from npsparseattn import reference
from npsparseattn.cuda.numba_cuda import attention_kernels, tiles
from npsparseattn.cuda.numba_cuda import exact as numba_exact

CUDA = BackendCase("attention", "numba-cuda")

CASES = [
    pytest.param(dict(hq=2, lq=21, lk=21, d=8), dict(), id="square-odd"),
    pytest.param(dict(hq=2, lq=21, lk=21, d=8), dict(window=(5, 2)), id="square-window"),
    pytest.param(dict(batch=(2,), hq=2, hk=1, lq=13, lk=27, d=12, dv=8), dict(causal=True), id="gqa-dv-causal"),
    pytest.param(dict(hq=4, hk=2, lq=13, lk=27, d=12), dict(window=(7, None), causal=True), id="gqa-causal-window"),
    pytest.param(dict(hq=2, hk=1, lq=30, lk=11, d=16, dv=5), dict(causal=True), id="mqa-lq>lk-empty-rows"),
    pytest.param(dict(hq=2, hk=1, lq=30, lk=11, d=16, dv=5), dict(window=(0, 0)), id="mqa-diagonal"),
    pytest.param(dict(hq=1, lq=1, lk=40, d=8), dict(causal=True), id="decode"),
    pytest.param(dict(hq=2, lq=17, lk=17, d=20, dv=3), dict(scale=0.7, causal=True), id="d20-scale"),
]


@pytest.mark.parametrize(("shape", "mask"), CASES)
def test_matches_reference(rng, shape, mask):
    q, k, v = random_qkv(rng, dtype=np.float32, **shape)
    check_against_reference(q, k, v, mask, np.float32, CUDA)


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16], ids=["float16", "bfloat16"])
def test_half_precision_storage(rng, dtype):
    q, k, v = random_qkv(rng, hq=2, hk=1, lq=19, lk=23, d=8, dtype=dtype)
    check_against_reference(q, k, v, dict(causal=True), dtype, CUDA)


def test_float16_error_within_twice_naive_float16(rng):
    q, k, v = random_qkv(rng, hq=1, lq=24, lk=24, d=16, dtype=np.float16)
    out = nsa.attention(q, k, v, causal=True, backend="numba-cuda")
    assert out.dtype == np.float16
    ref_out, _ = reference.attention(q, k, v, causal=True)
    s = (q @ k.swapaxes(-1, -2)) * np.float16(0.25)  # every step in float16
    s = np.where(reference.visibility_mask(24, 24, right=0), s, np.float16(-np.inf))
    p = np.exp(s - s.max(-1, keepdims=True))
    naive = (p / p.sum(-1, keepdims=True)).astype(np.float16) @ v
    naive_err = np.abs(naive.astype(np.float64) - ref_out).max()
    assert np.abs(out.astype(np.float64) - ref_out).max() <= 2 * naive_err + 1e-4


@pytest.mark.parametrize(("d", "dv"), [(40, 24), (72, 100)], ids=["gpu-tiles-64", "gpu-tiles-128"])
def test_gpu_tile_sizes(rng, monkeypatch, d, dv):
    """The GPU's own tile instances (64 or 128 head-dimension columns, 64 threads) on a few partial tiles."""
    monkeypatch.setattr(
        attention_kernels, "tiles", lambda kernel, width, user=False: tiles.tiles(kernel, width, False, user=user)
    )
    q, k, v = random_qkv(rng, hq=2, hk=1, lq=40, lk=37, d=d, dv=dv, dtype=np.float32)
    check_against_reference(q, k, v, dict(causal=True), np.float32, CUDA)


def test_kernels_write_every_output_element(rng):
    """Buffers poisoned with NaN come back fully written (the kernel contract's ``out``, ``lse`` and ``grads``)."""
    q, k, v = random_qkv(rng, batch=(1,), hq=2, hk=1, lq=20, lk=26, d=8, dv=6, dtype=np.float32)
    mask = dict(scale=0.25, offset=6, left=9, right=0)
    out, lse = np.full((1, 2, 20, 6), np.nan, np.float32), np.full((1, 2, 20), np.nan, np.float32)
    numba_exact.forward(q, k, v, out=out, lse=lse, **mask)
    assert not np.isnan(out).any() and not np.isnan(lse).any()
    grads = tuple(np.full(x.shape, np.nan, np.float32) for x in (q, k, v))
    numba_exact.backward(random_array(rng, out.shape, np.float32), q, k, v, out, lse, grads=grads, **mask)
    assert all(not np.isnan(g).any() for g in grads)


def test_empty_sequences(rng):
    q, k, v = random_qkv(rng, hq=2, lq=7, lk=0, d=8, dtype=np.float32)
    out, lse = nsa.attention(q, k, v, return_lse=True, backend="numba-cuda")
    assert out.shape == (2, 7, 8) and np.all(out == 0) and np.all(np.isneginf(lse))
    dq, dk, dv = nsa.attention_backward(np.ones_like(out), q, k, v, out, lse, backend="numba-cuda")
    assert np.all(dq == 0) and dk.shape == k.shape and dv.shape == v.shape
    q, k, v = random_qkv(rng, hq=2, lq=0, lk=9, d=8, dtype=np.float32)
    out, lse = nsa.attention(q, k, v, return_lse=True, backend="numba-cuda")
    assert out.shape == (2, 0, 8) and lse.shape == (2, 0)
    _, dk, dv = nsa.attention_backward(out, q, k, v, out, lse, backend="numba-cuda")
    assert np.all(dk == 0) and np.all(dv == 0)


def test_inputs_are_not_modified(rng):
    q, k, v = random_qkv(rng, hq=2, lq=12, lk=12, d=8, dtype=np.float32)
    copies = [x.copy() for x in (q, k, v)]
    out, lse = nsa.attention(q, k, v, causal=True, return_lse=True, backend="numba-cuda")
    nsa.attention_backward(np.ones_like(out), q, k, v, out, lse, causal=True, backend="numba-cuda")
    assert all(np.array_equal(x, c) for x, c in zip((q, k, v), copies))


def test_non_contiguous_inputs_are_copied_not_misread(rng):
    q, k, v = random_qkv(rng, hq=2, lq=15, lk=15, d=8, dtype=np.float32)
    strided = [np.ascontiguousarray(x.transpose(1, 0, 2)).transpose(1, 0, 2) for x in (q, k, v)]
    out = nsa.attention(*strided, causal=True, backend="numba-cuda")
    assert rel_err(out, reference.attention(q, k, v, causal=True)[0]) < 1e-5


def test_bfloat16_conversions_match_ml_dtypes():
    """The bit conversions the kernels use for bfloat16 (simulated here in NumPy) against ml_dtypes."""
    from npsparseattn.cuda.numba_cuda.runtime import storage

    widen, narrow = storage(True)
    bits = np.arange(0, 65536, 7, dtype=np.uint16)
    widened = np.array([widen(b) for b in bits], np.float32)
    expected = bits.view(ml_dtypes.bfloat16).astype(np.float32)
    same = widened.view(np.uint32) == expected.view(np.uint32)
    assert np.all(same | (np.isnan(widened) & np.isnan(expected)))
    rng = np.random.default_rng(0)
    values = rng.standard_normal(3000).astype(np.float32) * np.float32(10.0) ** rng.integers(-40, 39, 3000)
    values = np.concatenate([values, np.array([np.inf, -np.inf, 0.0, -0.0, 3.3961e38, math.nan], np.float32)])
    narrowed = np.array([narrow(x) for x in values], np.uint16)
    expected = values.astype(ml_dtypes.bfloat16).view(np.uint16)
    assert np.array_equal(narrowed[:-1], expected[:-1])
    assert np.isnan(narrowed[-1:].view(ml_dtypes.bfloat16)).all()

"""Tiled exact attention (numba backend) against the float64 dense reference."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import AutoCase, random_array, random_qkv, rel_err
from hypothesis import given, settings
from hypothesis import strategies as st

import npsparseattn as nsa
from npsparseattn import reference
from npsparseattn.cpu import exact as cpu_kernels
from npsparseattn.problems import attention_problem, lse_dtype

MASKS = [
    pytest.param(dict(), id="full"),
    pytest.param(dict(causal=True), id="causal"),
    pytest.param(dict(window=(17, 5)), id="window"),
    pytest.param(dict(window=(40, None), causal=True), id="causal-window"),
    pytest.param(dict(window=(None, 0)), id="right0"),
    pytest.param(dict(window=(0, 0)), id="diagonal"),
]

SHAPES = [
    pytest.param(dict(hq=2, lq=300, lk=300, d=64), id="square-not-tile-multiple"),
    pytest.param(dict(batch=(2,), hq=4, hk=2, lq=77, lk=131, d=16, dv=24), id="gqa-dv"),
    pytest.param(dict(hq=3, hk=1, lq=129, lk=257, d=32), id="mqa-lq<lk"),
    pytest.param(dict(hq=2, lq=1, lk=517, d=40), id="decode"),
    pytest.param(dict(hq=2, hk=1, lq=260, lk=70, d=8, dv=5), id="lq>lk"),
    pytest.param(dict(batch=(2, 3), hq=2, lq=19, lk=23, d=4), id="nd-batch"),
]


def check_against_reference(q, k, v, kw, dtype, backend=None):
    """Forward and backward of ``backend`` (a BackendCase; default: auto on NumPy) against the float64 oracle."""
    be = AutoCase("attention") if backend is None else backend
    be.require(attention_problem(q, k, v, **kw))
    tol = be.tolerance(dtype)
    out, lse = nsa.attention(*be.put(q, k, v), return_lse=True, backend=be.name, **kw)
    out, lse = be.get(out), be.get(lse)
    ref_out, ref_lse = reference.attention(q, k, v, **kw)
    assert out.dtype == q.dtype and out.shape == ref_out.shape
    assert lse.dtype == (np.float64 if dtype == np.float64 else np.float32)
    assert rel_err(out, ref_out) < tol
    empty = ~np.isfinite(ref_lse)
    assert np.array_equal(np.isneginf(lse), empty)
    assert np.all(out[empty] == 0)
    np.testing.assert_allclose(lse[~empty], ref_lse[~empty], rtol=0, atol=50 * tol)

    dout = random_array(np.random.default_rng(1), out.shape, dtype)
    grads = nsa.attention_backward(*be.put(dout, q, k, v, out, lse), backend=be.name, **kw)
    ref_grads = reference.attention_backward(dout, q, k, v, **kw)
    for label, g, r, x in zip("qkv", grads, ref_grads, (q, k, v)):
        g = be.get(g)
        assert g.shape == x.shape and g.dtype == x.dtype, label
        assert rel_err(g, r, floor=1.0) < 4 * tol, label


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mask", MASKS)
def test_matches_reference(rng, attention_backend, dtype, shape, mask):
    q, k, v = random_qkv(rng, dtype=dtype, **shape)
    check_against_reference(q, k, v, mask, dtype, attention_backend)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_custom_scale_and_2d_inputs(rng, attention_backend, dtype):
    q, k, v = random_qkv(rng, hq=1, lq=45, lk=61, d=12, dtype=dtype)
    check_against_reference(q[0], k[0], v[0], dict(scale=0.7, causal=True), dtype, attention_backend)


def test_empty_rows_give_zero_output_neg_inf_lse_and_zero_grads(rng):
    # Lq > Lk with causal alignment bottom-right: the first Lq - Lk queries see nothing.
    q, k, v = random_qkv(rng, hq=2, lq=50, lk=20, d=8)
    out, lse = nsa.attention(q, k, v, causal=True, return_lse=True)
    assert np.all(out[:, :30] == 0) and np.all(np.isneginf(lse[:, :30]))
    assert np.all(np.isfinite(lse[:, 30:]))
    dq, dk, dv = nsa.attention_backward(np.ones_like(out), q, k, v, out, lse, causal=True)
    assert np.all(dq[:, :30] == 0)
    assert not np.isnan(dq).any() and not np.isnan(dk).any() and not np.isnan(dv).any()


def test_empty_key_sequence(rng):
    q, k, v = random_qkv(rng, hq=2, lq=7, lk=0, d=8)
    out, lse = nsa.attention(q, k, v, return_lse=True)
    assert out.shape == (2, 7, 8) and np.all(out == 0) and np.all(np.isneginf(lse))
    dq, dk, dv = nsa.attention_backward(np.ones_like(out), q, k, v, out, lse)
    assert np.all(dq == 0) and dk.shape == k.shape and dv.shape == v.shape


def test_empty_query_sequence(rng):
    q, k, v = random_qkv(rng, hq=2, lq=0, lk=9, d=8)
    out, lse = nsa.attention(q, k, v, return_lse=True)
    assert out.shape == (2, 0, 8) and lse.shape == (2, 0)
    _, dk, dv = nsa.attention_backward(out, q, k, v, out, lse)
    assert np.all(dk == 0) and np.all(dv == 0)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_kernels_write_every_output_element(rng, attention_backend, dtype):
    """Buffers poisoned with NaN must come back fully overwritten (the kernel contract's ``out``/``grads``)."""
    be = attention_backend
    q, k, v = random_qkv(rng, batch=(2,), hq=4, hk=2, lq=70, lk=90, d=16, dv=12, dtype=dtype)
    be.require(attention_problem(q, k, v))
    compute = be.impl.compute_dtype(dtype)
    q, k, v = be.put(*(x.astype(compute) for x in (q, k, v)))
    kw = dict(scale=0.25, offset=20, left=30, right=0)
    out, lse = be.put(np.full((2, 4, 70, 12), np.nan, compute), np.full((2, 4, 70), np.nan, lse_dtype(compute)))
    be.impl.module.forward(q, k, v, out=out, lse=lse, **kw)
    assert not np.isnan(be.get(out)).any() and not np.isnan(be.get(lse)).any()
    grads = be.put(*(np.full(x.shape, np.nan, compute) for x in (q, k, v)))
    (dout,) = be.put(random_array(rng, out.shape, compute))
    be.impl.module.backward(dout, q, k, v, out, lse, grads=grads, **kw)
    for g in grads:
        assert not np.isnan(be.get(g)).any()


def _transposed(x):
    """The same values laid out (B, L, H, D) and viewed as (B, H, L, D): not contiguous."""
    return np.ascontiguousarray(x.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize(
    "layout",
    ["transposed", "strided-last-axis", "reversed", "fortran", "broadcast-kv"],
)
def test_non_contiguous_inputs(rng, dtype, layout):
    q, k, v = random_qkv(rng, batch=(2,), hq=4, hk=2, lq=37, lk=53, d=16, dtype=dtype)
    if layout == "transposed":
        q, k, v = _transposed(q), _transposed(k), _transposed(v)
        assert not q.flags.c_contiguous
    elif layout == "strided-last-axis":
        q, k, v = (np.repeat(x, 2, axis=-1)[..., ::2] for x in (q, k, v))
    elif layout == "reversed":
        q, k, v = q[:, :, ::-1], k[:, :, ::-1], v[:, :, ::-1]
    elif layout == "fortran":
        q, k, v = (np.asfortranarray(x) for x in (q, k, v))
    else:
        k = np.broadcast_to(k[:, :1, :1], k.shape)
        v = np.broadcast_to(v[:, :1], v.shape)
    check_against_reference(q, k, v, dict(causal=True), dtype)


def test_float16_error_within_twice_naive_float16(rng):
    q, k, v = random_qkv(rng, hq=2, lq=200, lk=200, d=64, dtype=np.float16)
    out = nsa.attention(q, k, v, causal=True)
    assert out.dtype == np.float16
    ref_out, _ = reference.attention(q, k, v, causal=True)
    # A naive float16 implementation: every step in float16.
    s = (q @ k.swapaxes(-1, -2)) * np.float16(0.125)
    s = np.where(reference.visibility_mask(200, 200, right=0), s, np.float16(-np.inf))
    p = np.exp(s - s.max(-1, keepdims=True))
    naive = (p / p.sum(-1, keepdims=True)).astype(np.float16) @ v
    naive_err = np.abs(naive.astype(np.float64) - ref_out).max()
    assert np.abs(out.astype(np.float64) - ref_out).max() <= 2 * naive_err + 1e-4


def test_nan_in_one_query_row_stays_in_that_row(rng):
    q, k, v = random_qkv(rng, hq=1, lq=40, lk=40, d=8)
    q[0, 5, 3] = np.nan
    out = nsa.attention(q, k, v)
    assert np.isnan(out[0, 5]).all()
    assert np.isfinite(np.delete(out[0], 5, axis=0)).all()


def test_gradients_match_finite_differences(rng):
    q, k, v = random_qkv(rng, hq=2, hk=1, lq=5, lk=7, d=3, dv=2)
    kw = dict(causal=True, window=(3, None), scale=0.8)
    weights = random_array(rng, (2, 5, 2))

    def loss(q_, k_, v_):
        return float((nsa.attention(q_, k_, v_, **kw) * weights).sum())

    out, lse = nsa.attention(q, k, v, return_lse=True, **kw)
    grads = nsa.attention_backward(weights, q, k, v, out, lse, **kw)
    eps = 1e-6
    for idx, (x, g) in enumerate(zip((q, k, v), grads)):
        numeric = np.zeros_like(x)
        for pos in np.ndindex(x.shape):
            args = [q.copy(), k.copy(), v.copy()]
            args[idx][pos] += eps
            up = loss(*args)
            args[idx][pos] -= 2 * eps
            numeric[pos] = (up - loss(*args)) / (2 * eps)
        np.testing.assert_allclose(g, numeric, rtol=1e-6, atol=1e-8)


@settings(max_examples=25, deadline=None)
@given(
    data=st.data(),
    lq=st.integers(0, 70),
    lk=st.integers(0, 70),
    group=st.sampled_from([1, 2, 3]),
    hk=st.integers(1, 2),
    d=st.integers(1, 20),
    dv=st.integers(1, 9),
    causal=st.booleans(),
)
def test_property_random_shapes(data, lq, lk, group, hk, d, dv, causal):
    left = data.draw(st.one_of(st.none(), st.integers(0, 80)), label="left")
    right = data.draw(st.one_of(st.none(), st.integers(0, 80)), label="right")
    seed = data.draw(st.integers(0, 2**32 - 1), label="seed")
    rng = np.random.default_rng(seed)
    q, k, v = random_qkv(rng, hq=hk * group, hk=hk, lq=lq, lk=lk, d=d, dv=dv)
    check_against_reference(q, k, v, dict(causal=causal, window=(left, right)), np.float64)


def test_result_does_not_depend_on_tile_count(rng):
    """Same answer whether the work is split into many small tiles or few large ones."""
    q, k, v = random_qkv(rng, hq=1, lq=600, lk=600, d=16)
    kw = dict(scale=0.25, offset=0, left=None, right=0)
    out_big, lse_big = cpu_kernels.forward(q[None], k[None], v[None], **kw)
    batched = np.repeat(q[None], 9, axis=1)
    out_many, lse_many = cpu_kernels.forward(batched, k[None], v[None], **kw)
    np.testing.assert_allclose(out_many[:, 3], out_big[:, 0], rtol=0, atol=1e-13)
    np.testing.assert_allclose(lse_many[:, 3], lse_big[:, 0], rtol=0, atol=1e-13)


def test_inputs_are_not_modified(rng):
    q, k, v = random_qkv(rng, hq=2, lq=40, lk=40, d=8, dtype=np.float32)
    copies = [x.copy() for x in (q, k, v)]
    out, lse = nsa.attention(q, k, v, causal=True, return_lse=True)
    nsa.attention_backward(np.ones_like(out), q, k, v, out, lse, causal=True)
    for x, c in zip((q, k, v), copies):
        assert np.array_equal(x, c)

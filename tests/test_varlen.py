"""Packed variable-length attention against per-sequence float64 attention, forward and backward."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import AutoCase, FakeCupyArray, random_array, rel_err
from hypothesis import given, settings
from hypothesis import strategies as st

import npsparseattn as nsa
from npsparseattn import reference
from npsparseattn.cpu._schedule import deal
from npsparseattn.problems import lse_dtype, varlen_problem

MASKS = [
    pytest.param(dict(), id="full"),
    pytest.param(dict(causal=True), id="causal"),
    pytest.param(dict(window=(9, 3)), id="window"),
    pytest.param(dict(window=(40, None), causal=True), id="causal-window"),
]

# (lengths of q, lengths of k) per sequence: empty sequences, length 1, shorter than a tile, several tiles
LENGTHS = [
    pytest.param(([5, 0, 1, 300, 17, 2], [5, 0, 1, 300, 17, 2]), id="self-mixed"),
    pytest.param(([1, 1, 1, 1], [700, 33, 1, 260]), id="decode-like"),
    pytest.param(([3, 0, 40, 130], [9, 4, 0, 129]), id="lq-ne-lk-empty-keys"),
    pytest.param(([0, 0, 0], [0, 5, 0]), id="no-queries"),
    pytest.param(([], []), id="no-sequences"),
]


def offsets(lengths) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int32)


def packed(rng, lq, lk, *, hq=4, hk=2, d=16, dv=12, dtype=np.float64):
    cu_q, cu_k = offsets(lq), offsets(lk)
    q = random_array(rng, (hq, int(cu_q[-1]), d), dtype)
    k = random_array(rng, (hk, int(cu_k[-1]), d), dtype)
    v = random_array(rng, (hk, int(cu_k[-1]), dv), dtype)
    return q, k, v, cu_q, cu_k


def per_sequence_reference(dout, q, k, v, cu_q, cu_k, kw):
    """float64 (out, lse, dq, dk, dv) from one dense reference call per sequence."""
    out = np.zeros((q.shape[0], q.shape[1], v.shape[2]))
    lse = np.full(q.shape[:2], -np.inf)
    grads = [np.zeros(x.shape) for x in (q, k, v)]
    for s in range(cu_q.shape[0] - 1):
        rows, keys = slice(cu_q[s], cu_q[s + 1]), slice(cu_k[s], cu_k[s + 1])
        out[:, rows], lse[:, rows] = reference.attention(q[:, rows], k[:, keys], v[:, keys], **kw)
        g = reference.attention_backward(dout[:, rows], q[:, rows], k[:, keys], v[:, keys], **kw)
        grads[0][:, rows], grads[1][:, keys], grads[2][:, keys] = g
    return out, lse, *grads


def check_varlen(be, q, k, v, cu_q, cu_k, kw, dtype):
    tol = be.tolerance(dtype)
    be.require(varlen_problem(q, k, v, cu_q, cu_k, **kw))
    out, lse = nsa.attention_varlen(*be.put(q, k, v, cu_q, cu_k), return_lse=True, backend=be.name, **kw)
    out, lse = be.get(out), be.get(lse)
    dout = random_array(np.random.default_rng(7), out.shape, dtype)
    ref_out, ref_lse, *ref_grads = per_sequence_reference(dout, q, k, v, cu_q, cu_k, kw)
    assert out.dtype == q.dtype and out.shape == ref_out.shape
    assert lse.dtype == lse_dtype(dtype) and lse.shape == ref_lse.shape
    assert rel_err(out, ref_out) < tol
    empty = ~np.isfinite(ref_lse)
    assert np.array_equal(np.isneginf(lse), empty)
    assert np.all(out[empty] == 0)
    np.testing.assert_allclose(lse[~empty], ref_lse[~empty], rtol=0, atol=50 * tol)
    grads = nsa.attention_varlen_backward(*be.put(dout, q, k, v, out, lse, cu_q, cu_k), backend=be.name, **kw)
    for label, g, r, x in zip("qkv", grads, ref_grads, (q, k, v)):
        g = be.get(g)
        assert g.shape == x.shape and g.dtype == x.dtype, label
        assert rel_err(g, r, floor=1.0) < 4 * tol, label


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("lengths", LENGTHS)
def test_equals_per_sequence_attention(rng, varlen_backend, dtype, mask, lengths):
    q, k, v, cu_q, cu_k = packed(rng, *lengths, dtype=dtype)
    check_varlen(varlen_backend, q, k, v, cu_q, cu_k, mask, dtype)


def test_reference_backend_equals_per_sequence_attention(rng):
    q, k, v, cu_q, cu_k = packed(rng, [4, 0, 9], [6, 3, 9])
    out, lse = nsa.attention_varlen(q, k, v, cu_q, cu_k, causal=True, return_lse=True, backend="reference")
    dout = random_array(rng, out.shape)
    ref = per_sequence_reference(dout, q, k, v, cu_q, cu_k, dict(causal=True))
    grads = nsa.attention_varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, causal=True, backend="reference")
    for got, want in zip((out, lse, *grads), ref):
        np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-13)


def test_mqa_scale_and_head_dims(rng):
    q, k, v, cu_q, cu_k = packed(rng, [7, 130, 1], [7, 200, 50], hq=3, hk=1, d=40, dv=5)
    check_varlen(AutoCase("attention_varlen"), q, k, v, cu_q, cu_k, dict(causal=True, scale=0.3), np.float64)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_kernels_write_every_output_element(rng, varlen_backend, dtype):
    """Buffers poisoned with NaN must come back fully overwritten (the kernel contract's ``out``/``grads``)."""
    be = varlen_backend
    q, k, v, cu_q, cu_k = packed(rng, [5, 0, 140, 1], [9, 4, 140, 0], dtype=dtype)
    be.require(varlen_problem(q, k, v, cu_q, cu_k))
    compute = be.impl.compute_dtype(dtype)
    q, k, v = be.put(*(x.astype(compute) for x in (q, k, v)))
    kw = dict(scale=0.25, left=30, right=0)
    out, lse = be.put(np.full((4, 146, 12), np.nan, compute), np.full((4, 146), np.nan, lse_dtype(compute)))
    be.impl.module.forward(q, k, v, cu_q, cu_k, out=out, lse=lse, **kw)
    assert not np.isnan(be.get(out)).any() and not np.isnan(be.get(lse)).any()
    grads = be.put(*(np.full(x.shape, np.nan, compute) for x in (q, k, v)))
    (dout,) = be.put(random_array(rng, out.shape, compute))
    be.impl.module.backward(dout, q, k, v, out, lse, cu_q, cu_k, grads=grads, **kw)
    for g in grads:
        assert not np.isnan(be.get(g)).any()


def test_flash_attn_token_major_layout_is_read_in_place(rng):
    """flash-attn packs (total, H, D); its transpose is a heads-first view, not contiguous."""
    q, k, v, cu_q, cu_k = packed(rng, [33, 2, 70], [33, 50, 70], dtype=np.float32)
    tq, tk, tv = (np.ascontiguousarray(x.transpose(1, 0, 2)).transpose(1, 0, 2) for x in (q, k, v))
    assert not tq.flags.c_contiguous
    check_varlen(AutoCase("attention_varlen"), tq, tk, tv, cu_q, cu_k, dict(causal=True), np.float32)


def test_int64_offsets_and_cu_seqlens_are_not_modified(rng):
    q, k, v, cu_q, cu_k = packed(rng, [3, 4], [3, 4])
    cu64 = cu_q.astype(np.int64)
    copy = cu64.copy()
    out = nsa.attention_varlen(q, k, v, cu64, cu64)
    np.testing.assert_allclose(out, nsa.attention_varlen(q, k, v, cu_q, cu_k), rtol=0, atol=0)
    assert np.array_equal(cu64, copy)


def test_inputs_are_not_modified(rng):
    q, k, v, cu_q, cu_k = packed(rng, [30, 1, 12], [30, 7, 12], dtype=np.float32)
    copies = [x.copy() for x in (q, k, v, cu_q, cu_k)]
    out, lse = nsa.attention_varlen(q, k, v, cu_q, cu_k, causal=True, return_lse=True)
    nsa.attention_varlen_backward(np.ones_like(out), q, k, v, out, lse, cu_q, cu_k, causal=True)
    for x, c in zip((q, k, v, cu_q, cu_k), copies):
        assert np.array_equal(x, c)


def test_float16_is_computed_in_float32(rng):
    q, k, v, cu_q, cu_k = packed(rng, [50, 3], [60, 3], dtype=np.float16)
    out = nsa.attention_varlen(q, k, v, cu_q, cu_k, causal=True)
    wide = nsa.attention_varlen(*(x.astype(np.float32) for x in (q, k, v)), cu_q, cu_k, causal=True)
    assert out.dtype == np.float16
    np.testing.assert_array_equal(out, wide.astype(np.float16))


@settings(max_examples=25, deadline=None)
@given(
    data=st.data(),
    n_seqs=st.integers(0, 5),
    group=st.sampled_from([1, 2]),
    causal=st.booleans(),
)
def test_property_random_lengths(data, n_seqs, group, causal):
    lq = data.draw(st.lists(st.integers(0, 40), min_size=n_seqs, max_size=n_seqs), label="lq")
    lk = data.draw(st.lists(st.integers(0, 40), min_size=n_seqs, max_size=n_seqs), label="lk")
    left = data.draw(st.one_of(st.none(), st.integers(0, 45)), label="left")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    q, k, v, cu_q, cu_k = packed(rng, lq, lk, hq=2 * group, hk=2, d=5, dv=3)
    kw = dict(causal=causal, window=(left, None))
    check_varlen(AutoCase("attention_varlen"), q, k, v, cu_q, cu_k, kw, np.float64)


def test_tasks_are_dealt_once_each_and_evenly():
    costs = np.random.default_rng(0).integers(1, 1000, 103)
    order, starts = deal(costs, 4)
    assert sorted(order.tolist()) == list(range(103))
    sizes = np.diff(starts)
    assert sizes.sum() == 103 and sizes.max() - sizes.min() <= 1
    totals = [costs[order[starts[w] : starts[w + 1]]].sum() for w in range(4)]
    assert max(totals) - min(totals) <= costs.max()


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("cu_q", "error", "message"),
    [
        (np.array([1, 5], np.int32), ValueError, r"cu_seqlens_q must start at 0, got cu_seqlens_q\[0\] = 1"),
        (np.array([0, 4, 3, 5], np.int32), ValueError, r"must be non-decreasing: cu_seqlens_q\[1\] = 4 > "),
        (np.array([0, 4], np.int32), ValueError, r"cu_seqlens_q must end at the packed length 5, got "),
        (np.array([[0, 5]], np.int32), ValueError, r"cu_seqlens_q must be a 1-D array of n_seqs \+ 1 offsets"),
        (np.array([0.0, 5.0]), TypeError, r"cu_seqlens_q must be an integer array \(int32\), got dtype float64"),
        ([0, 5], TypeError, r"cu_seqlens_q must be a NumPy or CuPy array, got builtins.list"),
        (np.array([0, 2, 5], np.int32), ValueError, r"the same number of sequences: 2 vs 1"),
    ],
)
def test_offset_errors(rng, cu_q, error, message):
    q, k, v, _, cu_k = packed(rng, [5], [5])
    with pytest.raises(error, match=message):
        nsa.attention_varlen(q, k, v, cu_q, cu_k)


def test_shape_and_dtype_errors(rng, fake_cupy):
    q, k, v, cu_q, cu_k = packed(rng, [5], [5])
    with pytest.raises(ValueError, match=r"q must have 3 axes \(H, total, D\) of packed sequences, got shape"):
        nsa.attention_varlen(q[None], k, v, cu_q, cu_k)
    with pytest.raises(ValueError, match=r"query heads \(4\) must be a multiple of key/value heads \(3\)"):
        nsa.attention_varlen(q, np.concatenate([k, k[:1]]), np.concatenate([v, v[:1]]), cu_q, cu_k)
    with pytest.raises(TypeError, match=r"q has dtype float64 but k has dtype float32"):
        nsa.attention_varlen(q, k.astype(np.float32), v, cu_q, cu_k)
    with pytest.raises(TypeError, match=r"cu_seqlens_k is a CuPy array but q is a NumPy array"):
        nsa.attention_varlen(q, k, v, cu_q, FakeCupyArray(cu_k))
    out, lse = nsa.attention_varlen(q, k, v, cu_q, cu_k, return_lse=True)
    with pytest.raises(ValueError, match=r"dout must have shape \(4, 5, 12\) \(like the forward output\)"):
        nsa.attention_varlen_backward(out[:, :4], q, k, v, out, lse, cu_q, cu_k)
    with pytest.raises(ValueError, match=r"lse must have shape \(4, 5\), got \(4, 4\)"):
        nsa.attention_varlen_backward(out, q, k, v, out, lse[:, :4], cu_q, cu_k)
    with pytest.raises(TypeError, match=r"out has dtype float32; expected float64 like q"):
        nsa.attention_varlen_backward(out, q, k, v, out.astype(np.float32), lse, cu_q, cu_k)


def test_gpu_arrays_are_refused_with_every_backends_reason(rng, fake_cupy):
    q, k, v, cu_q, cu_k = packed(rng, [5, 2], [5, 2])
    with pytest.raises(nsa.BackendError) as info:
        nsa.attention_varlen(FakeCupyArray(q), FakeCupyArray(k), FakeCupyArray(v), cu_q, cu_k)
    message = str(info.value)
    assert "no backend can run attention_varlen for these inputs" in message
    assert "numba: takes NumPy arrays, got CuPy" in message
    assert "reference: not chosen automatically (pass backend='reference' to use it)" in message

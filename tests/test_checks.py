"""Every validation rule: the error type and a message naming argument, value and expectation."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import random_qkv

import npsparseattn as nsa


@pytest.fixture
def qkv(rng):
    return random_qkv(rng, batch=(2,), hq=4, hk=2, lq=9, lk=11, d=8, dv=6)


def test_not_an_array(qkv):
    q, k, v = qkv
    with pytest.raises(TypeError, match=r"k must be a NumPy or CuPy array, got builtins.list"):
        nsa.attention(q, k.tolist(), v)


def test_too_few_axes(qkv):
    q, k, v = qkv
    with pytest.raises(ValueError, match=r"q must have at least 2 axes \(L, D\), got shape \(8,\)"):
        nsa.attention(q[0, 0, 0], k, v)


def test_axis_count_mismatch(qkv):
    q, k, v = qkv
    with pytest.raises(ValueError, match=r"q has 4 axes .* but k has 3 .*they must match"):
        nsa.attention(q, k[0], v)


def test_batch_mismatch(qkv):
    q, k, v = qkv
    with pytest.raises(ValueError, match=r"batch axes must match: q \(2, 4, 9, 8\), k \(1, 2, 11, 8\)"):
        nsa.attention(q, k[:1], v[:1])


def test_key_value_length_mismatch(qkv):
    q, k, v = qkv
    with pytest.raises(ValueError, match=r"k and v must have the same heads and length.*v \(2, 2, 10, 6\)"):
        nsa.attention(q, k, v[:, :, :10])


def test_head_dim_mismatch(qkv):
    q, k, v = qkv
    with pytest.raises(
        ValueError, match=r"q and k must have the same last axis D: q \(2, 4, 9, 8\) vs k \(2, 2, 11, 7\)"
    ):
        nsa.attention(q, k[..., :7], v)


def test_zero_head_dim(qkv):
    q, k, v = qkv
    with pytest.raises(ValueError, match=r"head dimensions must be >= 1"):
        nsa.attention(q, k, v[..., :0])


def test_heads_not_a_multiple(rng):
    q, k, v = random_qkv(rng, hq=5, hk=2, lq=4, d=4)
    with pytest.raises(ValueError, match=r"query heads \(5\) must be a multiple of key/value heads \(2\)"):
        nsa.attention(q, k, v)


def test_unsupported_dtype(qkv):
    q, k, v = qkv
    with pytest.raises(TypeError, match=r"q has dtype int64; expected one of float16, bfloat16, float32, float64"):
        nsa.attention(q.astype(np.int64), k.astype(np.int64), v.astype(np.int64))


def test_complex_dtype(qkv):
    q, k, v = qkv
    with pytest.raises(TypeError, match=r"k has dtype complex128"):
        nsa.attention(q, k.astype(complex), v)


def test_mixed_dtypes(qkv):
    q, k, v = qkv
    with pytest.raises(TypeError, match=r"q has dtype float64 but v has dtype float32; they must match"):
        nsa.attention(q, k, v.astype(np.float32))


@pytest.mark.parametrize("scale", ["0.5", True, None.__class__])
def test_scale_type(qkv, scale):
    q, k, v = qkv
    with pytest.raises(TypeError, match=r"scale must be a real number or None, got"):
        nsa.attention(q, k, v, scale=scale)


@pytest.mark.parametrize("scale", [np.inf, np.nan])
def test_scale_not_finite(qkv, scale):
    q, k, v = qkv
    with pytest.raises(ValueError, match=r"scale must be finite, got (inf|nan)"):
        nsa.attention(q, k, v, scale=scale)


@pytest.mark.parametrize("causal", [1, "yes", None])
def test_causal_not_bool(qkv, causal):
    q, k, v = qkv
    with pytest.raises(TypeError, match=r"causal must be True or False, got"):
        nsa.attention(q, k, v, causal=causal)


@pytest.mark.parametrize("window", [5, "ab", (1, 2, 3), [4]])
def test_window_not_a_pair(qkv, window):
    q, k, v = qkv
    with pytest.raises(TypeError, match=r"window must be None or a pair \(left, right\) as a tuple or list, got"):
        nsa.attention(q, k, v, window=window)


@pytest.mark.parametrize("window", [(1.5, 2), (True, 2), (1, "2")])
def test_window_bound_type(qkv, window):
    q, k, v = qkv
    with pytest.raises(TypeError, match=r"window (left|right) bound must be a non-negative int or None"):
        nsa.attention(q, k, v, window=window)


def test_window_negative(qkv):
    q, k, v = qkv
    with pytest.raises(ValueError, match=r"window right bound must be >= 0 \(None for unbounded\), got -1"):
        nsa.attention(q, k, v, window=(3, -1))


def test_backend_not_a_string(qkv):
    q, k, v = qkv
    with pytest.raises(TypeError, match=r"backend must be a string such as 'auto' or 'numba', got 3"):
        nsa.attention(q, k, v, backend=3)


def test_backward_dout_shape(qkv):
    q, k, v = qkv
    out, lse = nsa.attention(q, k, v, return_lse=True)
    with pytest.raises(ValueError, match=r"dout must have shape \(2, 4, 9, 6\) \(like the forward output\), got"):
        nsa.attention_backward(out[..., :5], q, k, v, out, lse)


def test_backward_out_dtype(qkv):
    q, k, v = qkv
    out, lse = nsa.attention(q, k, v, return_lse=True)
    with pytest.raises(TypeError, match=r"out has dtype float32; expected float64 like q"):
        nsa.attention_backward(out, q, k, v, out.astype(np.float32), lse)


def test_backward_lse_shape(qkv):
    q, k, v = qkv
    out, lse = nsa.attention(q, k, v, return_lse=True)
    with pytest.raises(ValueError, match=r"lse must have shape \(2, 4, 9\), got \(2, 4, 8\)"):
        nsa.attention_backward(out, q, k, v, out, lse[..., :8])


def test_backward_lse_dtype(qkv):
    q, k, v = qkv
    out, lse = nsa.attention(q, k, v, return_lse=True)
    with pytest.raises(TypeError, match=r"lse has dtype int32; expected float64, the dtype of the forward.s lse"):
        nsa.attention_backward(out, q, k, v, out, lse.astype(np.int32))


def test_bad_input_writes_nothing(qkv):
    """A rejected backward call leaves the caller's arrays untouched."""
    q, k, v = qkv
    out, lse = nsa.attention(q, k, v, return_lse=True)
    before = [x.copy() for x in (q, k, v, out, lse)]
    with pytest.raises(ValueError):
        nsa.attention_backward(out, q, k, v, out, lse[..., :3])
    for x, b in zip((q, k, v, out, lse), before):
        assert np.array_equal(x, b)

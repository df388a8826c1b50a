"""merge_states (public) and merge_into (ring attention's in-place accumulation): exact, guarded, checked."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import FakeCupyArray, random_qkv, rel_err

import npsparseattn as nsa
from npsparseattn.merge import merge_into
from npsparseattn.reference import masked_softmax


def _partial(q, k, v, cols, scale):
    """Dense float64 attention of q over the keys in ``cols`` only: (out, lse)."""
    mask = np.zeros((q.shape[-2], k.shape[-2]), dtype=bool)
    mask[:, cols] = True
    p, lse = masked_softmax(scale * q @ k.swapaxes(-1, -2), mask, np)
    return p @ v, lse


# ---------------------------------------------------------------- merge_states


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_merge_of_two_disjoint_key_sets_is_attention_over_their_union(rng, dtype):
    q, k, v = random_qkv(rng, hq=3, lq=17, lk=40, d=8, dv=5)
    cols = rng.permutation(40)
    a_out, a_lse = _partial(q, k, v, cols[:13], 0.4)
    b_out, b_lse = _partial(q, k, v, cols[13:], 0.4)
    out, lse = nsa.merge_states(a_out.astype(dtype), a_lse.astype(dtype), b_out.astype(dtype), b_lse.astype(dtype))
    ref_out, ref_lse = _partial(q, k, v, np.arange(40), 0.4)
    tol = 1e-13 if dtype == np.float64 else 1e-6
    assert out.dtype == dtype and lse.dtype == dtype
    assert out.shape == (3, 17, 5) and lse.shape == (3, 17)
    assert rel_err(out, ref_out) < tol
    assert np.abs(lse - ref_lse).max() < 10 * tol


def test_merge_states_does_not_modify_its_inputs(rng):
    a_out, b_out = rng.standard_normal((2, 4, 6, 3))
    a_lse, b_lse = rng.standard_normal((2, 4, 6))
    copies = [x.copy() for x in (a_out, a_lse, b_out, b_lse)]
    nsa.merge_states(a_out, a_lse, b_out, b_lse)
    for x, c in zip((a_out, a_lse, b_out, b_lse), copies):
        assert np.array_equal(x, c)


def test_merge_states_with_the_attention_of_two_key_halves(rng):
    q, k, v = random_qkv(rng, batch=(2,), hq=4, hk=2, lq=9, lk=50, d=16, dtype=np.float32)
    out_a, lse_a = nsa.attention(q, k[..., :21, :], v[..., :21, :], return_lse=True)
    out_b, lse_b = nsa.attention(q, k[..., 21:, :], v[..., 21:, :], return_lse=True)
    out, lse = nsa.merge_states(out_a, lse_a, out_b, lse_b)
    ref_out, ref_lse = nsa.reference.attention(q, k, v)
    assert rel_err(out, ref_out) < 1e-5
    np.testing.assert_allclose(lse, ref_lse, rtol=0, atol=1e-5)


def test_merge_is_symmetric(rng):
    a_out, b_out = rng.standard_normal((2, 6, 4))
    a_lse, b_lse = rng.standard_normal((2, 6)) * 5
    ab = nsa.merge_states(a_out, a_lse, b_out, b_lse)
    ba = nsa.merge_states(b_out, b_lse, a_out, a_lse)
    np.testing.assert_allclose(ab[0], ba[0], rtol=1e-14, atol=0)
    np.testing.assert_allclose(ab[1], ba[1], rtol=1e-14, atol=0)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_empty_sides(rng, dtype):
    """-inf on one side: the other passes through exactly, whatever the empty side's output holds."""
    a_out = rng.standard_normal((4, 3)).astype(dtype)
    b_out = rng.standard_normal((4, 3)).astype(dtype)
    a_out[0] = 123.0  # garbage in a row whose lse says it saw nothing
    b_out[2] = np.inf
    a_lse = np.array([-np.inf, 0.5, -np.inf, 1.0], dtype)
    b_lse = np.array([0.25, -np.inf, -np.inf, -np.inf], dtype)
    with np.errstate(all="raise"):
        out, lse = nsa.merge_states(a_out, a_lse, b_out, b_lse)
    assert np.array_equal(out[0], b_out[0]) and lse[0] == dtype(0.25)
    assert np.array_equal(out[1], a_out[1]) and lse[1] == dtype(0.5)
    assert np.array_equal(out[2], np.zeros(3)) and lse[2] == -np.inf
    assert np.array_equal(out[3], a_out[3]) and lse[3] == dtype(1.0)


def test_both_sides_empty_everywhere():
    empty = np.full((2, 5), -np.inf)
    out, lse = nsa.merge_states(np.zeros((2, 5, 4)), empty, np.ones((2, 5, 4)), empty)
    assert not out.any() and np.isneginf(lse).all()


def test_nan_behaviour(rng):
    """NaN in a side that saw keys reaches that row only; NaN in an empty side's output is ignored."""
    a_out, b_out = rng.standard_normal((2, 5, 3))
    a_lse, b_lse = rng.standard_normal((2, 5))
    a_lse[1] = np.nan  # NaN lse
    a_out[2, 0] = np.nan  # NaN output with a finite lse
    a_out[3, :] = np.nan  # NaN output of an empty side
    a_lse[3] = -np.inf
    with np.errstate(invalid="ignore"):  # NumPy warns about the NaN lse
        out, lse = nsa.merge_states(a_out, a_lse, b_out, b_lse)
    assert np.isnan(out[1]).all() and np.isnan(lse[1])
    assert np.isnan(out[2, 0]) and np.isfinite(lse[2])
    assert np.array_equal(out[3], b_out[3]) and lse[3] == b_lse[3]
    assert np.isfinite(out[[0, 4]]).all() and np.isfinite(lse[[0, 4]]).all()


def test_large_lse_gap_does_not_overflow():
    out, lse = nsa.merge_states(
        np.ones((1, 2), np.float32), np.array([80.0], np.float32), np.full((1, 2), 3.0, np.float32),
        np.array([-80.0], np.float32),
    )  # fmt: skip
    assert np.all(np.isfinite(out)) and np.allclose(out, 1.0) and lse[0] == pytest.approx(80.0)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_outputs_merge_in_float32(rng, dtype):
    if dtype == "bfloat16":
        dtype = pytest.importorskip("ml_dtypes").bfloat16
    a_out, b_out = rng.standard_normal((2, 6, 4))
    a_lse, b_lse = rng.standard_normal((2, 6)).astype(np.float32)
    out, lse = nsa.merge_states(a_out.astype(dtype), a_lse, b_out.astype(dtype), b_lse)
    exact, exact_lse = nsa.merge_states(
        a_out.astype(dtype).astype(np.float64), a_lse.astype(np.float64), b_out.astype(dtype).astype(np.float64),
        b_lse.astype(np.float64),
    )  # fmt: skip
    assert out.dtype == np.dtype(dtype) and lse.dtype == np.float32
    # one rounding to the output dtype
    assert rel_err(out.astype(np.float64), exact) < (2e-3 if np.dtype(dtype).name == "float16" else 1e-2)
    np.testing.assert_allclose(lse, exact_lse, rtol=1e-6)


def test_float64_lse_with_float32_outputs_is_accepted(rng):
    a_out, b_out = rng.standard_normal((2, 3, 4)).astype(np.float32)
    a_lse, b_lse = rng.standard_normal((2, 3))
    out, lse = nsa.merge_states(a_out, a_lse, b_out, b_lse)
    assert out.dtype == np.float32 and lse.dtype == np.float32


@pytest.mark.parametrize(
    ("args", "error", "message"),
    [
        (((3, 4), (3,), (3, 5), (3,)), ValueError, r"out_a and out_b must have the same shape: \(3, 4\) vs \(3, 5\)"),
        (((3, 4), (4,), (3, 4), (3,)), ValueError, r"lse_a must have shape \(3,\) \(the outputs' shape \(3, 4\) "),
        (((3, 4), (3,), (3, 4), (3, 1)), ValueError, r"lse_b must have shape \(3,\)"),
        (((), (), (), ()), ValueError, r"out_a must have at least 1 axis"),
    ],
)
def test_shape_errors(args, error, message):
    arrays = [np.zeros(shape) for shape in args]
    with pytest.raises(error, match=message):
        nsa.merge_states(*arrays)


def test_dtype_and_kind_errors(fake_cupy):
    out, lse = np.zeros((3, 4), np.float32), np.zeros(3, np.float32)
    with pytest.raises(TypeError, match=r"out_a has dtype float32 but out_b has dtype float64; they must match"):
        nsa.merge_states(out, lse, out.astype(np.float64), lse)
    with pytest.raises(TypeError, match=r"out_a has dtype int64; expected one of"):
        nsa.merge_states(np.zeros((3, 4), np.int64), lse, np.zeros((3, 4), np.int64), lse)
    with pytest.raises(TypeError, match=r"lse_b has dtype float16; expected float32 or float64"):
        nsa.merge_states(out, lse, out, lse.astype(np.float16))
    with pytest.raises(TypeError, match=r"out_a is a NumPy array but out_b is a CuPy array"):
        nsa.merge_states(out, lse, FakeCupyArray(out), lse)
    with pytest.raises(TypeError, match=r"lse_a must be a NumPy or CuPy array, got builtins.list"):
        nsa.merge_states(out, [0.0, 0.0, 0.0], out, lse)


# ---------------------------------------------------------------- merge_into (ring attention's accumulation)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_accumulating_partials_over_a_partition_of_keys_is_exact(rng, dtype):
    q, k, v = random_qkv(rng, hq=3, lq=17, lk=40, d=8, dv=5)
    parts = np.array_split(rng.permutation(40), 4)
    out = np.zeros((3, 17, 5), dtype)
    lse = np.full((3, 17), -np.inf, dtype)
    for cols in parts:
        block_out, block_lse = _partial(q, k, v, cols, 0.4)
        merge_into(out, lse, block_out.astype(dtype), block_lse.astype(dtype))
    ref_out, ref_lse = _partial(q, k, v, np.arange(40), 0.4)
    tol = 1e-13 if dtype == np.float64 else 1e-6
    assert out.dtype == dtype and lse.dtype == dtype
    assert rel_err(out, ref_out) < tol
    assert np.abs(lse - ref_lse).max() < 10 * tol


def test_merge_into_guards_empty_rows(rng):
    out = np.zeros((3, 4))
    lse = np.array([-np.inf, -np.inf, 0.5])
    block_out = rng.standard_normal((3, 4))
    block_lse = np.array([-np.inf, 1.25, -np.inf])
    keep = out[2].copy()
    with np.errstate(all="raise"):
        merge_into(out, lse, block_out, block_lse)
    assert np.array_equal(out[0], np.zeros(4)) and lse[0] == -np.inf
    assert np.array_equal(out[1], block_out[1]) and lse[1] == 1.25
    assert np.array_equal(out[2], keep) and lse[2] == 0.5


def test_merge_into_updates_views_in_place(rng):
    acc = np.zeros((2, 10, 3))
    lse = np.full((2, 10), -np.inf)
    block = rng.standard_normal((2, 4, 3))
    merge_into(acc[:, 3:7], lse[:, 3:7], block, np.zeros((2, 4)))
    assert np.array_equal(acc[:, 3:7], block) and np.all(lse[:, 3:7] == 0)
    assert np.all(acc[:, :3] == 0) and np.all(np.isneginf(lse[:, 7:]))


def test_merge_into_casts_the_block_to_the_accumulator_dtype(rng):
    out, lse = np.zeros((2, 3), np.float32), np.full(2, -np.inf, np.float32)
    merge_into(out, lse, rng.standard_normal((2, 3)), np.zeros(2))
    assert out.dtype == np.float32 and lse.dtype == np.float32 and np.all(lse == 0)

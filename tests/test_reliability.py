"""Defects found by trying to break the library as a new user would: one test per defect and its siblings.

Each of these failed before its fix: a wrong or NaN result where the dense formula is finite, a crash,
or an error that did not come from the argument checks.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from conftest import SoloComm, random_array, random_qkv, rel_err

import npsparseattn as nsa
from npsparseattn import layouts, reference

# ----------------------------------------------------------------------------- 2. rows apart by a fraction of an item


def _field(x: np.ndarray) -> np.ndarray:
    """The same values as one field of a structured array: row strides are not whole items."""
    packed = np.zeros(x.shape, dtype=[("pad", "u1"), ("value", x.dtype)])
    packed["value"] = x
    return packed["value"]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_inputs_whose_strides_are_not_whole_items(rng, dtype):
    q, k, v = random_qkv(rng, batch=(2,), hq=4, hk=2, lq=37, lk=45, d=8, dtype=dtype)
    fq, fk, fv = _field(q), _field(k), _field(v)
    assert fq.strides[-1] % fq.itemsize != 0
    tol = 1e-10 if dtype == np.float64 else 1e-5
    out, lse = nsa.attention(fq, fk, fv, causal=True, return_lse=True)
    assert rel_err(out, reference.attention(q, k, v, causal=True)[0]) < tol
    dout = random_array(rng, out.shape, dtype)
    grads = nsa.attention_backward(_field(dout), fq, fk, fv, _field(out), lse, causal=True)
    for g, r in zip(grads, reference.attention_backward(dout, q, k, v, causal=True)):
        assert rel_err(g, r, floor=1.0) < 4 * tol
    layout = layouts.sliding_window((37, 45), 8, 16)
    out, lse = nsa.block_sparse_attention(fq, fk, fv, layout, return_lse=True)
    assert rel_err(out, reference.block_sparse_attention(q, k, v, layout)[0]) < tol
    grads = nsa.block_sparse_attention_backward(_field(dout), fq, fk, fv, _field(out), lse, layout)
    for g, r in zip(grads, reference.block_sparse_attention_backward(dout, q, k, v, layout)):
        assert rel_err(g, r, floor=1.0) < 4 * tol


# ----------------------------------------------------------------------------- 3. size-like arguments that overflow


def test_window_bounds_that_mean_unbounded(rng):
    q, k, v = random_qkv(rng, hq=2, lq=40, lk=50, d=8)
    full = nsa.attention(q, k, v)
    np.testing.assert_allclose(nsa.attention(q, k, v, window=(None, sys.maxsize)), full, rtol=0, atol=1e-13)
    np.testing.assert_allclose(nsa.attention(q, k, v, window=(10**30, 10**30)), full, rtol=0, atol=1e-13)
    causal = nsa.attention(q, k, v, causal=True)
    np.testing.assert_allclose(nsa.attention(q, k, v, window=(10**30, 0)), causal, rtol=0, atol=1e-13)
    np.testing.assert_allclose(nsa.attention(q, k, v, window=(99, 0)), causal, rtol=0, atol=1e-13)
    layout = layouts.dense((40, 50), 16)
    sparse = nsa.block_sparse_attention(q, k, v, layout, window=(10**30, 0))
    np.testing.assert_allclose(sparse, causal, rtol=0, atol=1e-13)


def test_ring_window_bounds_that_mean_unbounded(rng):
    q, k, v = random_qkv(rng, hq=2, lq=30, d=8)
    out = nsa.ring_attention(q, k, v, SoloComm(), window=(10**30, sys.maxsize))
    np.testing.assert_allclose(out, nsa.attention(q, k, v), rtol=0, atol=1e-13)


def test_layout_builders_with_huge_bounds_equal_their_unbounded_forms():
    assert layouts.sliding_window(64, 16, (None, sys.maxsize)) == layouts.dense(64, 16)
    assert layouts.sliding_window(64, 16, (10**30, 0)) == layouts.causal(64, 16)
    span = -(-(64 + 64) // 16) + 1
    for causal in (True, False):
        assert layouts.strided(64, 16, 10**30, causal=causal) == layouts.strided(64, 16, span, causal=causal)
        assert layouts.fixed(64, 16, 10**30, causal=causal) == layouts.fixed(64, 16, span, causal=causal)
    assert layouts.fixed(64, 16, 10**30, summary=10**30 - 2) == layouts.fixed(64, 16, span, summary=span - 2)
    assert layouts.fixed(64, 16, 10**30, summary=10**30) == layouts.fixed(64, 16, span, summary=span)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: layouts.dense(10**30, 16), r"seq must be at most 2\*\*40 - 1 tokens"),
        (lambda: layouts.dense(10**10, 1), r"is too large to build \(more than 2\*\*32 cells\); use larger blocks"),
        (lambda: layouts.bigbird(2**20, 16, heads=10**6), r"is too large to build"),
    ],
)
def test_huge_builder_arguments_are_refused_before_any_work(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_lsh_windows_and_rounds_that_would_allocate_without_bound(rng):
    qk, v = random_array(rng, (64, 8)), random_array(rng, (64, 8))
    with pytest.raises(ValueError, match=r"1 \+ chunks_before \+ chunks_after = 1000001 chunks, more than 4 times"):
        nsa.lsh_attention(qk, v, n_buckets=4, chunk_size=8, chunks_before=10**6, seed=0)
    with pytest.raises(ValueError, match=r"rotations would have shape \(8, 1000000000000, 2\)"):
        nsa.lsh_attention(qk[:0], v[:0], n_buckets=4, n_hashes=10**12, seed=0)
    wraps = nsa.lsh_attention(qk, v, n_buckets=4, chunk_size=32, chunks_before=5, seed=0)  # 8 <= 4 x 2 chunks
    np.testing.assert_allclose(
        wraps, reference.lsh_attention(qk, v, n_buckets=4, chunk_size=32, chunks_before=5, seed=0)[0], atol=1e-12
    )


# ----------------------------------------------------------------------------- 5. zero-length axes with batch axes


def test_zero_length_axes_with_batch_axes():
    z = np.ones((1, 2, 0, 8))
    zk = np.ones((1, 2, 5, 8))
    out, lse = nsa.attention(z, zk, zk, return_lse=True)
    assert out.shape == (1, 2, 0, 8) and lse.shape == (1, 2, 0)
    assert [g.shape for g in nsa.attention_backward(out, z, zk, zk, out, lse)] == [z.shape, zk.shape, zk.shape]
    out, lse = nsa.attention(zk, z, z, return_lse=True)
    assert np.all(out == 0) and np.all(np.isneginf(lse))
    layout = layouts.dense((0, 5), 4)
    out, lse = nsa.block_sparse_attention(z, zk, zk, layout, return_lse=True)
    assert [g.shape for g in nsa.block_sparse_attention_backward(out, z, zk, zk, out, lse, layout)] == [
        z.shape,
        zk.shape,
        zk.shape,
    ]
    out, lse = nsa.lsh_attention(z, z, n_buckets=4, seed=0, return_lse=True)
    assert out.shape == (1, 2, 0, 8)
    assert nsa.lsh_buckets(z, 4, seed=0).shape == (1, 2, 1, 0)
    assert nsa.lsh_sort(np.zeros((3, 0, 1, 0), np.int32))[0].shape == (3, 0, 0)
    assert nsa.ring_attention(z[0], z[0], z[0], SoloComm()).shape == (2, 0, 8)


def test_demo_refuses_a_zero_length():
    result = subprocess.run(
        [sys.executable, "-m", "npsparseattn", "demo", "--seq", "0"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2 and "argument --seq: must be >= 1, got 0" in result.stderr
    assert "Traceback" not in result.stderr


# ----------------------------------------------------------------------------- 6. byte order


def test_big_endian_inputs_are_computed_in_their_precision(rng):
    q, k, v = random_qkv(rng, hq=2, lq=20, d=8)
    big = [x.astype(">f8") for x in (q, k, v)]
    out, lse = nsa.attention(*big, causal=True, return_lse=True)
    assert out.dtype == np.float64 and lse.dtype == np.float64
    ref_out, ref_lse = reference.attention(q, k, v, causal=True)
    assert rel_err(out, ref_out) < 1e-12 and rel_err(lse, ref_lse) < 1e-12
    mixed = nsa.attention(big[0], k, v.astype(">f8"), causal=True)
    assert rel_err(mixed, ref_out) < 1e-12
    grads = nsa.attention_backward(out.astype(">f8"), *big, out, lse, causal=True)
    assert all(g.dtype == np.float64 for g in grads)


# ----------------------------------------------------------------------------- 7. values the checks let through


def test_scale_whose_base2_factor_overflows_float32(rng):
    q, k, v = random_qkv(rng, hq=1, lq=8, d=4, dtype=np.float32)
    with pytest.raises(ValueError, match=r"scale=3e\+38 is too large for float32 inputs"):
        nsa.attention(q, k, v, scale=3e38)
    with pytest.raises(ValueError, match=r"scale=3e\+38 is too large for float16 inputs: .* float32"):
        nsa.attention(*(x.astype(np.float16) for x in (q, k, v)), scale=3e38)
    q64, k64, v64 = (x.astype(np.float64) for x in (q, k, v))
    out = nsa.attention(q64, k64, v64, scale=3e38)  # float64 accumulates in float64, where it fits
    assert rel_err(out, reference.attention(q64, k64, v64, scale=3e38)[0]) < 1e-10


@pytest.mark.parametrize("call", ["attention", "block_sparse_attention", "lsh_attention"])
def test_return_lse_must_be_a_bool(rng, call):
    q, k, v = random_qkv(rng, hq=1, lq=16, d=4)
    args = {
        "attention": (q, k, v),
        "block_sparse_attention": (q, k, v, layouts.dense(16, 8)),
        "lsh_attention": (q, v),
    }[call]
    extra = {"n_buckets": 4, "chunk_size": 8, "seed": 0} if call == "lsh_attention" else {}
    with pytest.raises(TypeError, match=r"return_lse must be True or False, got 'no'"):
        getattr(nsa, call)(*args, return_lse="no", **extra)


def test_backward_refuses_an_lse_of_lower_precision(rng):
    q, k, v = random_qkv(rng, hq=1, lq=8, d=4)
    out, lse = nsa.attention(q, k, v, return_lse=True)
    with pytest.raises(TypeError, match=r"lse has dtype float32; expected float64, the dtype of the forward's lse"):
        nsa.attention_backward(out, q, k, v, out, lse.astype(np.float32))
    with pytest.raises(TypeError, match=r"lse has dtype float64; expected float32"):
        q32, k32, v32 = (x.astype(np.float32) for x in (q, k, v))
        nsa.attention_backward(out.astype(np.float32), q32, k32, v32, out.astype(np.float32), lse)


@pytest.mark.parametrize("dtype", [complex, np.int64, object])
def test_topk_refuses_non_real_inputs(rng, dtype):
    q = random_array(rng, (2, 32, 4)).astype(dtype)
    with pytest.raises(TypeError, match=r"topk routes real floating arrays; q has dtype"):
        layouts.topk(q, q, 8, 2)


def test_union_of_many_layouts_keeps_every_block():
    many = [layouts.causal(64, 16)] * 256 + [layouts.sliding_window(64, 16, 16)]
    assert layouts.union(*many) == layouts.union(layouts.causal(64, 16), layouts.sliding_window(64, 16, 16))


# ----------------------------------------------------------------------------- 8. errors from the right place


def test_a_set_is_not_a_window(rng):
    q, k, v = random_qkv(rng, hq=1, lq=8, d=4)
    with pytest.raises(TypeError, match=r"window must be None or a pair \(left, right\) as a tuple or list, got"):
        nsa.attention(q, k, v, window={1, 2})
    with pytest.raises(TypeError, match=r"window must be None or a pair"):
        layouts.sliding_window(64, 16, {1, 2})


def test_unshard_needs_a_sequence(rng):
    x = random_array(rng, (8, 2))
    with pytest.raises(TypeError, match=r"shards must be a list or tuple of arrays, one per rank, got generator"):
        nsa.unshard(s for s in [x])


def test_block_layout_without_indices():
    with pytest.raises(TypeError, match=r"indices must be a 1-D integer array, got None"):
        layouts.BlockLayout([0, 0], None, 16, 16)


# ----------------------------------------------------------------------------- 9. NaN reaches the rows that see it


def test_reference_nan_in_v_reaches_only_the_rows_that_see_the_key(rng):
    q, k, v = random_qkv(rng, hq=1, lq=20, d=4)
    v[0, 3, 2] = np.nan
    v[0, 7, 0] = np.inf
    out, _ = reference.attention(q, k, v, causal=True)
    assert np.isnan(out[0, :, 2]).nonzero()[0].tolist() == list(range(3, 20))
    assert (~np.isfinite(out[0, :, 0])).nonzero()[0].tolist() == list(range(7, 20))
    assert np.isfinite(out[0, :, [1, 3]]).all()
    sparse, _ = reference.block_sparse_attention(q, k, v, layouts.causal(20, 8), causal=True)
    np.testing.assert_array_equal(np.isnan(sparse), np.isnan(out))


# ----------------------------------------------------------------------------- 10. the command line


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["bench", "attention", "--seq", "-4"], "--seq must be >= 1, got -4"),
        (["bench", "attention", "--dim", "0"], "--dim must be >= 1, got 0"),
        (["bench", "attention", "--heads", "0"], "--heads must be >= 1, got 0"),
        (["bench", "attention", "--repeat", "0"], "--repeat must be >= 1, got 0"),
        (["bench", "attention", "--json", "/nonexistent/x.json"], "cannot write --json /nonexistent/x.json"),
        (["layout", "causal", "--head", "3"], "--head 3 is out of range: the layout has 1 head (0..0)"),
        (["layout", "sliding_window", "--window", "1", "2", "3"], "--window takes one or two values"),
        (["layout", "causal", "--block", "0"], "argument --block: must be >= 1, got 0"),
    ],
)
def test_command_line_refuses_bad_values_before_any_work(argv, message):
    result = subprocess.run([sys.executable, "-m", "npsparseattn", *argv], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("argv", [["demo"], ["layout"], ["bench", "lsh"], ["bench", "block-sparse"]])
def test_help_has_no_sphinx_markup(argv):
    result = subprocess.run(
        [sys.executable, "-m", "npsparseattn", *argv, "--help"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0
    assert ":func:" not in result.stdout and ":mod:" not in result.stdout and "``" not in result.stdout


@pytest.mark.parametrize("where", ["v", "k", "q"])
@pytest.mark.parametrize("op", ["attention", "block_sparse"])
def test_nan_reaches_the_same_entries_in_the_kernels_and_the_reference(rng, where, op):
    """Forward and backward: the numba kernels and the float64 reference agree on which entries are NaN."""
    q, k, v = random_qkv(rng, hq=2, hk=1, lq=300, lk=300, d=16)
    {"q": q, "k": k, "v": v}[where][0, 37, 5] = np.nan
    kw = dict(causal=True, window=(40, None))
    layout = layouts.sliding_window(300, 32, (64, 0))
    dout = random_array(rng, (2, 300, 16))
    if op == "attention":
        out, lse = nsa.attention(q, k, v, return_lse=True, **kw)
        grads = nsa.attention_backward(dout, q, k, v, out, lse, **kw)
        ref_out, _ = reference.attention(q, k, v, **kw)
        ref_grads = reference.attention_backward(dout, q, k, v, **kw)
    else:
        out, lse = nsa.block_sparse_attention(q, k, v, layout, return_lse=True, **kw)
        grads = nsa.block_sparse_attention_backward(dout, q, k, v, out, lse, layout, **kw)
        ref_out, _ = reference.block_sparse_attention(q, k, v, layout, **kw)
        ref_grads = reference.block_sparse_attention_backward(dout, q, k, v, layout, **kw)
    assert np.isnan(ref_out).any() and not np.isnan(ref_out).all()
    np.testing.assert_array_equal(np.isnan(out), np.isnan(ref_out))
    for name, g, r in zip("qkv", grads, ref_grads):
        np.testing.assert_array_equal(np.isnan(g), np.isnan(r), err_msg=f"d{name}")

"""Reformer LSH attention (numba backend) against the float64 reference, and its validation."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import AutoCase, FakeCupyArray, random_array, rel_err
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from scipy.special import logsumexp

import npsparseattn as nsa
from npsparseattn import reference
from npsparseattn.cpu import lsh as kernels
from npsparseattn.lsh import lsh_attention, lsh_attention_backward, lsh_buckets, lsh_rotations, lsh_sort
from npsparseattn.problems import lse_dtype, lsh_problem

CONFIGS = [
    pytest.param(dict(n_buckets=4, chunk_size=8), id="1-hash"),
    pytest.param(dict(n_buckets=8, n_hashes=2, chunk_size=8, causal=True), id="2-hashes-causal"),
    pytest.param(dict(n_buckets=(2, 4), n_hashes=3, chunk_size=16), id="3-hashes-factorized"),
    pytest.param(
        dict(n_buckets=8, n_hashes=4, chunk_size=8, chunks_before=2, chunks_after=1, causal=True),
        id="4-hashes-before2-after1-causal",
    ),
    pytest.param(dict(n_buckets=6, n_hashes=2, chunk_size=16, chunks_before=0), id="own-chunk-only"),
    pytest.param(
        dict(n_buckets=4, n_hashes=2, chunk_size=8, chunks_before=0, chunks_after=2, exclude_self=False),
        id="after-only-keep-self",
    ),
    pytest.param(
        dict(n_buckets=8, chunk_size=32, chunks_before=3, chunks_after=1, causal=True), id="window-wraps-around"
    ),
    pytest.param(
        dict(n_buckets=16, n_hashes=3, chunk_size=4, causal=True, exclude_self=False), id="tiny-chunks-causal-keep-self"
    ),
]

SHAPES = [
    pytest.param(((2,), 64, 16, 16), id="H2-L64-D16"),
    pytest.param(((2, 3), 96, 8, 12), id="B2-H3-L96-D8-Dv12"),
]


def random_inputs(rng, lead, length, d, dv, dtype=np.float64):
    return random_array(rng, (*lead, length, d), dtype), random_array(rng, (*lead, length, dv), dtype)


def check_against_reference(qk, v, kw, dtype, backend=None):
    be = AutoCase("lsh_attention") if backend is None else backend
    be.require(lsh_problem(qk, v, **kw))
    tol = be.tolerance(dtype)
    out, lse = (be.get(x) for x in lsh_attention(*be.put(qk, v), return_lse=True, backend=be.name, **kw))
    ref_out, ref_lse = reference.lsh_attention(qk, v, **kw)
    assert out.dtype == qk.dtype and out.shape == ref_out.shape
    assert lse.dtype == (np.float64 if dtype == np.float64 else np.float32) and lse.shape == ref_lse.shape
    assert rel_err(out, ref_out) < tol
    # lse reaches -1e5 for a token that sees only itself: compare relative to its size
    assert np.all(np.abs(lse - ref_lse) <= 10 * tol * np.maximum(np.abs(ref_lse), 1.0))
    dout = random_array(np.random.default_rng(7), out.shape, dtype)
    dqk, dv = (be.get(g) for g in lsh_attention_backward(*be.put(dout, qk, v, out, lse), backend=be.name, **kw))
    ref_dqk, ref_dv = reference.lsh_attention_backward(dout, qk, v, **kw)
    assert dqk.shape == qk.shape and dqk.dtype == qk.dtype and dv.shape == v.shape and dv.dtype == v.dtype
    assert rel_err(dqk, ref_dqk, floor=1.0) < 4 * tol
    assert rel_err(dv, ref_dv, floor=1.0) < 4 * tol


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("config", CONFIGS)
def test_matches_reference(rng, lsh_backend, config, shape, dtype):
    qk, v = random_inputs(rng, *shape, dtype=dtype)
    check_against_reference(qk, v, dict(seed=11, **config), dtype, lsh_backend)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_2d_and_5d_inputs(rng, dtype):
    qk, v = random_inputs(rng, (), 48, 12, 5, dtype)
    check_against_reference(qk, v, dict(n_buckets=4, n_hashes=2, chunk_size=8, causal=True, seed=3), dtype)
    qk, v = random_inputs(rng, (2, 1, 2), 32, 4, 4, dtype)
    check_against_reference(qk, v, dict(n_buckets=(2, 2), n_hashes=2, chunk_size=16, seed=4), dtype)


def test_tokens_that_see_only_themselves_float32(rng):
    """Causal, own chunk only: early positions see nobody else (logit -1e5, where a float32 lse has an ulp
    of 0.008); their output is their own value and dv gets the whole dout in every round."""
    qk, v = random_inputs(rng, (3,), 64, 16, 8, np.float32)
    kw = dict(n_buckets=16, n_hashes=3, chunk_size=4, chunks_before=0, causal=True, seed=2)
    out, lse = lsh_attention(qk, v, return_lse=True, **kw)
    np.testing.assert_allclose(out[:, 0], v[:, 0], rtol=1e-6)
    np.testing.assert_allclose(lse[:, 0], -1e5 + np.log(3), rtol=1e-7)
    dout = random_array(rng, out.shape, np.float32)
    dqk, dv = lsh_attention_backward(dout, qk, v, out, lse, **kw)
    ref_dqk, ref_dv = reference.lsh_attention_backward(dout, qk, v, **kw)
    assert rel_err(dv, ref_dv, floor=1.0) < 4e-5 and rel_err(dqk, ref_dqk, floor=1.0) < 4e-5


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("exclude_self", [True, False])
def test_one_chunk_holding_everything_is_full_attention(rng, causal, exclude_self):
    """n_hashes=1, chunk_size=L, no neighbours: every query sees every key once, so the result is full
    attention over the normalised keys (scale 1) with the own logit set to -1e5."""
    qk, v = random_inputs(rng, (2, 3), 40, 8, 6)
    kw = dict(n_buckets=4, chunk_size=40, chunks_before=0, causal=causal, exclude_self=exclude_self, seed=0)
    out, lse = lsh_attention(qk, v, return_lse=True, **kw)
    keys = qk / np.sqrt(np.mean(qk**2, axis=-1, keepdims=True) + 1e-6) / np.sqrt(8)
    logits = qk @ keys.swapaxes(-1, -2)
    i, j = np.arange(40)[:, None], np.arange(40)[None, :]
    if causal:
        logits = np.where(j > i, -1e9, logits)
    if exclude_self:
        logits = np.where(i == j, -1e5, logits)
    expected_lse = logsumexp(logits, axis=-1)
    expected = np.exp(logits - expected_lse[..., None]) @ v
    assert rel_err(out, expected) < 1e-12
    assert rel_err(lse, expected_lse) < 1e-12
    if not exclude_self:
        # the same as the tiled exact attention kernel with keys = normalised qk and scale 1
        dense_out, dense_lse = nsa.attention(qk, keys, v, scale=1.0, causal=causal, return_lse=True)
        assert rel_err(out, dense_out) < 1e-12 and rel_err(lse, dense_lse) < 1e-12
        dout = random_array(rng, out.shape)
        dq, dk, dv_dense = nsa.attention_backward(dout, qk, keys, v, dense_out, dense_lse, scale=1.0, causal=causal)
        a = 1 / np.sqrt(np.mean(qk**2, axis=-1, keepdims=True) + 1e-6)
        dqk_dense = dq + a / np.sqrt(8) * (dk - a**2 * np.sum(qk * dk, axis=-1, keepdims=True) / 8 * qk)
        dqk, dv = lsh_attention_backward(dout, qk, v, out, lse, **kw)
        assert rel_err(dqk, dqk_dense) < 1e-11 and rel_err(dv, dv_dense) < 1e-11


def hf_style_lsh(x, values, rotations, n_buckets, chunk, before, after, causal, exclude_self):
    """HF ``LSHSelfAttention``'s steps literally, for one head (L, D): offset buckets, stable argsort, gather,
    ``_look_adjacent`` (concatenated rolled chunks), masks, per-chunk logsumexp, undo the sort, combine."""
    length, d = x.shape
    n_hashes = rotations.shape[1]
    buckets = lsh_buckets(x, n_buckets, n_hashes=n_hashes, rotations=rotations).astype(np.int64)
    offset = (buckets + np.arange(n_hashes)[:, None] * int(np.prod(n_buckets))).reshape(-1)
    sorted_idx = np.argsort(offset, kind="stable")
    undo = np.argsort(sorted_idx)
    pos = sorted_idx % length
    keys = x / np.sqrt(np.mean(x**2, axis=-1, keepdims=True) + 1e-6) / np.sqrt(d)
    n_chunks = n_hashes * length // chunk

    def split(a):
        return a.reshape((n_chunks, chunk) + a.shape[1:])

    def look_adjacent(a):
        return np.concatenate([np.roll(a, -i, axis=0) for i in range(-before, after + 1)], axis=1)

    q_pos, k_pos = split(pos), look_adjacent(split(pos))
    dots = split(x[pos]) @ look_adjacent(split(keys[pos])).transpose(0, 2, 1)
    if causal:
        dots = np.where(q_pos[:, :, None] < k_pos[:, None, :], -1e9, dots)
    if exclude_self:
        dots = np.where(q_pos[:, :, None] == k_pos[:, None, :], -1e5, dots)
    lse = logsumexp(dots, axis=-1, keepdims=True)
    out = (np.exp(dots - lse) @ look_adjacent(split(values[pos]))).reshape(n_hashes * length, -1)[undo]
    lse = lse.reshape(-1)[undo].reshape(n_hashes, length, 1)
    out = (out.reshape(n_hashes, length, -1) * np.exp(lse - logsumexp(lse, axis=0, keepdims=True))).sum(axis=0)
    return out, logsumexp(lse, axis=0)[..., 0]


@pytest.mark.parametrize("config", CONFIGS)
def test_reference_agrees_with_the_chunked_formulation(rng, config):
    """The token-level count mask of the reference is the chunked algorithm of trax/HF."""
    qk, v = random_inputs(rng, (), 64, 8, 5)
    kw = dict(dict(n_hashes=1, chunks_before=1, chunks_after=0, causal=False, exclude_self=True), **config)
    rotations = lsh_rotations(8, kw["n_buckets"], n_hashes=kw["n_hashes"], seed=9)
    out, lse = reference.lsh_attention(qk, v, rotations=rotations, **kw)
    hf_out, hf_lse = hf_style_lsh(
        qk, v, rotations, kw["n_buckets"], kw["chunk_size"], kw["chunks_before"], kw["chunks_after"], kw["causal"],
        kw["exclude_self"],
    )  # fmt: skip
    # exp(lse_r - logsumexp) as HF writes it carries the 1e-11 rounding of an lse near -1e5
    assert rel_err(out, hf_out) < 1e-10
    assert np.all(np.abs(lse - hf_lse) <= 1e-12 * np.maximum(np.abs(hf_lse), 1.0))


def test_window_counts_on_a_small_example():
    # L=4, chunk 2, one round, buckets [1, 0, 1, 0] -> sorted positions [1, 3 | 0, 2]
    counts = reference.lsh_window_counts(np.array([[1, 0, 1, 0]]), 2, 1, 0)[0]
    # chunk 0 = {1, 3} looks back cyclically at chunk 1 = {0, 2}: all four once
    np.testing.assert_array_equal(counts[[1, 3]], np.ones((2, 4)))
    np.testing.assert_array_equal(counts[[0, 2]], np.ones((2, 4)))
    # with two neighbours on a 2-chunk sequence, chunk 1 is seen twice from chunk 0 and vice versa
    counts = reference.lsh_window_counts(np.array([[1, 0, 1, 0]]), 2, 1, 1)[0]
    np.testing.assert_array_equal(counts[1], [2, 1, 2, 1])
    np.testing.assert_array_equal(counts[0], [1, 2, 1, 2])


FD_CONFIGS = [
    pytest.param(dict(n_buckets=4, n_hashes=2, chunk_size=4, causal=True), id="causal"),
    pytest.param(dict(n_buckets=(2, 2), n_hashes=3, chunk_size=4, chunks_after=1, exclude_self=False), id="keep-self"),
]


def finite_differences(loss, arrays, eps=1e-6):
    grads = []
    for index, x in enumerate(arrays):
        numeric = np.zeros_like(x)
        for pos in np.ndindex(x.shape):
            args = [a.copy() for a in arrays]
            args[index][pos] += eps
            up = loss(*args)
            args[index][pos] -= 2 * eps
            numeric[pos] = (up - loss(*args)) / (2 * eps)
        grads.append(numeric)
    return grads


@pytest.mark.parametrize("config", FD_CONFIGS)
def test_gradients_match_finite_differences(rng, config):
    qk, v = random_inputs(rng, (2,), 8, 3, 2)
    kw = dict(seed=5, **config)
    weights = random_array(rng, (2, 8, 2))
    out, lse = lsh_attention(qk, v, return_lse=True, **kw)
    dqk, dv = lsh_attention_backward(weights, qk, v, out, lse, **kw)
    numeric = finite_differences(lambda a, b: float((lsh_attention(a, b, **kw) * weights).sum()), [qk, v])
    np.testing.assert_allclose(dqk, numeric[0], rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(dv, numeric[1], rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("config", FD_CONFIGS)
def test_reference_gradients_match_its_finite_differences(rng, config):
    qk, v = random_inputs(rng, (1,), 8, 3, 2)
    kw = dict(seed=6, **config)
    weights = random_array(rng, (1, 8, 2))
    dqk, dv = reference.lsh_attention_backward(weights, qk, v, **kw)
    numeric = finite_differences(lambda a, b: float((reference.lsh_attention(a, b, **kw)[0] * weights).sum()), [qk, v])
    np.testing.assert_allclose(dqk, numeric[0], rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(dv, numeric[1], rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_kernels_write_every_output_element(rng, lsh_backend, dtype):
    """Buffers poisoned with NaN must come back fully overwritten."""
    be = lsh_backend
    qk, v = random_inputs(rng, (2, 3), 48, 8, 5, dtype)
    be.require(lsh_problem(qk, v, n_buckets=8, chunk_size=8))
    compute = be.impl.compute_dtype(dtype)
    order, inverse = be.put(*lsh_sort(lsh_buckets(qk, 8, n_hashes=2, seed=0)))
    qk, v = be.put(qk.astype(compute), v.astype(compute))
    options = dict(chunk_size=8, chunks_before=1, chunks_after=1, causal=True, exclude_self=True)
    out, lse = be.put(np.full((2, 3, 48, 5), np.nan, compute), np.full((2, 3, 48), np.nan, lse_dtype(compute)))
    be.impl.module.forward(qk, v, order, inverse, out=out, lse=lse, **options)
    assert not np.isnan(be.get(out)).any() and not np.isnan(be.get(lse)).any()
    grads = be.put(np.full(qk.shape, np.nan, compute), np.full(v.shape, np.nan, compute))
    (dout,) = be.put(random_array(rng, out.shape, compute))
    be.impl.module.backward(dout, qk, v, out, lse, order, inverse, grads=grads, **options)
    assert not np.isnan(be.get(grads[0])).any() and not np.isnan(be.get(grads[1])).any()


@pytest.mark.parametrize(("group", "workspace"), [(1, 1 << 30), (3, 1 << 30), (8, 1 << 30), (2, 1), (5, 60_000)])
def test_result_does_not_depend_on_chunk_grouping(rng, monkeypatch, group, workspace):
    """Tasks take blocks of chunks (the backward runs blocks in phases) and heads are processed in passes
    bounded by the workspace (here 1 or 2 of the 3 heads per pass); any split gives the same result."""
    qk, v = random_inputs(rng, (3,), 128, 8, 8)
    kw = dict(n_buckets=8, n_hashes=3, chunk_size=8, chunks_before=2, chunks_after=1, causal=True, seed=1)
    out, lse = lsh_attention(qk, v, return_lse=True, **kw)
    dout = random_array(rng, out.shape)
    grads = lsh_attention_backward(dout, qk, v, out, lse, **kw)
    monkeypatch.setattr(kernels, "_chunk_group", lambda n_chunks: group)
    monkeypatch.setattr(kernels, "_WORKSPACE_BYTES", workspace)
    out_g, lse_g = lsh_attention(qk, v, return_lse=True, **kw)
    np.testing.assert_allclose(out_g, out, rtol=0, atol=1e-13)
    np.testing.assert_allclose(lse_g, lse, rtol=1e-15)
    for g, expected in zip(lsh_attention_backward(dout, qk, v, out, lse, **kw), grads):
        np.testing.assert_allclose(g, expected, rtol=0, atol=1e-13)


@pytest.mark.parametrize(
    ("n_chunks", "group", "before", "after"), [(1, 1, 1, 0), (7, 3, 1, 1), (40, 8, 2, 1), (9, 2, 3, 3), (64, 8, 1, 0)]
)
def test_block_phases_touch_disjoint_windows(n_chunks, group, before, after):
    ptr, blocks = kernels._block_phases(n_chunks, group, before, after)
    assert sorted(blocks) == list(range(-(-n_chunks // group)))
    for phase in range(len(ptr) - 1):
        touched = []
        for k in blocks[ptr[phase] : ptr[phase + 1]]:
            c0, c1 = k * group, min((k + 1) * group, n_chunks)
            touched += sorted({(c0 - before + t) % n_chunks for t in range(c1 - c0 + before + after)})
        assert len(touched) == len(set(touched))


def test_rotations_are_shared_by_heads_and_batch(rng):
    qk, v = random_inputs(rng, (2, 3), 32, 8, 8)
    kw = dict(n_buckets=4, n_hashes=2, chunk_size=8, seed=4)
    out = lsh_attention(qk, v, **kw)
    np.testing.assert_allclose(out[1, 2], lsh_attention(qk[1, 2], v[1, 2], **kw), rtol=0, atol=1e-14)
    rotations = lsh_rotations(8, 4, n_hashes=2, seed=4)
    np.testing.assert_array_equal(lsh_attention(qk, v, rotations=rotations, **dict(kw, seed=None)), out)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("layout", ["transposed", "strided-last-axis", "fortran"])
def test_non_contiguous_inputs(rng, dtype, layout):
    qk, v = random_inputs(rng, (2, 2), 32, 8, 8, dtype)
    if layout == "transposed":
        qk, v = (np.ascontiguousarray(x.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3) for x in (qk, v))
        assert not qk.flags.c_contiguous
    elif layout == "strided-last-axis":
        qk, v = (np.repeat(x, 2, axis=-1)[..., ::2] for x in (qk, v))
    else:
        qk, v = np.asfortranarray(qk), np.asfortranarray(v)
    check_against_reference(qk, v, dict(n_buckets=4, n_hashes=2, chunk_size=8, causal=True, seed=8), dtype)


def test_float16_is_computed_in_float32(rng):
    qk, v = random_inputs(rng, (2,), 64, 16, 16, np.float16)
    kw = dict(n_buckets=8, n_hashes=2, chunk_size=16, causal=True, seed=1)
    out, lse = lsh_attention(qk, v, return_lse=True, **kw)
    assert out.dtype == np.float16 and lse.dtype == np.float32
    ref_out, _ = reference.lsh_attention(qk, v, **kw)
    # float32 arithmetic, then one float16 rounding of the output (half an ulp: 2**-11 relative)
    assert np.all(np.abs(out - ref_out) <= 2**-11 * np.abs(ref_out) + 1e-5)
    dqk, dv = lsh_attention_backward(np.ones_like(out), qk, v, out, lse, **kw)
    assert dqk.dtype == dv.dtype == np.float16


def test_empty_sequence():
    qk, v = np.zeros((2, 0, 8)), np.zeros((2, 0, 4))
    out, lse = lsh_attention(qk, v, n_buckets=4, seed=0, return_lse=True)
    assert out.shape == (2, 0, 4) and lse.shape == (2, 0)
    dqk, dv = lsh_attention_backward(out, qk, v, out, lse, n_buckets=4, seed=0)
    assert dqk.shape == qk.shape and dv.shape == v.shape


def test_inputs_are_not_modified(rng):
    qk, v = random_inputs(rng, (2,), 32, 8, 8, np.float32)
    copies = (qk.copy(), v.copy())
    out, lse = lsh_attention(qk, v, n_buckets=4, n_hashes=2, chunk_size=8, seed=0, return_lse=True)
    lsh_attention_backward(np.ones_like(out), qk, v, out, lse, n_buckets=4, n_hashes=2, chunk_size=8, seed=0)
    assert np.array_equal(qk, copies[0]) and np.array_equal(v, copies[1])


def test_dispatch(rng):
    qk, v = random_inputs(rng, (2,), 32, 8, 8, np.float32)
    assert nsa.available_backends("lsh_attention") == ["numba", "numba-cuda", "reference"]
    kw = dict(n_buckets=4, n_hashes=2, chunk_size=8, seed=0)
    ref = lsh_attention(qk, v, backend="reference", **kw)
    assert ref.dtype == np.float32
    np.testing.assert_allclose(lsh_attention(qk, v, backend="numba", **kw), ref, rtol=0, atol=1e-5)
    with pytest.raises(nsa.BackendError, match=r"backend must be 'auto' or one of 'numba', .*got 'triton'"):
        lsh_attention(qk, v, backend="triton", **kw)


@settings(max_examples=20, deadline=None)
@given(
    data=st.data(),
    n_chunks=st.integers(1, 6),
    chunk=st.sampled_from([1, 2, 5, 8]),
    n_hashes=st.integers(1, 4),
    before=st.integers(0, 3),
    after=st.integers(0, 2),
    causal=st.booleans(),
    exclude_self=st.booleans(),
)
def test_property_random_configurations(data, n_chunks, chunk, n_hashes, before, after, causal, exclude_self):
    # a window wrapping the sorted sequence more than 4 times is refused (test_reliability.py checks that)
    assume(1 + before + after <= 4 * n_chunks * n_hashes)
    n_buckets = data.draw(st.sampled_from([2, 4, 6, (2, 2), (4, 2)]), label="n_buckets")
    d = data.draw(st.integers(1, 9), label="d")
    seed = data.draw(st.integers(0, 2**32 - 1), label="seed")
    rng = np.random.default_rng(seed)
    length = n_chunks * chunk
    qk, v = random_inputs(rng, (2,), length, d, data.draw(st.integers(1, 5), label="dv"))
    kw = dict(n_buckets=n_buckets, n_hashes=n_hashes, chunk_size=chunk, chunks_before=before, chunks_after=after,
              causal=causal, exclude_self=exclude_self, seed=seed % 1000)  # fmt: skip
    check_against_reference(qk, v, kw, np.float64)


# --- validation ---------------------------------------------------------------------------------


@pytest.fixture
def qkv(rng):
    return random_inputs(rng, (2,), 16, 4, 4)


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        (dict(chunk_size=5), ValueError, "the sequence length L=16 (axis -2 of qk) must be a multiple of chunk_size=5"),
        (dict(n_buckets=5), ValueError, "n_buckets must be even"),
        (dict(n_buckets=(2, 5)), ValueError, "every factor of n_buckets must be even"),
        (dict(chunk_size=0), ValueError, "chunk_size must be >= 1, got 0"),
        (dict(chunks_before=-1), ValueError, "chunks_before must be >= 0, got -1"),
        (dict(chunks_after=1.0), TypeError, "chunks_after must be an int, got 1.0"),
        (dict(n_hashes=0), ValueError, "n_hashes must be >= 1, got 0"),
        (dict(causal="yes"), TypeError, "causal must be True or False, got 'yes'"),
        (dict(exclude_self=1), TypeError, "exclude_self must be True or False, got 1"),
        (dict(return_lse=None), TypeError, "return_lse must be True or False, got None"),
        (dict(backend=1), TypeError, "backend must be a string"),
        (
            dict(rotations=np.ones((4, 1, 4))),
            ValueError,
            "rotations must have shape (D, n_hashes, n_buckets//2) = (4, 1, 2)",
        ),
        (dict(rotations=np.ones((4, 1, 2)), seed=1), ValueError, "pass either rotations or seed, not both"),
    ],
)
def test_bad_options(qkv, change, error, message):
    kw = dict(n_buckets=4, chunk_size=8, seed=0)
    kw.update(change)
    if "rotations" in change and "seed" not in change:
        kw.pop("seed")
    with pytest.raises(error) as info:
        lsh_attention(*qkv, **kw)
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("qk_shape", "v_shape", "dtypes", "error", "message"),
    [
        (
            (2, 16, 4),
            (2, 8, 4),
            "ff",
            ValueError,
            "qk and v must have the same leading axes and length: qk (2, 16, 4) vs v (2, 8, 4)",
        ),
        ((2, 16, 4), (3, 16, 4), "ff", ValueError, "qk and v must have the same leading axes and length"),
        ((2, 16, 4), (16, 4), "ff", ValueError, "qk has 3 axes (shape (2, 16, 4)) but v has 2 (shape (16, 4))"),
        ((16,), (16,), "ff", ValueError, "qk must have at least 2 axes (L, D), got shape (16,)"),
        ((2, 16, 0), (2, 16, 4), "ff", ValueError, "head dimensions must be >= 1"),
        ((2, 16, 4), (2, 16, 4), "fi", TypeError, "v has dtype int64; expected one of"),
        ((2, 16, 4), (2, 16, 4), "fs", TypeError, "qk has dtype float64 but v has dtype float32; they must match"),
    ],
)
def test_bad_arrays(qk_shape, v_shape, dtypes, error, message):
    dtype = {"f": np.float64, "i": np.int64, "s": np.float32}
    qk = np.ones(qk_shape, dtype[dtypes[0]])
    v = np.ones(v_shape, dtype[dtypes[1]])
    with pytest.raises(error) as info:
        lsh_attention(qk, v, n_buckets=4, chunk_size=8, seed=0)
    assert message in str(info.value)


def test_backward_needs_the_forward_hashing(qkv):
    qk, v = qkv
    out, lse = lsh_attention(qk, v, n_buckets=4, chunk_size=8, seed=0, return_lse=True)
    with pytest.raises(
        ValueError, match="lsh_attention_backward needs the forward's hashing: pass the same rotations="
    ):
        lsh_attention_backward(out, qk, v, out, lse, n_buckets=4, chunk_size=8)


@pytest.mark.parametrize(
    ("which", "error", "message"),
    [
        ("dout", ValueError, "dout must have shape (2, 16, 4) (like the forward output), got (2, 16, 3)"),
        ("out", TypeError, "out has dtype float32; expected float64 like q"),
        ("lse", ValueError, "lse must have shape (2, 16), got (2, 15)"),
    ],
)
def test_bad_backward_inputs(qkv, which, error, message):
    qk, v = qkv
    kw = dict(n_buckets=4, chunk_size=8, seed=0)
    out, lse = lsh_attention(qk, v, return_lse=True, **kw)
    args = dict(dout=out, out=out, lse=lse)
    args[which] = {"dout": out[..., :3], "out": out.astype(np.float32), "lse": lse[:, :15]}[which]
    with pytest.raises(error) as info:
        lsh_attention_backward(args["dout"], qk, v, args["out"], args["lse"], **kw)
    assert message in str(info.value)


def test_cupy_arrays_are_refused_with_reasons(fake_cupy, qkv):
    qk, v = (FakeCupyArray(x) for x in qkv)
    with pytest.raises(nsa.BackendError) as info:
        lsh_attention(qk, v, n_buckets=4, chunk_size=8, seed=0)
    assert "numba: takes NumPy arrays, got CuPy" in str(info.value)
    assert "reference: takes NumPy arrays, got CuPy" in str(info.value)
    with pytest.raises(nsa.BackendError, match=r"no backend can run lsh_buckets .*\n  numba: takes NumPy arrays, got"):
        lsh_buckets(qk, 4, seed=0)
    with pytest.raises(TypeError, match="qk is a NumPy array but v is a CuPy array"):
        lsh_attention(qkv[0], v, n_buckets=4, chunk_size=8, seed=0)

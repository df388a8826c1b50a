"""Block-sparse attention (numba backend) against the float64 reference with the expanded block mask."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import TOL, AutoCase, random_array, random_qkv, rel_err
from hypothesis import given, settings
from hypothesis import strategies as st

import npsparseattn as nsa
from npsparseattn import layouts, reference
from npsparseattn.problems import attention_problem, lse_dtype

MASKS = [
    pytest.param(dict(), id="none"),
    pytest.param(dict(causal=True), id="causal"),
    pytest.param(dict(window=(17, 5)), id="window"),
    pytest.param(dict(window=(40, None), causal=True), id="causal-window"),
    pytest.param(dict(window=(0, 0)), id="diagonal"),
]


def check_against_reference(q, k, v, layout, kw, dtype, backend=None):
    """Forward and backward of ``backend`` (default: auto on NumPy) against the float64 reference, same layout."""
    be = AutoCase("block_sparse_attention") if backend is None else backend
    be.require(attention_problem(q, k, v, **kw))
    result = nsa.block_sparse_attention(*be.put(q, k, v), layout, return_lse=True, backend=be.name, **kw)
    out, lse = (be.get(x) for x in result)
    ref_out, ref_lse = reference.block_sparse_attention(q, k, v, layout, **kw)
    assert out.dtype == q.dtype and out.shape == ref_out.shape
    assert lse.dtype == (np.float64 if dtype == np.float64 else np.float32) and lse.shape == ref_lse.shape
    tol = be.tolerance(dtype)
    assert rel_err(out, ref_out) < tol
    empty = ~np.isfinite(ref_lse)
    assert np.array_equal(np.isneginf(lse), empty)
    assert np.all(out[empty] == 0)
    np.testing.assert_allclose(lse[~empty], ref_lse[~empty], rtol=0, atol=50 * tol)

    dout = random_array(np.random.default_rng(1), out.shape, dtype)
    moved = be.put(dout, q, k, v, out, lse)
    grads = tuple(be.get(g) for g in nsa.block_sparse_attention_backward(*moved, layout, backend=be.name, **kw))
    ref_grads = reference.block_sparse_attention_backward(dout, q, k, v, layout, **kw)
    for name, g, r, x in zip("qkv", grads, ref_grads, (q, k, v)):
        assert g.shape == x.shape and g.dtype == x.dtype, name
        assert rel_err(g, r, floor=1.0) < 4 * tol, name
    return out, lse, grads


# ----------------------------------------------------------------------------- dense layout == attention

DENSE_SHAPES = [
    pytest.param(dict(hq=2, lq=300, lk=300, d=64), (64, 64), id="square"),
    pytest.param(dict(batch=(2,), hq=4, hk=2, lq=77, lk=131, d=16, dv=24), (16, 24), id="gqa-lq<lk"),
    pytest.param(dict(hq=2, hk=1, lq=260, lk=70, d=8, dv=5), (32, 7), id="mqa-lq>lk"),
    pytest.param(dict(hq=2, lq=1, lk=517, d=40), (1, 300), id="decode"),
]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize(("shape", "block"), DENSE_SHAPES)
@pytest.mark.parametrize("mask", MASKS)
def test_dense_layout_equals_attention(rng, dtype, shape, block, mask):
    q, k, v = random_qkv(rng, dtype=dtype, **shape)
    layout = layouts.dense((shape["lq"], shape["lk"]), block)
    out, lse = nsa.block_sparse_attention(q, k, v, layout, return_lse=True, **mask)
    att_out, att_lse = nsa.attention(q, k, v, return_lse=True, **mask)
    tol = TOL[np.dtype(dtype)]
    assert rel_err(out, att_out) < tol
    assert np.array_equal(np.isneginf(lse), np.isneginf(att_lse))
    finite = np.isfinite(att_lse)
    np.testing.assert_allclose(lse[finite], att_lse[finite], rtol=0, atol=50 * tol)
    dout = random_array(rng, out.shape, dtype)
    grads = nsa.block_sparse_attention_backward(dout, q, k, v, out, lse, layout, **mask)
    att_grads = nsa.attention_backward(dout, q, k, v, att_out, att_lse, **mask)
    for name, g, a in zip("qkv", grads, att_grads):
        assert rel_err(g, a, floor=1.0) < 4 * tol, name


# ----------------------------------------------------------------------------- every builder == reference

BUILDERS = {
    "dense": lambda seq, block: layouts.dense(seq, block),
    "causal": lambda seq, block: layouts.causal(seq, block),
    "sliding_window": lambda seq, block: layouts.sliding_window(seq, block, (30, 10)),
    "strided": lambda seq, block: layouts.strided(seq, block, 2),
    "strided-bidirectional": lambda seq, block: layouts.strided(seq, block, 3, causal=False),
    "fixed": lambda seq, block: layouts.fixed(seq, block, 3, summary=1),
    "fixed-bidirectional": lambda seq, block: layouts.fixed(seq, block, 2, summary=1, causal=False),
    "longformer": lambda seq, block: layouts.longformer(seq, block, 16, global_blocks=[0, 3]),
    "bigbird": lambda seq, block: layouts.bigbird(seq, block, random_blocks=1, seed=5),
    "bigbird-per-head": lambda seq, block: layouts.bigbird(seq, block, random_blocks=1, seed=5, heads=4),
    "union": lambda seq, block: layouts.union(layouts.causal(seq, block), layouts.strided(seq, block, 2, causal=False)),
    "intersect": lambda seq, block: layouts.intersect(layouts.dense(seq, block), layouts.fixed(seq, block, 2)),
}

BUILDER_SHAPES = [
    pytest.param(dict(batch=(2,), hq=4, hk=2, lq=77, lk=131, d=16, dv=12), (16, 24), id="gqa-lq<lk"),
    pytest.param(dict(hq=4, hk=1, lq=150, lk=95, d=8), (24, 16), id="mqa-lq>lk"),
]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize(("shape", "block"), BUILDER_SHAPES)
@pytest.mark.parametrize("builder", list(BUILDERS))
@pytest.mark.parametrize("mask", [MASKS[0], MASKS[1], MASKS[3]])
def test_every_builder_matches_reference(rng, block_sparse_backend, dtype, shape, block, builder, mask):
    q, k, v = random_qkv(rng, dtype=dtype, **shape)
    layout = BUILDERS[builder]((shape["lq"], shape["lk"]), block)
    check_against_reference(q, k, v, layout, mask, dtype, block_sparse_backend)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("causal", [False, True])
def test_topk_routing_per_head_with_gqa(rng, dtype, causal):
    q, k, v = random_qkv(rng, hq=6, hk=2, lq=200, lk=200, d=16, dtype=dtype)
    layout = layouts.topk(q, k, 32, 2, causal=causal)
    assert layout.heads == 6
    check_against_reference(q, k, v, layout, dict(causal=causal), dtype)


def test_per_head_layouts_differ_per_head(rng):
    """Each query head follows its own layout; GQA groups share key heads across different layouts."""
    q, k, v = random_qkv(rng, hq=4, hk=2, lq=96, lk=96, d=8)
    per_head = layouts.stack(
        [
            layouts.causal(96, 16),
            layouts.sliding_window(96, 16, 0),
            layouts.from_block_mask(np.eye(6, dtype=bool)[::-1], 16),
            layouts.dense(96, 16),
        ]
    )
    out, _, _ = check_against_reference(q, k, v, per_head, dict(), np.float64)
    for h in range(4):
        single = layouts.from_block_mask(per_head.to_dense()[h], 16)
        alone = nsa.block_sparse_attention(q[h], k[h // 2], v[h // 2], single)
        np.testing.assert_allclose(out[h], alone, rtol=0, atol=1e-13)


# ----------------------------------------------------------------------------- random layouts (hypothesis)


@settings(max_examples=40, deadline=None)
@given(
    data=st.data(),
    lq=st.integers(0, 70),
    lk=st.integers(0, 70),
    bq=st.integers(1, 24),
    bk=st.integers(1, 24),
    group=st.sampled_from([1, 2]),
    hk=st.integers(1, 2),
    per_head=st.booleans(),
    causal=st.booleans(),
)
def test_property_random_layouts(data, lq, lk, bq, bk, group, hk, per_head, causal):
    hq = hk * group
    left = data.draw(st.one_of(st.none(), st.integers(0, 40)), label="left")
    right = data.draw(st.one_of(st.none(), st.integers(0, 40)), label="right")
    density = data.draw(st.floats(0, 1), label="density")
    seed = data.draw(st.integers(0, 2**32 - 1), label="seed")
    rng = np.random.default_rng(seed)
    heads = hq if per_head else 1
    mask = rng.random((heads, -(-lq // bq), -(-lk // bk))) < density
    layout = layouts.from_block_mask(mask, (bq, bk), seq=(lq, lk))
    q, k, v = random_qkv(rng, hq=hq, hk=hk, lq=lq, lk=lk, d=int(rng.integers(1, 12)), dv=int(rng.integers(1, 6)))
    check_against_reference(q, k, v, layout, dict(causal=causal, window=(left, right)), np.float64)


# ----------------------------------------------------------------------------- empty rows, unread blocks


def test_empty_rows_give_zero_output_neg_inf_lse_and_zero_grads(rng):
    # query block 1 stores nothing; query block 0 stores only key block 2, which causal hides from it.
    layout = layouts.from_block_mask(np.array([[False, False, True], [False, False, False], [True, True, True]]), 10)
    q, k, v = random_qkv(rng, hq=2, lq=30, lk=30, d=8)
    out, lse, (dq, _, _) = check_against_reference(q, k, v, layout, dict(causal=True), np.float64)
    assert np.all(out[:, :20] == 0) and np.all(np.isneginf(lse[:, :20])) and np.all(np.isfinite(lse[:, 20:]))
    assert np.all(dq[:, :20] == 0)


def test_keys_of_unstored_blocks_are_never_read(rng):
    """NaN in keys/values that no stored block covers cannot reach the results: the kernel skips them."""
    mask = np.zeros((5, 5), dtype=bool)
    mask[:, [0, 3]] = True
    mask[2, 1] = True
    layout = layouts.from_block_mask(mask, 16, seq=(80, 75))
    q, k, v = random_qkv(rng, hq=2, lq=80, lk=75, d=8, dtype=np.float32)
    unused = np.r_[32:48, 64:75]
    k[:, unused] = np.nan
    v[:, unused] = np.nan
    out, lse = nsa.block_sparse_attention(q, k, v, layout, return_lse=True)
    dq, dk, dv = nsa.block_sparse_attention_backward(np.ones_like(out), q, k, v, out, lse, layout)
    assert np.isfinite(out).all() and np.isfinite(lse).all() and np.isfinite(dq).all()
    assert np.all(dk[:, unused] == 0) and np.all(dv[:, unused] == 0)
    used = np.setdiff1d(np.arange(75), unused)
    assert np.isfinite(dk[:, used]).all() and np.isfinite(dv[:, used]).all()


def test_empty_key_and_query_sequences(rng):
    q, k, v = random_qkv(rng, hq=2, lq=7, lk=0, d=8)
    layout = layouts.dense((7, 0), 4)
    out, lse = nsa.block_sparse_attention(q, k, v, layout, return_lse=True)
    assert out.shape == (2, 7, 8) and np.all(out == 0) and np.all(np.isneginf(lse))
    dq, dk, dv = nsa.block_sparse_attention_backward(np.ones_like(out), q, k, v, out, lse, layout)
    assert np.all(dq == 0) and dk.shape == k.shape and dv.shape == v.shape
    q, k, v = random_qkv(rng, hq=2, lq=0, lk=9, d=8)
    out, lse = nsa.block_sparse_attention(q, k, v, layouts.dense((0, 9), 4), return_lse=True)
    assert out.shape == (2, 0, 8) and lse.shape == (2, 0)
    _, dk, dv = nsa.block_sparse_attention_backward(out, q, k, v, out, lse, layouts.dense((0, 9), 4))
    assert np.all(dk == 0) and np.all(dv == 0)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_kernels_write_every_output_element(rng, block_sparse_backend, dtype):
    """Buffers poisoned with NaN must come back fully overwritten, empty rows and unused keys included."""
    be = block_sparse_backend
    q, k, v = random_qkv(rng, batch=(2,), hq=4, hk=2, lq=70, lk=90, d=16, dv=12, dtype=dtype)
    be.require(attention_problem(q, k, v))
    compute = be.impl.compute_dtype(dtype)
    q, k, v = be.put(*(x.astype(compute) for x in (q, k, v)))
    keep = np.ones((5, 12), dtype=bool)
    keep[2] = False  # query block 2 (rows 32..47) stores nothing
    layout = layouts.intersect(
        layouts.bigbird((70, 90), (16, 8), random_blocks=1, heads=4), layouts.from_block_mask(keep, (16, 8), (70, 90))
    )
    kw = dict(scale=0.25, offset=20, left=30, right=0)
    out, lse = be.put(np.full((2, 4, 70, 12), np.nan, compute), np.full((2, 4, 70), np.nan, lse_dtype(compute)))
    be.impl.module.forward(q, k, v, layout, out=out, lse=lse, **kw)
    assert not np.isnan(be.get(out)).any() and not np.isnan(be.get(lse)).any()
    assert np.isneginf(be.get(lse)[:, :, 32:48]).all()
    grads = be.put(*(np.full(x.shape, np.nan, compute) for x in (q, k, v)))
    (dout,) = be.put(random_array(rng, out.shape, compute))
    be.impl.module.backward(dout, q, k, v, out, lse, layout, grads=grads, **kw)
    for g in grads:
        assert not np.isnan(be.get(g)).any()


# ----------------------------------------------------------------------------- inputs and options


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_2d_inputs_nd_batch_and_custom_scale(rng, dtype):
    q, k, v = random_qkv(rng, hq=1, lq=45, lk=61, d=12, dtype=dtype)
    lay = layouts.strided((45, 61), (8, 16), 2)
    check_against_reference(q[0], k[0], v[0], lay, dict(scale=0.7, causal=True), dtype)
    q, k, v = random_qkv(rng, batch=(2, 3), hq=2, lq=19, lk=23, d=4, dtype=dtype)
    check_against_reference(q, k, v, layouts.causal((19, 23), 5), dict(window=(3, 2)), dtype)


def _transposed(x):
    return np.ascontiguousarray(x.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)


@pytest.mark.parametrize("layout_kind", ["transposed", "strided-last-axis", "reversed", "broadcast-kv"])
def test_non_contiguous_inputs(rng, layout_kind):
    q, k, v = random_qkv(rng, batch=(2,), hq=4, hk=2, lq=37, lk=53, d=16, dtype=np.float32)
    if layout_kind == "transposed":
        q, k, v = _transposed(q), _transposed(k), _transposed(v)
    elif layout_kind == "strided-last-axis":
        q, k, v = (np.repeat(x, 2, axis=-1)[..., ::2] for x in (q, k, v))
    elif layout_kind == "reversed":
        q, k, v = q[:, :, ::-1], k[:, :, ::-1], v[:, :, ::-1]
    else:
        k = np.broadcast_to(k[:, :1, :1], k.shape)
        v = np.broadcast_to(v[:, :1], v.shape)
    check_against_reference(
        q, k, v, layouts.bigbird((37, 53), (8, 8), heads=4, random_blocks=1), dict(causal=True), np.float32
    )


def test_float16_is_computed_in_float32(rng):
    q, k, v = random_qkv(rng, hq=2, lq=100, lk=100, d=32, dtype=np.float16)
    layout = layouts.sliding_window(100, 16, 20)
    out = nsa.block_sparse_attention(q, k, v, layout, causal=True)
    assert out.dtype == np.float16
    as32 = nsa.block_sparse_attention(*(x.astype(np.float32) for x in (q, k, v)), layout, causal=True)
    np.testing.assert_array_equal(out, as32.astype(np.float16))


def test_inputs_are_not_modified(rng):
    q, k, v = random_qkv(rng, hq=2, lq=40, lk=40, d=8, dtype=np.float32)
    copies = [x.copy() for x in (q, k, v)]
    layout = layouts.bigbird(40, 8, random_blocks=1)
    out, lse = nsa.block_sparse_attention(q, k, v, layout, causal=True, return_lse=True)
    nsa.block_sparse_attention_backward(np.ones_like(out), q, k, v, out, lse, layout, causal=True)
    for x, c in zip((q, k, v), copies):
        assert np.array_equal(x, c)


def test_backends(rng):
    assert nsa.available_backends("block_sparse_attention") == ["numba", "cupy", "numba-cuda", "reference"]
    q, k, v = random_qkv(rng, hq=2, lq=30, d=8, dtype=np.float32)
    layout = layouts.causal(30, 8)
    ref = nsa.block_sparse_attention(q, k, v, layout, causal=True, backend="reference")
    fast = nsa.block_sparse_attention(q, k, v, layout, causal=True, backend="numba")
    assert ref.dtype == np.float32
    np.testing.assert_allclose(fast, ref, rtol=0, atol=1e-5)
    with pytest.raises(nsa.BackendError, match=r"backend must be 'auto' or one of 'numba', .*got 'triton'"):
        nsa.block_sparse_attention(q, k, v, layout, backend="triton")


# ----------------------------------------------------------------------------- bad inputs


@pytest.fixture
def qkv(rng):
    return random_qkv(rng, batch=(2,), hq=4, hk=2, lq=40, lk=50, d=8)


@pytest.fixture
def no_work(monkeypatch):
    """Fail loudly if a call gets as far as choosing a backend."""

    def refuse(*args, **kwargs):
        raise AssertionError("validation should have refused the call before any work")

    monkeypatch.setattr(nsa.block_sparse, "select", refuse)


@pytest.mark.parametrize(
    ("make_layout", "error", "message"),
    [
        (lambda: "causal", TypeError, r"layout must be an npsparseattn.layouts.BlockLayout .* got str"),
        (lambda: layouts.dense((40, 50), 8).to_dense(), TypeError, r"layout must be .* got ndarray"),
        (
            lambda: layouts.dense(50, 8),
            ValueError,
            r"layout is for seq \(Lq, Lk\) = \(50, 50\) but q has Lq=40 and k has Lk=50",
        ),
        (
            lambda: layouts.dense((50, 40), 8),
            ValueError,
            r"layout is for seq \(Lq, Lk\) = \(50, 40\) but q has Lq=40 and k has Lk=50",
        ),
        (
            lambda: layouts.bigbird((40, 50), 8, heads=2),
            ValueError,
            r"layout has 2 heads but q has 4 query heads; a layout serves every head \(heads=1\) "
            r"or gives one pattern per query head \(heads=4\)",
        ),
    ],
)
def test_mismatched_layout_is_refused_before_any_work(qkv, no_work, make_layout, error, message):
    q, k, v = qkv
    with pytest.raises(error, match=message):
        nsa.block_sparse_attention(q, k, v, make_layout())
    out = np.zeros((2, 4, 40, 8))
    lse = np.zeros((2, 4, 40))
    with pytest.raises(error, match=message):
        nsa.block_sparse_attention_backward(out, q, k, v, out, lse, make_layout())
    with pytest.raises(error, match=message):
        reference.block_sparse_attention(q, k, v, make_layout())


def test_layout_routed_on_key_heads_is_refused(qkv):
    q, k, v = qkv  # Hq=4, Hk=2: a layout is per query head, never per key head
    per_key_head = layouts.topk(k[0], k[0], 8, 2)
    with pytest.raises(ValueError, match=r"layout is for seq \(Lq, Lk\) = \(50, 50\)"):
        nsa.block_sparse_attention(q, k, v, per_key_head)
    per_key_head = layouts.topk(q[0, :2], k[0], 8, 2)
    with pytest.raises(ValueError, match=r"layout has 2 heads but q has 4 query heads"):
        nsa.block_sparse_attention(q, k, v, per_key_head)


def test_backward_checks_gradient_inputs(qkv, no_work):
    q, k, v = qkv
    layout = layouts.dense((40, 50), 8)
    out = np.zeros((2, 4, 40, 8))
    with pytest.raises(ValueError, match=r"dout must have shape \(2, 4, 40, 8\) \(like the forward output\)"):
        nsa.block_sparse_attention_backward(out[:, :2], q, k, v, out, np.zeros((2, 4, 40)), layout)
    with pytest.raises(ValueError, match=r"lse must have shape \(2, 4, 40\)"):
        nsa.block_sparse_attention_backward(out, q, k, v, out, np.zeros((2, 4)), layout)


def test_attention_argument_rules_still_apply(qkv, no_work):
    q, k, v = qkv
    layout = layouts.dense((40, 50), 8)
    with pytest.raises(TypeError, match=r"causal must be True or False, got 1"):
        nsa.block_sparse_attention(q, k, v, layout, causal=1)
    with pytest.raises(ValueError, match=r"window left bound must be >= 0"):
        nsa.block_sparse_attention(q, k, v, layout, window=(-1, 0))
    with pytest.raises(TypeError, match=r"backend must be a string"):
        nsa.block_sparse_attention(q, k, v, layout, backend=None)

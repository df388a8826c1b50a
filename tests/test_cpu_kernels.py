"""numba CPU kernels: the backward schemes, non-finite scores and values, determinism.

The equivalence with the float64 reference on ordinary inputs lives in
``test_attention.py`` and ``test_block_sparse.py``; here are the cases the
tiling itself could get wrong: a key tile with no finite score, NaN or
infinity in a value or key row next to rows that do not see it, and both
backward schemes (one pass per (batch, key head), or dK/dV then dQ), each
bitwise repeatable.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import random_array, random_qkv, rel_err
from numba.core import types as numba_types

import npsparseattn as nsa
from npsparseattn import layouts, reference
from npsparseattn.cpu import block_sparse as sparse_kernels
from npsparseattn.cpu import exact as dense_kernels
from npsparseattn.reference._oracle import visibility_mask

SCHEMES = ["one-pass", "two-pass"]
LK = 600  # three 256-key forward tiles, five 128-key backward tiles


def _kernel_call(q, k, v, kw, layout=None):
    """Forward with the numba backend, dense or block-sparse (``layout``)."""
    if layout is None:
        return nsa.attention(q, k, v, return_lse=True, backend="numba", **kw)
    return nsa.block_sparse_attention(q, k, v, layout, return_lse=True, backend="numba", **kw)


def _kernel_backward(dout, q, k, v, out, lse, kw, layout=None, scheme=None):
    """Backward of the numba kernels with the scheme forced; (H, L, D) or (B, H, L, D) arrays, grads alike."""
    if q.ndim == 3:
        args = (x[None] for x in (dout, q, k, v, out, lse))
        return tuple(g[0] for g in _kernel_backward(*args, kw, layout, scheme))
    window = kw.get("window") or (None, None)
    vis = dict(
        scale=1 / np.sqrt(q.shape[-1]),
        offset=k.shape[2] - q.shape[2],
        left=window[0],
        right=0 if kw.get("causal") else window[1],
    )
    lse = lse.astype(q.dtype)
    if layout is None:
        return dense_kernels.backward(dout, q, k, v, out, lse, scheme=scheme, **vis)
    return sparse_kernels.backward(dout, q, k, v, out, lse, layout, scheme=scheme, **vis)


LAYOUTS = [pytest.param(None, id="dense"), pytest.param("sparse", id="block-sparse")]


def _layout(kind, lq, lk, block=64):
    """``None`` (dense kernels) or a block-sparse layout that stores every block."""
    return None if kind is None else layouts.dense((lq, lk), block)


@pytest.mark.parametrize("kind", LAYOUTS)
@pytest.mark.parametrize("mask", [dict(), dict(causal=True)], ids=["full", "causal"])
def test_key_tile_with_only_neg_inf_scores_leaves_rows_finite(rng, kind, mask):
    # Every score of the first 256 keys is -inf (k holds -inf where q is positive): the
    # online softmax must come out of a tile with no finite score with an empty state.
    q, k, v = random_qkv(rng, hq=2, lq=LK, lk=LK, d=16, dtype=np.float32)
    q[..., 0] = np.abs(q[..., 0]) + 0.5
    k[..., :256, 0] = -np.inf
    out, lse = _kernel_call(q, k, v, mask, _layout(kind, LK, LK))
    ref_out, ref_lse = reference.attention(q, k, v, **mask)
    empty = np.isneginf(ref_lse)
    assert empty.any() == bool(mask)  # causal: rows before key 256 see only -inf scores
    assert np.array_equal(np.isneginf(lse), empty) and np.all(out[empty] == 0)
    assert np.isfinite(out).all()
    assert rel_err(out, ref_out) < 1e-5


@pytest.mark.parametrize("kind", LAYOUTS)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_scores_that_overflow_float32_to_neg_inf_in_a_whole_tile(rng, kind, scheme):
    # q.k = -1e40 is finite in float64 (the reference) and -inf in float32.
    q, k, v = random_qkv(rng, hq=2, lq=LK, lk=LK, d=16, dtype=np.float32)
    q[..., 0] = 1e20
    k[..., 0] = 0
    k[..., :256, 0] = -1e20
    layout = _layout(kind, LK, LK)
    out, lse = _kernel_call(q, k, v, {}, layout)
    ref_out, ref_lse = reference.attention(q, k, v)
    assert np.isfinite(out).all() and np.isfinite(lse).all()
    assert rel_err(out, ref_out) < 1e-5 and rel_err(lse, ref_lse) < 1e-5
    dout = random_array(rng, out.shape, np.float32)
    grads = _kernel_backward(dout, q, k, v, out, lse, {}, layout, scheme)
    ref_grads = reference.attention_backward(dout, q, k, v)
    for label, g, r in zip("qkv", grads, ref_grads):
        assert np.isfinite(g).all(), label
        assert rel_err(g, r, floor=1.0) < 4e-5, label


def _seen_by(mask, j):
    """Rows that see key ``j``, and the keys any of those rows sees."""
    rows = mask[:, j]
    return rows, mask[rows].any(axis=0)


WINDOW = dict(window=(40, 10))


@pytest.mark.parametrize("kind", LAYOUTS)
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("bad", [np.nan, np.inf], ids=["nan", "inf"])
def test_non_finite_value_reaches_only_the_rows_that_see_its_key(rng, kind, scheme, bad):
    j, col = 300, 3
    q, k, v = random_qkv(rng, hq=2, lq=LK, lk=LK, d=16, dtype=np.float32)
    clean = v.copy()
    v[0, j, col] = bad
    layout = _layout(kind, LK, LK)
    out, lse = _kernel_call(q, k, v, WINDOW, layout)
    ref_out, _ = reference.attention(q, k, clean, **WINDOW)
    rows, keys = _seen_by(visibility_mask(LK, LK, left=40, right=10), j)
    expected = np.zeros(out.shape, bool)
    expected[0, rows, col] = True
    assert np.array_equal(~np.isfinite(out), expected)
    assert rel_err(out[~expected], ref_out[~expected]) < 1e-5
    assert np.isfinite(lse).all()

    dout = random_array(rng, out.shape, np.float32)
    dq, dk, dv = _kernel_backward(dout, q, k, v, out, lse, WINDOW, layout, scheme)
    ref_dq, ref_dk, ref_dv = reference.attention_backward(dout, q, k, clean, **WINDOW)
    assert np.array_equal(~np.isfinite(dq).any(axis=-1)[0], rows)
    assert np.array_equal(~np.isfinite(dk).any(axis=-1)[0], keys)
    assert np.isfinite(dq[1]).all() and np.isfinite(dk[1]).all() and np.isfinite(dv).all()
    assert rel_err(dq[0, ~rows], ref_dq[0, ~rows], floor=1.0) < 4e-5
    assert rel_err(dk[0, ~keys], ref_dk[0, ~keys], floor=1.0) < 4e-5
    assert rel_err(dq[1], ref_dq[1], floor=1.0) < 4e-5 and rel_err(dv, ref_dv, floor=1.0) < 4e-5


@pytest.mark.parametrize("kind", LAYOUTS)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_nan_key_reaches_only_the_rows_that_see_it(rng, kind, scheme):
    j = 300
    q, k, v = random_qkv(rng, hq=2, lq=LK, lk=LK, d=16, dtype=np.float32)
    clean = k.copy()
    k[0, j, 5] = np.nan
    layout = _layout(kind, LK, LK)
    out, lse = _kernel_call(q, k, v, WINDOW, layout)
    ref_out, _ = reference.attention(q, clean, v, **WINDOW)
    rows, keys = _seen_by(visibility_mask(LK, LK, left=40, right=10), j)
    assert np.array_equal(np.isnan(out).any(axis=-1)[0], rows) and np.isnan(out[0, rows]).all()
    assert np.isfinite(out[1]).all() and rel_err(out[0, ~rows], ref_out[0, ~rows]) < 1e-5

    dout = random_array(rng, out.shape, np.float32)
    dq, dk, dv = _kernel_backward(dout, q, k, v, out, lse, WINDOW, layout, scheme)
    ref_dq, ref_dk, ref_dv = reference.attention_backward(dout, q, clean, v, **WINDOW)
    assert np.array_equal(np.isnan(dq).any(axis=-1)[0], rows)
    assert np.array_equal(np.isnan(dk).any(axis=-1)[0], keys)
    assert np.array_equal(np.isnan(dv).any(axis=-1)[0], keys)
    assert rel_err(dq[0, ~rows], ref_dq[0, ~rows], floor=1.0) < 4e-5
    assert rel_err(dk[0, ~keys], ref_dk[0, ~keys], floor=1.0) < 4e-5
    assert rel_err(dv[0, ~keys], ref_dv[0, ~keys], floor=1.0) < 4e-5
    for g, r in zip((dq, dk, dv), (ref_dq, ref_dk, ref_dv)):
        assert rel_err(g[1], r[1], floor=1.0) < 4e-5


@pytest.mark.parametrize("kind", LAYOUTS)
@pytest.mark.parametrize("bad", ["query", "dout"])
def test_nan_in_a_query_row_reaches_only_the_keys_it_sees(rng, kind, bad):
    i = 310
    q, k, v = random_qkv(rng, hq=2, lq=LK, lk=LK, d=16, dtype=np.float32)
    layout = _layout(kind, LK, LK)
    mask = visibility_mask(LK, LK, left=40, right=10)
    out, lse = _kernel_call(q, k, v, WINDOW, layout)
    dout = random_array(rng, out.shape, np.float32)
    ref_grads = reference.attention_backward(dout, q, k, v, **WINDOW)
    if bad == "query":
        q = q.copy()
        q[0, i, 2] = np.nan
    else:
        dout[0, i, 2] = np.nan
    keys = mask[i]
    for scheme in SCHEMES:
        dq, dk, dv = _kernel_backward(dout, q, k, v, out, lse, WINDOW, layout, scheme)
        assert np.array_equal(np.flatnonzero(np.isnan(dq).any(axis=-1)[0]), [i]), scheme
        for label, g, r in zip("kv", (dk, dv), ref_grads[1:]):
            assert np.array_equal(np.isnan(g).any(axis=-1)[0], keys), (scheme, label)
            assert rel_err(g[0, ~keys], r[0, ~keys], floor=1.0) < 4e-5, (scheme, label)
        for label, g, r in zip("qkv", (dq, dk, dv), ref_grads):
            assert rel_err(g[1], r[1], floor=1.0) < 4e-5, (scheme, label)


@pytest.mark.parametrize("kind", LAYOUTS)
@pytest.mark.parametrize("mask", [dict(), dict(causal=True), dict(window=(70, 20))], ids=["full", "causal", "window"])
def test_backward_schemes_agree_with_the_reference_and_repeat_bitwise(rng, kind, mask):
    q, k, v = random_qkv(rng, batch=(2,), hq=4, hk=2, lq=333, lk=LK, d=24, dv=20, dtype=np.float32)
    layout = _layout(kind, 333, LK)
    out, lse = _kernel_call(q, k, v, mask, layout)
    dout = random_array(rng, out.shape, np.float32)
    ref_grads = reference.attention_backward(dout, q, k, v, **mask)
    for scheme in SCHEMES:
        first = _kernel_backward(dout, q, k, v, out, lse, mask, layout, scheme)
        again = _kernel_backward(dout, q, k, v, out, lse, mask, layout, scheme)
        for label, g, h, r in zip("qkv", first, again, ref_grads):
            assert np.array_equal(g, h), (scheme, label)
            assert rel_err(g, r, floor=1.0) < 4e-5, (scheme, label)


def test_default_backward_is_bitwise_repeatable(rng):
    q, k, v = random_qkv(rng, hq=8, lq=700, d=32, dtype=np.float32)
    out, lse = nsa.attention(q, k, v, causal=True, return_lse=True)
    dout = random_array(rng, out.shape, np.float32)
    first = nsa.attention_backward(dout, q, k, v, out, lse, causal=True)
    again = nsa.attention_backward(dout, q, k, v, out, lse, causal=True)
    assert all(np.array_equal(g, h) for g, h in zip(first, again))


def test_scheme_choice_weighs_idle_threads_against_extra_work():
    choose = dense_kernels.backward_scheme
    assert choose(8, threads=2) == "one-pass"
    assert choose(3, threads=2) == "one-pass"  # busiest thread 4/3 of an even share < 3.5 / 2.5
    assert choose(1, threads=2) == "two-pass"  # one task cannot use two threads
    assert choose(5, threads=4) == "two-pass"  # busiest thread 8/5 of an even share > 3.5 / 2.5
    assert choose(np.array([10, 1, 1, 10]), threads=2) == "one-pass"
    assert choose(np.array([10, 10, 1, 1]), threads=2) == "two-pass"
    assert choose(np.zeros(4), threads=2) == "two-pass"


def test_unknown_scheme_is_refused(rng):
    q, k, v = random_qkv(rng, hq=2, lq=40, d=8, dtype=np.float32)
    out, lse = nsa.attention(q, k, v, return_lse=True)
    with pytest.raises(ValueError, match="scheme must be one of 'one-pass', 'two-pass'"):
        _kernel_backward(out, q, k, v, out, lse, {}, None, "three-pass")


def test_exp2_f32_is_float32_accurate_and_total():
    from numba import njit

    from npsparseattn.cpu._vecmath import exp2_f32

    @njit
    def apply(x, out):
        for i in range(x.shape[0]):
            out[i] = exp2_f32(x[i])

    x = np.linspace(-126, 127.4, 1_000_001, dtype=np.float32)
    out = np.empty_like(x)
    apply(x, out)
    assert np.abs(out / np.exp2(x.astype(np.float64)) - 1).max() < 1.2e-7
    special = np.array([-np.inf, -1e30, -127.0, -126.6, 128.0, 1e30, np.inf, np.nan], np.float32)
    out = np.empty_like(special)
    apply(special, out)
    assert np.array_equal(out[:4], np.zeros(4, np.float32))
    assert np.isposinf(out[4:7]).all() and np.isnan(out[7])


def test_any_mix_of_strided_inputs_runs_the_one_compiled_kernel_per_dtype():
    """Transposed, reversed and read-only broadcast inputs, mixed with contiguous ones: copied, one version."""
    rng = np.random.default_rng(11)
    base = rng.standard_normal((1, 2, 70, 24))
    transposed = np.ascontiguousarray(base.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)
    reversed_rows = np.ascontiguousarray(base[:, :, ::-1])[:, :, ::-1]
    broadcast = np.broadcast_to(base[:, :1], base.shape)
    mixes = [(transposed, base, base), (base, reversed_rows, broadcast), (broadcast, transposed, reversed_rows)]
    for q, k, v in mixes:
        out, lse = nsa.attention(q, k, v, causal=True, return_lse=True, backend="numba")
        ref_out, ref_lse = nsa.attention(q, k, v, causal=True, return_lse=True, backend="reference")
        assert rel_err(out, ref_out) < 1e-12 and rel_err(lse, ref_lse) < 1e-12
    versions = [sig for sig in dense_kernels._forward_kernel.versions if sig[0].dtype.name == "float64"]
    assert len(versions) == 1, versions
    arrays = [t for t in versions[0] if isinstance(t, numba_types.Array)]
    assert all(t.layout == "C" for t in arrays)
    assert [t.mutable for t in arrays] == [False, False, False, False, True, True]  # q, k, kt, v read; out, lse


def test_a_kernel_that_reads_contiguous_arrays_refuses_others():
    q = np.zeros((1, 1, 8, 4), np.float32)[:, :, ::2]
    with pytest.raises(TypeError, match="reads C-contiguous arrays only"):
        dense_kernels._forward_kernel(q, q, q, q, q, q[..., 0], 1.0, 0, 0, 0, 4, 4, 4, 0)


DECODE_SHAPES = [(1, 4, 2, 1), (2, 6, 2, 3), (1, 8, 1, 8)]  # (B, Hq, Hk, Lq): decoding and short chunks, GQA/MQA
DECODE_MASKS = [dict(), dict(causal=True), dict(window=(700, 0)), dict(window=(None, 5))]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("mask", DECODE_MASKS, ids=["full", "causal", "left700", "right5"])
@pytest.mark.parametrize("shape", DECODE_SHAPES, ids=lambda s: "B{}-Hq{}-Hk{}-Lq{}".format(*s))
def test_decoding_shapes_run_the_kv_cache_forward_and_match_the_reference(rng, dtype, mask, shape):
    """``attention`` on decoding shapes takes the KV-cache kernels (keys split across threads where the rows
    cannot fill them, chunks merged by lse): every element written, equal to the float64 reference."""
    b, hq, hk, lq = shape
    lk = 1100 + lq  # more than kvcache.MIN_SPLIT keys: split into chunks unless the window narrows them
    q, k, v = random_qkv(rng, batch=(b,), hq=hq, hk=hk, lq=lq, lk=lk, d=16, dv=24, dtype=dtype)
    assert dense_kernels.decode_shaped(q, k, lk - lq)
    window = mask.get("window") or (None, None)
    right = 0 if mask.get("causal") else window[1]
    out = np.full((b, hq, lq, 24), np.nan, dtype)
    lse = np.full((b, hq, lq), np.nan, dtype)
    dense_kernels.forward(q, k, v, scale=0.25, offset=lk - lq, left=window[0], right=right, out=out, lse=lse)
    ref_out, ref_lse = reference.attention(q, k, v, scale=0.25, **mask)
    tol = 1e-10 if dtype == np.float64 else 1e-5
    assert rel_err(out, ref_out) < tol and rel_err(lse, ref_lse) < tol
    public = nsa.attention(q, k, v, scale=0.25, backend="numba", **mask)
    assert np.array_equal(public, out)


def test_only_bottom_right_aligned_decoding_takes_the_kv_cache_forward(rng):
    q, k, _ = random_qkv(rng, hq=4, hk=2, lq=2, lk=1200, d=8)
    q, k = q[None], k[None]
    assert dense_kernels.decode_shaped(q, k, 1198)
    assert not dense_kernels.decode_shaped(q, k, 0)  # a ring block's diagonal: the tiled forward
    assert not dense_kernels.decode_shaped(q, k[:, :, :1000], 998)  # few keys
    many = np.concatenate([q] * 40, axis=2)  # 80 rows x group 2 > one row tile
    assert not dense_kernels.decode_shaped(many, k, 1200 - 80)


@pytest.mark.parametrize("small_matrix", [True, False], ids=["small-matrix-blas", "packing-blas"])
@pytest.mark.parametrize("mask", [dict(), dict(causal=True), dict(window=(90, 7))], ids=["full", "causal", "window"])
def test_both_tile_families_match_the_reference(rng, monkeypatch, small_matrix, mask):
    """The tiles for OpenBLAS's small-matrix cores and those for packing cores: whichever this machine's BLAS
    picks, the other is run here too (forward, both backward schemes, odd lengths, GQA, D != Dv)."""
    monkeypatch.setattr(dense_kernels, "small_matrix_kernels", lambda: small_matrix)
    q, k, v = random_qkv(rng, batch=(2,), hq=4, hk=2, lq=531, lk=533, d=48, dv=40, dtype=np.float64)
    expected = reference.attention(q, k, v, **mask)
    out, lse = nsa.attention(q, k, v, return_lse=True, backend="numba", **mask)
    assert rel_err(out, expected[0]) < 1e-10 and rel_err(lse, expected[1]) < 1e-10
    dout = random_array(rng, out.shape)
    ref_grads = reference.attention_backward(dout, q, k, v, **mask)
    for scheme in SCHEMES:
        grads = _kernel_backward(dout, q, k, v, out, lse, mask, scheme=scheme)
        for g, r in zip(grads, ref_grads):
            assert rel_err(g, r, floor=1.0) < 1e-10


def test_tile_shapes_follow_the_blas_cores(monkeypatch):
    monkeypatch.setattr(dense_kernels, "small_matrix_kernels", lambda: True)
    for width in (32, 64, 128, 256):
        for backward in (False, True):
            rows, keys = dense_kernels.tile_shape(width, backward)
            assert rows * keys * width <= dense_kernels.GEMM_VOLUME and keys % 32 == 0
    monkeypatch.setattr(dense_kernels, "small_matrix_kernels", lambda: False)
    assert dense_kernels.tile_shape(64) == dense_kernels.PACKED_TILES[64][0]
    assert dense_kernels.tile_shape(100, backward=True) == dense_kernels.PACKED_TILES[128][1]
    assert dense_kernels.tile_shape(512) == dense_kernels.PACKED_TILES[None][0]

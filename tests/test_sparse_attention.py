"""Index-driven sparse attention against the float64 dense reference with the selected token mask."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import TOL, random_array, random_qkv, rel_err

import npsparseattn as nsa
from npsparseattn import available_backends, layouts
from npsparseattn.problems.sparse import sparse_problem
from npsparseattn.reference import sparse as reference_sparse
from npsparseattn.reference._oracle import visibility_mask

# the CPU backends; the GPU ones are tested where their arrays live (tests/cudasim/test_sim_sparse.py under the
# simulator, tests/test_raw_sparse.py under the host emulation and on a GPU), on the cases their blocks allow
BACKENDS = [name for name in available_backends("sparse_attention") if name not in ("reference", "cupy", "numba-cuda")]

MASKS = [
    pytest.param(dict(), id="none"),
    pytest.param(dict(causal=True), id="causal"),
    pytest.param(dict(window=(17, 5)), id="window"),
    pytest.param(dict(window=(40, None), causal=True), id="causal-window"),
]

# (shape, q_block, kv_block, slots): blocks with GQA, token mode, per-query lists (stacked GQA heads and not),
# blocks too short to multiply in place (gathered), more queries than keys, a few queries against many keys
CASES = [
    pytest.param(dict(batch=(2,), hq=4, hk=2, lq=150, lk=170, d=16, dv=12), 32, 32, 3, id="blocks-gqa"),
    pytest.param(dict(hq=2, hk=1, lq=70, lk=90, d=16), 16, 1, 24, id="tokens"),
    pytest.param(dict(hq=4, hk=1, lq=45, lk=80, d=8, dv=6), 1, 8, 4, id="per-query-gqa"),
    pytest.param(dict(hq=2, lq=40, lk=50, d=8), 1, 1, 10, id="per-query-tokens"),
    pytest.param(dict(hq=2, lq=130, lk=130, d=16), 64, 5, 7, id="short-blocks"),
    pytest.param(dict(hq=2, hk=2, lq=97, lk=33, d=8), 24, 40, 1, id="lq>lk"),
    pytest.param(dict(hq=3, hk=1, lq=3, lk=200, d=16), 2, 16, 5, id="few-queries"),
]


def blocks(length: int, size: int) -> int:
    return -(-length // size)


def random_index(rng, lead, n_query_blocks, slots, n_key_blocks, unused=0.25):
    """Distinct random key blocks per list, in random order, some slots -1; int32 (*lead, nqb, slots)."""
    shape = (*lead, n_query_blocks)
    order = np.argsort(rng.random(shape + (max(n_key_blocks, slots),)), axis=-1)[..., :slots]
    idx = np.where(order < n_key_blocks, order, -1)
    idx[rng.random(idx.shape) < unused] = -1
    return idx.astype(np.int32)


def index_for(rng, q, k, q_block, kv_block, slots):
    lead = k.shape[:-2]
    return random_index(rng, lead, blocks(q.shape[-2], q_block), slots, blocks(k.shape[-2], kv_block))


def reference(q, k, v, kv_idx, kv_cnt, dout, **kw):
    """float64 (out, lse, grads) of the dense oracle under the expanded index."""
    out, lse = nsa.sparse_attention(q, k, v, kv_idx, kv_cnt=kv_cnt, return_lse=True, backend="reference", **kw)
    grads = nsa.sparse_attention_backward(dout, q, k, v, out, lse, kv_idx, kv_cnt=kv_cnt, backend="reference", **kw)
    return out, lse, grads


def check(q, k, v, kv_idx, kv_cnt, backend, dtype, **kw):
    """Forward and backward of ``backend`` against the reference; returns (out, lse, grads)."""
    tol = TOL[np.dtype(dtype)]
    out, lse = nsa.sparse_attention(q, k, v, kv_idx, kv_cnt=kv_cnt, return_lse=True, backend=backend, **kw)
    dout = random_array(np.random.default_rng(7), out.shape, dtype)
    ref_out, ref_lse, ref_grads = reference(q, k, v, kv_idx, kv_cnt, dout, **kw)
    assert out.dtype == q.dtype and out.shape == ref_out.shape
    assert lse.dtype == (np.float64 if dtype == np.float64 else np.float32)
    assert rel_err(out, ref_out) < tol
    empty = np.isneginf(ref_lse)
    assert np.array_equal(np.isneginf(lse), empty)
    assert np.all(out[empty] == 0)
    np.testing.assert_allclose(lse[~empty], ref_lse[~empty], rtol=0, atol=50 * tol)
    grads = nsa.sparse_attention_backward(dout, q, k, v, out, lse, kv_idx, kv_cnt=kv_cnt, backend=backend, **kw)
    for name, g, r, x in zip("qkv", grads, ref_grads, (q, k, v)):
        assert g.shape == x.shape and g.dtype == x.dtype, name
        assert rel_err(g, r, floor=1.0) < 4 * tol, name
    return out, lse, grads


# ----------------------------------------------------------------------------- against the reference


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize(("shape", "q_block", "kv_block", "slots"), CASES)
@pytest.mark.parametrize("mask", MASKS)
def test_matches_reference(rng, backend, dtype, shape, q_block, kv_block, slots, mask):
    q, k, v = random_qkv(rng, dtype=dtype, **shape)
    kv_idx = index_for(rng, q, k, q_block, kv_block, slots)
    check(q, k, v, kv_idx, None, backend, dtype, q_block=q_block, kv_block=kv_block, **mask)


@pytest.mark.parametrize("backend", BACKENDS)
def test_counts_ignore_the_slots_after_them(rng, backend):
    q, k, v = random_qkv(rng, hq=4, hk=2, lq=90, lk=90, d=8)
    kv_idx = index_for(rng, q, k, 16, 4, 9)
    kv_cnt = rng.integers(0, 10, kv_idx.shape[:-1]).astype(np.int32)
    junk = np.arange(9) >= kv_cnt[..., None]
    kv_idx[junk] = rng.integers(-50, 50, int(junk.sum()))  # out of range or repeated: ignored
    out, *_ = check(q, k, v, kv_idx, kv_cnt, backend, np.float64, q_block=16, kv_block=4, causal=True)
    cleaned = np.where(junk, -1, kv_idx)
    assert np.array_equal(out, nsa.sparse_attention(q, k, v, cleaned, q_block=16, kv_block=4, causal=True))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mask", MASKS[:2])
def test_every_block_selected_equals_attention(rng, backend, mask):
    q, k, v = random_qkv(rng, batch=(2,), hq=4, hk=2, lq=77, lk=131, d=16, dtype=np.float32)
    nqb, nkb = blocks(77, 16), blocks(131, 24)
    kv_idx = np.broadcast_to(rng.permutation(nkb).astype(np.int32), (2, 2, nqb, nkb))
    out = nsa.sparse_attention(q, k, v, kv_idx, q_block=16, kv_block=24, backend=backend, **mask)
    assert rel_err(out, nsa.attention(q, k, v, **mask)) < TOL[np.dtype(np.float32)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_layout_as_an_index_equals_block_sparse_attention(rng, backend):
    q, k, v = random_qkv(rng, hq=2, lq=200, lk=200, d=16)
    layout = layouts.bigbird(200, 32, random_blocks=1, seed=3)
    rows = np.split(layout.indices, layout.indptr[1:-1])
    width = max(len(r) for r in rows)
    kv_idx = np.array([np.pad(r, (0, width - len(r)), constant_values=-1) for r in rows], np.int32)
    kv_idx = np.broadcast_to(kv_idx, (2,) + kv_idx.shape)  # the layout serves both heads
    out = nsa.sparse_attention(q, k, v, kv_idx, q_block=32, kv_block=32, causal=True, backend=backend)
    expected = nsa.block_sparse_attention(q, k, v, layout, causal=True)
    assert rel_err(out, expected) < TOL[np.dtype(np.float64)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_lower_rank_inputs(rng, backend):
    q, k, v = random_qkv(rng, hq=1, lq=60, lk=60, d=8)
    kv_idx = index_for(rng, q, k, 8, 1, 12)
    kw = dict(q_block=8, kv_block=1, causal=True, backend=backend)
    out3 = nsa.sparse_attention(q, k, v, kv_idx, **kw)
    out2, lse2 = nsa.sparse_attention(q[0], k[0], v[0], kv_idx[0], return_lse=True, **kw)
    assert out2.shape == (60, 8) and lse2.shape == (60,) and np.array_equal(out2, out3[0])
    grads2 = nsa.sparse_attention_backward(out2, q[0], k[0], v[0], out2, lse2, kv_idx[0], **kw)
    grads3 = nsa.sparse_attention_backward(out3, q, k, v, out3, lse2[None], kv_idx, **kw)
    assert all(g2.shape == (60, 8) and np.array_equal(g2, g3[0]) for g2, g3 in zip(grads2, grads3))


@pytest.mark.parametrize("backend", BACKENDS)
def test_nothing_selected_gives_zero_and_minus_infinity(rng, backend):
    q, k, v = random_qkv(rng, hq=2, lq=50, lk=40, d=8)
    for kv_idx in (np.full((2, 4, 3), -1, np.int32), np.zeros((2, 4, 0), np.int32)):
        out, lse = nsa.sparse_attention(q, k, v, kv_idx, q_block=16, return_lse=True, backend=backend)
        assert np.all(out == 0) and np.all(np.isneginf(lse))
        grads = nsa.sparse_attention_backward(out, q, k, v, out, lse, kv_idx, q_block=16, backend=backend)
        assert all(np.all(g == 0) for g in grads)


def test_outputs_are_all_written_and_strided_inputs_read_right(rng):
    from npsparseattn.cpu import sparse as cpu_sparse

    q, k, v = random_qkv(rng, batch=(1,), hq=4, hk=2, lq=66, lk=70, d=8, dtype=np.float32)
    kv_idx = index_for(rng, q, k, 1, 1, 9)
    idx, cnt = sparse_problem(q, k, v, kv_idx, q_block=1, kv_block=1).kernel_index()
    options = dict(q_block=1, kv_block=1, scale=0.3, offset=4, left=None, right=0)
    out, lse = np.full((1, 4, 66, 8), np.nan, np.float32), np.full((1, 4, 66), np.nan, np.float32)
    cpu_sparse.forward(q, k, v, idx, cnt, out=out, lse=lse, **options)
    assert not np.isnan(out).any() and not np.isnan(lse).any()
    grads = tuple(np.full(x.shape, np.nan, np.float32) for x in (q, k, v))
    cpu_sparse.backward(out, q, k, v, out, lse, idx, cnt, grads=grads, **options)
    assert not any(np.isnan(g).any() for g in grads)
    strided = np.asfortranarray(q)
    kw = dict(q_block=1, kv_block=1, causal=True)
    assert np.array_equal(
        nsa.sparse_attention(strided, k, v, kv_idx, **kw), nsa.sparse_attention(q, k, v, kv_idx, **kw)
    )


# ----------------------------------------------------------------------------- determinism


@pytest.mark.parametrize(("q_block", "kv_block"), [(16, 32), (1, 1)])
def test_backward_is_bitwise_repeatable_across_runs_and_threads(rng, q_block, kv_block):
    import numba

    from npsparseattn.cpu import sparse as cpu_sparse

    q, k, v = random_qkv(rng, batch=(2,), hq=4, hk=2, lq=96, lk=96, d=16, dtype=np.float32)
    kv_idx = index_for(rng, q, k, q_block, kv_block, 40 if kv_block == 1 else 2)
    p = sparse_problem(q, k, v, kv_idx, q_block=q_block, kv_block=kv_block, causal=True)
    options = dict(p.options())
    out, lse = cpu_sparse.forward(q, k, v, *p.kernel_index(), **options)
    dout = random_array(rng, out.shape, np.float32)
    threads = numba.get_num_threads()
    for scheme in ("one-pass", "two-pass"):
        runs = []
        for n in sorted({1, threads}) + [threads]:
            numba.set_num_threads(n)
            try:
                runs.append(cpu_sparse.backward(dout, q, k, v, out, lse, *p.kernel_index(), scheme=scheme, **options))
            finally:
                numba.set_num_threads(threads)
        for other in runs[1:]:
            assert all(a.tobytes() == b.tobytes() for a, b in zip(runs[0], other)), scheme


# ----------------------------------------------------------------------------- refusals


def test_bad_indices_are_refused_before_any_work(rng):
    q, k, v = random_qkv(rng, hq=2, lq=64, lk=64, d=8)
    good = np.zeros((2, 2, 1), np.int32)
    kw = dict(q_block=32, kv_block=32)
    repeated = np.full((2, 2, 3), -1)
    repeated[1, 0] = [1, -1, 1]
    with pytest.raises(ValueError, match=r"kv_idx\[1, 0, :\] selects key block 1 twice \(slots 0 and 2\)"):
        nsa.sparse_attention(q, k, v, repeated, **kw)
    with pytest.raises(ValueError, match=r"kv_idx\[0, 1, 0\] = 2 is out of range.*\[0, 2\)"):
        nsa.sparse_attention(q, k, v, np.array([[[0], [2]], [[0], [0]]], np.int32), **kw)
    with pytest.raises(ValueError, match=r"= -2 is out of range"):
        nsa.sparse_attention(q, k, v, np.full((2, 2, 1), -2, np.int32), **kw)
    with pytest.raises(ValueError, match=r"kv_idx must have shape \(2, 2, 1\)"):
        nsa.sparse_attention(q, k, v, np.zeros((2, 3, 1), np.int32), **kw)
    with pytest.raises(TypeError, match="integer array"):
        nsa.sparse_attention(q, k, v, good.astype(np.float32), **kw)
    with pytest.raises(TypeError, match="integer array"):
        nsa.sparse_attention(q, k, v, good.astype(bool), **kw)
    with pytest.raises(ValueError, match=r"kv_cnt\[0, 1\] = 2; a count must lie in \[0, K=1\]"):
        nsa.sparse_attention(q, k, v, good, kv_cnt=np.array([[1, 2], [0, 0]]), **kw)
    with pytest.raises(ValueError, match="kv_cnt must have shape"):
        nsa.sparse_attention(q, k, v, good, kv_cnt=np.ones((2,), np.int32), **kw)
    with pytest.raises(ValueError, match="q_block must be"):
        nsa.sparse_attention(q, k, v, good, q_block=0)
    with pytest.raises(TypeError, match="kv_idx must be"):
        nsa.sparse_attention(q, k, v, [[[0]]], **kw)


def test_refusals_touch_no_gradient_buffer(rng):
    from npsparseattn.cpu import sparse as cpu_sparse

    assert cpu_sparse.unsupported(None) == []
    q, k, v = random_qkv(rng, hq=2, lq=64, lk=64, d=8)
    out, lse = nsa.sparse_attention(q, k, v, np.zeros((2, 2, 1), np.int32), q_block=32, return_lse=True)
    with pytest.raises(ValueError, match="twice"):
        nsa.sparse_attention_backward(out, q, k, v, out, lse, np.zeros((2, 2, 2), np.int32), q_block=32)
    with pytest.raises(ValueError, match="lse must have shape"):
        nsa.sparse_attention_backward(out, q, k, v, out, lse[:, :3], np.zeros((2, 2, 1), np.int32), q_block=32)


# ----------------------------------------------------------------------------- masks and non-finite values


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kv_block", [1, 32])
def test_nan_reaches_exactly_the_queries_that_see_it(rng, backend, kv_block):
    q, k, v = random_qkv(rng, hq=1, lq=64, lk=64, d=8)
    v[0, 40, 3] = np.nan
    nkb = blocks(64, kv_block)
    kv_idx = np.broadcast_to(np.arange(nkb, dtype=np.int32), (1, 2, nkb))
    out = nsa.sparse_attention(q, k, v, kv_idx, q_block=32, kv_block=kv_block, causal=True, backend=backend)
    sees = visibility_mask(64, 64, right=0)[:, 40]
    assert np.array_equal(np.isnan(out[0]).any(axis=1), sees)


def test_torch_autograd_of_the_masked_dense_formula(rng):
    torch = pytest.importorskip("torch")
    q, k, v = random_qkv(rng, hq=4, hk=2, lq=50, lk=60, d=8)
    kv_idx = index_for(rng, q, k, 1, 4, 6)
    kw = dict(q_block=1, kv_block=4, window=(20, 3))
    out, lse = nsa.sparse_attention(q, k, v, kv_idx, return_lse=True, **kw)
    dout = random_array(rng, out.shape)
    grads = nsa.sparse_attention_backward(dout, q, k, v, out, lse, kv_idx, **kw)
    mask = reference_sparse.token_mask(kv_idx[None], np.full(kv_idx.shape[:-1], 6)[None], 4, 50, 60, 1, 4, 10,
                                       20, 3, np)[0]  # fmt: skip
    tq, tk, tv = (torch.tensor(x, requires_grad=True) for x in (q, k, v))
    scores = tq @ tk.repeat_interleave(2, 0).transpose(-1, -2) / np.sqrt(8)
    scores = scores.masked_fill(~torch.tensor(mask), -torch.inf)
    p = torch.softmax(scores, -1).nan_to_num(0.0)
    (p @ tv.repeat_interleave(2, 0)).backward(torch.tensor(dout))
    for g, t in zip(grads, (tq, tk, tv)):
        assert rel_err(g, t.grad.numpy(), floor=1.0) < 1e-10


# ----------------------------------------------------------------------------- varlen


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize(("q_block", "kv_block", "hq", "hk"), [(16, 16, 2, 2), (1, 1, 4, 2), (8, 3, 3, 1)])
@pytest.mark.parametrize("mask", [MASKS[0], MASKS[3]])
def test_varlen_matches_reference_and_separate_calls(rng, dtype, q_block, kv_block, hq, hk, mask):
    cu_q = np.array([0, 37, 37, 90], np.int32)
    cu_k = np.array([0, 50, 61, 101], np.int32)
    q = random_array(rng, (hq, 90, 8), dtype)
    k, v = random_array(rng, (hk, 101, 8), dtype), random_array(rng, (hk, 101, 8), dtype)
    lengths_q, lengths_k = np.diff(cu_q), np.diff(cu_k)
    parts = [random_index(rng, (hk,), blocks(lq, q_block), 5, blocks(lk, kv_block)) for lq, lk in
             zip(lengths_q, lengths_k)]  # fmt: skip
    kv_idx = np.concatenate(parts, axis=1)
    kw = dict(q_block=q_block, kv_block=kv_block, **mask)
    out, lse = nsa.sparse_attention_varlen(q, k, v, cu_q, cu_k, kv_idx, return_lse=True, **kw)
    ref_out, ref_lse = nsa.sparse_attention_varlen(q, k, v, cu_q, cu_k, kv_idx, return_lse=True, backend="reference",
                                                   **kw)  # fmt: skip
    tol = TOL[np.dtype(dtype)]
    assert rel_err(out, ref_out) < tol
    assert np.array_equal(np.isneginf(lse), np.isneginf(ref_lse))
    dout = random_array(rng, out.shape, dtype)
    grads = nsa.sparse_attention_varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, kv_idx, **kw)
    ref_grads = nsa.sparse_attention_varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, kv_idx, backend="reference",
                                                     **kw)  # fmt: skip
    for name, g, r in zip("qkv", grads, ref_grads):
        assert rel_err(g, r, floor=1.0) < 4 * tol, name
    s = 2  # the last sequence alone
    alone = nsa.sparse_attention(q[:, 37:], k[:, 61:], v[:, 61:], parts[s], **kw)
    assert rel_err(out[:, 37:], alone) < tol


def test_varlen_refuses_a_wrong_number_of_lists(rng):
    q, k, v = random_qkv(rng, hq=1, lq=20, lk=20, d=4)
    cu = np.array([0, 10, 20], np.int32)
    with pytest.raises(ValueError, match=r"kv_idx must have shape \(1, 4, 2\)"):
        nsa.sparse_attention_varlen(q, k, v, cu, cu, np.zeros((1, 3, 2), np.int32), q_block=5)
    with pytest.raises(ValueError, match=r"out of range.*\[0, 1\)"):
        nsa.sparse_attention_varlen(q, k, v, cu, cu, np.ones((1, 2, 1), np.int32), q_block=10, kv_block=10)

"""numba-cuda attention, block-sparse and sparse attention with ALiBi, softcap, bias and a user's score_mod and
mask_mod in the CUDA simulator, against the float64 reference.

Each case runs the forward (out, lse, empty rows) and the backward (dq, dk,
dv and, with a bias, its gradient summed over the axes it broadcasts along)
through the public API; the reference gets the same inputs in float64.
Sizes stay small: the simulator runs every thread in Python.
"""

from __future__ import annotations

import ml_dtypes
import numba
import numpy as np
import pytest
from conftest import BackendCase, random_array, random_qkv, rel_err

import npsparseattn as nsa
from npsparseattn import layouts
from npsparseattn.cuda.numba_cuda import exact as numba_exact
from npsparseattn.problems import attention_problem
from npsparseattn.problems.scores import bias_grad_buffer, with_score_mods

CUDA = BackendCase("attention", "numba-cuda")


@numba.njit
def tempered(score, b, h, q_idx, kv_idx):
    """A score_mod reading every argument: per-head temperature, a batch offset and a relative-position term."""
    return score * (0.75 + 0.125 * h) + 0.25 * b - 0.01 * (q_idx - kv_idx)


@numba.njit
def tempered_grad(score, b, h, q_idx, kv_idx):
    return 0.75 + 0.125 * h


@numba.njit
def striped(b, h, q_idx, kv_idx):
    """A mask_mod that empties query 5's row for batch 1 and cuts every third pair."""
    return not (b == 1 and q_idx == 5) and (q_idx + kv_idx + h) % 3 != 0


USER = dict(score_mod=tempered, score_mod_grad=tempered_grad, mask_mod=striped)
OPERATIONS = {
    "attention": (nsa.attention, nsa.attention_backward),
    "block_sparse": (nsa.block_sparse_attention, nsa.block_sparse_attention_backward),
    "sparse": (nsa.sparse_attention, nsa.sparse_attention_backward),
}

CASES = [
    pytest.param(dict(hq=2, hk=1, lq=11, lk=14, d=8), dict(causal=True), ("alibi",), id="alibi-gqa-causal"),
    pytest.param(dict(hq=2, lq=13, lk=13, d=8, dv=5), dict(window=(3, 1)), ("softcap",), id="softcap-window"),
    pytest.param(
        dict(batch=(2,), hq=2, lq=12, lk=9, d=8), dict(window=(1, 0)), ("bias-heads",), id="bias-window-empty-rows"
    ),
    pytest.param(
        dict(batch=(2,), hq=2, hk=1, lq=10, lk=15, d=12, dv=8),
        dict(window=(4, None), causal=True),
        ("alibi-batch", "softcap", "bias-2d"),
        id="all-gqa-causal-window",
    ),
]


def _mods(rng, shape, which):
    """The keywords for the modifications named in ``which``, drawn fresh (slopes positive, bias normal)."""
    batch, hq, lq, lk = shape.get("batch", ()), shape["hq"], shape["lq"], shape["lk"]
    found = {}
    for name in which:
        if name == "alibi":
            found["alibi_slopes"] = rng.uniform(0.1, 1.0, hq)
        elif name == "alibi-batch":
            found["alibi_slopes"] = rng.uniform(0.1, 1.0, (*batch, hq))
        elif name == "softcap":
            found["softcap"] = 1.5
        elif name == "bias-heads":
            found["bias"] = random_array(rng, (1, hq, lq, lk), np.float32)
        elif name == "bias-2d":
            found["bias"] = random_array(rng, (lq, lk), np.float32)
        elif name == "bias-batch":  # per batch, shared by the heads: strides that do not fold into B * Hq
            found["bias"] = random_array(rng, (*batch, 1, lq, lk), np.float32)
    return found


def check_mods(q, k, v, kw, mods, dtype, operation="attention", index=()):
    """Forward and backward of numba-cuda with ``mods`` against the reference in float64.

    ``operation`` names the public functions (:data:`OPERATIONS`), ``index`` the
    arguments after ``v`` (a layout, a kv_idx).
    """
    tol = CUDA.tolerance(dtype)
    fwd, bwd = OPERATIONS[operation]
    wide = {name: x.astype(np.float64) if isinstance(x, np.ndarray) else x for name, x in mods.items()}
    forward_mods = {name: x for name, x in wide.items() if name != "score_mod_grad"}
    q64, k64, v64 = (x.astype(np.float64) for x in (q, k, v))
    narrow = {name: x for name, x in mods.items() if name != "score_mod_grad"}
    out, lse = fwd(q, k, v, *index, return_lse=True, backend="numba-cuda", **kw, **narrow)
    ref_out, ref_lse = fwd(q64, k64, v64, *index, return_lse=True, backend="reference", **kw, **forward_mods)
    assert out.dtype == q.dtype and out.shape == ref_out.shape and lse.dtype == np.float32
    assert rel_err(out, ref_out) < tol
    empty = ~np.isfinite(ref_lse)
    assert np.array_equal(np.isneginf(lse), empty)
    assert np.all(out[empty] == 0)
    np.testing.assert_allclose(lse[~empty], ref_lse[~empty], rtol=0, atol=50 * tol)

    dout = random_array(np.random.default_rng(1), out.shape, dtype)
    grads = bwd(dout, q, k, v, out, lse, *index, backend="numba-cuda", **kw, **mods)
    ref = bwd(dout.astype(np.float64), q64, k64, v64, ref_out, ref_lse, *index, backend="reference", **kw, **wide)
    assert len(grads) == len(ref) == 3 + ("bias" in mods)
    for label, g, r in zip(("dq", "dk", "dv", "dbias"), grads, ref):
        assert g.shape == r.shape and g.dtype == dtype, label
        assert rel_err(g, r, floor=1.0) < 4 * tol, label
    return empty


@pytest.mark.parametrize(("shape", "mask", "which"), CASES)
def test_matches_reference(rng, shape, mask, which):
    q, k, v = random_qkv(rng, dtype=np.float32, **shape)
    empty = check_mods(q, k, v, mask, _mods(rng, shape, which), np.float32)
    if shape["lq"] > shape["lk"]:
        assert empty.any()  # the case has rows that see no key


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16], ids=["float16", "bfloat16"])
def test_half_precision_storage(rng, dtype):
    shape = dict(batch=(2,), hq=2, hk=1, lq=9, lk=11, d=8)
    q, k, v = random_qkv(rng, dtype=dtype, **shape)
    mods = _mods(rng, shape, ("alibi", "softcap", "bias-heads"))
    mods["bias"] = mods["bias"].astype(dtype)
    check_mods(q, k, v, dict(causal=True), mods, dtype)


def test_block_sparse_per_head_layout(rng):
    """ALiBi per batch and head, softcap and a per-head bias on a per-head layout (empty rows), GQA, causal."""
    shape = dict(batch=(2,), hq=2, hk=1, lq=13, lk=17, d=8, dv=6)
    q, k, v = random_qkv(rng, dtype=np.float32, **shape)
    stored = rng.random((2, 3, 3)) < 0.6  # (Hq, query blocks, key blocks) of blocks (5, 6)
    stored[1, 1] = False  # head 1's second query block stores nothing
    layout = layouts.from_block_mask(stored, block=(5, 6), seq=(13, 17))
    mods = _mods(rng, shape, ("alibi-batch", "softcap", "bias-heads"))
    empty = check_mods(q, k, v, dict(causal=True), mods, np.float32, "block_sparse", (layout,))
    assert empty[:, 1, 5:10].all()


def test_sparse_unused_slot_and_empty_list(rng):
    """The batch folded into the heads: a per-batch bias, per-(batch, head) slopes and the user's functions still get
    the caller's (b, h)."""
    shape = dict(batch=(2,), hq=2, hk=1, lq=26, lk=37, d=8)
    q, k, v = random_qkv(rng, dtype=np.float32, **shape)
    kv_idx = np.argsort(rng.random((2, 1, 2, 3)), axis=-1)[..., :2].astype(np.int32)  # 2 query x 3 key blocks
    kv_idx[0, 0, 0, 0] = -1  # an unused slot before a used one
    kv_cnt = np.full((2, 1, 2), 2, np.int32)
    kv_cnt[1, 0, 1] = 0  # a list with nothing: those queries see no key
    kw = dict(kv_cnt=kv_cnt, q_block=16, kv_block=16, causal=True)
    mods = dict(_mods(rng, shape, ("alibi-batch", "softcap", "bias-batch")), **USER)
    empty = check_mods(q, k, v, kw, mods, np.float32, "sparse", (kv_idx,))
    assert empty[1, :, 16:].all() and empty[1, :, 5].all()


@pytest.mark.parametrize("builtins", [(), ("alibi-batch", "bias-2d")], ids=["alone", "with-alibi-bias"])
def test_score_mod_and_mask_mod(rng, builtins):
    """The user's functions compiled into the dense kernels (GQA, causal, odd lengths, a row emptied by mask_mod)."""
    shape = dict(batch=(2,), hq=2, hk=1, lq=11, lk=13, d=8, dv=6)
    q, k, v = random_qkv(rng, dtype=np.float32, **shape)
    mods = dict(_mods(rng, shape, builtins), **USER)
    empty = check_mods(q, k, v, dict(causal=True), mods, np.float32)
    assert empty[1, :, 5].all() and not empty[0].any()


def test_kernels_write_every_output_and_visible_bias_gradient(rng):
    """out, lse, grads poisoned with NaN, and dbias NaN on every visible pair (0 elsewhere), come back written."""
    q, k, v = random_qkv(rng, batch=(1,), hq=2, hk=1, lq=12, lk=10, d=8, dv=6, dtype=np.float32)
    problem = with_score_mods(
        attention_problem(q, k, v, window=(2, 0)), alibi_slopes=np.array([0.5, 0.25]), softcap=2.0,
        bias=random_array(rng, (12, 10), np.float32),
    )  # fmt: skip
    kw = problem.visibility()
    out, lse = np.full((1, 2, 12, 6), np.nan, np.float32), np.full((1, 2, 12), np.nan, np.float32)
    numba_exact.forward(q, k, v, out=out, lse=lse, **kw)
    assert not np.isnan(out).any() and not np.isnan(lse).any()
    grads = tuple(np.full(x.shape, np.nan, np.float32) for x in (q, k, v))
    dbias = bias_grad_buffer(problem, np.float32)
    i, j = np.arange(12)[:, None], np.arange(10)[None, :]
    visible = (j >= i - 2 - 2) & (j <= i - 2)  # offset Lk - Lq = -2, window (2, 0)
    dbias[:, :, visible] = np.nan
    numba_exact.backward(random_array(rng, out.shape, np.float32), q, k, v, out, lse, grads=grads, dbias=dbias, **kw)
    assert all(not np.isnan(g).any() for g in grads)
    assert not np.isnan(dbias).any()
    assert np.all(dbias[:, :, ~visible] == 0)

"""Score modifications in block-sparse and index-driven sparse attention (the CPU walk) against the float64 oracle."""

from __future__ import annotations

import numba
import numpy as np
import pytest
from conftest import random_array, random_qkv, rel_err

import npsparseattn as nsa
from npsparseattn import layouts
from npsparseattn.cpu import block_sparse as cpu_block_sparse
from npsparseattn.cpu import exact as cpu_exact
from npsparseattn.cpu import sparse as cpu_sparse
from npsparseattn.problems import attention_problem, sparse_problem
from npsparseattn.problems.scores import bias_grad_buffer, with_score_mods

SHAPE = dict(batch=(2,), hq=4, hk=2, lq=150, lk=139, d=16, dv=8)

# Each type of score modifications is a compiled version of the walk kernels: the tests that build the same
# versions run on one pytest-xdist worker (``--dist loadgroup``), which compiles each once, not once per worker.
pytestmark = pytest.mark.xdist_group("scores_walk")


@numba.njit
def local_causal(b, h, q_idx, kv_idx):
    """Causal within 70 keys: the mask_mod of these tests (one function: one compiled version of the walk)."""
    return kv_idx <= q_idx and q_idx - kv_idx < 70


def _builtin(rng, q_shape, lk):
    b, hq, lq = q_shape[:3]
    return dict(alibi_slopes=rng.random((b, hq)) * 0.2, softcap=2.0, bias=random_array(rng, (1, hq, lq, lk)))


def _compare(rng, run, reference, p, out_shape, tol, schemes=cpu_exact.SCHEMES):
    """``run(scheme, out, lse, grads, dbias)`` (poisoned buffers) against ``reference`` (public call, backend
    "reference"): forward, both backward schemes, dbias."""
    ref_out, ref_lse = reference(None)
    out = np.full(out_shape, np.nan)
    lse = np.full(out_shape[:3], np.nan)
    run(None, out, lse, None, None)
    assert rel_err(out, ref_out.reshape(out.shape)) < tol
    finite = np.isfinite(ref_lse.reshape(lse.shape))
    assert np.array_equal(np.isfinite(lse), finite)
    assert rel_err(lse[finite], ref_lse.reshape(lse.shape)[finite]) < tol
    dout = random_array(rng, out.shape)
    ref = reference((dout, ref_out, ref_lse))
    dense = getattr(p, "dense", p)
    for scheme in schemes:
        grads = tuple(np.full(x.shape, np.nan) for x in (dense.q, dense.k, dense.v))
        dbias = bias_grad_buffer(p, np.float64)
        run((scheme, dout), out, lse, grads, dbias)
        got = grads + (() if dbias is None else (dense.mods.reduce_bias_grad(dbias),))
        assert len(got) == len(ref)
        for g, r in zip(got, ref, strict=True):
            assert rel_err(g, r.reshape(g.shape)) < tol, scheme


@pytest.mark.parametrize("functions", [False, True], ids=["builtin", "mask-mod"])
def test_block_sparse_mods(rng, functions):
    """ALiBi, softcap, bias (and a mask_mod, evaluated on every stored block of a plain layout) inside the stored
    blocks of a BigBird layout, causal.  (A score_mod runs the same tile code: tests/test_scores.py.)"""
    q, k, v = random_qkv(rng, **SHAPE)
    mods = _builtin(rng, q.shape, k.shape[-2])
    if functions:
        mods.update(mask_mod=local_causal)
    fwd = {key: val for key, val in mods.items() if key != "score_mod_grad"}
    layout = layouts.bigbird((150, 139), 16, global_blocks=(0,), random_blocks=2, seed=3)
    p = with_score_mods(attention_problem(q, k, v, causal=True), **mods)

    def reference(grad_inputs):
        if grad_inputs is None:
            return nsa.block_sparse_attention(q, k, v, layout, causal=True, return_lse=True, backend="reference", **fwd)
        dout, out, lse = grad_inputs
        return nsa.block_sparse_attention_backward(dout.reshape(out.shape), q, k, v, out, lse, layout, causal=True,
                                                   backend="reference", **mods)  # fmt: skip

    def run(backward, out, lse, grads, dbias):
        if backward is None:
            cpu_block_sparse.forward(p.q, p.k, p.v, layout, out=out, lse=lse, **p.visibility())
            return
        scheme, dout = backward
        extra = {} if dbias is None else {"dbias": dbias}
        cpu_block_sparse.backward(dout, p.q, p.k, p.v, out, lse, layout, grads=grads, scheme=scheme,
                                  **p.visibility(), **extra)  # fmt: skip

    schemes = ("one-pass",) if functions else cpu_exact.SCHEMES  # one compiled version per type of modifications
    _compare(rng, run, reference, p, p.q.shape[:3] + (v.shape[-1],), 1e-10, schemes)


@pytest.mark.parametrize(
    "blocks", [dict(q_block=1, kv_block=1), dict(q_block=32, kv_block=16)], ids=["per-token-stacked-heads", "blocks"]
)
def test_sparse_attention_mods(rng, blocks):
    """The modifications on index-driven sparse attention: per-token lists (GQA heads stacked per position, keys
    gathered into tiles: positions and heads recovered inside the tile) and block lists, with -1 slots."""
    q, k, v = random_qkv(rng, **SHAPE)
    mods = _builtin(rng, q.shape, k.shape[-2])
    nqb = -(-150 // blocks["q_block"])
    nkb = -(-139 // blocks["kv_block"])
    slots = min(12, nkb)
    kv_idx = np.argsort(rng.random((2, 2, nqb, nkb)), axis=-1)[..., :slots].astype(np.int32)
    kv_idx[..., -1] = -1
    p = with_score_mods(sparse_problem(q, k, v, kv_idx, None, causal=True, **blocks), **mods)

    def reference(grad_inputs):
        if grad_inputs is None:
            return nsa.sparse_attention(q, k, v, kv_idx, causal=True, return_lse=True, backend="reference",
                                        **blocks, **mods)  # fmt: skip
        dout, out, lse = grad_inputs
        return nsa.sparse_attention_backward(dout.reshape(out.shape), q, k, v, out, lse, kv_idx, causal=True,
                                             backend="reference", **blocks, **mods)  # fmt: skip

    d = p.dense

    def run(backward, out, lse, grads, dbias):
        if backward is None:
            cpu_sparse.forward(d.q, d.k, d.v, *p.kernel_index(), out=out, lse=lse, **p.options())
            return
        scheme, dout = backward
        extra = {} if dbias is None else {"dbias": dbias}
        cpu_sparse.backward(dout, d.q, d.k, d.v, out, lse, *p.kernel_index(), grads=grads, scheme=scheme,
                            **p.options(), **extra)  # fmt: skip

    _compare(rng, run, reference, p, d.q.shape[:3] + (v.shape[-1],), 1e-10)


def test_public_sparse_entries_return_dbias(rng):
    """block_sparse_attention_backward and sparse_attention_backward return dbias in the bias's shape."""
    q, k, v = random_qkv(rng, hq=2, lq=64, lk=64, d=8)
    bias = random_array(rng, (64, 64))
    layout = layouts.sliding_window(64, 16, (1, 0))
    out, lse = nsa.block_sparse_attention(q, k, v, layout, causal=True, bias=bias, return_lse=True)
    grads = nsa.block_sparse_attention_backward(np.ones_like(out), q, k, v, out, lse, layout, causal=True, bias=bias)
    ref = nsa.block_sparse_attention_backward(np.ones_like(out), q, k, v, out, lse, layout, causal=True, bias=bias,
                                              backend="reference")  # fmt: skip
    assert grads[3].shape == bias.shape and rel_err(grads[3], ref[3]) < 1e-10
    kv_idx = np.tile(np.arange(4, dtype=np.int32), (2, 4, 1))
    out, lse = nsa.sparse_attention(q, k, v, kv_idx, q_block=16, kv_block=16, bias=bias, return_lse=True)
    grads = nsa.sparse_attention_backward(np.ones_like(out), q, k, v, out, lse, kv_idx, q_block=16, kv_block=16,
                                          bias=bias)  # fmt: skip
    dense = nsa.attention_backward(np.ones_like(out), q, k, v, out, lse, bias=bias)  # every block listed: dense
    assert rel_err(grads[3], dense[3]) < 1e-10


def test_mask_mod_layout_skips_full_blocks(rng):
    """A layout from layouts.from_mask_mod with the same mask_mod: full blocks run without the predicate, partial
    ones with it, merged exactly; equal to the oracle masked by the predicate everywhere (forward, both backward
    schemes, dbias), and the split is what runs (two parts)."""
    q, k, v = random_qkv(rng, batch=(2,), hq=2, lq=160, lk=160, d=16)
    layout = layouts.from_mask_mod(lambda b, h, i, j: (j <= i) & (i - j < 70), 160, 16)
    assert layout.full.any() and not layout.full.all()
    p = with_score_mods(attention_problem(q, k, v), mask_mod=local_causal, bias=random_array(rng, (160, 160)))
    assert len(cpu_block_sparse.mask_mod_parts(layout, p.mods)) == 2

    def reference(grad_inputs):
        kw = dict(backend="reference", mask_mod=local_causal, bias=p.mods.bias)
        if grad_inputs is None:
            return nsa.attention(q, k, v, return_lse=True, **kw)
        dout, out, lse = grad_inputs
        return nsa.attention_backward(dout.reshape(out.shape), q, k, v, out, lse, **kw)

    def run(backward, out, lse, grads, dbias):
        if backward is None:
            cpu_block_sparse.forward(p.q, p.k, p.v, layout, out=out, lse=lse, **p.visibility())
            return
        scheme, dout = backward
        cpu_block_sparse.backward(dout, p.q, p.k, p.v, out, lse, layout, grads=grads, scheme=scheme, dbias=dbias,
                                  **p.visibility())  # fmt: skip

    _compare(rng, run, reference, p, p.q.shape[:3] + (v.shape[-1],), 1e-10, ("one-pass",))

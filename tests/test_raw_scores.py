"""The ``cupy`` backend's attention with ALiBi and softcap, forward and backward, against the float64 reference.

Like ``tests/test_raw_attention.py``, every test runs ``emulated`` (the CUDA C++
on the host, strict checks, NumPy arrays) and ``gpu`` (marker ``gpu``: CuPy on
a CUDA GPU, skipped where there is none).  The error is measured relative to the
largest reference value, within the backend's tolerance (four times it for the
gradients).  A bias is refused by name: the kernels do not read one.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import random_array, rel_err
from raw_support import DTYPES, MODES, RawMode

import npsparseattn as nsa
from npsparseattn._dispatch import BackendError, implementations
from npsparseattn.cuda.cupy_raw import TOLERANCE
from npsparseattn.cuda.cupy_raw import exact as raw_exact
from npsparseattn.problems import attention_problem
from npsparseattn.problems.scores import with_score_mods

CASES = [
    pytest.param("float16", dict(hq=4, hk=2, lq=77, lk=131, d=32), dict(causal=True), ("alibi",), id="alibi-gqa"),
    pytest.param("bfloat16", dict(hq=2, hk=2, lq=70, lk=70, d=64), dict(window=(20, 7)), ("softcap",), id="softcap"),
    pytest.param(
        "float16",
        dict(batch=2, hq=2, hk=1, lq=90, lk=60, d=32),
        dict(window=(10, None), causal=True),
        ("alibi-batch", "softcap"),
        id="both-lq>lk-empty-rows",
    ),
]


@pytest.fixture(params=MODES)
def mode(request, monkeypatch):
    return RawMode(request.param, monkeypatch)


def _inputs(rng, dtype, batch=1, hq=2, hk=1, lq=40, lk=40, d=32):
    shapes = [(batch, hq, lq, d), (batch, hk, lk, d), (batch, hk, lk, d), (batch, hq, lq, d)]
    return [random_array(rng, s).astype(DTYPES[dtype]) for s in shapes]


def _mods(rng, batch, hq, which):
    found = {}
    if "alibi" in which:
        found["alibi_slopes"] = rng.uniform(0.05, 0.5, hq)
    if "alibi-batch" in which:
        found["alibi_slopes"] = rng.uniform(0.05, 0.5, (batch, hq))
    if "softcap" in which:
        found["softcap"] = 2.0
    return found


def _on(mode, mods):
    """The keywords ``mods`` with their arrays as ``mode``'s."""
    return {name: mode.put(x)[0] if isinstance(x, np.ndarray) else x for name, x in mods.items()}


def _reference(q, k, v, dout, kw, mods):
    q64, k64, v64, do64 = (x.astype(np.float64) for x in (q, k, v, dout))
    out, lse = nsa.attention(q64, k64, v64, return_lse=True, backend="reference", **kw, **mods)
    grads = nsa.attention_backward(do64, q64, k64, v64, out, lse, backend="reference", **kw, **mods)
    return out, lse, grads


@pytest.mark.parametrize(("dtype", "shape", "kw", "which"), CASES)
def test_matches_reference(rng, mode, dtype, shape, kw, which):
    q, k, v, dout = _inputs(rng, dtype, **shape)
    mods = _mods(rng, shape.get("batch", 1), shape["hq"], which)
    device_mods = _on(mode, mods)
    out, lse = nsa.attention(*mode.put(q, k, v), return_lse=True, backend="cupy", **kw, **device_mods)
    grads = nsa.attention_backward(*mode.put(dout, q, k, v), out, lse, backend="cupy", **kw, **device_mods)
    out, lse, grads = mode.get(out), mode.get(lse), [mode.get(g) for g in grads]
    ref_out, ref_lse, ref_grads = _reference(q, k, v, dout, kw, mods)
    tol = TOLERANCE[dtype]
    assert out.dtype == q.dtype and lse.dtype == np.float32 and len(grads) == 3
    assert rel_err(out, ref_out) < tol
    empty = ~np.isfinite(ref_lse)
    if shape["lq"] > shape["lk"]:
        assert empty.any()
    np.testing.assert_array_equal(np.isneginf(lse), empty)
    np.testing.assert_allclose(lse[~empty], ref_lse[~empty], rtol=0, atol=1e-3)
    assert np.all(out[empty] == 0)
    for label, g, r, x in zip(("dq", "dk", "dv"), grads, ref_grads, (q, k, v)):
        assert g.dtype == x.dtype and g.shape == x.shape, label
        assert rel_err(g, r, floor=1.0) < 4 * tol, label


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic-dq", "deterministic-dq"])
def test_kernels_write_every_output_element(rng, mode, deterministic):
    """out, lse and the gradients poisoned with NaN come back written, and right, through the backend module."""
    q, k, v, dout = _inputs(rng, "float16", batch=2, hq=2, hk=1, lq=50, lk=70, d=32)
    kw = dict(window=(15, 3))
    mods = dict(alibi_slopes=rng.uniform(0.05, 0.5, (2, 2)), softcap=3.0)
    problem = with_score_mods(attention_problem(*mode.put(q, k, v), **kw), **_on(mode, mods))
    nan = np.float32(np.nan)
    out, lse = mode.put(np.full(dout.shape, nan).astype(np.float16), np.full(dout.shape[:3], nan, np.float32))
    raw_exact.forward(*mode.put(q, k, v), out=out, lse=lse, **problem.visibility())
    grads = mode.put(*(np.full(x.shape, nan).astype(np.float16) for x in (q, k, v)))
    raw_exact.backward(*mode.put(dout, q, k, v), out, lse, grads=grads, deterministic=deterministic,
                       **problem.visibility())  # fmt: skip
    ref_out, _, ref_grads = _reference(q, k, v, dout, kw, mods)
    assert rel_err(mode.get(out), ref_out) < TOLERANCE["float16"]
    for label, g, r in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert rel_err(mode.get(g), r, floor=1.0) < 4 * TOLERANCE["float16"], label


def test_a_bias_is_refused_by_name(rng, monkeypatch):
    """The cupy kernels apply ALiBi and softcap only: a bias names the backend and what it does not apply."""
    mode = RawMode("emulated", monkeypatch)
    q, k, v, _ = _inputs(rng, "float16", hq=2, hk=1, lq=20, lk=20)
    bias = random_array(rng, (1, 2, 20, 20)).astype(np.float16)
    with pytest.raises(BackendError, match=r"backend 'cupy' cannot run attention: does not apply bias"):
        nsa.attention(*mode.put(q, k, v), bias=bias, softcap=2.0, backend="cupy")
    impl = next(i for i in implementations("attention") if i.name == "cupy")
    problem = with_score_mods(attention_problem(q, k, v), alibi_slopes=np.ones(2), bias=bias)
    assert impl.unsupported(problem) == ["does not apply bias"]
    assert impl.unsupported(with_score_mods(attention_problem(q, k, v), alibi_slopes=np.ones(2), softcap=1.0)) == []


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_gpu_sizes_with_alibi_and_softcap(rng, monkeypatch, dtype):
    """Many tiles at head dimensions 64 and 128, ALiBi per (batch, head) and a softcap: only where a GPU is."""
    mode = RawMode("gpu", monkeypatch)
    kw = dict(causal=True, window=(400, None))
    for d in (64, 128):
        q, k, v, dout = _inputs(rng, dtype, batch=2, hq=4, hk=2, lq=1000, lk=1100, d=d)
        mods = dict(alibi_slopes=rng.uniform(0.01, 0.2, (2, 4)), softcap=30.0)
        on = _on(mode, mods)
        out, lse = nsa.attention(*mode.put(q, k, v), return_lse=True, backend="cupy", **kw, **on)
        grads = nsa.attention_backward(*mode.put(dout, q, k, v), out, lse, backend="cupy", **kw, **on)
        ref_out, _, ref_grads = _reference(q, k, v, dout, kw, mods)
        assert rel_err(mode.get(out), ref_out) < TOLERANCE[dtype], d
        for label, g, r in zip(("dq", "dk", "dv"), grads, ref_grads):
            assert rel_err(mode.get(g), r, floor=1.0) < 4 * TOLERANCE[dtype], (label, d)

"""Score modifications (ALiBi, softcap, bias, score_mod, mask_mod): the oracle against PyTorch autograd, the numba
kernels against the oracle, and the refusals."""

from __future__ import annotations

import numba
import numpy as np
import pytest
from conftest import random_array, random_qkv, rel_err

import npsparseattn as nsa
from npsparseattn.cpu import exact as cpu_kernels
from npsparseattn.problems import attention_problem
from npsparseattn.problems.scores import bias_grad_buffer, with_score_mods

# Each type of score modifications is a compiled version of the dense kernels: the tests that build the same
# versions run on one pytest-xdist worker (``--dist loadgroup``), which compiles each once, not once per worker.
pytestmark = pytest.mark.xdist_group("scores_dense")


@numba.njit
def tempered(score, b, h, q_idx, kv_idx):
    """A score_mod reading every argument: per-head temperature, a batch offset and a relative-position term."""
    return score * (0.75 + 0.125 * h) + 0.25 * b - 0.01 * (q_idx - kv_idx)


@numba.njit
def tempered_grad(score, b, h, q_idx, kv_idx):
    return 0.75 + 0.125 * h


@numba.njit
def striped(b, h, q_idx, kv_idx):
    """A mask_mod that leaves some rows empty: query 5 sees nothing, and every third key pair is cut."""
    return q_idx != 5 and (q_idx + kv_idx + h) % 3 != 0


def _torch_attention(torch, q, k, v, *, scale, offset, causal, slopes, cap, bias, score_mod, mask_mod):
    """Dense attention with the modifications written in torch operations (autograd gives every gradient)."""
    group = q.shape[1] // k.shape[1]
    kk, vv = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    x = scale * q @ kk.transpose(-1, -2)
    lq, lk = x.shape[-2:]
    i = torch.arange(lq, dtype=torch.float64)[:, None]
    j = torch.arange(lk, dtype=torch.float64)[None, :]
    if cap is not None:
        x = cap * torch.tanh(x / cap)
    if slopes is not None:
        x = x - slopes[..., None, None] * (i + offset - j).abs()
    if bias is not None:
        x = x + bias
    if score_mod is not None:
        b = torch.arange(x.shape[0], dtype=torch.float64)[:, None, None, None]
        h = torch.arange(x.shape[1], dtype=torch.float64)[None, :, None, None]
        x = score_mod(x, b, h, i, j)
    keep = torch.ones(lq, lk, dtype=torch.bool)
    if causal:
        keep = keep & (j <= i + offset)
    keep = keep.expand(x.shape)
    if mask_mod is not None:
        keep = keep & mask_mod
    x = x.masked_fill(~keep, float("-inf"))
    p = torch.softmax(x, dim=-1).nan_to_num(0.0)  # empty rows: 0
    return p @ vv


def test_oracle_matches_torch_autograd(rng):
    """The float64 oracle's out and every gradient (dq, dk, dv, dbias broadcast over batch) equal torch autograd of
    the formulas written independently, with all five modifications at once, GQA, causal and empty rows."""
    torch = pytest.importorskip("torch", reason="PyTorch is not installed (pip install npsparseattn[interop])")
    q, k, v = random_qkv(rng, batch=(2,), hq=4, hk=2, lq=23, lk=29, d=8, dv=5)
    slopes = rng.random(4) + 0.1
    bias = random_array(rng, (1, 4, 23, 29))
    mask = np.array([[[[bool(striped(b, h, i, j)) for j in range(29)] for i in range(23)] for h in range(4)]
                     for b in range(2)])  # fmt: skip
    kw = dict(causal=True, alibi_slopes=slopes, softcap=1.5, bias=bias, score_mod=tempered, mask_mod=striped)
    out = nsa.attention(q, k, v, backend="reference", **kw)
    dout = random_array(rng, out.shape)
    grads = nsa.attention_backward(
        dout, q, k, v, out, nsa.attention(q, k, v, backend="reference", return_lse=True, **kw)[1],
        backend="reference", score_mod_grad=tempered_grad, **kw,
    )  # fmt: skip
    t = [torch.tensor(x, requires_grad=True) for x in (q, k, v, bias)]
    expected = _torch_attention(
        torch, *t[:3], scale=8**-0.5, offset=6, causal=True, slopes=torch.tensor(slopes), cap=1.5, bias=t[3],
        score_mod=lambda x, b, h, i, j: x * (0.75 + 0.125 * h) + 0.25 * b - 0.01 * (i - j),
        mask_mod=torch.tensor(mask),
    )  # fmt: skip
    expected.backward(torch.tensor(dout))
    assert rel_err(out, expected.detach().numpy()) < 1e-12
    for got, ref in zip(grads, t, strict=True):
        assert got.shape == tuple(ref.shape)
        assert rel_err(got, ref.grad.numpy()) < 1e-11


SHAPE = dict(batch=(2,), hq=4, hk=2, lq=300, lk=290, d=16, dv=8)  # two tiles each way, not multiples of them


def _mods(rng, q_shape, lk, bias_shape):
    b, hq, lq = q_shape[0], q_shape[1], q_shape[2]
    shape = {"full": (b, hq, lq, lk), "heads": (1, hq, lq, lk), "keys": (b, 1, 1, lk), "plain": (lq, lk)}
    return dict(alibi_slopes=rng.random((b, hq)) * 0.2, softcap=2.0, bias=random_array(rng, shape[bias_shape]))


def _check_kernels(rng, q, k, v, kw, mods, tol, scheme_names=cpu_kernels.SCHEMES):
    """numba forward (poisoned buffers) and both backward schemes against the oracle, dbias included."""
    fwd = {key: val for key, val in mods.items() if key != "score_mod_grad"}
    p = with_score_mods(attention_problem(q, k, v, **kw), **mods)
    ref_out, ref_lse = nsa.attention(q, k, v, backend="reference", return_lse=True, **kw, **fwd)
    out = np.full(p.q.shape[:3] + (v.shape[-1],), np.nan, q.dtype)
    lse = np.full(p.q.shape[:3], np.nan, q.dtype)
    cpu_kernels.forward(p.q, p.k, p.v, out=out, lse=lse, **p.visibility())
    assert rel_err(out, ref_out.reshape(out.shape)) < tol
    finite = np.isfinite(ref_lse.reshape(lse.shape))
    assert np.array_equal(np.isfinite(lse), finite)
    assert rel_err(lse[finite], ref_lse.reshape(lse.shape)[finite]) < tol
    dout = random_array(rng, out.shape, q.dtype)
    ref = nsa.attention_backward(dout, q, k, v, ref_out.astype(q.dtype), ref_lse.astype(lse.dtype),
                                 backend="reference", **kw, **mods)  # fmt: skip
    for scheme in scheme_names:
        grads = tuple(np.full(x.shape, np.nan, q.dtype) for x in (p.q, p.k, p.v))
        dbias = bias_grad_buffer(p, q.dtype)
        extra = {} if dbias is None else {"dbias": dbias}
        cpu_kernels.backward(dout, p.q, p.k, p.v, out, lse, grads=grads, scheme=scheme, **p.visibility(), **extra)
        got = grads + (() if dbias is None else (p.mods.reduce_bias_grad(dbias),))
        assert len(got) == len(ref)
        for g, r in zip(got, ref, strict=True):
            assert rel_err(g, r.reshape(g.shape)) < tol, scheme


@pytest.mark.parametrize("bias_shape", ["full", "heads", "keys", "plain"])
@pytest.mark.parametrize(
    "kw", [dict(), dict(causal=True), dict(window=(40, 3))], ids=["full", "causal-empty-rows", "window"]
)
def test_numba_builtin_mods(rng, kw, bias_shape):
    """ALiBi + softcap + bias in the numba kernels equal the oracle: forward, both backward schemes, dbias summed
    over the axes the bias broadcasts along (Lq > Lk: with causal the first 10 rows see no key)."""
    q, k, v = random_qkv(rng, **SHAPE)
    _check_kernels(rng, q, k, v, kw, _mods(rng, q.shape, k.shape[-2], bias_shape), 1e-10)


@pytest.mark.parametrize("mods", [dict(alibi_slopes=True), dict(softcap=0.5), dict(bias=True)], ids=str)
def test_numba_one_mod_each(rng, mods):
    """Each built-in modification alone (the others absent: empty placeholders in the same compiled kernel)."""
    q, k, v = random_qkv(rng, **SHAPE)
    full = _mods(rng, q.shape, k.shape[-2], "heads")
    chosen = {key: (full[key] if val is True else val) for key, val in mods.items()}
    _check_kernels(rng, q, k, v, dict(causal=True), chosen, 1e-10, scheme_names=("one-pass",))


def test_numba_score_and_mask_mod(rng):
    """A numba score_mod (with its derivative) and mask_mod compiled into the kernels, with the built-ins."""
    q, k, v = random_qkv(rng, **SHAPE)
    mods = _mods(rng, q.shape, k.shape[-2], "heads")
    mods.update(score_mod=tempered, score_mod_grad=tempered_grad, mask_mod=striped)
    _check_kernels(rng, q, k, v, dict(window=(None, 7)), mods, 1e-10, scheme_names=("one-pass",))


def test_numba_float32(rng):
    """float32 inputs (float32 bias): within the float32 tolerance of the oracle."""
    q, k, v = random_qkv(rng, dtype=np.float32, **SHAPE)
    mods = _mods(rng, q.shape, k.shape[-2], "keys")
    mods["bias"] = mods["bias"].astype(np.float32)
    _check_kernels(rng, q, k, v, dict(causal=True), mods, 2e-5, scheme_names=("one-pass",))


def test_public_api_and_repeatable(rng):
    """Through nsa.attention/attention_backward (backend auto picks numba): shapes restored, dbias in the bias's
    own shape and dtype, the backward bitwise repeatable."""
    q, k, v = random_qkv(rng, hq=2, lq=70, lk=70, d=8)  # 3-D (H, L, D) inputs
    bias = random_array(rng, (70, 70), np.float32)
    kw = dict(causal=True, softcap=3.0, bias=bias, alibi_slopes=np.array([0.5, 0.25]))
    out, lse = nsa.attention(q, k, v, return_lse=True, **kw)
    dout = random_array(rng, out.shape)
    first = nsa.attention_backward(dout, q, k, v, out, lse, **kw)
    second = nsa.attention_backward(dout, q, k, v, out, lse, **kw)
    assert [g.shape for g in first] == [q.shape, k.shape, v.shape, bias.shape]
    assert first[3].dtype == np.float32
    for a, b in zip(first, second, strict=True):
        assert np.array_equal(a, b)
    ref = nsa.attention_backward(dout, q, k, v, out, lse, backend="reference", **kw)
    assert rel_err(first[3], ref[3]) < 1e-6


def test_refusals(rng):
    """Bad modifications are refused before any work, each naming the argument."""
    q, k, v = random_qkv(rng, hq=2, lq=9, lk=9, d=4)
    out, lse = nsa.attention(q, k, v, return_lse=True)
    with pytest.raises(ValueError, match="bias of shape"):
        nsa.attention(q, k, v, bias=np.zeros((3, 9, 9)))
    with pytest.raises(TypeError, match="bias must have a float dtype"):
        nsa.attention(q, k, v, bias=np.zeros((9, 9), np.int32))
    with pytest.raises(ValueError, match="alibi_slopes must have shape"):
        nsa.attention(q, k, v, alibi_slopes=np.ones(3))
    with pytest.raises(ValueError, match="alibi_slopes must be finite"):
        nsa.attention(q, k, v, alibi_slopes=np.array([1.0, np.inf]))
    with pytest.raises(ValueError, match="softcap must be"):
        nsa.attention(q, k, v, softcap=-1.0)
    with pytest.raises(TypeError, match="score_mod must be a function"):
        nsa.attention(q, k, v, score_mod=3)
    with pytest.raises(ValueError, match="score_mod_grad"):
        nsa.attention_backward(out, q, k, v, out, lse, score_mod=tempered)
    with pytest.raises(ValueError, match="pass score_mod too"):
        nsa.attention_backward(out, q, k, v, out, lse, score_mod_grad=tempered_grad)
    with pytest.raises(ValueError, match=r"not a numba\.njit function"):
        nsa.attention(q, k, v, score_mod=lambda s, b, h, i, j: s, backend="numba")


def test_backend_without_a_modification_is_refused():
    """A backend module that does not list a modification in SCORE_MODS is never given it."""
    from npsparseattn._dispatch import implementations

    q = np.zeros((1, 2, 4, 4), np.float32)
    p = with_score_mods(attention_problem(q, q, q), softcap=1.0, mask_mod=striped)
    impls = {impl.name: impl for impl in implementations("attention")}
    assert impls["numba"].unsupported(p) == [] and impls["reference"].unsupported(p) == []
    gpu = dict(p.__dict__, kind="cupy")  # the GPU modules judged on a CuPy problem (kind checked first)
    for name in set(impls) - {"numba", "reference"}:
        reasons = impls[name].unsupported(type(p)(**gpu))
        if not any("CuPy" in r or "GPU" in r or "numba-cuda" in r for r in reasons):
            assert any("does not apply" in r and "mask_mod" in r for r in reasons), (name, reasons)

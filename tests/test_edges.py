"""Reliability at the edges (issue 18): interop, paged caches, the command line and registration.

One section per defect of the issue, in its order.  Each test failed before its fix: a wrong or silently
incomplete result, a cache written and then an error, a traceback instead of a clear message, or work
started before a refusal.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import re
import subprocess
import sys
import tracemalloc
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
from conftest import random_array, random_qkv, rel_err

import npsparseattn as nsa
from npsparseattn import _dispatch, reference
from npsparseattn.reference.kvcache import gather

HAS_TORCH = importlib.util.find_spec("torch") is not None
HAS_JAX = importlib.util.find_spec("jax") is not None
HAS_ML_DTYPES = importlib.util.find_spec("ml_dtypes") is not None
needs_torch = pytest.mark.skipif(not HAS_TORCH, reason="PyTorch is not installed (pip install npsparseattn[interop])")
needs_jax = pytest.mark.skipif(not HAS_JAX, reason="JAX is not installed (pip install npsparseattn[interop])")
needs_ml_dtypes = pytest.mark.skipif(not HAS_ML_DTYPES, reason="ml_dtypes is not installed (pip install ml_dtypes)")
ROOT = Path(__file__).resolve().parent.parent


def _tensors(*arrays):
    import torch

    return tuple(torch.from_numpy(np.ascontiguousarray(a)) for a in arrays)


def _reference_kvcache(q, k_cache, v_cache, lengths, table, **kw):
    """float64 attention of each sequence over its first ``lengths[b]`` keys (read through ``table``)."""
    outs = []
    for b in range(q.shape[0]):
        n = int(lengths[b])
        if table is None:
            k, v = k_cache[b, :, :n], v_cache[b, :, :n]
        else:
            k, v = (gather(x, table[b], n, np) for x in (k_cache, v_cache))
        outs.append(reference.attention(q[b], k, v, **{"causal": True, **kw})[0])
    return np.stack(outs)


# ----------------------------------------------------------------------------- 1. double backward (PyTorch)


@needs_torch
def test_torch_adapter_refuses_to_be_differentiated_twice(rng):
    import torch

    from npsparseattn.interop import torch as nsa_torch

    q, k, v = (torch.from_numpy(x).requires_grad_() for x in random_qkv(rng, hq=4, hk=2, lq=23, d=8))
    out = nsa_torch.attention(q, k, v, causal=True)
    (dk,) = torch.autograd.grad(out.sum(), k, create_graph=True)  # a gradient penalty starts like this
    qp, kp, vp = (x.detach().requires_grad_() for x in (q, k, v))
    plain = torch.nn.functional.scaled_dot_product_attention(qp, kp, vp, is_causal=True, enable_gqa=True)
    (dk_plain,) = torch.autograd.grad(plain.sum(), kp)
    assert rel_err(dk.detach().numpy(), dk_plain.numpy(), floor=1.0) < 1e-10  # the first derivative is right
    with pytest.raises(RuntimeError, match=r"attention is differentiable once: its gradients were differentiated"):
        (out.sum() + dk.square().sum()).backward()


# ----------------------------------------------------------------------------- 2. shared pages of a paged cache


def _paged(rng, n_pages=6, page_size=4, hk=1, d=4):
    k_pages, v_pages = (random_array(rng, (n_pages, hk, page_size, d)) for _ in range(2))
    return k_pages, v_pages


def test_append_into_a_page_another_sequence_reads_is_refused_before_any_write(rng):
    k_pages, v_pages = _paged(rng)
    q = random_array(rng, (2, 2, 1, 4))
    k_new, v_new = random_array(rng, (2, 2, 1, 1, 4))
    before = k_pages.copy(), v_pages.copy()
    cases = [
        # sequence 0 (2 tokens) appends at slot 2 of page 0, which sequence 1 (3 tokens) reads: distinct slots
        (np.array([[0, 2], [0, 3]]), [2, 3], r"sequence 0 appends into page 0 \(block_table\[0, 0\]\), which "
                                             r"sequence 1 also uses \(block_table\[1, 0\]\)"),
        # the same page twice among the pages one sequence uses: position 5 would overwrite position 1
        (np.array([[1, 1], [2, 3]]), [5, 0], r"block_table\[0\] lists page 1 twice among the 2 pages sequence 0 "
                                             r"uses \(block_table\[0, 0\] and block_table\[0, 1\]\)"),
    ]  # fmt: skip
    for table, lengths, message in cases:
        with pytest.raises(ValueError, match=message + r".*nothing was written"):
            nsa.attention_with_kvcache(q, k_pages, v_pages, cache_seqlens=np.array(lengths), k_new=k_new,
                                       v_new=v_new, block_table=table)  # fmt: skip
        assert k_pages.tobytes() == before[0].tobytes() and v_pages.tobytes() == before[1].tobytes()
    with pytest.raises(ValueError, match=r"block_table\[0\] lists page 1 twice"):  # reading a page twice, too
        nsa.attention_with_kvcache(q, k_pages, v_pages, cache_seqlens=np.array([5, 0]), block_table=cases[1][0])


def test_sequences_share_prefix_pages_for_reading_and_append_into_their_own(rng):
    k_pages, v_pages = _paged(rng, n_pages=8)
    q = random_array(rng, (3, 2, 2, 4))
    k_new, v_new = random_array(rng, (2, 3, 1, 2, 4))
    # page 0 holds a 4-token prefix all three read; unused trailing entries (-1, a repeated page) are never read
    table = np.array([[0, 1, -1], [0, 2, 2], [0, 5, 0]], np.int32)
    lengths = np.array([4, 4, 5])
    keys = [gather(k_pages, table[b], int(lengths[b]), np) for b in range(3)]
    values = [gather(v_pages, table[b], int(lengths[b]), np) for b in range(3)]
    out = nsa.attention_with_kvcache(q, k_pages, v_pages, cache_seqlens=lengths, k_new=k_new, v_new=v_new,
                                     block_table=table)  # fmt: skip
    for b in range(3):
        k = np.concatenate([keys[b], k_new[b]], axis=1)
        v = np.concatenate([values[b], v_new[b]], axis=1)
        assert rel_err(out[b], reference.attention(q[b], k, v, causal=True)[0]) < 1e-12


# ----------------------------------------------------------------------------- 3. ml_dtypes, conversions first


@needs_torch
def test_torch_tensors_need_ml_dtypes_only_for_bfloat16(rng, monkeypatch):
    import torch

    monkeypatch.setitem(sys.modules, "ml_dtypes", None)  # as if it were not installed
    q, k, v = _tensors(*(random_array(rng, (2, 9, 4), np.float32) for _ in range(3)))
    assert isinstance(nsa.attention(q, k, v), torch.Tensor)
    k_cache, v_cache = torch.zeros(1, 1, 8, 4), torch.zeros(1, 1, 8, 4)
    new = _tensors(random_array(rng, (1, 1, 1, 4), np.float32))[0]
    out = nsa.attention_with_kvcache(q[:1, None, :1], k_cache, v_cache, cache_seqlens=3, k_new=new, v_new=new)
    assert isinstance(out, torch.Tensor) and torch.equal(k_cache[0, :, 3], new[0, :, 0])

    half, one = torch.zeros(1, 1, 8, 4, dtype=torch.bfloat16), torch.ones(1, 1, 1, 4, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match=r"ml_dtypes is not installed: pip install ml_dtypes"):
        nsa.attention_with_kvcache(one, half, half, cache_seqlens=3, k_new=one, v_new=one)
    assert not half.any()


class _NoFloat32Back:
    """A foreign array whose framework cannot take float32 arrays back (its ``from_dlpack`` refuses them)."""

    def __init__(self, x):
        self.x = x

    def __dlpack__(self, **kwargs):
        return self.x.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self.x.__dlpack_device__()

    def __array_namespace__(self, api_version=None):
        def from_dlpack(a):
            if a.dtype == np.float32:
                raise TypeError("this framework has no float32")
            return _NoFloat32Back(np.from_dlpack(a))

        return types.SimpleNamespace(from_dlpack=from_dlpack)


def test_a_result_that_cannot_go_back_is_refused_before_the_cache_is_written(rng):
    k_cache, v_cache = (random_array(rng, (2, 1, 8, 4), np.float32) for _ in range(2))
    q, k_new, v_new = (random_array(rng, shape, np.float32) for shape in ((2, 2, 1, 4), (2, 1, 1, 4), (2, 1, 1, 4)))
    before = k_cache.copy()
    with pytest.raises(TypeError, match="this framework has no float32"):  # the float32 output could not go back
        nsa.attention_with_kvcache(*(_NoFloat32Back(x) for x in (q, k_cache, v_cache)), cache_seqlens=3,
                                   k_new=_NoFloat32Back(k_new), v_new=_NoFloat32Back(v_new))  # fmt: skip
    assert k_cache.tobytes() == before.tobytes()


# ----------------------------------------------------------------------------- 4. half-precision caches


def _half_dtypes():
    dtypes = [np.float16]
    if HAS_ML_DTYPES:
        import ml_dtypes

        dtypes.append(ml_dtypes.bfloat16)
    return dtypes


@pytest.mark.parametrize("dtype", _half_dtypes(), ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize(("page_size", "lq"), [(None, 1), (16, 1), (16, 40), (None, 40)])
def test_half_precision_caches_against_float64(rng, dtype, page_size, lq):
    """Read as stored and widened tile by tile: decoding (loops) and query blocks (BLAS), contiguous and paged."""
    batch, hq, hk, d, dv = 3, 4, 2, 16, 12
    rows, slots, table = batch, 300, None  # contiguous: one row of 300 slots per sequence
    if page_size is not None:  # paged: 18 pages of 16 slots per sequence, scattered over a pool with spare pages
        rows, slots = batch * 18 + 4, page_size
        table = rng.permutation(rows)[: batch * 18].reshape(batch, 18).astype(np.int32)
    k_cache, v_cache = random_array(rng, (rows, hk, slots, d)), random_array(rng, (rows, hk, slots, dv))
    k_cache, v_cache = k_cache.astype(dtype), v_cache.astype(dtype)
    q = random_array(rng, (batch, hq, lq, d)).astype(dtype)
    k_new, v_new = (
        random_array(rng, (batch, hk, 2, d)).astype(dtype),
        random_array(rng, (batch, hk, 2, dv)).astype(dtype),
    )
    lengths = np.array([0, 257, 41])
    kw = {} if table is None else {"block_table": table}
    out, lse = nsa.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=lengths, k_new=k_new, v_new=v_new,
                                          return_lse=True, **kw)  # fmt: skip
    assert out.dtype == np.dtype(dtype) and lse.dtype == np.float32
    f64 = [x.astype(np.float64) for x in (q, k_cache, v_cache)]
    ref = _reference_kvcache(*f64, lengths + 2, table)
    bound = 4e-3 if np.dtype(dtype).name == "float16" else 3e-2  # the output's rounding to its dtype, twice
    assert rel_err(out, ref) < bound


def test_a_half_precision_pool_is_not_widened_whole(rng):
    """A 64 MiB float16 pool with one page in use: the call allocates about a page, not a float32 pool."""
    n_pages, hk, page_size, d = 256, 4, 256, 128
    k_pages = np.ones((n_pages, hk, page_size, d), np.float16)
    v_pages = np.ones((n_pages, hk, page_size, d), np.float16)
    k_pages[7], v_pages[7] = random_array(rng, (2, hk, page_size, d)).astype(np.float16)
    q = random_array(rng, (1, 8, 1, d)).astype(np.float16)
    table, lengths = np.array([[7]], np.int32), np.array([200])
    nsa.attention_with_kvcache(q, k_pages[:8], v_pages[:8], cache_seqlens=lengths, block_table=table)  # compiled
    tracemalloc.start()
    out = nsa.attention_with_kvcache(q, k_pages, v_pages, cache_seqlens=lengths, block_table=table)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < k_pages.nbytes // 64, f"{peak} bytes allocated for a pool of {2 * k_pages.nbytes}"
    ref = _reference_kvcache(q.astype(np.float64), k_pages[7:8].astype(np.float64), v_pages[7:8].astype(np.float64),
                             lengths, None)  # fmt: skip
    assert rel_err(out, ref) < 4e-3


# ----------------------------------------------------------------------------- 5. one scale and lse rule


def test_scale_and_lse_rules_hold_for_varlen_and_the_kv_cache(rng):
    cu = np.array([0, 5, 9], np.int32)
    q, k, v = (random_array(rng, (2, 9, 4), np.float32) for _ in range(3))
    message = r"scale=3e\+38 is too large for float32 inputs"
    with pytest.raises(ValueError, match=message):
        nsa.attention_varlen(q, k, v, cu, cu, scale=3e38)
    with pytest.raises(ValueError, match=message):
        nsa.attention_with_kvcache(q[None, :, :1], k[None], v[None], cache_seqlens=9, scale=3e38)
    with pytest.raises(ValueError, match=message):
        nsa.attention_varlen_backward(q, q, k, v, q, q[..., 0], cu, cu, scale=3e38)
    q, k, v = (x.astype(np.float64) for x in (q, k, v))
    out, lse = nsa.attention_varlen(q, k, v, cu, cu, return_lse=True)
    with pytest.raises(TypeError, match=r"lse has dtype float32; expected float64, the dtype of the forward's lse"):
        nsa.attention_varlen_backward(out, q, k, v, out, lse.astype(np.float32), cu, cu)


# ----------------------------------------------------------------------------- 6. torch.compile


@needs_torch
def test_torch_compile_of_the_adapter_and_the_plain_functions(rng):
    import torch

    from npsparseattn.interop import torch as nsa_torch

    q, k, v = _tensors(*random_qkv(rng, hq=4, hk=2, lq=30, d=8))

    def plain(q, k, v):
        return nsa.attention(q, k, v, causal=True) * 2

    compiled = torch.compile(plain, backend="eager")
    assert torch.equal(compiled(q, k, v), plain(q, k, v))

    def loss(q, k, v):
        return (nsa_torch.attention(q, k, v, causal=True) * 3).sum()

    grads = {}
    for name, fn in (("eager", loss), ("compiled", torch.compile(loss, backend="eager"))):
        inputs = [x.clone().requires_grad_() for x in (q, k, v)]
        fn(*inputs).backward()
        grads[name] = [x.grad for x in inputs]
    for got, want in zip(grads["compiled"], grads["eager"]):
        assert torch.equal(got, want)


# ----------------------------------------------------------------------------- 7. lazy negation through DLPack


@needs_torch
def test_lazily_negated_tensors_are_resolved_or_refused(rng):
    import torch

    z = torch.from_numpy(random_array(rng, (2, 12, 4)) + 1j * random_array(rng, (2, 12, 4)))
    x = z.conj().imag  # a float64 view whose values are negated on reading
    assert x.is_neg()
    plain = x.resolve_neg()
    assert torch.equal(nsa.attention(x, x, x, causal=True), nsa.attention(plain, plain, plain, causal=True))

    cache = torch.from_numpy(random_array(rng, (1, 2, 4, 6)) + 1j * random_array(rng, (1, 2, 4, 6))).conj().imag
    before = cache.resolve_neg()
    new = _tensors(random_array(rng, (1, 2, 1, 6)))[0]
    with pytest.raises(TypeError, match=r"k_cache is a lazily negated view .* and k_cache is written in place"):
        nsa.attention_with_kvcache(new, cache, cache, cache_seqlens=1, k_new=new, v_new=new)
    assert torch.equal(cache.resolve_neg(), before)


# ----------------------------------------------------------------------------- 8. the command line


def _no_work(monkeypatch):
    """Make every benchmark and the demo fail if they start: the refusals must come before any work."""
    from npsparseattn.bench import BENCHMARKS
    from npsparseattn.cli import demo, layout

    def started(*args, **kwargs):
        raise AssertionError("work started before the arguments were refused")

    for module in (*BENCHMARKS.values(), demo, layout):
        monkeypatch.setattr(module, "run", started)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["bench", "inference", "--page-size", "0"], "--page-size must be >= 1, got 0"),
        (["bench", "inference", "--rounds", "0"], "--rounds must be >= 1, got 0"),
        (["bench", "inference", "--kv-heads", "0"], "--kv-heads must be >= 1, got 0"),
        (["bench", "inference", "--q-heads", "3", "--kv-heads", "2"], "--q-heads 3 must be a multiple of --kv-heads 2"),
        (["bench", "inference", "--cache", "-5"], "--cache must be >= 1, got -5"),
        (["bench", "inference", "--cache", "0"], "--cache must be >= 1, got 0"),
        (["bench", "inference", "--varlen-max", "0"], "--varlen-max must be >= 1, got 0"),
        (["bench", "inference", "--varlen-heads", "0"], "--varlen-heads must be >= 1, got 0"),
        (["bench", "inference", "--varlen-seqs", "-2"], "--varlen-seqs must be >= 0, got -2"),
        (["bench", "attention", "--heads", "3", "--kv-heads", "2"], "--heads 3 must be a multiple of --kv-heads 2"),
        (["demo", "--sparse-seq", "300"], "argument --sparse-seq: must be a multiple of 64 (the LSH chunk) of at"),
    ],
)
def test_command_line_refuses_bad_values_with_one_line(argv, message, monkeypatch, capsys):
    from npsparseattn.cli import main

    _no_work(monkeypatch)
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2 and message in err.strip().splitlines()[-1], err


@pytest.mark.parametrize(
    "argv",
    [
        ["bench", "attention", "--plot", "{tmp}/scaling.png", "--json", "{tmp}/r.json"],
        ["layout", "causal", "-o", "{tmp}/l.png"],
    ],
)
def test_plots_without_matplotlib_are_refused_before_any_work(argv, tmp_path, monkeypatch, capsys):
    from npsparseattn.cli import main

    _no_work(monkeypatch)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    with pytest.raises(SystemExit) as info:
        main([a.format(tmp=tmp_path) for a in argv])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert info.value.code == 2 and "needs matplotlib, which is not installed: pip install 'npsparseattn[plot]'" in last


# ----------------------------------------------------------------------------- 9. registration


@pytest.fixture
def registry(monkeypatch):
    """A copy of the registry's table for the test, and a module that follows the contract of attention."""
    monkeypatch.setattr(_dispatch, "_TABLE", list(_dispatch._TABLE))
    real = next(impl for impl in _dispatch.implementations("attention") if impl.name == "reference").module
    module = types.ModuleType("edges_backend")
    for name in (*_dispatch.CONTRACT, "forward", "backward"):
        setattr(module, name, getattr(real, name))
    monkeypatch.setitem(sys.modules, module.__name__, module)
    return module


def test_register_backend_validates_the_module_and_the_priority(rng, registry, monkeypatch):
    before = nsa.available_backends("attention")
    with pytest.raises(ValueError, match=r"module 'no_such_package.kernels' cannot be imported: ModuleNotFoundError"):
        nsa.register_backend("attention", "broken", "no_such_package.kernels", priority=1)
    with pytest.raises(TypeError, match=r"priority must be an int .*, got 'high'"):
        nsa.register_backend("attention", "mine", "edges_backend", priority="high")
    incomplete = types.ModuleType("edges_incomplete")
    incomplete.forward = registry.forward
    monkeypatch.setitem(sys.modules, incomplete.__name__, incomplete)
    with pytest.raises(ValueError, match=r"does not follow the kernel contract of attention: it lacks KINDS, DTYPES"):
        nsa.register_backend("attention", "mine", "edges_incomplete")
    assert nsa.available_backends("attention") == before
    q, k, v = random_qkv(rng, hq=2, lq=9, d=4)
    np.testing.assert_allclose(nsa.attention(q, k, v), reference.attention(q, k, v)[0], rtol=0, atol=1e-12)


def test_unregister_backend(rng, registry):
    nsa.register_backend("attention", "mine", "edges_backend", priority=1)
    q, k, v = random_qkv(rng, hq=2, lq=9, d=4)
    assert nsa.available_backends("attention")[0] == "mine"
    nsa.attention(q, k, v, backend="mine")
    nsa.unregister_backend("attention", "mine")
    assert "mine" not in nsa.available_backends("attention")
    with pytest.raises(nsa.BackendError, match=r"backend must be 'auto' or one of"):
        nsa.attention(q, k, v, backend="mine")
    with pytest.raises(ValueError, match=r"backend 'mine' is not registered for attention; its backends: numba"):
        nsa.unregister_backend("attention", "mine")
    with pytest.raises(ValueError, match=r"backend 'numba' is built into npsparseattn and cannot be removed"):
        nsa.unregister_backend("attention", "numba")
    nsa.register_backend("attention", "mine", "edges_backend", priority=1)  # the name is free again


# ----------------------------------------------------------------------------- 10. low


def test_huge_unsigned_offsets_and_lengths_are_reported_as_they_are(rng):
    q, k, v = (random_array(rng, (1, 3, 4)) for _ in range(3))
    huge = np.array([0, 2**64 - 1], np.uint64)
    with pytest.raises(ValueError, match=r"cu_seqlens_q\[1\] = 18446744073709551615 is too large"):
        nsa.attention_varlen(q, k, v, huge, huge)
    with pytest.raises(ValueError, match=r"cache_seqlens\[0\] = 18446744073709551615 is too large"):
        nsa.attention_with_kvcache(q[None], k[None], v[None], cache_seqlens=huge[1:])


def test_pages_of_no_slot_are_refused_without_a_warning(rng):
    pages = np.zeros((3, 1, 0, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match=r"a paged cache's axis 2 is page_size, which must be >= 1"):
            nsa.attention_with_kvcache(random_array(rng, (1, 1, 1, 4)), pages, pages, cache_seqlens=0,
                                       block_table=np.zeros((1, 2), np.int32))  # fmt: skip


@needs_jax
def test_jax_adapter_with_a_traced_scale_says_it_must_be_static():
    import jax
    import jax.numpy as jnp

    from npsparseattn.interop import jax as nsa_jax

    x = jnp.ones((2, 8, 4))
    with pytest.raises(TypeError, match=r"scale must be static \(a Python value\), but it is traced"):
        jax.jit(lambda x, s: nsa_jax.attention(x, x, x, scale=s))(x, 0.5)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_merge_states_takes_the_limit_when_an_lse_is_plus_infinity(dtype):
    out_a = np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], dtype)
    out_b = -out_a
    lse_a = np.array([np.inf, np.inf, 0.0], dtype)
    lse_b = np.array([0.0, np.inf, np.inf], dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out, lse = nsa.merge_states(out_a, lse_a, out_b, lse_b)
    np.testing.assert_array_equal(out, np.array([[1.0, 2.0], [0.0, 0.0], [-5.0, -6.0]], dtype))
    np.testing.assert_array_equal(lse, np.full(3, np.inf, dtype))


def test_available_backends_of_merge_states_explains_that_it_has_none():
    with pytest.raises(ValueError, match=r"merge_states has no backends to choose from: it is array arithmetic"):
        nsa.available_backends("merge_states")


def test_demo_has_a_varlen_kv_cache_and_merge_part(capsys):
    from npsparseattn.cli import demo

    demo.inference()
    text = capsys.readouterr().out
    for line in ("varlen:", "KV cache:", "merge_states:"):
        assert line in text
    errors = [float(e) for e in re.findall(r"vs float64 (?:attention over all \d+ keys )?(\d\.\de[-+]\d+)", text)]
    assert len(errors) == 3 and max(errors) < 1e-5, text


# ----------------------------------------------------------------------------- 11. package data


def test_every_file_the_package_reads_is_in_the_wheel():
    """Every tracked non-Python file inside the package matches a package-data pattern of pyproject.toml."""
    listed = subprocess.run(["git", "-C", str(ROOT), "ls-files", "npsparseattn"], capture_output=True, text=True)
    if listed.returncode != 0:
        pytest.skip("not a git checkout")
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11 on")
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    data = [name.removeprefix("npsparseattn/") for name in listed.stdout.split() if not name.endswith(".py")]
    missing = [name for name in data if not any(fnmatch.fnmatch(name, p) for p in patterns["npsparseattn"])]
    assert not missing, f"not in the wheel: {missing}"

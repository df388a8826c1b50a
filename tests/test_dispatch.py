"""The backend registry: lazy rows, the reasons behind a refusal, and a backend that plugs in without edits."""

from __future__ import annotations

import ast
import collections
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from conftest import FakeCupyArray, SoloComm, random_array, random_qkv, rel_err

import npsparseattn as nsa
from npsparseattn import _dispatch, layouts, reference
from npsparseattn.problems import attention_problem

PACKAGE = Path(nsa.__file__).parent
PUBLIC_MODULES = ("exact.py", "block_sparse.py", "lsh.py", "ring.py", "merge.py", "varlen.py", "kvcache.py")
BACKEND_PACKAGES = ("npsparseattn.cpu", "npsparseattn.cuda", "npsparseattn.reference")


def test_import_needs_no_backend_packages():
    code = (
        "import sys, npsparseattn\n"
        "bad = [m for m in ('cupy', 'numba', 'numba.cuda', 'mpi4py', 'matplotlib', 'npsparseattn.cpu') "
        "if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_registry_imports_a_module_only_when_it_is_chosen():
    code = (
        "import sys, numpy as np, npsparseattn as nsa\n"
        "assert nsa.available_backends('attention') == ['numba', 'cupy', 'numba-cuda', 'reference']\n"
        "assert 'npsparseattn.cpu.exact' not in sys.modules\n"
        "nsa.attention(np.ones((4, 2)), np.ones((4, 2)), np.ones((4, 2)))\n"
        "assert 'npsparseattn.cpu.exact' in sys.modules\n"
        "assert 'npsparseattn.cpu.lsh' not in sys.modules and 'numba.cuda' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("name", PUBLIC_MODULES)
def test_public_modules_import_no_backend_package(name):
    tree = ast.parse((PACKAGE / name).read_text())
    imported = [node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    imported += [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
    assert not [m for m in imported if m and m.startswith(BACKEND_PACKAGES)]


@pytest.mark.parametrize("op", _dispatch.OPERATIONS)
def test_every_operation_has_implementations(op):
    names = nsa.available_backends(op)
    assert names[0] == "numba" and "reference" in names


def test_ring_attention_runs_the_attention_kernels():
    assert nsa.available_backends("ring_attention") == nsa.available_backends("attention")


def test_unknown_operation_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown operation 'atention'; the operations are 'attention', "):
        nsa.available_backends("atention")


def test_auto_picks_numba_for_numpy(rng):
    q, k, v = random_qkv(rng, hq=2, lq=8, d=4)
    assert _dispatch.select("attention", attention_problem(q, k, v), "auto").name == "numba"


def test_forced_reference_matches_numba(rng):
    q, k, v = random_qkv(rng, hq=2, lq=30, d=8, dtype=np.float32)
    ref = nsa.attention(q, k, v, causal=True, backend="reference")
    fast = nsa.attention(q, k, v, causal=True, backend="numba")
    assert ref.dtype == np.float32
    np.testing.assert_allclose(fast, ref, rtol=0, atol=1e-5)


def test_unknown_backend(rng):
    q, k, v = random_qkv(rng, hq=2, lq=8, d=4)
    with pytest.raises(nsa.BackendError, match=r"backend must be 'auto' or one of 'numba', .* got 'triton'"):
        nsa.attention(q, k, v, backend="triton")


def test_backend_without_the_operation(rng, monkeypatch):
    monkeypatch.setattr(_dispatch, "_TABLE", list(_dispatch._TABLE))
    nsa.register_backend("attention", "solo", "npsparseattn.reference.exact")
    q, k, v = random_qkv(rng, hq=2, lq=8, d=4)
    assert nsa.attention(q, k, v, backend="solo").shape == q.shape
    with pytest.raises(nsa.BackendError, match=r"backend 'solo' has no block_sparse_attention; available for "):
        nsa.block_sparse_attention(q, k, v, layouts.dense(8, 4), backend="solo")


def test_mixed_numpy_and_cupy_names_both(fake_cupy, rng):
    q, k, v = random_qkv(rng, hq=2, lq=8, d=4)
    with pytest.raises(TypeError, match=r"q is a NumPy array but v is a CuPy array; pass all arrays"):
        nsa.attention(q, k, FakeCupyArray(v))


def test_cupy_arrays_with_auto_explain_every_backend(fake_cupy, rng):
    q, k, v = (FakeCupyArray(x) for x in random_qkv(rng, hq=2, lq=8, d=4))
    with pytest.raises(nsa.BackendError) as info:
        nsa.attention(q, k, v)
    message = str(info.value)
    assert "no backend can run attention for these inputs" in message
    assert "numba: takes NumPy arrays, got CuPy" in message
    assert "reference: not chosen automatically (pass backend='reference' to use it)" in message


def test_forced_backend_reports_its_reasons(fake_cupy, rng):
    q, k, v = (FakeCupyArray(x) for x in random_qkv(rng, hq=2, lq=8, d=4))
    with pytest.raises(nsa.BackendError, match=r"backend 'numba' cannot run attention: takes NumPy arrays, got CuPy"):
        nsa.attention(q, k, v, backend="numba")


def test_dtype_reason(rng):
    q, k, v = random_qkv(rng, hq=2, lq=8, d=4)
    problem = attention_problem(q.astype(np.float16), k.astype(np.float16), v.astype(np.float16))
    numba = _dispatch.implementations("attention")[0]
    assert numba.unsupported(problem) == []
    narrow = types.SimpleNamespace(KINDS=("numpy",), DTYPES=("float32",), unsupported=lambda p: [])
    impl = _dispatch.Implementation(_dispatch.Row("attention", "narrow", "unused", 50))
    impl.__dict__["module"] = narrow
    assert impl.unsupported(problem) == ["dtype float16 not supported (supports float32)"]


def test_module_reasons_are_reported(rng):
    q, k, v = random_qkv(rng, hq=2, lq=8, d=4)
    module = types.SimpleNamespace(KINDS=("numpy",), DTYPES=("float64",), unsupported=lambda p: ["no CUDA GPU found"])
    impl = _dispatch.Implementation(_dispatch.Row("attention", "gpu", "unused", 50))
    impl.__dict__["module"] = module
    assert impl.unsupported(attention_problem(q, k, v)) == ["no CUDA GPU found"]


def test_registration_rules(monkeypatch):
    monkeypatch.setattr(_dispatch, "_TABLE", list(_dispatch._TABLE))
    with pytest.raises(ValueError, match=r"backend 'numba' is already registered for attention"):
        nsa.register_backend("attention", "numba", "npsparseattn.cpu.exact")
    with pytest.raises(ValueError, match=r"ring_attention runs the attention kernels; register the backend for"):
        nsa.register_backend("ring_attention", "mine", "mine.ring")
    with pytest.raises(ValueError, match=r"backend must be a non-empty name other than 'auto', got 'auto'"):
        nsa.register_backend("attention", "auto", "mine.exact")
    with pytest.raises(ValueError, match=r"unknown operation 'softmax'"):
        nsa.register_backend("softmax", "mine", "mine.softmax")


# --------------------------------------------------------------------------- a backend plugged in from outside

# kernel functions of each operation's module in the contract
KERNELS = {
    "attention": ("forward", "backward"),
    "block_sparse_attention": ("forward", "backward"),
    "lsh_buckets": ("buckets",),
    "lsh_sort": ("sort",),
    "lsh_attention": ("forward", "backward"),
    "attention_varlen": ("forward", "backward"),
    "attention_with_kvcache": ("forward",),
    "sparse_attention": ("forward", "backward"),
    "sparse_attention_varlen": ("forward", "backward"),
}
CONTRACT = ("KINDS", "DTYPES", "TOLERANCE", "STRIDED_ROWS", "compute_dtype", "unsupported")


def _counting(calls, op, name, kernel):
    def counted(*args, **kwargs):
        calls[op, name] += 1
        return kernel(*args, **kwargs)

    return counted


@pytest.fixture
def fake_backend(monkeypatch):
    """Backend ``"fake"`` for every operation: NumPy underneath (the reference kernels), counting its calls.

    It is added with :func:`npsparseattn.register_backend` only; no module of the package is edited.
    """
    calls = collections.Counter()
    monkeypatch.setattr(_dispatch, "_TABLE", list(_dispatch._TABLE))
    for op, functions in KERNELS.items():
        real = next(impl for impl in _dispatch.implementations(op) if impl.name == "reference").module
        module = types.ModuleType(f"fake_backend_{op}")
        for name in CONTRACT:
            setattr(module, name, getattr(real, name))
        for name in functions:
            setattr(module, name, _counting(calls, op, name, getattr(real, name)))
        monkeypatch.setitem(sys.modules, module.__name__, module)
        nsa.register_backend(op, "fake", module.__name__, priority=200, auto=False)
    return calls


def test_every_operation_routes_through_a_registered_backend(rng, fake_backend):
    calls = fake_backend
    assert all("fake" in nsa.available_backends(op) for op in _dispatch.OPERATIONS)
    q, k, v = random_qkv(rng, batch=(2,), hq=4, hk=2, lq=40, lk=40, d=8)
    dout = random_array(rng, (2, 4, 40, 8))

    out, lse = nsa.attention(q, k, v, causal=True, return_lse=True, backend="fake")
    grads = nsa.attention_backward(dout, q, k, v, out, lse, causal=True, backend="fake")
    assert rel_err(out, reference.attention(q, k, v, causal=True)[0]) < 1e-12
    assert rel_err(grads[0], reference.attention_backward(dout, q, k, v, causal=True)[0], floor=1.0) < 1e-12
    assert calls["attention", "forward"] == 1 and calls["attention", "backward"] == 1

    layout = layouts.sliding_window(40, 8, 8)
    out, lse = nsa.block_sparse_attention(q, k, v, layout, return_lse=True, backend="fake")
    nsa.block_sparse_attention_backward(dout, q, k, v, out, lse, layout, backend="fake")
    assert calls["block_sparse_attention", "forward"] == 1 and calls["block_sparse_attention", "backward"] == 1

    qk, values = random_array(rng, (2, 32, 8)), random_array(rng, (2, 32, 8))
    kw = dict(n_buckets=4, n_hashes=2, chunk_size=8, seed=0)
    out, lse = nsa.lsh_attention(qk, values, return_lse=True, backend="fake", **kw)
    nsa.lsh_attention_backward(np.ones_like(out), qk, values, out, lse, backend="fake", **kw)
    assert calls["lsh_attention", "forward"] == 1 and calls["lsh_attention", "backward"] == 1
    assert calls["lsh_buckets", "buckets"] == 2 and calls["lsh_sort", "sort"] == 2  # the plan of each call
    nsa.lsh_sort(nsa.lsh_buckets(qk, 4, seed=0, backend="fake"), backend="fake")
    assert calls["lsh_buckets", "buckets"] == 3 and calls["lsh_sort", "sort"] == 3

    kv_idx = np.broadcast_to(np.array([[0, -1], [1, 0], [2, 1], [3, 2], [4, 3]], np.int32), (2, 2, 5, 2))
    out, lse = nsa.sparse_attention(q, k, v, kv_idx, q_block=8, kv_block=8, return_lse=True, backend="fake")
    nsa.sparse_attention_backward(dout, q, k, v, out, lse, kv_idx, q_block=8, kv_block=8, backend="fake")
    assert calls["sparse_attention", "forward"] == 1 and calls["sparse_attention", "backward"] == 1
    cu = np.array([0, 16, 40], np.int32)
    packed = np.zeros((2, 5, 1), np.int32)
    out, lse = nsa.sparse_attention_varlen(q[0], k[0], v[0], cu, cu, packed, q_block=8, return_lse=True, backend="fake")
    nsa.sparse_attention_varlen_backward(dout[0], q[0], k[0], v[0], out, lse, cu, cu, packed, q_block=8, backend="fake")
    assert calls["sparse_attention_varlen", "forward"] == 1 and calls["sparse_attention_varlen", "backward"] == 1

    before = calls["attention", "forward"], calls["attention", "backward"]
    out, lse = nsa.ring_attention(q, k, v, SoloComm(), causal=True, return_lse=True, backend="fake")
    nsa.ring_attention_backward(dout, q, k, v, out, lse, SoloComm(), causal=True, backend="fake")
    assert calls["attention", "forward"] > before[0] and calls["attention", "backward"] > before[1]
    assert rel_err(out, reference.attention(q, k, v, causal=True)[0]) < 1e-12


def test_a_registered_backend_is_not_chosen_by_auto_when_it_says_so(rng, fake_backend):
    q, k, v = random_qkv(rng, hq=2, lq=8, d=4)
    nsa.attention(q, k, v)
    assert fake_backend["attention", "forward"] == 0

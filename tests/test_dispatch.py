"""Backend registry, array-kind detection and the errors that explain a refusal."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from conftest import FakeCupyArray, random_qkv

import npsparseattn as nsa
from npsparseattn import _dispatch


def test_import_needs_no_gpu_packages():
    code = (
        "import sys, npsparseattn\n"
        "bad = [m for m in ('cupy', 'numba.cuda', 'mpi4py', 'matplotlib') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_auto_picks_numba_for_numpy(rng):
    q, k, v = random_qkv(rng, hq=2, lq=8, d=4)
    problem = nsa._checks.attention_problem(q, k, v)
    assert _dispatch.select("attention", problem, "auto").name == "numba"
    assert nsa.available_backends("attention") == ["numba", "reference"]


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


@pytest.mark.parametrize("backend", ["cupy", "numba-cuda"])
def test_gpu_backend_not_built(rng, backend):
    q, k, v = random_qkv(rng, hq=2, lq=8, d=4)
    with pytest.raises(nsa.BackendError, match=rf"backend '{backend}' has no attention in this release \(GPU kernels"):
        nsa.attention(q, k, v, backend=backend)


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
    impl = _dispatch.implementations("attention")[0]
    q, k, v = random_qkv(rng, hq=2, lq=8, d=4)
    problem = nsa._checks.attention_problem(q, k, v)
    object.__setattr__(problem, "dtype", np.dtype("float16"))
    assert impl.unsupported(problem) == []
    narrow = _dispatch.Implementation("numba", ("numpy",), ("float32",), impl.forward, impl.backward)
    assert narrow.unsupported(problem) == ["dtype float16 not supported (supports float32)"]


def test_environment_reason_is_reported(rng):
    q, k, v = random_qkv(rng, hq=2, lq=8, d=4)
    problem = nsa._checks.attention_problem(q, k, v)
    impl = _dispatch.Implementation(
        "cupy", ("numpy",), ("float64",), print, print, environment=lambda: "no CUDA GPU found"
    )
    assert impl.unsupported(problem) == ["no CUDA GPU found"]


def test_duplicate_registration_refused():
    impl = _dispatch.implementations("attention")[0]
    with pytest.raises(ValueError, match=r"backend 'numba' is already registered for attention"):
        _dispatch.register("attention", impl)

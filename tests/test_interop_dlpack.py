"""Arrays from other frameworks through every public operation: PyTorch and JAX (CPU builds), any DLPack array.

PyTorch and JAX come with the ``interop`` extra; the tests that need one skip,
with the reason, where it is missing.  GPU tensors (read as CuPy arrays) need a
GPU and are not exercised here.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import types

import numpy as np
import pytest
from conftest import SoloComm, random_array

import npsparseattn as nsa
from npsparseattn import layouts
from npsparseattn.interop.dlpack import accepts_dlpack, is_foreign

HAS_TORCH = importlib.util.find_spec("torch") is not None
HAS_JAX = importlib.util.find_spec("jax") is not None
needs_torch = pytest.mark.skipif(not HAS_TORCH, reason="PyTorch is not installed (pip install npsparseattn[interop])")
needs_jax = pytest.mark.skipif(not HAS_JAX, reason="JAX is not installed (pip install npsparseattn[interop])")


def test_importing_the_package_and_the_converter_imports_no_framework():
    code = (
        "import sys, numpy as np, npsparseattn as nsa, npsparseattn.interop, npsparseattn.interop.dlpack\n"
        "nsa.attention(np.ones((4, 2)), np.ones((4, 2)), np.ones((4, 2)))\n"
        "bad = [m for m in ('torch', 'jax', 'jaxlib', 'ml_dtypes') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------- a generic DLPack array


class Wrapped:
    """A minimal foreign array: DLPack export plus an array-API namespace whose from_dlpack wraps again."""

    def __init__(self, x):
        self.x = np.asarray(x)

    def __dlpack__(self, **kwargs):
        return self.x.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self.x.__dlpack_device__()

    def __array_namespace__(self, api_version=None):
        return types.SimpleNamespace(from_dlpack=lambda a: Wrapped(np.from_dlpack(a)))


class Unknown:
    """A DLPack array with no namespace: results come back as NumPy arrays."""

    def __init__(self, x):
        self.x = x

    def __dlpack__(self, **kwargs):
        return self.x.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self.x.__dlpack_device__()


def test_generic_dlpack_arrays_in_and_back_out(rng):
    q, k, v = (random_array(rng, (2, 9, 4)) for _ in range(3))
    out, lse = nsa.attention(Wrapped(q), Wrapped(k), Wrapped(v), causal=True, return_lse=True)
    ref_out, ref_lse = nsa.attention(q, k, v, causal=True, return_lse=True)
    assert isinstance(out, Wrapped) and isinstance(lse, Wrapped)
    np.testing.assert_array_equal(out.x, ref_out)
    np.testing.assert_array_equal(lse.x, ref_lse)
    plain = nsa.attention(Unknown(q), Unknown(k), Unknown(v))
    assert isinstance(plain, np.ndarray)


def test_conversion_is_zero_copy_both_ways(rng):
    x = random_array(rng, (3, 5))
    same = accepts_dlpack(lambda a: a)(Wrapped(x))
    assert np.shares_memory(same.x, x)


def test_numpy_scalars_and_arrays_are_not_foreign():
    assert not is_foreign(np.ones(3)) and not is_foreign(np.float32(1.0)) and not is_foreign(1.0)
    assert is_foreign(Wrapped(np.ones(3)))


def test_unsupported_device_is_named():
    class OnAnotherDevice(Unknown):
        def __dlpack_device__(self):
            return (14, 0)  # kDLOneAPI

    with pytest.raises(TypeError, match=r"q is on DLPack device type 14; arrays on the CPU and CUDA GPUs are"):
        nsa.attention(OnAnotherDevice(np.ones((3, 2))), np.ones((3, 2)), np.ones((3, 2)))


# --------------------------------------------------------------------------- PyTorch


def _torch(*arrays):
    import torch

    return tuple(torch.from_numpy(np.ascontiguousarray(a)) for a in arrays)


@needs_torch
def test_torch_tensors_through_every_operation(rng):
    import torch

    q, k, v = (random_array(rng, (2, 4, 64, 8), np.float32) for _ in range(3))
    tq, tk, tv = _torch(q, k, v)
    dout = random_array(rng, (2, 4, 64, 8), np.float32)
    (tdout,) = _torch(dout)
    layout = layouts.sliding_window(64, 16, 16)
    lsh = dict(n_buckets=4, n_hashes=2, chunk_size=16, seed=0)
    cases = {
        "attention": lambda *a: nsa.attention(*a[:3], causal=True, return_lse=True),
        "attention_backward": lambda *a: nsa.attention_backward(a[3], *a[:3], *nsa.attention(*a[:3], return_lse=True)),
        "block_sparse": lambda *a: nsa.block_sparse_attention(*a[:3], layout, return_lse=True),
        "block_sparse_backward": lambda *a: nsa.block_sparse_attention_backward(
            a[3], *a[:3], *nsa.block_sparse_attention(*a[:3], layout, return_lse=True), layout
        ),
        "lsh_attention": lambda *a: nsa.lsh_attention(a[0], a[2], **lsh),
        "lsh_backward": lambda *a: nsa.lsh_attention_backward(
            a[3], a[0], a[2], *nsa.lsh_attention(a[0], a[2], return_lse=True, **lsh), **lsh
        ),
        "lsh_buckets": lambda *a: nsa.lsh_buckets(a[0], 4, seed=1),
        "ring": lambda *a: nsa.ring_attention(*a[:3], SoloComm(), causal=True),
        "shard": lambda *a: nsa.unshard([nsa.shard(a[0], r, 3) for r in range(3)]),
    }  # fmt: skip
    for name, fn in cases.items():
        got = fn(tq, tk, tv, tdout)
        want = fn(q, k, v, dout)
        got, want = (got, want) if isinstance(want, tuple) else ((got,), (want,))
        for g, w in zip(got, want):
            assert isinstance(g, torch.Tensor), name
            np.testing.assert_array_equal(g.numpy(), w, err_msg=name)
    order, inverse = nsa.lsh_sort(nsa.lsh_buckets(tq, 4, seed=1))
    assert order.dtype == torch.int32 and isinstance(inverse, torch.Tensor)
    merged = nsa.merge_states(*nsa.attention(tq, tk, tv, return_lse=True), *nsa.attention(tq, tq, tv, return_lse=True))
    assert all(isinstance(m, torch.Tensor) for m in merged)


@needs_torch
def test_torch_varlen_and_kvcache_with_index_tensors(rng):
    import torch

    cu = np.array([0, 3, 3, 10], np.int32)
    q, k, v = (random_array(rng, (2, 10, 8)) for _ in range(3))
    out = nsa.attention_varlen(*_torch(q, k, v, cu, cu), causal=True)
    assert isinstance(out, torch.Tensor)
    np.testing.assert_array_equal(out.numpy(), nsa.attention_varlen(q, k, v, cu, cu, causal=True))

    k_cache, v_cache = torch.zeros(2, 1, 8, 4, dtype=torch.float64), torch.zeros(2, 1, 8, 4, dtype=torch.float64)
    tq, k_new, v_new = _torch(*(random_array(rng, shape) for shape in ((2, 2, 1, 4), (2, 1, 1, 4), (2, 1, 1, 4))))
    lengths = torch.tensor([0, 5], dtype=torch.int32)
    out = nsa.attention_with_kvcache(tq, k_cache, v_cache, cache_seqlens=lengths, k_new=k_new, v_new=v_new)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 2, 1, 4)
    assert torch.equal(k_cache[1, :, 5], k_new[1, :, 0])  # written in place into the torch tensor
    assert torch.equal(out[0], v_new[0].expand(2, 1, 4))  # the only key of sequence 0 is the new one


@needs_torch
def test_torch_bfloat16_in_and_out(rng):
    import torch

    x = torch.randn(2, 20, 8, dtype=torch.bfloat16)
    out = nsa.attention(x, x, x, causal=True)
    assert out.dtype == torch.bfloat16
    ref = nsa.attention(x.float(), x.float(), x.float(), causal=True)
    assert (out.float() - ref).abs().max() < 2e-2


@needs_torch
def test_torch_tensor_that_requires_grad_points_to_the_adapter():
    import torch

    x = torch.ones(3, 2, requires_grad=True)
    with pytest.raises(
        TypeError, match=r"q requires grad; .*: pass q.detach\(\), or use npsparseattn.interop.torch.attention for"
    ):
        nsa.attention(x, x, x)


@needs_torch
@needs_jax
def test_two_frameworks_in_one_call_are_refused():
    import jax.numpy as jnp
    import torch

    with pytest.raises(TypeError, match=r"q is a PyTorch array but k is a JAX array; pass arrays of one framework"):
        nsa.attention(torch.ones(3, 2), jnp.ones((3, 2)), torch.ones(3, 2))


# --------------------------------------------------------------------------- JAX


@needs_jax
def test_jax_arrays_in_and_out(rng):
    import jax
    import jax.numpy as jnp

    q, k, v = (random_array(rng, (3, 40, 8), np.float32) for _ in range(3))
    out, lse = nsa.attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), causal=True, return_lse=True)
    assert isinstance(out, jax.Array) and isinstance(lse, jax.Array)
    ref_out, ref_lse = nsa.attention(q, k, v, causal=True, return_lse=True)
    np.testing.assert_array_equal(np.asarray(out), ref_out)
    np.testing.assert_array_equal(np.asarray(lse), ref_lse)
    bf = jnp.asarray(q, dtype=jnp.bfloat16)
    assert nsa.attention(bf, bf, bf).dtype == jnp.bfloat16


@needs_jax
def test_jax_cache_is_immutable_so_appending_is_refused(rng):
    import jax.numpy as jnp

    cache = jnp.zeros((1, 1, 8, 4))
    new = jnp.ones((1, 1, 1, 4))
    with pytest.raises(ValueError, match=r"k_cache is read-only \(a JAX array, say\)"):
        nsa.attention_with_kvcache(jnp.ones((1, 2, 1, 4)), cache, cache, cache_seqlens=2, k_new=new, v_new=new)
    out = nsa.attention_with_kvcache(jnp.ones((1, 2, 1, 4)), cache, cache, cache_seqlens=2)
    assert out.shape == (1, 2, 1, 4)


@needs_jax
def test_jax_tracers_point_to_the_adapter():
    import jax
    import jax.numpy as jnp

    with pytest.raises(
        TypeError,
        match=r"q is a JAX tracer \(inside jax.jit, grad or vmap\); .* use npsparseattn.interop.jax.attention",
    ):
        jax.jit(lambda x: nsa.attention(x, x, x))(jnp.ones((3, 2)))

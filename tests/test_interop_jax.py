"""npsparseattn.interop.jax.attention: a jax.custom_vjp (host callbacks) under jit, grad and vmap.

Compared with ``jax.grad`` of a plain jax.numpy implementation.  Needs the CPU
build of JAX (``interop`` extra); skipped, with the reason, without it.
"""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax", reason="JAX is not installed (pip install npsparseattn[interop])")

import jax.numpy as jnp  # noqa: E402

from npsparseattn.interop import jax as nsa_jax  # noqa: E402
from npsparseattn.reference import visibility_mask  # noqa: E402

CASES = [
    pytest.param(((2, 4, 37, 16), 2, 37, 16), dict(causal=True), id="gqa-causal"),
    pytest.param(((3, 20, 8), 1, 45, 5), dict(window=(7, 2)), id="mqa-window-dv"),
    pytest.param(((11, 6), None, 11, 6), dict(scale=0.3), id="2d"),
    pytest.param(((2, 30, 8), 2, 10, 8), dict(causal=True), id="empty-rows"),
]


def plain_attention(q, k, v, causal=False, window=None, scale=None):
    """Dense attention written with jax.numpy (jax.grad gives its gradients)."""
    lq, lk = q.shape[-2], k.shape[-2]
    if q.ndim >= 3 and q.shape[-3] != k.shape[-3]:
        group = q.shape[-3] // k.shape[-3]
        k, v = jnp.repeat(k, group, axis=-3), jnp.repeat(v, group, axis=-3)
    left, right = (None, None) if window is None else window
    mask = jnp.asarray(visibility_mask(lq, lk, left=left, right=0 if causal else right))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = jnp.where(mask, q @ jnp.swapaxes(k, -1, -2) * scale, -jnp.inf)
    top = jnp.max(scores, axis=-1, keepdims=True)
    e = jnp.where(mask, jnp.exp(scores - jnp.where(jnp.isfinite(top), top, 0.0)), 0.0)
    total = e.sum(axis=-1, keepdims=True)
    return (e / jnp.where(total > 0, total, 1.0)) @ v


def _inputs(shape, hk, lk, dv, seed=0, dtype=jnp.float32):
    kv_shape = list(shape)
    kv_shape[-2] = lk
    if hk is not None:
        kv_shape[-3] = hk
    keys = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(keys[0], shape, dtype)
    k = jax.random.normal(keys[1], tuple(kv_shape), dtype)
    v = jax.random.normal(keys[2], tuple(kv_shape[:-1]) + (dv,), dtype)
    weights = jax.random.normal(keys[3], tuple(shape[:-1]) + (dv,), dtype)
    return q, k, v, weights


@pytest.mark.parametrize(("arrays", "options"), CASES)
def test_jit_grad_equals_jax_grad_of_plain_attention(arrays, options):
    q, k, v, weights = _inputs(*arrays)

    def loss(attn):
        return jax.jit(lambda q, k, v: (attn(q, k, v, **options) * weights).sum())

    ours = jax.grad(loss(nsa_jax.attention), argnums=(0, 1, 2))(q, k, v)
    theirs = jax.grad(loss(plain_attention), argnums=(0, 1, 2))(q, k, v)
    np.testing.assert_allclose(nsa_jax.attention(q, k, v, **options), plain_attention(q, k, v, **options), atol=2e-6)
    for label, a, b in zip("qkv", ours, theirs):
        assert a.dtype == b.dtype and a.shape == b.shape, label
        np.testing.assert_allclose(a, b, rtol=0, atol=2e-5 * float(jnp.abs(b).max()), err_msg=label)


def test_float64_gradients_with_x64():
    enable_x64 = jax.enable_x64 if hasattr(jax, "enable_x64") else jax.experimental.enable_x64
    with enable_x64(True):
        q, k, v, weights = _inputs((3, 17, 8), 1, 23, 4, dtype=jnp.float64)
        loss = lambda attn: lambda q, k, v: (attn(q, k, v, causal=True) * weights).sum()  # noqa: E731
        ours = jax.grad(loss(nsa_jax.attention), argnums=(0, 1, 2))(q, k, v)
        theirs = jax.grad(loss(plain_attention), argnums=(0, 1, 2))(q, k, v)
        for a, b in zip(ours, theirs):
            assert a.dtype == jnp.float64
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


def test_vmap_over_a_batch_axis():
    q, k, v, _ = _inputs((4, 12, 8), 2, 12, 8)
    qs = jnp.stack([q, 2 * q, -q])
    batched = jax.vmap(lambda x: nsa_jax.attention(x, k, v, causal=True))(qs)
    assert batched.shape == (3, 4, 12, 8)
    np.testing.assert_allclose(batched[1], nsa_jax.attention(2 * q, k, v, causal=True), rtol=0, atol=1e-6)


def test_bad_shapes_are_reported_when_tracing():
    q, k, v, _ = _inputs((3, 12, 8), 3, 12, 8)
    with pytest.raises(ValueError, match=r"q and k must have the same last axis D"):
        jax.jit(lambda q, k, v: nsa_jax.attention(q, k, v))(q, k[..., :4], v)

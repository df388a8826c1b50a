"""interop.torch.sparse_attention and interop.jax.sparse_attention: gradients through npsparseattn's sparse backward.

Compared with torch autograd and jax.grad of a dense float64 implementation
whose mask is built here in NumPy from ``kv_idx`` (the selected key blocks of
each query block, then the causal/window mask).  Needs PyTorch and JAX
(``interop`` extra); each half is skipped, with the reason, without its
framework.
"""

from __future__ import annotations

import numpy as np
import pytest

from npsparseattn.reference import visibility_mask

# (q shape, Hk, Lk, Dv), q_block, kv_block, K, options; every L odd and not a multiple of the blocks
CASES = [
    pytest.param(((1, 4, 37, 8), 2, 37, 8), 8, 8, 3, dict(causal=True), id="gqa-causal-blocks"),
    pytest.param(((2, 21, 8), 1, 29, 5), 4, 1, 6, dict(window=(9, 2), counts=True), id="mqa-token-window-cnt"),
    pytest.param(((13, 6), None, 13, 6), 1, 3, 2, dict(scale=0.3), id="2d-per-query"),
]


def random_index(rng, lead, n_query_blocks, n_key_blocks, slots):
    """Distinct key blocks per list in random order, some slots -1, one list entirely -1; int32."""
    draws = rng.random((*lead, n_query_blocks, n_key_blocks)).argsort(axis=-1)[..., :slots]
    idx = np.where(rng.random(draws.shape) < 0.25, -1, draws).astype(np.int32)
    idx[..., 0, -1] = -1  # a -1 slot in every case
    idx.reshape(-1, n_query_blocks, slots)[0, -1] = -1  # the last query block of one head sees nothing
    return idx


def selected_mask(kv_idx, kv_cnt, lq, lk, q_block, kv_block, causal=False, window=None):
    """Boolean (*lead, Lq, Lk): key block listed for the query's block (within kv_cnt) and visible."""
    slots = kv_idx.shape[-1]
    used = np.arange(slots) < (slots if kv_cnt is None else kv_cnt[..., None])
    listed = np.zeros(kv_idx.shape[:-1] + (-(-lk // kv_block) + 1,), bool)  # last column: the -1 slots
    np.put_along_axis(listed, np.where(used, kv_idx, -1).astype(np.int64), True, axis=-1)
    rows = listed[..., np.arange(lq) // q_block, :][..., np.arange(lk) // kv_block]
    left, right = (None, None) if window is None else window
    return rows & visibility_mask(lq, lk, left=left, right=0 if causal else right)


def make_case(rng, arrays, q_block, kv_block, slots, options):
    shape, hk, lk, dv = arrays
    options = dict(options)
    counts = options.pop("counts", False)
    kv_shape = list(shape)
    kv_shape[-2] = lk
    if hk is not None:
        kv_shape[-3] = hk
    q, k = rng.standard_normal(shape), rng.standard_normal(kv_shape)
    v = rng.standard_normal(kv_shape[:-1] + [dv])
    lead, lq = tuple(kv_shape[:-2]), shape[-2]
    kv_idx = random_index(rng, lead, -(-lq // q_block), -(-lk // kv_block), slots)
    kv_cnt = rng.integers(0, slots + 1, kv_idx.shape[:-1]).astype(np.int32) if counts else None
    mask = selected_mask(kv_idx, kv_cnt, lq, lk, q_block, kv_block, options.get("causal", False),
                         options.get("window"))  # fmt: skip
    if len(shape) > 2:
        mask = np.repeat(mask, shape[-3] // kv_shape[-3], axis=-3)  # GQA: the group shares its key head's lists
    weights = rng.standard_normal(shape[:-1] + (dv,))
    blocks = dict(q_block=q_block, kv_block=kv_block, **options)
    return (q, k, v, kv_idx, kv_cnt), mask, weights, blocks


# ----------------------------------------------------------------------------- PyTorch


def _torch():
    return pytest.importorskip("torch", reason="PyTorch is not installed (pip install npsparseattn[interop])")


def torch_masked_attention(q, k, v, mask, scale=None):
    """Dense attention with a boolean mask, written with torch operations (autograd gives its gradients)."""
    torch = _torch()
    if q.dim() >= 3 and q.shape[-3] != k.shape[-3]:
        group = q.shape[-3] // k.shape[-3]
        k, v = k.repeat_interleave(group, dim=-3), v.repeat_interleave(group, dim=-3)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    hidden = ~torch.from_numpy(mask)
    probs = (q @ k.transpose(-1, -2) * scale).masked_fill(hidden, float("-inf")).softmax(dim=-1)
    return probs.masked_fill(hidden, 0.0) @ v  # a row with no visible key: 0 (its NaNs are masked)


@pytest.mark.parametrize(("arrays", "q_block", "kv_block", "slots", "options"), CASES)
def test_torch_gradients_equal_autograd_of_the_masked_dense_reference(rng, arrays, q_block, kv_block, slots, options):
    torch = _torch()
    from npsparseattn.interop import torch as nsa_torch

    (q, k, v, kv_idx, kv_cnt), mask, weights, blocks = make_case(rng, arrays, q_block, kv_block, slots, options)
    q, k, v = (torch.from_numpy(x).requires_grad_() for x in (q, k, v))
    cnt = None if kv_cnt is None else torch.from_numpy(kv_cnt)
    out = nsa_torch.sparse_attention(q, k, v, torch.from_numpy(kv_idx), kv_cnt=cnt, **blocks)
    ours = torch.autograd.grad((out * torch.from_numpy(weights)).sum(), (q, k, v))
    ref = torch_masked_attention(q, k, v, mask, scale=blocks.get("scale"))
    theirs = torch.autograd.grad((ref * torch.from_numpy(weights)).sum(), (q, k, v))
    assert not mask.all(axis=-1).all() and not mask.any(axis=-1).all()  # sparse, with empty rows
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    for label, a, b in zip("qkv", ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=label)


def test_torch_refuses_double_backward_and_runs_under_torch_compile(rng):
    torch = _torch()
    from npsparseattn.interop import torch as nsa_torch

    (q, k, v, kv_idx, _), _, _, blocks = make_case(rng, *CASES[0].values)
    q, k, v = (torch.from_numpy(x) for x in (q, k, v))
    kv_idx = torch.from_numpy(kv_idx)

    def loss(q, k, v):
        return (nsa_torch.sparse_attention(q, k, v, kv_idx, **blocks) * 3).sum()

    grads = {}
    for name, fn in (("eager", loss), ("compiled", torch.compile(loss, backend="eager"))):
        inputs = [x.clone().requires_grad_() for x in (q, k, v)]
        fn(*inputs).backward()
        grads[name] = [x.grad for x in inputs]
    for got, want in zip(grads["compiled"], grads["eager"]):
        assert torch.equal(got, want)

    qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
    out = nsa_torch.sparse_attention(qg, kg, vg, kv_idx, **blocks)
    (dk,) = torch.autograd.grad(out.sum(), kg, create_graph=True)
    with pytest.raises(RuntimeError, match=r"interop.torch.sparse_attention is differentiable once"):
        (out.sum() + dk.square().sum()).backward()


def test_torch_index_as_numpy_and_bad_indices_refused_before_any_work(rng):
    torch = _torch()
    from npsparseattn.interop import torch as nsa_torch

    q, k, v = (torch.randn(2, 21, 8, requires_grad=True) for _ in range(3))
    idx = torch.zeros(2, 3, 1, dtype=torch.int32)
    grads = []
    for index in (idx, idx.numpy()):
        nsa_torch.sparse_attention(q, k, v, index, q_block=8, kv_block=8).sum().backward()
        grads.append(v.grad.clone())
        q.grad = k.grad = v.grad = None
    assert torch.equal(grads[0], grads[1]) and grads[0][:, 8:].abs().max() == 0  # only key block 0 is read
    with pytest.raises(TypeError, match=r"kv_idx must be an integer array \(int32\), got dtype float32"):
        nsa_torch.sparse_attention(q, k, v, idx.float(), q_block=8, kv_block=8)
    with pytest.raises(ValueError, match=r"kv_idx must have shape \(2, 3, 1\) .*got \(2, 2, 1\)"):
        nsa_torch.sparse_attention(q, k, v, idx[:, :2], q_block=8, kv_block=8)
    assert q.grad is None


# ----------------------------------------------------------------------------- JAX


def _jax():
    return pytest.importorskip("jax", reason="JAX is not installed (pip install npsparseattn[interop])")


def _x64():
    jax = _jax()
    return jax.enable_x64(True) if hasattr(jax, "enable_x64") else jax.experimental.enable_x64(True)


def jax_masked_attention(q, k, v, mask, scale=None):
    """Dense attention with a boolean mask, written with jax.numpy (jax.grad gives its gradients)."""
    jnp = _jax().numpy
    if q.ndim >= 3 and q.shape[-3] != k.shape[-3]:
        group = q.shape[-3] // k.shape[-3]
        k, v = jnp.repeat(k, group, axis=-3), jnp.repeat(v, group, axis=-3)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    jax = _jax()
    logits = jnp.where(mask, q @ jnp.swapaxes(k, -1, -2) * scale, -jnp.inf)
    shift = jax.lax.stop_gradient(logits.max(axis=-1, keepdims=True))
    unnormalised = jnp.exp(logits - jnp.nan_to_num(shift, neginf=0.0))  # 0 where hidden
    norm = unnormalised.sum(axis=-1, keepdims=True)
    return unnormalised / (norm + (norm == 0)) @ v  # a row with no visible key: 0


@pytest.mark.parametrize(("arrays", "q_block", "kv_block", "slots", "options"), CASES)
def test_jax_jit_grad_equals_jax_grad_of_the_masked_dense_reference(rng, arrays, q_block, kv_block, slots, options):
    jax = _jax()
    from npsparseattn.interop import jax as nsa_jax

    (q, k, v, kv_idx, kv_cnt), mask, weights, blocks = make_case(rng, arrays, q_block, kv_block, slots, options)
    with _x64():
        q, k, v, weights = (jax.numpy.asarray(x) for x in (q, k, v, weights))

        def ours(q, k, v, kv_idx, kv_cnt):  # the index is a traced argument of the jitted function
            return (nsa_jax.sparse_attention(q, k, v, kv_idx, kv_cnt=kv_cnt, **blocks) * weights).sum()

        def theirs(q, k, v):
            return (jax_masked_attention(q, k, v, mask, scale=blocks.get("scale")) * weights).sum()

        got = jax.jit(jax.value_and_grad(ours, argnums=(0, 1, 2)))(q, k, v, kv_idx, kv_cnt)
        want = jax.jit(jax.value_and_grad(theirs, argnums=(0, 1, 2)))(q, k, v)  # jit: op by op is slower
        np.testing.assert_allclose(got[0], want[0], rtol=1e-10)
        for label, a, b in zip("qkv", got[1], want[1]):
            assert a.dtype == np.float64 and a.shape == b.shape, label
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12, err_msg=label)


def test_jax_vmap_and_a_zero_cotangent_for_the_index(rng):
    jax = _jax()
    from npsparseattn.interop import jax as nsa_jax

    (q, k, v, kv_idx, _), _, _, blocks = make_case(rng, *CASES[1].values)
    qs = jax.numpy.asarray(np.stack([q, 2 * q]), jax.numpy.float32)
    k, v = jax.numpy.asarray(k, jax.numpy.float32), jax.numpy.asarray(v, jax.numpy.float32)
    batched = jax.vmap(lambda x: nsa_jax.sparse_attention(x, k, v, kv_idx, **blocks))(qs)
    single = nsa_jax.sparse_attention(qs[1], k, v, kv_idx, **blocks)
    np.testing.assert_allclose(batched[1], single, rtol=0, atol=1e-6)
    _, vjp = jax.vjp(lambda q, i: nsa_jax.sparse_attention(q, k, v, i, **blocks), qs[0], jax.numpy.asarray(kv_idx))
    dq, d_idx = vjp(jax.numpy.ones_like(single))
    assert dq.shape == q.shape and d_idx.dtype == jax.dtypes.float0 and d_idx.shape == kv_idx.shape


def test_jax_bad_index_is_refused_when_tracing_or_before_the_call(rng):
    jax = _jax()
    from npsparseattn.interop import jax as nsa_jax

    x = jax.numpy.ones((2, 21, 8))
    idx = np.zeros((2, 3, 2), np.int32)
    run = jax.jit(lambda x, i: nsa_jax.sparse_attention(x, x, x, i, q_block=8, kv_block=8))
    with pytest.raises(TypeError, match=r"kv_idx must be an integer array \(int32\), got dtype float32"):
        run(x, idx.astype(np.float32))
    with pytest.raises(ValueError, match=r"kv_idx must have shape \(2, 3, 2\) .*got \(2, 2, 2\)"):
        run(x, idx[:, :2])
    with pytest.raises(ValueError, match=r"kv_idx\[0, 0, :\] selects key block 0 twice"):
        nsa_jax.sparse_attention(x, x, x, idx, q_block=8, kv_block=8)  # a concrete index: its values too
    with pytest.raises(TypeError, match=r"q_block must be static \(a Python value\), but it is traced"):
        jax.jit(lambda x, b: nsa_jax.sparse_attention(x, x, x, idx, q_block=b))(x, 8)

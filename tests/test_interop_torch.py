"""npsparseattn.interop.torch.attention: a torch.autograd.Function whose gradients are npsparseattn's backward.

Compared with PyTorch autograd through a plain float64 implementation (the
masked softmax written out), and with torch.autograd.gradcheck.  Needs the
CPU build of PyTorch (``interop`` extra); skipped, with the reason, without it.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch", reason="PyTorch is not installed (pip install npsparseattn[interop])")

from npsparseattn.interop import torch as nsa_torch  # noqa: E402
from npsparseattn.reference import visibility_mask  # noqa: E402

CASES = [
    pytest.param(dict(shape=(2, 4, 37, 16), hk=2, lk=37, dv=16), dict(causal=True), id="gqa-causal"),
    pytest.param(dict(shape=(3, 20, 8), hk=1, lk=45, dv=5), dict(window=(7, 2)), id="mqa-window-dv"),
    pytest.param(dict(shape=(11, 6), hk=None, lk=11, dv=6), dict(scale=0.3), id="2d"),
    pytest.param(dict(shape=(2, 30, 8), hk=2, lk=10, dv=8), dict(causal=True), id="empty-rows"),
]


def plain_attention(q, k, v, causal=False, window=None, scale=None):
    """Dense attention written with torch operations (autograd gives its gradients)."""
    lq, lk = q.shape[-2], k.shape[-2]
    if q.dim() >= 3 and q.shape[-3] != k.shape[-3]:
        group = q.shape[-3] // k.shape[-3]
        k, v = k.repeat_interleave(group, dim=-3), v.repeat_interleave(group, dim=-3)
    left, right = (None, None) if window is None else window
    mask = torch.from_numpy(visibility_mask(lq, lk, left=left, right=0 if causal else right))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q @ k.transpose(-1, -2) * scale).masked_fill(~mask, float("-inf"))
    p = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # rows with no visible key: 0
    return p @ v


def _inputs(shape, hk, lk, dv, dtype=torch.float64):
    gen = torch.Generator().manual_seed(sum(shape) + lk)
    kv_shape = list(shape)
    kv_shape[-2] = lk
    if hk is not None:
        kv_shape[-3] = hk
    q = torch.randn(*shape, dtype=dtype, generator=gen)
    k = torch.randn(*kv_shape, dtype=dtype, generator=gen)
    v = torch.randn(*kv_shape[:-1], dv, dtype=dtype, generator=gen)
    return [x.requires_grad_() for x in (q, k, v)]


@pytest.mark.parametrize(("arrays", "options"), CASES)
def test_gradients_equal_torch_autograd_of_plain_attention(arrays, options):
    q, k, v = _inputs(**arrays)
    weights = torch.randn(*q.shape[:-1], arrays["dv"], dtype=q.dtype)
    out = nsa_torch.attention(q, k, v, **options)
    ours = torch.autograd.grad((out * weights).sum(), (q, k, v))
    ref_out = plain_attention(q, k, v, **options)
    theirs = torch.autograd.grad((ref_out * weights).sum(), (q, k, v))
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-12)
    for label, a, b in zip("qkv", ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=label)


def test_gradcheck():
    q, k, v = _inputs((2, 5, 3), 1, 7, 2)
    assert torch.autograd.gradcheck(lambda a, b, c: nsa_torch.attention(a, b, c, causal=True, window=(3, None)),
                                    (q, k, v))  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_single_precision_gradients(dtype):
    q, k, v = _inputs((2, 4, 40, 16), 2, 40, 16, dtype=dtype)
    out = nsa_torch.attention(q, k, v, causal=True)
    out.float().square().sum().backward()
    wide = [x.detach().double().requires_grad_() for x in (q, k, v)]
    plain_attention(*wide, causal=True).square().sum().backward()
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    assert out.dtype == dtype
    for x, w in zip((q, k, v), wide):
        assert x.grad.dtype == dtype
        scale = w.grad.abs().max()
        assert (x.grad.double() - w.grad).abs().max() / scale < tol


def test_only_some_inputs_require_grad_and_non_contiguous_tensors():
    q, k, v = _inputs((2, 3, 21, 8), 3, 21, 8)
    k = k.detach()
    v_t = v.detach().transpose(-2, -3).contiguous().transpose(-2, -3).requires_grad_()  # (B, L, H, D) storage
    assert not v_t.is_contiguous()
    nsa_torch.attention(q, k, v_t, causal=True).sum().backward()
    plain_q, plain_v = q.detach().clone().requires_grad_(), v_t.detach().clone().requires_grad_()
    plain_attention(plain_q, k, plain_v, causal=True).sum().backward()
    assert k.grad is None
    torch.testing.assert_close(q.grad, plain_q.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(v_t.grad, plain_v.grad, rtol=1e-10, atol=1e-12)


def test_argument_errors_surface_in_the_forward():
    q = torch.randn(3, 4, 8, requires_grad=True)
    with pytest.raises(ValueError, match=r"query heads \(3\) must be a multiple of key/value heads \(2\)"):
        nsa_torch.attention(q, torch.randn(2, 4, 8), torch.randn(2, 4, 8))

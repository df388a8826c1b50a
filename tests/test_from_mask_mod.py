"""``layouts.from_mask_mod``: the block layout (and full/partial split) of a FlexAttention-style mask_mod."""

from __future__ import annotations

import numba
import numpy as np
import pytest
from conftest import random_qkv

import npsparseattn as nsa
from npsparseattn import _mask_blocks, layouts

LQ, LK = 77, 101  # not multiples of the blocks
DOC = np.repeat(np.arange(4), [30, 9, 40, 22])  # document of each of the 101 keys (and of the first 77 queries)
PREFIX = 23


def _causal(b, h, q_idx, kv_idx):
    return kv_idx <= q_idx + (LK - LQ)


def _window(b, h, q_idx, kv_idx):
    d = q_idx + (LK - LQ) - kv_idx
    return (d <= 9 + 5 * h) & (d >= -4)  # a wider window for each head


def _document(b, h, q_idx, kv_idx):
    return DOC[q_idx] == DOC[kv_idx]


def _document_causal(b, h, q_idx, kv_idx):
    return (DOC[q_idx] == DOC[kv_idx]) & (kv_idx <= q_idx)


def _prefix_lm(b, h, q_idx, kv_idx):
    return (kv_idx < PREFIX) | (kv_idx <= q_idx + (LK - LQ))


@numba.njit
def _window_jit(b, h, q_idx, kv_idx):
    d = q_idx + (LK - LQ) - kv_idx
    if d > 9 + 5 * h:  # numba versions may branch
        return False
    return d >= -4


MASKS = {
    "causal": _causal,
    "window": _window,
    "document": _document,
    "document_causal": _document_causal,
    "prefix_lm": _prefix_lm,
}
JITTED = {name: numba.njit(fn) for name, fn in MASKS.items()} | {"window": _window_jit}


def _dense(mask_mod, heads):
    """The token mask, one scalar call per pair (heads, LQ, LK)."""
    return np.array(
        [[[bool(mask_mod(0, h, i, j)) for j in range(LK)] for i in range(LQ)] for h in range(heads)], dtype=bool
    )


def _block_all(mask, block):
    """Per block, whether every real pair of the block is in the token mask (padding counts as true)."""
    bq, bk = block
    heads, lq, lk = mask.shape
    nqb, nkb = -(-lq // bq), -(-lk // bk)
    padded = np.ones((heads, nqb * bq, nkb * bk), dtype=bool)
    padded[:, :lq, :lk] = mask
    return padded.reshape(heads, nqb, bq, nkb, bk).all(axis=(2, 4))


@pytest.mark.parametrize("name", list(MASKS))
@pytest.mark.parametrize("jit", [False, True], ids=["numpy", "numba"])
@pytest.mark.parametrize("block", [(16, 16), (8, 24), (128, 7)])
def test_layout_is_the_block_or_of_the_token_mask(name, jit, block):
    heads = 3 if name == "window" else 1
    mask_mod = JITTED[name] if jit else MASKS[name]
    lay = layouts.from_mask_mod(mask_mod, (LQ, LK), block, heads)
    dense = _dense(mask_mod, heads)
    assert isinstance(lay, layouts.MaskModLayout) and lay.heads == heads
    assert lay == layouts.from_token_mask(dense, block)
    blocks = lay.to_dense()
    assert np.array_equal(blocks, layouts.from_token_mask(dense, block).to_dense())
    # the expanded layout covers the mask, and every stored block holds a true pair
    assert not (dense & ~lay.to_token_mask()).any()
    full = np.zeros(lay.shape, dtype=bool)
    full[np.repeat(np.arange(lay.shape[0]), np.diff(lay.indptr)), lay.indices] = lay.full
    assert np.array_equal(full.reshape(blocks.shape), _block_all(dense, block) & blocks)


def test_numpy_and_numba_agree_on_a_long_sequence():
    @numba.njit
    def window(b, h, q_idx, kv_idx):
        return abs(q_idx - kv_idx) <= 300

    def window_np(b, h, q_idx, kv_idx):
        return np.abs(q_idx - kv_idx) <= 300

    a = layouts.from_mask_mod(window_np, 4000, 64)
    b = layouts.from_mask_mod(window, 4000, 64)
    assert a == b == layouts.sliding_window(4000, 64, 300)
    assert np.array_equal(a.full, b.full)
    assert 0 < a.full.sum() < a.nnz


def test_vectorised_calls_are_chunked(monkeypatch):
    calls = []

    def causal(b, h, q_idx, kv_idx):
        calls.append(q_idx.shape[0])
        return kv_idx <= q_idx + (LK - LQ)

    monkeypatch.setattr(_mask_blocks, "_CHUNK_PAIRS", 3 * 8 * LK)
    lay = layouts.from_mask_mod(causal, (LQ, LK), (8, 16))
    assert calls == [24, 24, 24, 5]  # three query blocks per call, the last call partial
    assert lay == layouts.from_token_mask(_dense(_causal, 1), (8, 16))


def test_batch_and_head_reach_the_function():
    seen = set()

    def record(b, h, q_idx, kv_idx):
        seen.add((b, h))
        return kv_idx == q_idx

    layouts.from_mask_mod(record, 64, 16, heads=2, batch=5)
    assert seen == {(5, 0), (5, 1)}


def test_constant_and_empty_masks():
    everything = layouts.from_mask_mod(lambda b, h, q, kv: True, (LQ, LK), 16)
    assert everything == layouts.dense((LQ, LK), 16) and everything.full.all()
    nothing = layouts.from_mask_mod(lambda b, h, q, kv: np.zeros((q.size, kv.size), bool), (LQ, LK), 16)
    assert nothing.nnz == 0 and nothing.full.shape == (0,)
    assert layouts.from_mask_mod(_causal, (0, 5), 4).nnz == 0


def test_block_sparse_attention_takes_the_layout(rng):
    q, k, v = random_qkv(rng, hq=2, lq=LQ, lk=LK, d=8)
    lay = layouts.from_mask_mod(_causal, (LQ, LK), (16, 32))
    out = nsa.block_sparse_attention(q, k, v, lay, causal=True)
    assert np.abs(out - nsa.reference.attention(q, k, v, causal=True)[0]).max() < 1e-12


def test_repr_names_the_full_blocks():
    lay = layouts.from_mask_mod(lambda b, h, q, kv: kv <= q, 40, 16)
    assert repr(lay) == ("MaskModLayout(seq=(40, 40), block=(16, 16), heads=1, grid=3x3, nnz=6, density=66.7%, full=3)")
    assert lay == layouts.causal(40, 16) and lay.transpose() == layouts.causal(40, 16).transpose()


def _branchy(b, h, q_idx, kv_idx):
    if kv_idx <= q_idx:
        return True
    return False


@numba.njit
def _untypable(b, h, q_idx, kv_idx):
    return kv_idx.undefined_attribute


@pytest.mark.parametrize(
    ("mask_mod", "kwargs", "error", "message"),
    [
        ("not a function", {}, TypeError, "mask_mod must be a function"),
        (_branchy, {}, TypeError, "could not be evaluated on index arrays .*ValueError.*np.where"),
        (lambda b, h, q, kv: (kv <= q).astype(int), {}, TypeError, "must return booleans, got dtype int64"),
        (lambda b, h, q, kv: np.ones(3, bool), {}, ValueError, r"returned shape \(3,\).*must broadcast"),
        (_untypable, {}, TypeError, "numba mask_mod could not be compiled"),
        (_causal, {"heads": 0}, ValueError, "heads must be"),
        (_causal, {"batch": -1}, ValueError, "batch must be"),
    ],
)
def test_refusals(mask_mod, kwargs, error, message):
    with pytest.raises(error, match=message):
        layouts.from_mask_mod(mask_mod, (LQ, LK), 16, **kwargs)


def test_mask_mod_layout_checks_its_flags():
    with pytest.raises(ValueError, match="one entry per stored block"):
        layouts.MaskModLayout([0, 1], [0], [True, False], 16, 16)

"""``npsparseattn.inspect``: coverage, block_mass and recall against a direct dense float64 computation."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import random_array

from npsparseattn import inspect, layouts, routing
from npsparseattn.reference import masked_softmax, visibility_mask


def _dense_probs(q, k, *, causal=False, window=None, scale=None):
    """float64 dense probabilities (B, Hq, Lq, Lk) and the visibility mask (Lq, Lk), from the formulas."""
    q4 = q.reshape((-1,) + q.shape[-3:]).astype(np.float64)
    k4 = k.reshape((-1,) + k.shape[-3:]).astype(np.float64)
    k4 = np.repeat(k4, q4.shape[1] // k4.shape[1], axis=1)
    lq, lk = q4.shape[2], k4.shape[2]
    left, right = window if window is not None else (None, None)
    visible = visibility_mask(lq, lk, left=left, right=0 if causal else right)
    scale = 1 / np.sqrt(q.shape[-1]) if scale is None else scale
    probs, _ = masked_softmax(scale * q4 @ k4.swapaxes(-1, -2), visible, np)
    return probs, visible


def _dense_coverage(q, k, keep, **kwargs):
    """Kept share of each query's dense mass; 1 for a query that sees no key.  ``keep`` (heads or 1, Lq, Lk)."""
    probs, visible = _dense_probs(q, k, **kwargs)
    kept = (probs * keep).sum(-1)
    cov = np.where(visible.any(-1), kept, 1.0)
    return cov.reshape(q.shape[:-1])


def _qk(rng, batch, hq, hk, lq, lk, d=16, dtype=np.float64):
    return random_array(rng, (*batch, hq, lq, d), dtype), random_array(rng, (*batch, hk, lk, d), dtype)


CASES = [  # batch, hq, hk, lq, lk, causal, window, block
    ((), 2, 2, 77, 77, False, None, 16),
    ((2,), 4, 2, 77, 101, True, None, (16, 24)),  # GQA, Lq < Lk, odd lengths
    ((2, 1), 3, 1, 90, 61, True, None, (32, 8)),  # MQA, Lq > Lk: the first 29 queries see nothing
    ((1,), 2, 1, 100, 100, False, (20, 7), 16),
    ((), 4, 4, 65, 130, False, (None, 3), (8, 16)),
]


def _layouts(rng, hq, lq, lk, block):
    seq = (lq, lk)
    nqb, nkb = layouts.from_token_mask(np.ones(seq, bool), block).shape
    holes = rng.random((hq, nqb, nkb)) < 0.4
    holes[:, 1] = False  # query block 1 keeps no key block: its queries get 0
    return {
        "sliding_window": layouts.sliding_window(seq, block, 20),
        "bigbird_per_head": layouts.bigbird(seq, block, random_blocks=1, seed=3, heads=hq),
        "random_with_empty_row": layouts.from_block_mask(holes, block, seq),
        "dense": layouts.dense(seq, block),
    }


@pytest.mark.parametrize(("batch", "hq", "hk", "lq", "lk", "causal", "window", "block"), CASES)
def test_coverage_equals_dense_float64(rng, batch, hq, hk, lq, lk, causal, window, block):
    q, k = _qk(rng, batch, hq, hk, lq, lk)
    for name, lay in _layouts(rng, hq, lq, lk, block).items():
        got = inspect.coverage(q, k, lay, causal=causal, window=window)
        expected = _dense_coverage(q, k, lay.to_token_mask(), causal=causal, window=window)
        assert got.dtype == np.float64 and got.shape == q.shape[:-1], name
        assert np.abs(got - expected).max() < 1e-12, name
        assert (got >= 0).all() and (got <= 1).all(), name
        if name == "random_with_empty_row":
            bq = lay.block[0]
            _, visible = _dense_probs(q, k, causal=causal, window=window)
            rows = np.flatnonzero(visible.any(-1)[bq : 2 * bq]) + bq
            assert rows.size and (got[..., rows] == 0).all()  # visible keys, none selected: exactly 0
        if causal and lq > lk:
            assert (got[..., : lq - lk] == 1.0).all()  # no visible key: nothing lost


@pytest.mark.parametrize(("batch", "hq", "hk", "lq", "lk", "causal", "window", "block"), CASES[:3])
def test_coverage_of_a_sparse_index(rng, batch, hq, hk, lq, lk, causal, window, block):
    """A kv_idx (and a router's (kv_idx, kv_cnt)) selection: equal to the dense computation with the index
    expanded to a token mask, GQA lists shared by their query heads, -1 slots selecting nothing."""
    from npsparseattn.reference.sparse import token_mask

    q, k = _qk(rng, batch, hq, hk, lq, lk)
    bq, bk = (block, block) if isinstance(block, int) else block
    nqb, nkb = -(-lq // bq), -(-lk // bk)
    kv_idx = np.argsort(rng.random((*batch, hk, nqb, nkb)), axis=-1)[..., : max(1, nkb // 2)].astype(np.int32)
    kv_idx[..., 0, :] = -1  # query block 0 selects nothing
    got = inspect.coverage(q, k, kv_idx, causal=causal, window=window, q_block=bq, kv_block=bk)
    flat = kv_idx.reshape((-1, hk, nqb, kv_idx.shape[-1]))
    keep = token_mask(flat, np.full(flat.shape[:3], flat.shape[3]), hq, lq, lk, bq, bk, 0, None, None, np)
    expected = _dense_coverage(q, k, keep, causal=causal, window=window)  # keep: (flattened batch, Hq, Lq, Lk)
    assert got.shape == q.shape[:-1] and np.abs(got - expected).max() < 1e-12
    kv_idx2, kv_cnt = routing.select_topk_blocks(q, k, q_block=bq, kv_block=bk, topk=2, causal=causal)
    pair = inspect.coverage(q, k, (kv_idx2, kv_cnt), causal=causal, q_block=bq, kv_block=bk)
    flat = kv_idx2.reshape((-1, hk, nqb, kv_idx2.shape[-1]))
    keep = token_mask(flat, kv_cnt.reshape(flat.shape[:3]), hq, lq, lk, bq, bk, 0, None, None, np)
    expected = _dense_coverage(q, k, keep, causal=causal)
    assert np.abs(pair - expected).max() < 1e-12


def test_coverage_float32_and_a_scale(rng):
    q, k = _qk(rng, (2,), 4, 2, 150, 150, d=32, dtype=np.float32)
    lay = layouts.bigbird(150, 32, seed=0, heads=4)
    got = inspect.coverage(q, k, lay, causal=True, scale=0.3)
    expected = _dense_coverage(q, k, lay.to_token_mask(), causal=True, scale=0.3)
    assert got.dtype == np.float32 and np.abs(got - expected).max() < 1e-5


def test_coverage_of_2d_and_3d_inputs(rng):
    q, k = _qk(rng, (), 3, 3, 70, 70)
    lay = layouts.sliding_window(70, 16, 10)
    full = inspect.coverage(q, k, lay)
    assert np.abs(inspect.coverage(q[0], k[0], lay) - full[0]).max() < 1e-14
    assert inspect.coverage(q[None], k[None], lay).shape == (1, 3, 70)


@pytest.mark.parametrize(("batch", "hq", "hk", "lq", "lk", "causal", "window", "block"), CASES)
def test_block_mass_equals_dense(rng, monkeypatch, batch, hq, hk, lq, lk, causal, window, block):
    q, k = _qk(rng, batch, hq, hk, lq, lk)
    monkeypatch.setattr(inspect, "_TILE_CELLS", 600)  # several tiles of whole query blocks
    got = inspect.block_mass(q, k, block, causal=causal, window=window)
    probs, visible = _dense_probs(q, k, causal=causal, window=window)
    bq, bk = block if isinstance(block, tuple) else (block, block)
    nqb, nkb = -(-lq // bq), -(-lk // bk)
    padded = np.zeros(probs.shape[:2] + (nqb * bq, nkb * bk))
    padded[..., :lq, :lk] = probs
    sums = padded.reshape(probs.shape[:2] + (nqb, bq, nkb, bk)).sum(axis=(3, 5))
    expected = sums / np.minimum(bq, lq - bq * np.arange(nqb))[:, None]
    assert got.shape == q.shape[:-2] + (nqb, nkb) and got.dtype == np.float64
    assert np.abs(got - expected.reshape(got.shape)).max() < 1e-12
    seen = np.add.reduceat(visible.any(-1), np.arange(0, lq, bq)) / np.minimum(bq, lq - bq * np.arange(nqb))
    assert np.allclose(got.sum(-1), seen, rtol=0, atol=1e-12)  # rows sum to the share of queries seeing a key


def test_block_mass_float32(rng):
    q, k = _qk(rng, (), 2, 1, 200, 180, d=32, dtype=np.float32)
    got = inspect.block_mass(q, k, 64, window=(50, 50))
    probs, _ = _dense_probs(q, k, window=(50, 50))
    expected = np.add.reduceat(np.add.reduceat(probs, np.arange(0, 180, 64), -1), np.arange(0, 200, 64), -2)
    expected /= np.minimum(64, 200 - 64 * np.arange(4))[:, None]
    assert got.dtype == np.float32 and np.abs(got - expected).max() < 1e-5


@pytest.mark.parametrize(("batch", "hq", "hk", "lq", "lk", "causal", "window", "block"), CASES)
def test_recall_is_the_mean_coverage_of_queries_that_see_a_key(rng, batch, hq, hk, lq, lk, causal, window, block):
    q, k = _qk(rng, batch, hq, hk, lq, lk)
    mass = inspect.block_mass(q, k, block, causal=causal, window=window)
    _, visible = _dense_probs(q, k, causal=causal, window=window)
    seen = visible.any(-1)
    for name, lay in _layouts(rng, hq, lq, lk, block).items():
        got = inspect.recall(mass, lay)
        cov = inspect.coverage(q, k, lay, causal=causal, window=window)
        assert got.shape == q.shape[:-2], name
        assert np.abs(got - cov[..., seen].mean(-1)).max() < 1e-12, name
    assert np.array_equal(inspect.recall(mass, layouts.dense((lq, lk), block)), np.ones(q.shape[:-2]))


def test_recall_of_a_head_that_sees_nothing_is_one(rng):
    q, k = _qk(rng, (), 1, 1, 40, 10)
    mass = inspect.block_mass(q, k, 8, window=(0, 0))  # Lq > Lk: the first 30 queries see nothing
    empty = layouts.from_block_mask(np.zeros((5, 2), bool), 8, (40, 10))
    assert inspect.recall(mass, empty)[0] == 0.0
    nothing = np.zeros((2, 5, 2))  # two heads none of whose queries sees a key
    assert np.array_equal(inspect.recall(nothing, empty), [1.0, 1.0])


@pytest.mark.parametrize(
    ("hq", "hk", "causal", "window"), [(2, 2, False, None), (4, 2, True, None), (2, 1, False, (9, 30))]
)
def test_lsh_selection_coverage_equals_dense(rng, monkeypatch, hq, hk, causal, window):
    q, k = _qk(rng, (2,), hq, hk, 70, 90)
    sel = inspect.lsh_selection(q, k, 4, n_hashes=3, seed=5)
    qb, kb = sel.q_buckets, np.repeat(sel.k_buckets, hq // hk, axis=1)
    keep = (qb[..., :, None] == kb[..., None, :]).any(axis=2)  # (B, Hq, Lq, Lk): a shared bucket in any round
    monkeypatch.setattr(inspect, "_TILE_CELLS", 1000)
    got = inspect.coverage(q, k, sel, causal=causal, window=window)
    expected = _dense_coverage(q, k, keep, causal=causal, window=window)
    assert np.abs(got - expected).max() < 1e-12
    assert abs(sel.density - keep.mean()) < 1e-15
    assert 0.4 < keep.mean() < 0.8


def test_lsh_buckets_are_those_of_lsh_buckets(rng):
    import npsparseattn as nsa

    q, k = _qk(rng, (), 2, 2, 64, 64)
    sel = inspect.lsh_selection(q, k, (4, 2), n_hashes=2, seed=7)
    rot = nsa.lsh_rotations(16, (4, 2), n_hashes=2, seed=7)
    assert np.array_equal(sel.q_buckets[0], nsa.lsh_buckets(q, (4, 2), n_hashes=2, rotations=rot))
    assert np.array_equal(sel.k_buckets[0], nsa.lsh_buckets(k, (4, 2), n_hashes=2, rotations=rot))
    assert sel.n_buckets == 8 and sel.n_hashes == 2
    same = inspect.lsh_selection(q, k, (4, 2), n_hashes=2, seed=None, rotations=rot)
    assert np.array_equal(same.q_buckets, sel.q_buckets)


def test_refusals(rng):
    q, k = _qk(rng, (), 2, 2, 64, 64)
    lay = layouts.dense(64, 16)
    with pytest.raises(TypeError, match=r"BlockLayout, an LSHSelection .* or a sparse_attention index"):
        inspect.coverage(q, k, np.zeros((1, 2, 4, 3), np.float32))
    with pytest.raises(ValueError, match="layout is for seq"):
        inspect.coverage(q, k, layouts.dense(65, 16))
    with pytest.raises(ValueError, match="query heads"):
        inspect.coverage(np.ones((3, 64, 16)), k, lay)
    with pytest.raises(TypeError, match="must be a NumPy or CuPy array"):
        inspect.coverage(q.tolist(), k, lay)
    with pytest.raises(TypeError, match="dtype int64"):
        inspect.block_mass(q.astype(np.int64), k, 16)
    with pytest.raises(ValueError, match="block"):
        inspect.block_mass(q, k, 0)
    with pytest.raises(ValueError, match="made for other q/k"):
        inspect.coverage(q[:, :32], k, inspect.lsh_selection(q, k, 4))
    with pytest.raises(ValueError, match="backend must be 'auto' or one of"):
        inspect.coverage(q, k, inspect.lsh_selection(q, k, 4), backend="fastest")
    mass = inspect.block_mass(q, k, 16)
    with pytest.raises(ValueError, match="compute the mass with the layout's block"):
        inspect.recall(mass, layouts.dense(64, 32))
    with pytest.raises(ValueError, match="the layout has 3 heads"):
        inspect.recall(mass, layouts.bigbird(64, 16, heads=3))
    with pytest.raises(TypeError, match="use coverage"):
        inspect.recall(mass, inspect.lsh_selection(q, k, 4))
    with pytest.raises(TypeError, match="mass must be a floating NumPy array"):
        inspect.recall(mass.tolist(), lay)

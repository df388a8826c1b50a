"""BlockLayout: validation, properties, and every builder against an independent token-level rule."""

from __future__ import annotations

import doctest
import sys

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st

from npsparseattn import layouts
from npsparseattn.layouts import BlockLayout

# (seq, block) geometries: aligned, partial last blocks, Lq < Lk, Lq > Lk, bq != bk, one block, empty sides.
GEOMETRIES = [
    pytest.param((96, 96), (16, 16), id="aligned"),
    pytest.param((100, 100), (16, 16), id="partial"),
    pytest.param((70, 130), (16, 24), id="lq<lk"),
    pytest.param((130, 70), (24, 16), id="lq>lk"),
    pytest.param((50, 50), (64, 64), id="one-block"),
    pytest.param((0, 40), (16, 16), id="no-queries"),
    pytest.param((40, 0), (16, 16), id="no-keys"),
]


def blocks_touched(token_mask: np.ndarray, bq: int, bk: int) -> np.ndarray:
    """(nqb, nkb): block (r, c) holds at least one True of the (Lq, Lk) token mask (plain loops)."""
    lq, lk = token_mask.shape
    nqb, nkb = -(-lq // bq), -(-lk // bk)
    out = np.zeros((nqb, nkb), dtype=bool)
    for r in range(nqb):
        for c in range(nkb):
            out[r, c] = token_mask[r * bq : (r + 1) * bq, c * bk : (c + 1) * bk].any()
    return out


def aligned(seq):
    """Aligned key position p = i + Lk - Lq of every query (column) and key index j (row)."""
    lq, lk = seq
    return np.arange(lq)[:, None] + (lk - lq), np.arange(lk)[None, :]


def window_rule(seq, left, right):
    p, j = aligned(seq)
    mask = np.ones((seq[0], seq[1]), dtype=bool)
    if left is not None:
        mask &= j >= p - left
    if right is not None:
        mask &= j <= p + right
    return mask


def strided_rule(seq, length, causal):
    """Child et al. 2019, strided: A1 = {i-l..i} (band), A2 = {j: (i-j) mod l == 0}; positions aligned."""
    p, j = aligned(seq)
    d = p - j
    if causal:
        return (d >= 0) & ((d <= length) | (d % length == 0))
    return (np.abs(d) <= length) | (d % length == 0)


def fixed_rule(seq, length, summary_tokens, causal):
    """Child et al. 2019, fixed: A1 = {j: floor(j/l) == floor(i/l)}, A2 = {j: j mod l in {l-c, ..., l}}."""
    p, j = aligned(seq)
    mask = (j // length == p // length) | (j % length >= length - summary_tokens)
    return mask & (j <= p) if causal else mask


def global_rule(seq, bk, global_blocks):
    """Global key blocks: every query sees them; queries whose aligned position lies in one see everything."""
    p, j = aligned(seq)
    nkb = -(-seq[1] // bk)
    glob = {g % nkb for g in global_blocks}
    columns = np.isin(j // bk, list(glob))
    rows = (p >= 0) & (p < seq[1]) & np.isin(p // bk, list(glob))
    return columns | rows


def check(layout: BlockLayout, token_mask: np.ndarray, block) -> None:
    expected = blocks_touched(token_mask, *block)
    assert layout.heads == 1
    np.testing.assert_array_equal(layout.to_dense()[0], expected)


# ----------------------------------------------------------------------------- validation


def _valid():
    return dict(indptr=[0, 1, 3], indices=[0, 0, 1], block=(16, 16), seq=(20, 30))


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        (dict(block=0), ValueError, r"block must be >= 1, got 0"),
        (dict(block=(16, -2)), ValueError, r"block\[1\] must be >= 1, got -2"),
        (dict(block=2.5), TypeError, r"block must be an int or a pair \(query, key\) of ints, got 2.5"),
        (dict(block=(1, 2, 3)), TypeError, r"block must be an int or a pair \(query, key\) of ints, got \(1, 2, 3\)"),
        (dict(seq=(20, -1)), ValueError, r"seq\[1\] must be >= 0, got -1"),
        (dict(seq=(20.0, 30)), TypeError, r"seq\[0\] must be an int, got 20.0"),
        (dict(heads=0), ValueError, r"heads must be >= 1, got 0"),
        (dict(heads=True), TypeError, r"heads must be an int, got True"),
        (dict(indptr=[[0, 1, 3]]), ValueError, r"indptr must be 1-D, got shape \(1, 3\)"),
        (dict(indices=[0.0, 0.0, 1.0]), TypeError, r"indices must be an integer array, got dtype float64"),
        (
            dict(indptr=[0, 3]),
            ValueError,
            r"indptr must have heads \* ceil\(Lq/bq\) \+ 1 = 3 entries for heads=1, seq=\(20, 30\), "
            r"block=\(16, 16\); got 2",
        ),
        (dict(heads=2), ValueError, r"indptr must have .* = 5 entries for heads=2"),
        (dict(indptr=[1, 1, 3]), ValueError, r"indptr must start at 0, got 1"),
        (dict(indptr=[0, 2, 1, 3], seq=(40, 30)), ValueError, r"non-decreasing; indptr\[1\]=2 > indptr\[2\]=1"),
        (dict(indptr=[0, 1, 2]), ValueError, r"indptr\[-1\] must equal len\(indices\) = 3, got 2"),
        (
            dict(indices=[0, 0, 2]),
            ValueError,
            r"indices must lie in \[0, 2\) \(key blocks of Lk=30 with bk=16\); row 1 \(head 0, query block 1\) has 2",
        ),
        (dict(indices=[-1, 0, 1]), ValueError, r"indices must lie in \[0, 2\).*row 0 \(head 0, query block 0\) has -1"),
        (
            dict(indices=[0, 1, 0]),
            ValueError,
            r"indices must be sorted and unique within each row; row 1 \(head 0, query block 1\) has 0 after 1",
        ),
        (dict(indices=[0, 1, 1]), ValueError, r"sorted and unique within each row; row 1 .* has 1 after 1"),
    ],
)
def test_validation_rules(change, error, message):
    kwargs = _valid() | change
    with pytest.raises(error, match=message):
        BlockLayout(**kwargs)


def test_row_boundaries_are_not_order_violations():
    # Row 0 ends with block 1, row 1 starts with block 0; empty rows in between are fine.
    lay = BlockLayout([0, 2, 2, 3], [0, 1, 0], block=4, seq=(12, 8))
    assert lay.nnz == 3
    assert lay.to_dense()[0].tolist() == [[True, True], [False, False], [True, False]]


def test_second_head_error_names_head_and_block():
    with pytest.raises(ValueError, match=r"row 3 \(head 1, query block 1\) has 0 after 0"):
        BlockLayout([0, 1, 1, 2, 4], [0, 0, 0, 0], block=8, seq=(16, 16), heads=2)


def test_arrays_are_copied_and_read_only():
    indptr = np.array([0, 1, 2])
    lay = BlockLayout(indptr, np.array([0, 1], dtype=np.int32), block=8, seq=16)
    indptr[1] = 2
    assert lay.indptr.tolist() == [0, 1, 2] and lay.indptr.dtype == np.int64 and lay.indices.dtype == np.int64
    with pytest.raises(ValueError, match="read-only"):
        lay.indices[0] = 1


# ----------------------------------------------------------------------------- properties


def test_properties_and_repr():
    lay = layouts.causal((100, 130), (16, 32))
    assert lay.shape == (7, 5) and lay.n_query_blocks == 7 and lay.n_key_blocks == 5
    assert lay.nnz == int(lay.to_dense().sum())
    assert lay.density == pytest.approx(lay.nnz / 35)
    assert repr(lay) == (
        f"BlockLayout(seq=(100, 130), block=(16, 32), heads=1, grid=7x5, nnz={lay.nnz}, density={lay.nnz / 35:.1%})"
    )
    assert layouts.dense((0, 10), 4).density == 0.0


def test_token_mask_expands_blocks_and_crops_partial_ones():
    lay = layouts.from_block_mask(np.array([[True, False], [False, True]]), (3, 4), seq=(5, 7))
    mask = lay.to_token_mask()
    assert mask.shape == (1, 5, 7)
    expected = np.zeros((5, 7), dtype=bool)
    expected[:3, :4] = True
    expected[3:, 4:] = True
    np.testing.assert_array_equal(mask[0], expected)


@pytest.mark.parametrize(("seq", "block"), GEOMETRIES)
def test_transpose_is_csc_and_cached(seq, block):
    lay = layouts.bigbird(seq, block, random_blocks=1, heads=3, seed=1)
    t = lay.transpose()
    assert t is lay.transpose() and t.transpose() is lay
    assert (t.seq, t.block, t.heads) == (seq[::-1], block[::-1], 3)
    np.testing.assert_array_equal(t.to_dense(), lay.to_dense().transpose(0, 2, 1))
    # a freshly validated copy of the transpose accepts the same arrays
    assert BlockLayout(t.indptr, t.indices, t.block, t.seq, t.heads) == t


def test_runs_merge_consecutive_blocks_per_row():
    lay = BlockLayout([0, 4, 4, 6], [0, 1, 2, 5, 3, 4], block=1, seq=(3, 6))
    run_ptr, start, stop = lay.runs()
    assert run_ptr.tolist() == [0, 2, 2, 3]
    assert list(zip(start.tolist(), stop.tolist())) == [(0, 3), (5, 6), (3, 5)]
    assert lay.runs() is lay.runs()


def test_equality_and_hash():
    a = layouts.sliding_window(100, 16, 20)
    b = layouts.from_block_mask(a.to_dense(), 16, seq=100)
    assert a == b and hash(a) == hash(b)
    assert a != layouts.sliding_window(100, 16, 40)
    assert a != layouts.sliding_window((100, 100), (16, 20), 20)
    assert a != "layout"
    assert len({a, b}) == 1


# ----------------------------------------------------------------------------- builders vs the papers' rules


@pytest.mark.parametrize(("seq", "block"), GEOMETRIES)
def test_dense_and_causal(seq, block):
    check(layouts.dense(seq, block), np.ones(seq, dtype=bool), block)
    check(layouts.causal(seq, block), window_rule(seq, None, 0), block)


@pytest.mark.parametrize(("seq", "block"), GEOMETRIES)
@pytest.mark.parametrize("window", [0, 16, (23, 0), (None, 5), (0, None), (40, 7), None])
def test_sliding_window(seq, block, window):
    left, right = (window, window) if isinstance(window, int) else (window or (None, None))
    check(layouts.sliding_window(seq, block, window), window_rule(seq, left, right), block)


@pytest.mark.parametrize(("seq", "block"), GEOMETRIES)
@pytest.mark.parametrize("stride", [1, 2, 3])
@pytest.mark.parametrize("causal", [True, False])
def test_strided_matches_sparse_transformer(seq, block, stride, causal):
    lay = layouts.strided(seq, block, stride, causal=causal)
    check(lay, strided_rule(seq, stride * block[1], causal), block)


def test_strided_is_band_plus_every_stride_th_block():
    """On aligned blocks: key blocks r-stride..r and r - m*stride (the description of the issue)."""
    mask = layouts.strided(20 * 8, 8, 4).to_dense()[0]
    r, c = np.indices(mask.shape)
    np.testing.assert_array_equal(mask, (c <= r) & ((r - c <= 4) | ((r - c) % 4 == 0)))


@pytest.mark.parametrize(("seq", "block"), GEOMETRIES)
@pytest.mark.parametrize(("stride", "summary"), [(1, 0), (2, 1), (3, 1), (3, 2), (3, 3)])
@pytest.mark.parametrize("causal", [True, False])
def test_fixed_matches_sparse_transformer(seq, block, stride, summary, causal):
    lay = layouts.fixed(seq, block, stride, summary=summary, causal=causal)
    check(lay, fixed_rule(seq, stride * block[1], summary * block[1], causal), block)


def test_fixed_is_own_segment_plus_summary_blocks():
    mask = layouts.fixed(12 * 8, 8, 4, summary=1, causal=False).to_dense()[0]
    r, c = np.indices(mask.shape)
    np.testing.assert_array_equal(mask, (r // 4 == c // 4) | (c % 4 == 3))


@pytest.mark.parametrize(("seq", "block"), GEOMETRIES[:5])
@pytest.mark.parametrize(("window", "global_blocks"), [(16, [0]), ((30, 0), [0, -1]), (0, []), (5, [-1])])
def test_longformer(seq, block, window, global_blocks):
    left, right = (window, window) if isinstance(window, int) else window
    lay = layouts.longformer(seq, block, window, global_blocks=global_blocks)
    check(lay, window_rule(seq, left, right) | global_rule(seq, block[1], global_blocks), block)


@pytest.mark.parametrize(("seq", "block"), GEOMETRIES[:4])
def test_longformer_interior_global_blocks(seq, block):
    lay = layouts.longformer(seq, block, (5, 9), global_blocks=[1, 2])
    check(lay, window_rule(seq, 5, 9) | global_rule(seq, block[1], [1, 2]), block)


def test_longformer_is_symmetric_on_square_layouts():
    mask = layouts.longformer(20 * 16, 16, 16, global_blocks=[0, 7, -1]).to_dense()[0]
    np.testing.assert_array_equal(mask, mask.T)
    assert mask[[0, 7, 19]].all() and mask[:, [0, 7, 19]].all()


@pytest.mark.parametrize(("seq", "block"), GEOMETRIES[:5])
@pytest.mark.parametrize("random_blocks", [0, 1, 3])
def test_bigbird_window_global_and_disjoint_random_blocks(seq, block, random_blocks):
    lay = layouts.bigbird(seq, block, random_blocks=random_blocks, seed=7, heads=2)
    base = blocks_touched(window_rule(seq, block[1], block[1]) | global_rule(seq, block[1], [0, -1]), *block)
    dense = lay.to_dense()
    for h in range(2):
        extra = dense[h] & ~base
        assert not (base & ~dense[h]).any(), "window and global blocks are all kept"
        free = (~base).sum(axis=1)
        # exactly min(r, free) random blocks per row, all outside window and global blocks
        np.testing.assert_array_equal(extra.sum(axis=1), np.minimum(random_blocks, free))


def test_bigbird_is_reproducible_by_seed_and_differs_across_seeds_and_heads():
    a = layouts.bigbird(2048, 32, random_blocks=3, seed=3, heads=4)
    assert a == layouts.bigbird(2048, 32, random_blocks=3, seed=3, heads=4)
    assert a != layouts.bigbird(2048, 32, random_blocks=3, seed=4, heads=4)
    dense = a.to_dense()
    assert not np.array_equal(dense[0], dense[1])
    # per head: 2 global rows of 64; rows 1 and 62 hold 4 window/global blocks, the other 60 hold 5; +3 random each
    assert a.nnz == 4 * (2 * 64 + 2 * (4 + 3) + 60 * (5 + 3))


def _touched_blocks_of_query_positions(seq, block, r):
    lq, lk = seq
    bq, bk = block
    p0, p1 = r * bq + lk - lq, min(r * bq + bq, lq) - 1 + lk - lq
    p0, p1 = max(p0, 0), min(p1, lk - 1)
    return set(range(p0 // bk, p1 // bk + 1)) if p0 <= p1 else set()


def topk_by_hand(q, k, block, top_k, causal):
    """Independent routing: loops over blocks, Python sorting."""
    bq, bk = block
    hq, lq, _ = q.shape
    hk, lk, _ = k.shape
    nqb, nkb = -(-lq // bq), -(-lk // bk)
    out = np.zeros((hq, nqb, nkb), dtype=bool)
    for h in range(hq):
        kh = h // (hq // hk)
        for r in range(nqb):
            qm = q[h, r * bq : (r + 1) * bq].mean(axis=0)
            last_p = min(r * bq + bq, lq) - 1 + lk - lq
            diag = _touched_blocks_of_query_positions((lq, lk), block, r)
            cands = []
            for c in range(nkb):
                if causal and c * bk > last_p:
                    continue
                score = float(qm @ k[kh, c * bk : (c + 1) * bk].mean(axis=0))
                cands.append((0 if c in diag else 1, -score, c))
            for _, _, c in sorted(cands)[: max(top_k, len(diag))]:
                out[h, r, c] = True
    return out


@pytest.mark.parametrize(("seq", "block"), GEOMETRIES[:5])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(("hq", "hk"), [(1, 1), (4, 2)])
def test_topk_matches_hand_routing(rng, seq, block, causal, hq, hk):
    q = rng.standard_normal((hq, seq[0], 8))
    k = rng.standard_normal((hk, seq[1], 8))
    lay = layouts.topk(q, k, block, 2, causal=causal)
    assert lay.heads == hq
    np.testing.assert_array_equal(lay.to_dense(), topk_by_hand(q, k, block, 2, causal))


def test_topk_keeps_diagonal_and_respects_causality(rng):
    q, k = rng.standard_normal((2, 3, 40 * 8, 16))
    dense = layouts.topk(q, k, 8, 5, causal=True).to_dense()
    assert dense[:, np.arange(40), np.arange(40)].all()
    assert not np.triu(dense, k=1).any()
    assert (dense.sum(axis=2) == np.minimum(np.arange(1, 41), 5)).all()


def test_topk_accepts_2d_and_unit_batch(rng):
    q, k = rng.standard_normal((2, 1, 2, 64, 8))
    assert layouts.topk(q, k, 16, 2) == layouts.topk(q[0], k[0], 16, 2)
    assert layouts.topk(q[0, 0], k[0, 0], 16, 2).heads == 1


def test_from_block_and_token_masks(rng):
    blocks = rng.random((3, 5, 4)) < 0.4
    lay = layouts.from_block_mask(blocks, (8, 6), seq=(37, 20))
    assert lay.heads == 3 and lay.seq == (37, 20)
    np.testing.assert_array_equal(lay.to_dense(), blocks)
    assert layouts.from_token_mask(lay.to_token_mask(), (8, 6)) == lay
    assert layouts.from_block_mask(blocks[0], 4).seq == (20, 16)
    token = rng.random((37, 20)) < 0.05
    np.testing.assert_array_equal(layouts.from_token_mask(token, (8, 6)).to_dense()[0], blocks_touched(token, 8, 6))


def test_scipy_round_trip(rng):
    lay = layouts.bigbird((90, 70), (16, 8), heads=2, random_blocks=2)
    matrix = layouts.to_scipy(lay)
    assert matrix.shape == (2 * 6, 9) and matrix.dtype == bool
    np.testing.assert_array_equal(matrix.toarray(), lay.to_dense().reshape(12, 9))
    assert layouts.from_scipy(matrix, (16, 8), (90, 70), heads=2) == lay
    coo = sp.coo_matrix(([1.0, 2.0, 0.0, 5.0], ([0, 0, 1, 2], [2, 2, 0, 1])), shape=(3, 3))
    from_coo = layouts.from_scipy(coo, 4)
    assert from_coo.to_dense()[0].tolist() == [[False, False, True], [False, False, False], [False, True, False]]


def test_union_intersect_and_stack(rng):
    seq, block = (100, 90), (16, 8)
    a = layouts.sliding_window(seq, block, 20)
    b = layouts.bigbird(seq, block, heads=3, random_blocks=2)
    c = layouts.causal(seq, block)
    np.testing.assert_array_equal(layouts.union(a, b, c).to_dense(), a.to_dense() | b.to_dense() | c.to_dense())
    np.testing.assert_array_equal(layouts.intersect(a, b, c).to_dense(), a.to_dense() & b.to_dense() & c.to_dense())
    assert layouts.union(a) == a
    stacked = layouts.stack([a, b, c])
    assert stacked.heads == 5
    np.testing.assert_array_equal(stacked.to_dense(), np.concatenate([a.to_dense(), b.to_dense(), c.to_dense()]))


# ----------------------------------------------------------------------------- builder argument errors


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda: layouts.strided(64, 16, 0), ValueError, r"stride must be >= 1, got 0"),
        (lambda: layouts.strided(64, 16, 2, causal=1), TypeError, r"causal must be True or False, got 1"),
        (lambda: layouts.fixed(64, 16, 2, summary=3), ValueError, r"summary must be <= stride \(2 blocks"),
        (lambda: layouts.fixed(64, 16, 2, summary=-1), ValueError, r"summary must be >= 0, got -1"),
        (lambda: layouts.sliding_window(64, 16, -3), ValueError, r"window must be >= 0, got -3"),
        (lambda: layouts.sliding_window(64, 16, (1, 2, 3)), TypeError, r"window must be None or a pair"),
        (lambda: layouts.sliding_window(64, 16, (1, -2)), ValueError, r"window right bound must be >= 0"),
        (lambda: layouts.longformer(64, 16, 8, global_blocks=[4]), ValueError, r"entries must lie in \[-4, 4\)"),
        (lambda: layouts.longformer(64, 16, 8, global_blocks=[-5]), ValueError, r"entry must be >= -4, got -5"),
        (lambda: layouts.longformer(64, 16, 8, global_blocks=0), TypeError, r"global_blocks must be a sequence"),
        (lambda: layouts.bigbird(64, 16, random_blocks=-1), ValueError, r"random_blocks must be >= 0, got -1"),
        (lambda: layouts.bigbird(64, 16, seed=-1), ValueError, r"seed must be >= 0, got -1"),
        (lambda: layouts.dense(64, (16, 0)), ValueError, r"block\[1\] must be >= 1, got 0"),
        (
            lambda: layouts.from_block_mask(np.ones((2, 2), dtype=bool), 16, seq=(40, 16)),
            ValueError,
            r"mask has 2 x 2 blocks but seq=\(40, 16\) with block=\(16, 16\) needs 3 x 1",
        ),
        (lambda: layouts.from_block_mask(np.ones((2, 2)), 16), TypeError, r"mask must be a boolean array, got dtype"),
        (lambda: layouts.from_token_mask(np.ones(4, dtype=bool), 2), ValueError, r"mask must have 2 axes or 3"),
        (lambda: layouts.from_scipy(np.eye(3), 4), TypeError, r"matrix must be a scipy.sparse matrix or array, got"),
        (
            lambda: layouts.from_scipy(sp.eye(3, format="csr"), 4, heads=2),
            ValueError,
            r"matrix has 3 rows, not a multiple of heads=2",
        ),
        (
            lambda: layouts.from_scipy(sp.eye(3, format="csr"), 4, seq=(20, 12)),
            ValueError,
            r"matrix has shape \(3, 3\) but heads=1, seq=\(20, 12\), block=\(4, 4\) needs \(5, 3\)",
        ),
        (lambda: layouts.to_scipy("x"), TypeError, r"to_scipy takes BlockLayout objects, got str"),
        (lambda: layouts.union(), ValueError, r"union needs at least one layout"),
        (
            lambda: layouts.union(layouts.dense(64, 16), layouts.dense(64, 8)),
            ValueError,
            r"union: layouts must share block and seq; got block=\(16, 16\), seq=\(64, 64\) and block=\(8, 8\)",
        ),
        (
            lambda: layouts.intersect(layouts.bigbird(64, 16, heads=2), layouts.bigbird(64, 16, heads=3)),
            ValueError,
            r"intersect: layouts must have heads=1 or the same number of heads; got 2 and 3",
        ),
        (lambda: layouts.stack([]), ValueError, r"stack needs at least one layout"),
        (
            lambda: layouts.stack([layouts.dense(64, 16), layouts.dense(32, 16)]),
            ValueError,
            r"stack: layouts must share block and seq",
        ),
    ],
)
def test_builder_argument_errors(call, error, message):
    with pytest.raises(error, match=message):
        call()


@pytest.mark.parametrize(
    ("q_shape", "k_shape", "error", "message"),
    [
        ((2, 2, 32, 8), (2, 2, 32, 8), ValueError, r"topk routes one sequence: q must be .* got shape \(2, 2, 32, 8\)"),
        ((2, 32, 8), (32, 8), ValueError, r"q has 3 axes but k has 2; they must match"),
        ((2, 32, 8), (2, 32, 4), ValueError, r"q and k must have the same last axis D"),
        ((3, 32, 8), (2, 32, 8), ValueError, r"query heads \(3\) must be a multiple of key heads \(2\)"),
    ],
)
def test_topk_shape_errors(rng, q_shape, k_shape, error, message):
    with pytest.raises(error, match=message):
        layouts.topk(rng.standard_normal(q_shape), rng.standard_normal(k_shape), 8, 2)


def test_topk_argument_errors(rng):
    q = rng.standard_normal((32, 8))
    with pytest.raises(ValueError, match=r"top_k must be >= 1, got 0"):
        layouts.topk(q, q, 8, 0)
    with pytest.raises(TypeError, match=r"topk routes NumPy arrays; k is builtins.list"):
        layouts.topk(q, q.tolist(), 8, 1)
    with pytest.raises(TypeError, match=r"causal must be True or False, got 'yes'"):
        layouts.topk(q, q, 8, 1, causal="yes")


# ----------------------------------------------------------------------------- pictures


def test_ascii_shrinks_large_grids():
    text = layouts.sliding_window(64 * 16, 16, 16).to_ascii(width=16)
    lines = text.splitlines()
    assert lines[0] == "64 x 64 blocks of 16 x 16 tokens, 190 stored (4.6%); 1 char = 4 x 4 blocks"
    assert len(lines) == 17 and all(len(line) == 16 for line in lines[1:])
    assert lines[1] == "++.............." and lines[2] == "+++............."


def test_ascii_names_the_head_of_per_head_layouts():
    lay = layouts.stack([layouts.causal(32, 16), layouts.dense(32, 16)])
    assert lay.to_ascii(head=1).splitlines() == [
        "head 1 of 2: 2 x 2 blocks of 16 x 16 tokens, 4 stored (100.0%)",
        "##",
        "##",
    ]
    with pytest.raises(ValueError, match=r"head must be < heads=2, got 2"):
        lay.to_ascii(head=2)


def test_plot_writes_a_small_png(tmp_path):
    path = tmp_path / "bigbird.png"
    layouts.bigbird((1000, 1200), (64, 48), heads=2).plot(path, head=1, title="bigbird")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) < 100_000
    layouts.dense(200_000, 64).plot(tmp_path / "large.png")  # 3125 blocks a side: shaded, still quick
    assert (tmp_path / "large.png").stat().st_size < 100_000


def test_plot_without_matplotlib_says_how_to_install(tmp_path, monkeypatch):
    for name in ("matplotlib", "matplotlib.colors", "matplotlib.figure"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ImportError, match=r"BlockLayout.plot needs matplotlib: pip install 'npsparseattn\[plot\]'"):
        layouts.causal(64, 16).plot(tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_docstring_pictures_are_what_the_builders_draw():
    """Each builder's docstring shows its picture as a doctest; they must stay true."""
    result = doctest.testmod(layouts, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted >= 15 and result.failed == 0


# ----------------------------------------------------------------------------- random layouts


@st.composite
def block_layouts(draw):
    """Random layouts: lengths, block sizes, heads, and a random block mask of random density."""
    lq, lk = draw(st.integers(0, 60)), draw(st.integers(0, 60))
    bq, bk = draw(st.integers(1, 20)), draw(st.integers(1, 20))
    heads = draw(st.integers(1, 3))
    nqb, nkb = -(-lq // bq), -(-lk // bk)
    density = draw(st.floats(0, 1))
    seed = draw(st.integers(0, 2**32 - 1))
    mask = np.random.default_rng(seed).random((heads, nqb, nkb)) < density
    return layouts.from_block_mask(mask, (bq, bk), seq=(lq, lk))


@settings(max_examples=60, deadline=None)
@given(lay=block_layouts())
def test_property_round_trips(lay):
    dense = lay.to_dense()
    assert lay.nnz == dense.sum()
    assert BlockLayout(lay.indptr, lay.indices, lay.block, lay.seq, lay.heads) == lay
    np.testing.assert_array_equal(lay.transpose().to_dense(), dense.transpose(0, 2, 1))
    assert layouts.from_scipy(layouts.to_scipy(lay), lay.block, lay.seq, heads=lay.heads) == lay
    run_ptr, start, stop = lay.runs()
    rows = lay.shape[0]
    for t in range(rows):
        expanded = [
            c
            for s, e in zip(start[run_ptr[t] : run_ptr[t + 1]], stop[run_ptr[t] : run_ptr[t + 1]])
            for c in range(s, e)
        ]
        assert expanded == lay.indices[lay.indptr[t] : lay.indptr[t + 1]].tolist()

"""Context parallelism without MPI: sharding, the block plan, heads, packing, one-rank runs, checks, communicators.

The multi-rank runs (every mode under ``mpiexec -n 2/3/4``, traffic counts)
are in tests/test_ring.py; the NCCL engine is driven here through a fake
``cupy.cuda.nccl``.
"""

from __future__ import annotations

import itertools
import types

import numpy as np
import pytest
from conftest import SoloComm, random_qkv, rel_err

import npsparseattn as nsa
from npsparseattn import layouts
from npsparseattn.context_parallel import plan, sharding
from npsparseattn.context_parallel.heads import HeadSplit
from npsparseattn.context_parallel.selection import IndexSelection, LayoutSelection
from npsparseattn.context_parallel.ulysses import Packing, SeqMap
from npsparseattn.distributed import MPIComm, NCCLComm, RingTimeoutError, base
from npsparseattn.distributed.agree import RankArgumentError
from npsparseattn.reference import _oracle, visibility_mask

# ---------------------------------------------------------------- sharding


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("cu", [[0, 5, 5, 23, 24], [0, 24], [0, 1, 2, 3, 24]])
def test_per_document_round_trip_and_every_document_shared_by_every_rank(rng, world, cu):
    x = rng.standard_normal((2, 24, 3))
    shards = [nsa.shard(x, r, world, "per_document", cu_seqlens=cu) for r in range(world)]
    assert [s.shape[1] for s in shards] == sharding.shard_lengths(24, world, "per_document", cu_seqlens=cu)
    assert np.array_equal(nsa.unshard(shards, "per_document", cu_seqlens=cu), x)
    for start, stop in itertools.pairwise(cu):
        held = [sum(min(b, stop) - max(a, start) for a, b in sharding.shard_pieces(24, world, r, "per_document",
                cu_seqlens=cu) if min(b, stop) > max(a, start)) for r in range(world)]  # fmt: skip
        assert sum(held) == stop - start
        assert max(held) - min(held) <= 2 * (-(-(stop - start) // (2 * world)))  # at most two chunks apart


@pytest.mark.parametrize("name", ["zigzag", "contiguous", "per_document"])
def test_block_cuts_only_at_multiples_of_the_block(name):
    cu = [0, 12, 40, 45]
    for r in range(3):
        for a, b in sharding.shard_pieces(45, 3, r, name, cu_seqlens=cu, block=4):
            assert a % 4 == 0 and (b % 4 == 0 or b == 45), (r, a, b)
    assert sharding.shard_pieces(10, 2, 0, "zigzag", block=1) == [(0, 3), (8, 10)]  # block 1: unchanged


def test_per_document_balances_causal_work_where_zigzag_of_the_stream_cannot():
    """One long and many short documents: per-document zigzag gives every rank the same causal work."""
    cu = np.array([0, 600, *range(620, 1001, 20)])
    work = {}
    for name in ("zigzag", "per_document"):
        per_rank = []
        for r in range(4):
            qp = sharding.shard_pieces(1000, 4, r, name, cu_seqlens=cu)
            total = 0
            for s in range(4):
                kp = sharding.shard_pieces(1000, 4, s, name, cu_seqlens=cu)
                total += _coverage(qp, kp, plan.block_calls(qp, kp, None, 0, cu)).sum()
            per_rank.append(total)
        work[name] = max(per_rank) / min(per_rank)
    assert work["per_document"] < 1.02 < 1.2 < work["zigzag"], work


def test_sharding_errors():
    with pytest.raises(ValueError, match=r"sharding='per_document' needs cu_seqlens"):
        sharding.shard_pieces(8, 2, 0, "per_document")
    with pytest.raises(ValueError, match=r"cu_seqlens must end at the sequence length 8, got cu_seqlens\[-1\] = 7"):
        nsa.shard(np.zeros((8, 2)), 0, 2, "per_document", cu_seqlens=[0, 7])
    with pytest.raises(ValueError, match=r"cu_seqlens must be non-decreasing: cu_seqlens\[1\] = 5 > 3"):
        sharding.document_offsets([0, 5, 3])
    with pytest.raises(TypeError, match=r"cu_seqlens must be an integer array \(int32\), got dtype float64"):
        sharding.document_offsets(np.array([0.0, 8.0]))
    with pytest.raises(ValueError, match=r"block must be a positive int \(tokens\), got 0"):
        nsa.shard(np.zeros((8, 2)), 0, 2, block=0)


# ---------------------------------------------------------------- the plan


def _coverage(q_pieces, k_pieces, calls, layout=None):
    """How many calls count each (local query, local key) pair as visible (a layout's blocks included)."""
    q_pos = np.concatenate([np.arange(a, b) for a, b in q_pieces] or [np.zeros(0, int)])
    k_pos = np.concatenate([np.arange(a, b) for a, b in k_pieces] or [np.zeros(0, int)])
    count = np.zeros((q_pos.size, k_pos.size), int)
    for c in calls:
        m, n = c.q.stop - c.q.start, c.k.stop - c.k.start
        seen = visibility_mask(m, n, offset=c.offset, left=c.left, right=c.right)
        if c.sparse is not None:
            seen = seen & c.sparse.to_token_mask().reshape(-1, m, n).any(axis=0)
        count[c.q, c.k] += seen
    return count


def _truth(q_pieces, k_pieces, left, right, cu=None, layout=None, head=0):
    q_pos = np.concatenate([np.arange(a, b) for a, b in q_pieces] or [np.zeros(0, int)])
    k_pos = np.concatenate([np.arange(a, b) for a, b in k_pieces] or [np.zeros(0, int)])
    seen = np.ones((q_pos.size, k_pos.size), dtype=bool)
    if left is not None:
        seen &= k_pos[None, :] >= q_pos[:, None] - left
    if right is not None:
        seen &= k_pos[None, :] <= q_pos[:, None] + right
    if cu is not None:
        doc = np.searchsorted(cu, np.arange(cu[-1]), side="right") - 1
        seen &= doc[q_pos][:, None] == doc[k_pos][None, :]
    if layout is not None:
        tokens = layout.to_token_mask().reshape(-1, *layout.seq)
        seen &= tokens[head if layout.heads > 1 else 0][np.ix_(q_pos, k_pos)]
    return seen


WINDOWS = [(None, None), (None, 0), (3, 0), (5, 2), (2, None)]


@pytest.mark.parametrize(("left", "right"), WINDOWS)
@pytest.mark.parametrize("name", ["zigzag", "contiguous", "per_document"])
@pytest.mark.parametrize("world", [2, 3])
def test_calls_with_documents_cover_exactly_the_visible_pairs(left, right, name, world):
    cu = np.array([0, 4, 4, 13, 14, 29])
    pieces = [sharding.shard_pieces(29, world, r, name, cu_seqlens=cu) for r in range(world)]
    needs = plan.Plan(pieces, left, right, cu).needs
    for r, s in itertools.product(range(world), repeat=2):
        calls = plan.block_calls(pieces[r], pieces[s], left, right, cu)
        truth = _truth(pieces[r], pieces[s], left, right, cu)
        assert np.array_equal(_coverage(pieces[r], pieces[s], calls), truth.astype(int)), (r, s)
        assert needs[r, s] == truth.any() == bool(calls), (r, s)


SPARSE = [
    layouts.sliding_window(45, 4, (4, 0)),
    layouts.longformer(45, 4, (4, 4)),
    layouts.stack([layouts.bigbird(45, 4, seed=h) for h in range(2)]),
    layouts.fixed(45, 4, 2, causal=False),
]


@pytest.mark.parametrize("layout", SPARSE, ids=["window", "longformer", "bigbird-per-head", "fixed"])
@pytest.mark.parametrize(("left", "right"), [(None, None), (None, 0), (6, 1)])
@pytest.mark.parametrize("name", ["zigzag", "contiguous"])
def test_sparse_calls_cover_exactly_the_selected_visible_pairs(layout, left, right, name):
    """Each call's sub-layout: the layout's blocks in its rows and keys, emptied blocks dropped; needs exact."""
    world, cu = 3, np.array([0, 8, 20, 45])
    pieces = [sharding.shard_pieces(45, world, r, name, block=4) for r in range(world)]
    p = plan.Plan(pieces, left, right, cu, LayoutSelection(layout), range(2))
    for r, s in itertools.product(range(world), repeat=2):
        calls = p.calls(r, s)
        assert all(c.sparse is not None for c in calls)
        assert all(np.any(c.sparse.to_dense()) for c in calls)  # no call runs an empty layout
        truths = [_truth(pieces[r], pieces[s], left, right, cu, layout, h) for h in range(2)]
        for h, truth in enumerate(truths):
            coverage = _coverage(pieces[r], pieces[s], [_head(c, h) for c in calls])
            assert np.array_equal(coverage, truth.astype(int)), (r, s, h)
        assert p.needs[r, s] == any(t.any() for t in truths), (r, s)


def _head(call, h):
    """The call restricted to query head ``h`` of a per-head layout (the shared one as it is)."""
    lay = call.sparse
    if lay.heads == 1:
        return call
    nqb = lay.n_query_blocks
    indptr = lay.indptr[h * nqb : (h + 1) * nqb + 1]
    sub = layouts.BlockLayout(indptr - indptr[0], lay.indices[indptr[0] : indptr[-1]], lay.block, lay.seq)
    return plan.BlockCall(call.q, call.k, call.offset, call.left, call.right, sub)


def test_needs_of_a_window_on_contiguous_shards_are_the_neighbours_only():
    pieces = [sharding.shard_pieces(40, 4, r, "contiguous") for r in range(4)]
    p = plan.Plan(pieces, 3, 0)
    assert np.array_equal(p.needs, np.eye(4, dtype=bool) | np.eye(4, k=-1, dtype=bool))
    assert not p.dense and plan.Plan(pieces, None, None).dense


def test_selection_hook_reads_only_the_ranges_asked():
    sel = LayoutSelection(layouts.stack([layouts.dense(16, 4), layouts.causal(16, 4)]))
    head, qb, kb = sel.blocks((8, 16), (0, 8), range(2))
    assert sorted(zip(head.tolist(), qb.tolist(), kb.tolist())) == [
        (0, 2, 0), (0, 2, 1), (0, 3, 0), (0, 3, 1), (1, 2, 0), (1, 2, 1), (1, 3, 0), (1, 3, 1)
    ]  # fmt: skip
    one = sel.blocks((8, 16), (0, 8), range(1, 2))  # the second head alone, reported as head 0 of the call
    assert one[0].tolist() == [0, 0, 0, 0]


def _random_index(rng, batch, hk, length, q_block, kv_block, slots):
    """Random ``(kv_idx, kv_cnt)`` over ``length``: distinct blocks, some ``-1``, a stray block past each count."""
    nqb, nkb = -(-length // q_block), -(-length // kv_block)
    rows = np.stack([rng.permutation(nkb)[:slots] for _ in range(batch * hk * nqb)])
    rows[rng.random(rows.shape) < 0.2] = -1
    kv_cnt = rng.integers(0, slots + 1, rows.shape[0])
    return rows.reshape(batch, hk, nqb, slots).astype(np.int32), kv_cnt.reshape(batch, hk, nqb).astype(np.int32)


def _index_tokens(kv_idx, kv_cnt, q_block, kv_block, lq, lk):
    """Token mask (B, Hk, lq, lk) of an index (brute force)."""
    mask = np.zeros((*kv_idx.shape[:2], lq, lk), dtype=bool)
    for b, h, qb in itertools.product(*(range(n) for n in kv_idx.shape[:3])):
        for kb in kv_idx[b, h, qb, : kv_cnt[b, h, qb]]:
            if kb >= 0:
                mask[b, h, qb * q_block : (qb + 1) * q_block, kb * kv_block : (kb + 1) * kv_block] = True
    return mask


def test_index_selection_blocks_are_the_union_over_batch_and_the_call_index_is_canonical(rng):
    kv_idx, kv_cnt = _random_index(rng, 2, 2, 45, 4, 2, 5)
    sel = IndexSelection(kv_idx, kv_cnt, 4, 2, heads=4)
    q_range, k_range = (8, 28), (10, 30)  # query blocks 2..6, key blocks 5..14
    for heads in (range(4), range(2, 4)):
        head, qb, kb = sel.blocks(q_range, k_range, heads)
        truth = {
            (h, r, int(c))
            for h, b, r in itertools.product(range(len(heads)), range(2), range(2, 7))
            for c in kv_idx[b, heads[h] // 2, r, : kv_cnt[b, heads[h] // 2, r]]
            if 5 <= c < 15
        }
        assert sorted(zip(head.tolist(), qb.tolist(), kb.tolist())) == sorted(truth)
        dropped = (qb != 3) | (kb != 7)  # a block the plan's masks left out of the call
        idx, cnt = sel.kernel_argument(q_range, k_range, heads, (head[dropped], qb[dropped], kb[dropped]))
        first = heads[0] // 2
        assert idx.dtype == cnt.dtype == np.int32 and idx.shape[:3] == (2, len(heads) // 2, 5)
        for b, h, r in itertools.product(range(2), range(idx.shape[1]), range(5)):
            row = kv_idx[b, first + h, r + 2, : kv_cnt[b, first + h, r + 2]]
            want = sorted(int(c) - 5 for c in row if 5 <= c < 15 and (r + 2, c) != (3, 7))
            assert cnt[b, h, r] == len(want) and idx[b, h, r, : len(want)].tolist() == want
            assert (idx[b, h, r, len(want) :] == -1).all()


@pytest.mark.parametrize(("left", "right"), [(None, None), (None, 0), (6, 1)])
@pytest.mark.parametrize("name", ["zigzag", "contiguous"])
def test_index_calls_cover_exactly_the_selected_visible_pairs(rng, left, right, name):
    """Per batch entry and query head, the calls' kv_idx cover the selected visible pairs once; needs exact."""
    world, cu, length = 3, np.array([0, 8, 20, 45]), 45
    kv_idx, kv_cnt = _random_index(rng, 2, 2, length, 4, 2, 4)
    tokens = _index_tokens(kv_idx, kv_cnt, 4, 2, length, length)
    pieces = [sharding.shard_pieces(length, world, r, name, block=4) for r in range(world)]
    p = plan.Plan(pieces, left, right, cu, IndexSelection(kv_idx, kv_cnt, 4, 2, heads=4), range(4))
    for r, s in itertools.product(range(world), repeat=2):
        q_pos, k_pos = (np.concatenate([np.arange(a, b) for a, b in pieces[m]]) for m in (r, s))
        calls = p.calls(r, s)
        assert all(int(c.sparse[1].sum()) > 0 for c in calls)  # no call runs an empty index
        any_seen = False
        for b, h in itertools.product(range(2), range(4)):
            truth = _truth(pieces[r], pieces[s], left, right, cu) & tokens[b, h // 2][np.ix_(q_pos, k_pos)]
            count = np.zeros(truth.shape, int)
            for c in calls:
                m, n = c.q.stop - c.q.start, c.k.stop - c.k.start
                seen = visibility_mask(m, n, offset=c.offset, left=c.left, right=c.right)
                count[c.q, c.k] += seen & _index_tokens(*c.sparse, 4, 2, m, n)[b, h // 2]
            assert np.array_equal(count, truth.astype(int)), (r, s, b, h)
            any_seen |= bool(truth.any())
        assert p.needs[r, s] == any_seen, (r, s)


# ---------------------------------------------------------------- heads, sequence map, packing


@pytest.mark.parametrize(("hq", "hk", "group"), [(8, 4, 4), (8, 8, 2), (8, 2, 4), (6, 1, 3), (12, 4, 2)])
def test_head_split_gives_each_query_head_its_key_value_head(hq, hk, group):
    split = HeadSplit(hq, hk, group)
    seen = []
    for u in range(group):
        for c in range(split.chunks):
            (kv,) = split.kv_heads(u, c)
            for h in split.q_heads(u, c):
                assert h // (hq // hk) == kv  # the GQA rule: query head h reads key/value head h // (Hq / Hk)
                seen.append(h)
    assert sorted(seen) == list(range(hq))
    assert split.replicated == (hk < group)


@pytest.mark.parametrize(
    ("hq", "hk", "group", "message"),
    [
        (6, 2, 4, r"the 6 query heads over 4 ranks, so the heads must be a multiple of the group size"),
        (6, 2, 3, r"needs the key/value heads \(2\) to be a multiple or a divisor of the group size"),
    ],
)
def test_head_split_refusals(hq, hk, group, message):
    with pytest.raises(ValueError, match=message):
        HeadSplit(hq, hk, group)


def test_sequence_map_and_packing():
    m = SeqMap([[(0, 3), (9, 12)], [(3, 9)], [(20, 21)]])
    assert m.pieces == [(0, 12), (20, 21)] and m.length == 13 and m.lengths == [6, 6, 1]
    assert [i.tolist() for i in m.index] == [[0, 1, 2, 9, 10, 11], [3, 4, 5, 6, 7, 8], [12]]
    p = Packing([[((3,), np.float32), ((2, 2), np.float64)], [((1,), np.float32)]])
    assert p.counts == [48, 8] and p.displs == [0, 48]
    buf = np.zeros(p.total, np.uint8)
    a, b = p.views(buf, 0)
    a[...] = [1, 2, 3]
    b[...] = 7.5
    (c,) = p.views(buf, 1)
    c[...] = -1
    assert p.views(buf, 0)[0].tolist() == [1, 2, 3] and p.views(buf, 0)[1].sum() == 30 and c.tolist() == [-1]


# ---------------------------------------------------------------- one rank: every mode


def _oracle_call(q, k, v, dout, causal, window, cu, layout, tokens=None):
    length = q.shape[-2]
    left, right = window or (None, None)
    mask = visibility_mask(length, length, offset=0, left=left, right=0 if causal else right)
    if cu is not None:
        doc = np.searchsorted(cu, np.arange(length), side="right") - 1
        mask &= doc[:, None] == doc[None, :]
    mask = np.broadcast_to(mask, (1, q.shape[1], length, length)).copy()
    if layout is not None:
        mask &= layout.to_token_mask().reshape(layout.heads, length, length)[None]
    if tokens is not None:
        mask &= tokens
    out, lse, _ = _oracle.forward(q, k, v, mask, 1 / np.sqrt(q.shape[-1]), np)
    return out, lse, _oracle.backward(dout, q, k, v, out, lse, mask, 1 / np.sqrt(q.shape[-1]), np)


@pytest.mark.parametrize("mode", ["ring", "ulysses", "hybrid", "allgather"])
@pytest.mark.parametrize(
    "options",
    [
        dict(causal=True),
        dict(window=(5, 2), sharding="per_document", cu_seqlens=np.array([0, 9, 9, 30, 37])),
        dict(causal=True, layout=layouts.stack([layouts.bigbird(37, 4, seed=h) for h in range(4)])),
        dict(causal=True, index=True),
    ],
    ids=["causal", "docs-window", "per-head-layout", "kv_idx"],
)
def test_one_rank_equals_the_float64_oracle(rng, mode, options):
    q, k, v = random_qkv(rng, batch=(1,), hq=4, hk=2, lq=37, d=8, dv=6)
    dout = rng.standard_normal((1, 4, 37, 6))
    options, tokens = dict(options), None
    if options.pop("index", False):
        kv_idx, kv_cnt = _random_index(rng, 1, 2, 37, 4, 2, 6)
        options.update(kv_idx=kv_idx, kv_cnt=kv_cnt, q_block=4, kv_block=2)
        tokens = np.repeat(_index_tokens(kv_idx, kv_cnt, 4, 2, 37, 37), 2, axis=1)  # key heads to query heads
    kw = dict(options, mode=mode, ulysses_size=1 if mode == "hybrid" else None)
    out, lse = nsa.context_parallel_attention(q, k, v, SoloComm(), return_lse=True, **kw)
    grads = nsa.context_parallel_attention_backward(dout, q, k, v, out, lse, SoloComm(), **kw)
    ref_out, ref_lse, ref_grads = _oracle_call(
        q, k, v, dout, options.get("causal", False), options.get("window"), options.get("cu_seqlens"),
        options.get("layout"), tokens,
    )  # fmt: skip
    assert rel_err(out, ref_out) < 1e-12
    assert np.array_equal(np.isneginf(lse), np.isneginf(ref_lse))
    seen = ~np.isneginf(ref_lse)  # rows that see no key: -inf on both sides (checked above)
    assert np.abs(lse[seen] - ref_lse[seen]).max(initial=0.0) < 1e-12
    for g, r in zip(grads, ref_grads):
        assert rel_err(g, r, floor=1.0) < 1e-12


def test_plans_are_kept_for_repeated_arguments_and_remade_for_new_ones(rng):
    from npsparseattn.context_parallel import modes

    q, k, v = random_qkv(rng, batch=(1,), hq=2, lq=37, d=8)
    first, second = layouts.sliding_window(37, 4, (4, 0)), layouts.sliding_window(37, 4, (8, 0))
    kept = []
    for layout in (first, second, first, first):
        out = nsa.context_parallel_attention(q, k, v, SoloComm(), layout=layout, causal=True)
        assert rel_err(out, nsa.block_sparse_attention(q, k, v, layout, causal=True)) < 1e-12
        kept.append(next(reversed(modes._LAYOUTS.values()))[1])
    assert kept[2] is kept[3] and kept[0] is not kept[1]
    assert len(modes._LAYOUTS) <= modes._KEEP


def test_float16_and_2d_inputs(rng):
    q, k, v = random_qkv(rng, hq=1, lq=20, d=8, dtype=np.float16)
    out = nsa.context_parallel_attention(q[0], k[0], v[0], SoloComm(), mode="allgather", causal=True)
    ref, _ = nsa.reference.attention(q[0], k[0], v[0], causal=True)
    assert out.dtype == np.float16 and out.shape == (20, 8) and np.abs(out - ref).max() < 2e-3


# ---------------------------------------------------------------- argument checks


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (dict(mode="striped"), ValueError, r"mode must be one of 'ring', 'ulysses', 'hybrid', 'allgather', got"),
        (dict(ulysses_size=2), ValueError, r"ulysses_size is for mode='ulysses' or 'hybrid', not mode='ring'"),
        (dict(mode="hybrid"), ValueError, r"mode='hybrid' needs ulysses_size: the ranks of one Ulysses group"),
        (dict(mode="hybrid", ulysses_size=2), ValueError, r"ulysses_size must divide the 1 ranks, got 2"),
        (dict(mode="ulysses", ulysses_size=2), ValueError, r"mode='ulysses' spreads heads over all 1 ranks"),
        (dict(mode="ulysses", ulysses_size="1"), TypeError, r"ulysses_size must be an int or None, got '1'"),
        (dict(sharding="per_document"), ValueError, r"sharding='per_document' needs cu_seqlens"),
        (dict(layout="dense"), TypeError, r"layout must be None or an npsparseattn.layouts.BlockLayout"),
        (dict(layout=layouts.stack([layouts.dense(8, 4)] * 3)), ValueError, r"layout has 3 heads but q has 2"),
        (dict(cu_seqlens=np.array([0, 9])), RankArgumentError, r"cu_seqlens must end at the total sequence length 8"),
        (dict(layout=layouts.dense(9, 4)), RankArgumentError, r"layout is for seq \(Lq, Lk\) = \(9, 9\) but the whole"),
        (
            dict(layout=layouts.dense(8, 4), cu_seqlens=np.array([0, 3, 8])),
            RankArgumentError,
            r"documents must start at multiples of 4 tokens \(cu_seqlens has 3\)",
        ),
        (dict(backend="triton"), nsa.BackendError, r"backend must be 'auto' or one of"),
        (dict(kv_cnt=np.ones((2, 2), np.int32)), ValueError, r"kv_cnt go\(es\) with kv_idx, which is None"),
        (
            dict(kv_idx=np.zeros((2, 2, 1), np.int32), layout=layouts.dense(8, 4)),
            ValueError,
            r"pass either layout \(block-sparse\) or kv_idx \(sparse_attention's index\), not both",
        ),
        (dict(kv_idx=[[0]]), TypeError, r"kv_idx must be an integer array \(\*batch, Hk, nqb, K\), got list"),
        (dict(kv_idx=np.zeros((2, 1), np.int32)), ValueError, r"kv_idx must have shape .* in the axes of k, that is"),
        (dict(kv_idx=np.zeros((2, 2, 1)), q_block=4), TypeError, r"kv_idx must be an integer array \(int32\), got"),
        (
            dict(kv_idx=np.zeros((2, 2, 2), np.int32), kv_cnt=np.full((2, 2), 3, np.int32), q_block=4),
            ValueError,
            r"kv_cnt\[0, 0\] = 3; a count must lie in \[0, K=2\]",
        ),
        (
            dict(kv_idx=np.zeros((2, 3, 1), np.int32), q_block=4, kv_block=4),
            RankArgumentError,
            r"kv_idx has 3 query blocks \(axis -2\) but the whole sequence of 8 positions .* = 2; build kv_idx",
        ),
        (
            dict(kv_idx=np.full((2, 2, 1), 2, np.int32), q_block=4, kv_block=4),
            RankArgumentError,
            r"kv_idx\[0, 0, 0\] = 2 is out of range: .* \[0, 2\) \(key blocks of the whole sequence\)",
        ),
        (
            dict(kv_idx=np.zeros((2, 2, 2), np.int32), q_block=4, kv_block=4),
            RankArgumentError,
            r"kv_idx\[0, 0, :\] selects key block 0 twice \(slots 0 and 1\)",
        ),
        (
            dict(kv_idx=np.zeros((2, 2, 1), np.int32), q_block=4, kv_block=2, cu_seqlens=np.array([0, 2, 8])),
            RankArgumentError,
            r"with kv_idx of block \(4, 2\), documents must start at multiples of 4 tokens \(cu_seqlens has 2\)",
        ),
    ],
)
def test_argument_errors(rng, kwargs, error, message):
    q, k, v = random_qkv(rng, hq=2, lq=8, d=4)
    with pytest.raises(error, match=message):
        nsa.context_parallel_attention(q, k, v, SoloComm(), **kwargs)


def test_the_lengths_error_names_the_block_to_cut_with(rng):
    q, k, v = random_qkv(rng, hq=2, lq=8, d=4)

    class Two(SoloComm):  # rank 0 of 2, the other rank holding 4 rows
        size = 2

        def allreduce(self, values, op="sum"):
            values = values.copy()
            values[-3] = 4  # the other rank's length
            return values

    with pytest.raises(RankArgumentError, match=r"cut the sequence with npsparseattn.shard\(x, rank, world, "
                       r"sharding='zigzag', block=4\)"):  # fmt: skip
        nsa.context_parallel_attention(q, k, v, Two(), layout=layouts.dense(12, 4))


def test_ulysses_refuses_heads_it_cannot_split(rng):
    q, k, v = random_qkv(rng, hq=6, hk=2, lq=8, d=4)

    class Three(SoloComm):
        size = 3

    with pytest.raises(ValueError, match=r"Ulysses on 3 ranks needs the key/value heads \(2\) to be a multiple"):
        nsa.context_parallel_attention(q, k, v, Three(), mode="ulysses")


# ---------------------------------------------------------------- communicators


def test_base_transfers_serve_a_group_of_one():
    comm = SoloComm()
    recv = np.zeros(3)
    comm.wait(comm.alltoallv(np.arange(5.0), [3], [2], recv, [3], [0]))
    assert recv.tolist() == [2.0, 3.0, 4.0]
    comm.wait(comm.allgatherv(np.arange(2.0), recv[:2], [2]))
    assert recv.tolist() == [0.0, 1.0, 4.0]
    assert comm.split(3, 0) is comm
    comm.wait(comm.exchange([], None, [], None))
    assert (comm.traffic.messages, comm.traffic.bytes) == (0, 0)


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda c: c.exchange([np.zeros(2)], None, [], None), ValueError, r"dest must be a rank in \[0, 1\), got None"),
        (lambda c: c.exchange([], None, [np.zeros(4)[::2]], 0), ValueError, r"recv\[0\] must be C-contiguous"),
        (
            lambda c: c.alltoallv(np.zeros(2), [3], [0], np.zeros(3), [3], [0]),
            ValueError,
            r"send slices reach element 3 but send has 2",
        ),
        (
            lambda c: c.alltoallv(np.zeros(2), [1, 1], [0], np.zeros(2), [1], [0]),
            ValueError,
            r"send_counts must hold 1",
        ),
        (lambda c: c.alltoallv(np.zeros(2), [1], [0], np.zeros(2, int), [1], [0]), TypeError, r"one dtype"),
        (lambda c: c.alltoallv(np.zeros((2, 1)), [1], [0], np.zeros(2), [1], [0]), ValueError, r"send must be a C-c"),
        (lambda c: c.allgatherv(np.zeros(2), np.zeros(3), [2]), ValueError, r"counts \[2\] do not fit"),
        (lambda c: c.split(-1, 0), ValueError, r"color must be a non-negative int, got -1"),
    ],
)
def test_transfer_checks(call, error, message):
    with pytest.raises(error, match=message):
        call(SoloComm())


def test_receive_slices_may_not_overlap():
    class Two(SoloComm):
        size = 2

    with pytest.raises(ValueError, match=r"recv slices overlap: \[\(0, 2\), \(1, 3\)\]"):
        base.check_alltoallv(Two(), np.zeros(4), [2, 2], [0, 0], np.zeros(4), [2, 2], [0, 1])


def test_mpi_collectives_on_comm_self_count_nothing_that_stays_home():
    mpi = pytest.importorskip("mpi4py.MPI")
    comm = MPIComm(mpi.COMM_SELF, timeout=5)
    recv = np.full(4, np.nan, np.float32)
    comm.wait(comm.alltoallv(np.arange(6, dtype=np.float32), [4], [1], recv, [4], [0]))
    assert recv.tolist() == [1, 2, 3, 4]
    comm.wait(comm.allgatherv(np.array([9, 8], np.float32), recv[:2], [2]))
    got = np.zeros(3)
    comm.wait(comm.exchange([np.arange(3.0)], 0, [got], 0, tag=5))
    assert recv[:2].tolist() == [9, 8] and got.tolist() == [0, 1, 2]
    assert (comm.traffic.messages, comm.traffic.bytes) == (0, 0)  # everything stayed on this rank
    sub = comm.split(0, 0)
    assert isinstance(sub, MPIComm) and (sub.rank, sub.size, sub.timeout) == (0, 1, 5)
    assert sub.traffic is comm.traffic


# ---------------------------------------------------------------- NCCL engine with a fake cupy.cuda.nccl


class _Log:
    def __init__(self):
        self.calls = []


class _GpuBuffer:
    """What the NCCL engine reads of a CuPy array: a pointer, sizes, flags."""

    def __init__(self, n, ptr, itemsize=4):
        self.size, self.nbytes, self.ndim = n, n * itemsize, 1
        self.dtype = np.dtype({1: np.uint8, 4: np.float32, 8: np.float64}[itemsize])
        self.data = types.SimpleNamespace(ptr=ptr)
        self.flags = types.SimpleNamespace(c_contiguous=True)
        self.shape = (n,)


def _nccl(log, rank=1, size=3, *, arrives=True):
    class Event:
        def __init__(self, disable_timing):
            self.done = False

        def record(self, stream):
            self.done = arrives

    class Stream:
        def __init__(self, non_blocking=True):
            self.ptr = 22

        def wait_event(self, event):
            pass

    caller = Stream()
    cupy = types.SimpleNamespace(
        ndarray=_GpuBuffer,
        cuda=types.SimpleNamespace(
            Event=Event,
            Stream=Stream,
            get_current_stream=lambda: caller,
            Device=lambda i: types.SimpleNamespace(use=lambda: log.calls.append(("use", i))),
        ),
    )

    class Communicator:
        def __init__(self, ndev=size, comm_id=None, rank=rank):
            log.calls.append(("NcclCommunicator", ndev, comm_id, rank))

        def send(self, *a):
            log.calls.append(("send", *a))

        def recv(self, *a):
            log.calls.append(("recv", *a))

        def allGather(self, *a):
            log.calls.append(("allGather", *a))

        def abort(self):
            log.calls.append(("abort",))

    fake = types.SimpleNamespace(
        NCCL_UINT8=99,
        groupStart=lambda: log.calls.append(("groupStart",)),
        groupEnd=lambda: log.calls.append(("groupEnd",)),
        NcclCommunicator=Communicator,
        get_unique_id=lambda: tuple(range(128)),
    )

    class Mpi:
        def __init__(self, rank, size):
            self.rank, self.size, self.timeout = rank, size, 0.05

        def mark_failed(self):
            log.calls.append(("mark_failed",))

        def split(self, color, key):
            log.calls.append(("mpi.split", color, key))
            return Mpi(0, 2)

        def broadcast(self, values, root=0):
            log.calls.append(("broadcast", root))
            values[:] = np.arange(128) + 1
            return values

    return NCCLComm(Communicator(), Mpi(rank, size), 5, Stream(), cupy, fake)


def test_nccl_exchange_sends_to_any_peer_and_may_receive_nothing():
    log = _Log()
    comm = _nccl(log)
    log.calls.clear()
    comm.wait(comm.exchange([_GpuBuffer(4, 100)], 0, [], None, tag=1))
    assert log.calls == [("groupStart",), ("send", 100, 16, 99, 0, 22), ("groupEnd",)]
    assert (comm.traffic.messages, comm.traffic.bytes) == (1, 16)


def test_nccl_alltoallv_is_grouped_send_recv_per_peer_with_a_count():
    log = _Log()
    comm = _nccl(log)
    log.calls.clear()
    send, recv = _GpuBuffer(10, 1000, 8), _GpuBuffer(6, 5000, 8)
    comm.wait(comm.alltoallv(send, [2, 0, 3], [0, 0, 4], recv, [1, 2, 0], [0, 1, 3]))
    assert log.calls == [
        ("groupStart",),
        ("send", 1000, 16, 99, 0, 22),  # 2 float64 to rank 0; nothing for rank 1 (itself, count 0)
        ("send", 1032, 24, 99, 2, 22),  # 3 from element 4 to rank 2
        ("recv", 5000, 8, 99, 0, 22),
        ("recv", 5008, 16, 99, 1, 22),  # its own slice, through NCCL like the others
        ("groupEnd",),
    ]
    assert (comm.traffic.messages, comm.traffic.bytes) == (2, 40)


def test_nccl_allgatherv_uses_allgather_for_equal_counts_and_send_recv_otherwise():
    log = _Log()
    comm = _nccl(log)
    log.calls.clear()
    comm.wait(comm.allgatherv(_GpuBuffer(2, 10), _GpuBuffer(6, 20), [2, 2, 2]))
    assert log.calls == [("groupStart",), ("allGather", 10, 20, 8, 99, 22), ("groupEnd",)]
    log.calls.clear()
    comm.wait(comm.allgatherv(_GpuBuffer(1, 10), _GpuBuffer(4, 20), [2, 1, 1]))
    sends = [c for c in log.calls if c[0] == "send"]
    recvs = [c for c in log.calls if c[0] == "recv"]
    assert sends == [("send", 10, 4, 99, j, 22) for j in range(3)]
    assert recvs == [("recv", 20, 8, 99, 0, 22), ("recv", 28, 4, 99, 1, 22), ("recv", 32, 4, 99, 2, 22)]
    assert (comm.traffic.messages, comm.traffic.bytes) == (4, 24)  # 2 peers x 8 bytes, then 2 x 4


def test_nccl_split_makes_a_new_communicator_from_a_new_unique_id():
    log = _Log()
    comm = _nccl(log)
    log.calls.clear()
    sub = comm.split(1, 0)
    assert log.calls[0] == ("mpi.split", 1, 0)
    assert log.calls[1] == ("broadcast", 0)  # rank 0 of the group makes the id, the group's MPI broadcasts it
    assert log.calls[2] == ("use", 5)
    assert log.calls[3] == ("NcclCommunicator", 2, tuple(range(1, 129)), 0)
    assert (sub.rank, sub.size, sub.device) == (0, 2, 5) and sub.traffic is comm.traffic


def test_nccl_collective_times_out_and_aborts():
    log = _Log()
    comm = _nccl(log, arrives=False)
    transfer = comm.alltoallv(_GpuBuffer(3, 1), [1, 1, 1], [0, 1, 2], _GpuBuffer(3, 2), [1, 1, 1], [0, 1, 2])
    with pytest.raises(RingTimeoutError, match=r"rank 1 of 3: NCCL all-to-all \(12 bytes out\) did not complete"):
        comm.wait(transfer)
    assert log.calls[-2:] == [("abort",), ("mark_failed",)]


class _StagedArray:
    """A device array stand-in: what MPIComm's host staging touches (shape, dtype, flags, ``set``, ``ndim``)."""

    def __init__(self, x):
        self.host = np.ascontiguousarray(x)
        self.shape, self.dtype, self.flags, self.ndim = self.host.shape, self.host.dtype, self.host.flags, x.ndim
        self.size = self.host.size

    def set(self, values):
        self.host[...] = values


def test_mpi_host_staging_carries_the_collectives_through_host_buffers(monkeypatch):
    mpi = pytest.importorskip("mpi4py.MPI")
    fake = types.ModuleType("cupy")
    fake.asnumpy = lambda x: x.host.copy()
    fake.ndarray = _StagedArray
    monkeypatch.setitem(__import__("sys").modules, "cupy", fake)
    comm = MPIComm(mpi.COMM_SELF, timeout=5, host_staging=True)
    send, recv = _StagedArray(np.arange(5, dtype=np.float32)), _StagedArray(np.zeros(3, np.float32))
    transfer = comm.alltoallv(send, [3], [2], recv, [3], [0])
    assert recv.host.tolist() == [0, 0, 0]  # nothing reaches the device array before the wait
    comm.wait(transfer)
    assert recv.host.tolist() == [2, 3, 4]
    gathered = _StagedArray(np.zeros(2, np.float32))
    comm.wait(comm.allgatherv(_StagedArray(np.array([7.0, 8.0], np.float32)), gathered, [2]))
    assert gathered.host.tolist() == [7, 8]

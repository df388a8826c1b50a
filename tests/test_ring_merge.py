"""Ring attention pieces that need no MPI: shard/unshard and the block schedule (the merge: test_merge.py)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import npsparseattn as nsa
from npsparseattn import ring
from npsparseattn.reference import visibility_mask

# ---------------------------------------------------------------- shard / unshard


def test_zigzag_gives_rank_r_chunks_r_and_2p_minus_1_minus_r():
    x = np.arange(16)[:, None]
    held = [nsa.shard(x, r, 4)[:, 0].tolist() for r in range(4)]
    assert held == [[0, 1, 14, 15], [2, 3, 12, 13], [4, 5, 10, 11], [6, 7, 8, 9]]
    assert nsa.shard(x, 1, 4, "contiguous")[:, 0].tolist() == [4, 5, 6, 7]


@pytest.mark.parametrize("sharding", ["zigzag", "contiguous"])
@pytest.mark.parametrize("world", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("length", [0, 1, 3, 7, 10, 29])
def test_shard_unshard_round_trip(rng, sharding, world, length):
    x = rng.standard_normal((2, 3, length, 4))
    shards = [nsa.shard(x, r, world, sharding) for r in range(world)]
    assert [s.shape[2] for s in shards] == ring.shard_lengths(length, world, sharding)
    assert max(s.shape[2] for s in shards) - min(s.shape[2] for s in shards) <= 2
    assert np.array_equal(nsa.unshard(shards, sharding), x)
    lse = x[..., 0]
    lse_shards = [nsa.shard(lse, r, world, sharding, axis=-1) for r in range(world)]
    assert np.array_equal(nsa.unshard(lse_shards, sharding, axis=-1), lse)


def test_shard_returns_a_copy(rng):
    x = rng.standard_normal((5, 2))
    part = nsa.shard(x, 0, 1, "contiguous")
    part[0, 0] = 123.0
    assert x[0, 0] != 123.0


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "message"),
    [
        ((0, 0), {}, ValueError, r"world must be >= 1, got 0"),
        ((2, 2), {}, ValueError, r"rank must be in \[0, 2\), got 2"),
        ((0.0, 2), {}, TypeError, r"rank must be an int, got 0.0"),
        ((0, 2, "ring"), {}, ValueError, r"sharding must be 'zigzag', 'contiguous' or 'per_document', got 'ring'"),
        ((0, 2), {"axis": 2}, ValueError, r"axis 2 is out of range for an array with 2 axes"),
        ((0, 2), {"axis": "L"}, TypeError, r"axis must be an int, got 'L'"),
    ],
)
def test_shard_errors(args, kwargs, error, message):
    with pytest.raises(error, match=message):
        nsa.shard(np.zeros((8, 2)), *args, **kwargs)


def test_shard_rejects_non_arrays():
    with pytest.raises(TypeError, match=r"x must be a NumPy or CuPy array, got builtins.list"):
        nsa.shard([[1.0]], 0, 1)


def test_unshard_errors(rng):
    x = rng.standard_normal((11, 2))
    shards = [nsa.shard(x, r, 3) for r in range(3)]
    with pytest.raises(ValueError, match=r"shard lengths \[4, 4, 3\] along axis -2 do not match sharding 'zigzag' "):
        nsa.unshard(shards[::-1])
    with pytest.raises(ValueError, match=r"unshard needs the shards of at least one rank"):
        nsa.unshard([])


# ---------------------------------------------------------------- schedule


def _coverage(q_pieces, k_pieces, calls):
    """How many calls count each (local query, local key) pair as visible."""
    q_pos = np.concatenate([np.arange(a, b) for a, b in q_pieces] or [np.zeros(0, int)])
    k_pos = np.concatenate([np.arange(a, b) for a, b in k_pieces] or [np.zeros(0, int)])
    count = np.zeros((q_pos.size, k_pos.size), int)
    for c in calls:
        m, n = c.q.stop - c.q.start, c.k.stop - c.k.start
        count[c.q, c.k] += visibility_mask(m, n, offset=c.offset, left=c.left, right=c.right)
    return q_pos, k_pos, count


WINDOWS = [(None, None), (None, 0), (3, 0), (5, 2), (0, 0), (2, None)]


@pytest.mark.parametrize("sharding", ["zigzag", "contiguous"])
@pytest.mark.parametrize(("left", "right"), WINDOWS)
@pytest.mark.parametrize(("length", "world"), [(13, 2), (24, 3), (9, 4), (3, 2), (31, 5)])
def test_block_calls_cover_exactly_the_visible_pairs(sharding, left, right, length, world):
    """Every (query, key) pair of every step: computed once if the global mask shows it, never otherwise."""
    for r, s in itertools.product(range(world), range(world)):
        qp = ring.shard_pieces(length, world, r, sharding)
        kp = ring.shard_pieces(length, world, s, sharding)
        calls = ring.block_calls(qp, kp, left, right)
        q_pos, k_pos, count = _coverage(qp, kp, calls)
        visible = np.ones(count.shape, dtype=bool)
        if left is not None:
            visible &= k_pos[None, :] >= q_pos[:, None] - left
        if right is not None:
            visible &= k_pos[None, :] <= q_pos[:, None] + right
        assert np.array_equal(count, visible.astype(int)), (r, s, calls)


def test_unmasked_steps_are_one_call_and_empty_pairs_are_skipped():
    qp = ring.shard_pieces(16, 2, 0)  # chunks 0 and 3: [0, 4) and [12, 16)
    kp = ring.shard_pieces(16, 2, 1)  # chunks 1 and 2: [4, 8) and [8, 12)
    assert ring.block_calls(qp, kp, None, None) == [ring.BlockCall(slice(0, 8), slice(0, 8), 0, None, None)]
    # causal: chunk 0 sees nothing of rank 1, chunk 3 sees all of it, unmasked
    assert ring.block_calls(qp, kp, None, 0) == [ring.BlockCall(slice(4, 8), slice(0, 8), 0, None, None)]
    # diagonal step: chunk 0 x chunk 0 masked, chunk 3 x chunk 0 full, chunk 3 x chunk 3 masked
    assert ring.block_calls(qp, qp, None, 0) == [
        ring.BlockCall(slice(0, 4), slice(0, 4), 0, None, 0),
        ring.BlockCall(slice(4, 8), slice(0, 4), 0, None, None),
        ring.BlockCall(slice(4, 8), slice(4, 8), 0, None, 0),
    ]


def _causal_work(length, world, sharding):
    """Visible (query, key) pairs per rank per step under a causal mask."""
    work = np.zeros((world, world), int)
    for r, step in itertools.product(range(world), range(world)):
        qp = ring.shard_pieces(length, world, r, sharding)
        kp = ring.shard_pieces(length, world, (r - step) % world, sharding)
        work[r, step] = _coverage(qp, kp, ring.block_calls(qp, kp, None, 0))[2].sum()
    return work


@pytest.mark.parametrize("world", [2, 3, 4, 8])
def test_zigzag_balances_causal_work_at_every_step(world):
    length = 2 * world * 64
    zig = _causal_work(length, world, "zigzag")
    contiguous = _causal_work(length, world, "contiguous")
    assert zig.sum() == contiguous.sum() == length * (length + 1) // 2
    step_imbalance = zig.max(axis=0) / zig.min(axis=0)
    assert step_imbalance.max() < 1.05, zig  # only the diagonal halves differ, by the chunk's diagonal
    assert zig.sum(axis=1).max() / zig.sum(axis=1).min() < 1.01
    totals = contiguous.sum(axis=1)
    assert totals.max() / totals.min() > world  # contiguous: the last rank does ~2P-1 times the first's work

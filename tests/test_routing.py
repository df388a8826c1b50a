"""Routers against straightforward NumPy (loops, sorting) and torch autograd implementations."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import random_array, rel_err

import npsparseattn as nsa
from npsparseattn.routing import (
    compressed_attention,
    compressed_attention_backward,
    compressed_keys,
    indexer_kl_target,
    lightning_indexer,
    lightning_indexer_backward,
    select_topk_blocks,
)

# ----------------------------------------------------------------------------- select_topk_blocks


def topk_by_hand(q, k, q_block, kv_block, topk, score, force, causal):
    """Loops over (batch, key head, query block): pooled query, every key block scored, Python sorting."""
    n_batch, hq, lq, _ = q.shape
    hk, lk = k.shape[1], k.shape[2]
    group = hq // hk
    nqb, nkb = -(-lq // q_block), -(-lk // kv_block)
    lists = np.zeros((n_batch, hk, nqb, nkb), bool)
    for b in range(n_batch):
        for h in range(hk):
            for r in range(nqb):
                rows = slice(r * q_block, (r + 1) * q_block)
                query = np.mean([q[b, g, rows].mean(axis=0) for g in range(h * group, (h + 1) * group)], axis=0)
                first, last = r * q_block + lk - lq, min(r * q_block + q_block, lq) - 1 + lk - lq
                local = set(range(max(first, 0) // kv_block, min(last, lk - 1) // kv_block + 1))
                local = local if max(first, 0) <= min(last, lk - 1) else set()
                forced = (local if "local" in force else set()) | ({0} if "sink" in force else set())
                cands = []
                for c in range(nkb):
                    if causal and c * kv_block > last:
                        continue
                    keys = k[b, h, c * kv_block : (c + 1) * kv_block]
                    s = query @ keys.mean(axis=0) if score == "mean" else max(query @ key for key in keys)
                    cands.append((0 if c in forced else 1, -s, c))
                n_forced = sum(1 for f, _, _ in cands if f == 0)
                for _, _, c in sorted(cands)[: max(topk, n_forced)]:
                    lists[b, h, r, c] = True
    return lists


@pytest.mark.parametrize("score", ["mean", "max"])
@pytest.mark.parametrize("force", [(), ("sink",), ("sink", "local")])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(("lq", "lk", "q_block", "kv_block"), [(70, 70, 16, 8), (40, 95, 7, 16), (95, 40, 32, 5)])
def test_select_topk_blocks_matches_hand_routing(rng, score, force, causal, lq, lk, q_block, kv_block):
    q = rng.standard_normal((2, 4, lq, 8))
    k = rng.standard_normal((2, 2, lk, 8))
    kv_idx, kv_cnt = select_topk_blocks(q, k, q_block=q_block, kv_block=kv_block, topk=3, score=score, force=force,
                                        causal=causal)  # fmt: skip
    expected = topk_by_hand(q, k, q_block, kv_block, 3, score, force, causal)
    got = np.zeros_like(expected)
    for index in np.ndindex(kv_cnt.shape):
        row = kv_idx[index]
        assert list(row[: kv_cnt[index]]) == sorted(row[: kv_cnt[index]]) and np.all(row[kv_cnt[index] :] == -1)
        got[index][row[: kv_cnt[index]]] = True
    np.testing.assert_array_equal(got, expected)


def test_select_topk_blocks_feeds_sparse_attention_in_every_rank(rng):
    q, k, v = (rng.standard_normal((3, 2, 64, 8)) for _ in range(3))
    kv_idx, kv_cnt = select_topk_blocks(q, k, q_block=16, kv_block=16, topk=2, causal=True)
    assert kv_idx.shape[:-1] == (3, 2, 4) and kv_cnt.shape == (3, 2, 4)
    out = nsa.sparse_attention(q, k, v, kv_idx, kv_cnt=kv_cnt, q_block=16, kv_block=16, causal=True)
    idx2, cnt2 = select_topk_blocks(q[0, 0], k[0, 0], q_block=16, kv_block=16, topk=2, causal=True)
    assert idx2.shape[:-1] == (4,) and np.array_equal(idx2, kv_idx[0, 0, :, : idx2.shape[-1]])
    out2 = nsa.sparse_attention(q[0, 0], k[0, 0], v[0, 0], idx2, kv_cnt=cnt2, q_block=16, kv_block=16, causal=True)
    np.testing.assert_allclose(out2, out[0, 0], rtol=0, atol=1e-12)


def test_select_topk_blocks_refusals(rng):
    q = rng.standard_normal((2, 32, 8))
    with pytest.raises(ValueError, match="score must be one of"):
        select_topk_blocks(q, q, q_block=8, kv_block=8, topk=1, score="median")
    with pytest.raises(ValueError, match="force entries must be among"):
        select_topk_blocks(q, q, q_block=8, kv_block=8, topk=1, force=("diagonal",))
    with pytest.raises(TypeError, match="force must be a sequence"):
        select_topk_blocks(q, q, q_block=8, kv_block=8, topk=1, force="sink")
    with pytest.raises(ValueError, match=r"query heads \(2\) must be a multiple of key heads \(3\)"):
        select_topk_blocks(q, rng.standard_normal((3, 32, 8)), q_block=8, kv_block=8, topk=1)
    with pytest.raises(TypeError, match="routes NumPy arrays"):
        select_topk_blocks(q.tolist(), q, q_block=8, kv_block=8, topk=1)
    with pytest.raises(ValueError, match="topk must be >= 1"):
        select_topk_blocks(q, q, q_block=8, kv_block=8, topk=0)


# ----------------------------------------------------------------------------- lightning indexer


def index_scores_by_hand(q_idx, k_idx, w):
    """I[t, s] = sum_j w[t, j] * max(q[j, t] . k[s], 0), with loops over heads."""
    heads, lq, _ = q_idx.shape
    scores = np.zeros((lq, k_idx.shape[0]))
    for j in range(heads):
        scores += w[j][:, None] * np.maximum(q_idx[j] @ k_idx.T, 0)
    return scores


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(("lq", "lk", "topk"), [(30, 30, 7), (12, 40, 5), (25, 6, 9)])
def test_lightning_indexer_matches_sorting(rng, causal, lq, lk, topk):
    q_idx, k_idx, w = rng.standard_normal((3, lq, 8)), rng.standard_normal((lk, 8)), rng.random((3, lq))
    k_idx[5 % lk] = k_idx[3 % lk]  # exact ties: the lower key wins
    kv_idx, scores = lightning_indexer(q_idx, k_idx, w, topk=topk, causal=causal)
    full = index_scores_by_hand(q_idx, k_idx, w)
    assert kv_idx.shape == scores.shape == (1, lq, min(topk, lk))
    for t in range(lq):
        keys = [s for s in range(lk) if not causal or s <= t + lk - lq]
        best = sorted(sorted(keys, key=lambda s: (-full[t, s], s))[:topk])
        row = kv_idx[0, t]
        assert row[: len(best)].tolist() == best and np.all(row[len(best) :] == -1)
        np.testing.assert_allclose(scores[0, t, : len(best)], full[t, best], rtol=1e-12)
        assert np.all(np.isneginf(scores[0, t, len(best) :]))


def test_lightning_indexer_batched_and_float32(rng):
    q_idx, k_idx, w = rng.standard_normal((2, 4, 20, 8)), rng.standard_normal((2, 20, 8)), rng.random((2, 4, 20))
    kv_idx, scores = lightning_indexer(q_idx.astype(np.float32), k_idx.astype(np.float32), w.astype(np.float32),
                                       topk=4, causal=True)  # fmt: skip
    assert kv_idx.shape == (2, 1, 20, 4) and kv_idx.dtype == np.int32 and scores.dtype == np.float32
    for b in range(2):
        one, _ = lightning_indexer(q_idx[b], k_idx[b], w[b], topk=4, causal=True)
        assert np.array_equal(one, kv_idx[b])


def test_lightning_indexer_backward_matches_torch_autograd(rng):
    torch = pytest.importorskip("torch")
    q_idx, k_idx, w = rng.standard_normal((2, 3, 16, 8)), rng.standard_normal((2, 24, 8)), rng.random((2, 3, 16))
    kv_idx, scores = lightning_indexer(q_idx, k_idx, w, topk=6, causal=True)
    dscores = random_array(rng, scores.shape)
    grads = lightning_indexer_backward(dscores, q_idx, k_idx, w, kv_idx)
    tq, tk, tw = (torch.tensor(x, requires_grad=True) for x in (q_idx, k_idx, w))
    full = torch.einsum("bht,bhts->bts", tw, torch.relu(tq @ tk.transpose(-1, -2)[:, None]))
    idx = torch.tensor(np.maximum(kv_idx[:, 0], 0), dtype=torch.int64)
    picked = torch.gather(full, 2, idx)
    (picked * torch.tensor(np.where(kv_idx[:, 0] >= 0, dscores[:, 0], 0))).sum().backward()
    for g, t in zip(grads, (tq, tk, tw)):
        assert g.shape == tuple(t.shape)
        assert rel_err(g, t.grad.numpy(), floor=1.0) < 1e-12


def test_lightning_indexer_refusals(rng):
    q_idx, k_idx, w = rng.standard_normal((3, 10, 8)), rng.standard_normal((10, 8)), rng.random((3, 10))
    with pytest.raises(ValueError, match="k_idx must be"):
        lightning_indexer(q_idx, k_idx[:, :4], w, topk=2)
    with pytest.raises(ValueError, match="weights must have shape"):
        lightning_indexer(q_idx, k_idx, w[:2], topk=2)
    with pytest.raises(TypeError, match="must be a NumPy array"):
        lightning_indexer(q_idx.tolist(), k_idx, w, topk=2)
    kv_idx, scores = lightning_indexer(q_idx, k_idx, w, topk=2)
    with pytest.raises(ValueError, match="dscores must have the shape"):
        lightning_indexer_backward(scores[:, :3], q_idx, k_idx, w, kv_idx)
    with pytest.raises(ValueError, match=r"kv_idx entries must be -1 or keys in \[0, 10\)"):
        lightning_indexer_backward(scores, q_idx, k_idx, w, kv_idx + 9)


# ----------------------------------------------------------------------------- indexer KL target


@pytest.mark.parametrize(("hq", "hk"), [(4, 1), (4, 2)])
def test_indexer_kl_target_is_the_head_summed_attention_over_the_slots(rng, hq, hk):
    q, k, v = rng.standard_normal((hq, 20, 8)), rng.standard_normal((hk, 26, 8)), rng.standard_normal((hk, 26, 8))
    kv_idx = np.argsort(rng.random((hk, 20, 26)), axis=-1)[..., :7].astype(np.int32)
    kv_idx[:, 3, 2] = -1
    _, lse = nsa.sparse_attention(q, k, v, kv_idx, q_block=1, kv_block=1, causal=True, return_lse=True)
    target = indexer_kl_target(q, k, kv_idx, lse, causal=True)
    assert target.shape == kv_idx.shape
    group = hq // hk
    for h in range(hk):
        for t in range(20):
            weights = np.zeros(7)
            for g in range(h * group, (h + 1) * group):
                for m, s in enumerate(kv_idx[h, t]):
                    if s >= 0 and s <= t + 6:
                        weights[m] += np.exp(q[g, t] @ k[h, s] / np.sqrt(8) - lse[g, t])
            expected = weights / weights.sum() if weights.sum() > 0 else weights
            np.testing.assert_allclose(target[h, t], expected, rtol=1e-6, atol=1e-12)


# ----------------------------------------------------------------------------- NSA compression branch


def compressed_by_hand(q, k, v, block, stride, causal):
    """Pooled keys by loops, then dense masked softmax attention (float64); (out, lse)."""
    lq, lk = q.shape[-2], k.shape[-2]
    n = (lk - block) // stride + 1 if lk >= block else 0
    kc = np.stack([k[..., i * stride : i * stride + block, :].mean(axis=-2) for i in range(n)], axis=-2)
    vc = np.stack([v[..., i * stride : i * stride + block, :].mean(axis=-2) for i in range(n)], axis=-2)
    group = q.shape[-3] // k.shape[-3]
    kc, vc = kc.repeat(group, axis=-3), vc.repeat(group, axis=-3)
    s = q @ kc.swapaxes(-1, -2) / np.sqrt(q.shape[-1])
    if causal:
        ends = np.arange(n) * stride + block - 1
        s = np.where(ends[None, :] <= np.arange(lq)[:, None] + lk - lq, s, -np.inf)
    top = np.max(s, axis=-1, keepdims=True, initial=-np.inf)
    top = np.where(np.isfinite(top), top, 0)
    e = np.exp(s - top)
    total = e.sum(axis=-1, keepdims=True)
    out = np.where(total > 0, (e @ vc) / np.where(total > 0, total, 1), 0)
    return out, np.where(total[..., 0] > 0, top[..., 0] + np.log(np.where(total > 0, total, 1)[..., 0]), -np.inf)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(
    ("lq", "lk", "block", "stride"), [(64, 64, 16, 8), (50, 71, 8, 8), (40, 40, 5, 1), (9, 30, 4, 3)]
)
def test_compressed_attention_matches_dense_pooling(rng, causal, lq, lk, block, stride):
    q = rng.standard_normal((1, 4, lq, 8))
    k, v = rng.standard_normal((2, 1, 2, lk, 8))
    out, lse = compressed_attention(q, k, v, kv_block=block, stride=stride, causal=causal, return_lse=True)
    ref_out, ref_lse = compressed_by_hand(q, k, v, block, stride, causal)
    assert rel_err(out, ref_out) < 1e-10
    assert np.array_equal(np.isneginf(lse), np.isneginf(ref_lse))
    np.testing.assert_allclose(lse[np.isfinite(lse)], ref_lse[np.isfinite(ref_lse)], atol=1e-10)


@pytest.mark.parametrize(("block", "stride"), [(16, 8), (6, 6), (5, 1)])
def test_compressed_attention_backward_matches_torch_autograd(rng, block, stride):
    torch = pytest.importorskip("torch")
    q, k, v = rng.standard_normal((3, 2, 45, 8))
    out, lse = compressed_attention(q, k, v, kv_block=block, stride=stride, causal=True, return_lse=True)
    dout = random_array(rng, out.shape)
    grads = compressed_attention_backward(dout, q, k, v, out, lse, kv_block=block, stride=stride, causal=True)
    tq, tk, tv = (torch.tensor(x, requires_grad=True) for x in (q, k, v))
    n = (45 - block) // stride + 1
    kc = torch.stack([tk[:, i * stride : i * stride + block].mean(1) for i in range(n)], 1)
    vc = torch.stack([tv[:, i * stride : i * stride + block].mean(1) for i in range(n)], 1)
    visible = torch.tensor(np.arange(n)[None, :] * stride + block - 1 <= np.arange(45)[:, None])
    p = torch.softmax((tq @ kc.transpose(1, 2) / np.sqrt(8)).masked_fill(~visible, -torch.inf), -1).nan_to_num(0.0)
    (p @ vc).backward(torch.tensor(dout))
    for g, t in zip(grads, (tq, tk, tv)):
        assert rel_err(g, t.grad.numpy(), floor=1.0) < 1e-10


def test_compressed_keys_overlapping_and_too_short():
    x = np.arange(10.0).reshape(10, 1)
    assert compressed_keys(x, kv_block=4, stride=3)[:, 0].tolist() == [1.5, 4.5, 7.5]
    assert compressed_keys(x, kv_block=11).shape == (0, 1)

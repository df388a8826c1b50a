"""KV-cache attention (contiguous and paged caches, new tokens written in place) against float64 attention."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import AutoCase, FakeCupyArray, random_array, rel_err

import npsparseattn as nsa
from npsparseattn import reference
from npsparseattn.cpu import kvcache as cpu_kvcache
from npsparseattn.problems import kvcache_problem, lse_dtype
from npsparseattn.reference.kvcache import gather

MASKS = [
    pytest.param(dict(), id="causal"),
    pytest.param(dict(causal=False), id="full"),
    pytest.param(dict(window=(37, None)), id="sliding-window"),
    pytest.param(dict(causal=False, window=(5, 2)), id="window"),
]


class Cache:
    """A contiguous or paged cache filled with random values everywhere (valid slots or not)."""

    def __init__(self, rng, *, batch, hk, d, dv, capacity, page_size=None, dtype=np.float64, spare_pages=3):
        self.page_size = page_size
        if page_size is None:
            self.k = random_array(rng, (batch, hk, capacity, d), dtype)
            self.v = random_array(rng, (batch, hk, capacity, dv), dtype)
            self.block_table = None
        else:
            per_seq = -(-capacity // page_size)
            n_pages = batch * per_seq + spare_pages  # pages no sequence owns stay untouched too
            self.k = random_array(rng, (n_pages, hk, page_size, d), dtype)
            self.v = random_array(rng, (n_pages, hk, page_size, dv), dtype)
            self.block_table = rng.permutation(n_pages)[: batch * per_seq].reshape(batch, per_seq).astype(np.int32)

    def keys(self, b, n):
        """The first ``n`` keys and values of sequence ``b``: (Hk, n, D), (Hk, n, Dv)."""
        if self.block_table is None:
            return self.k[b, :, :n], self.v[b, :, :n]
        return (gather(x, self.block_table[b], n, np) for x in (self.k, self.v))

    def kwargs(self):
        return {} if self.block_table is None else {"block_table": self.block_table}


def concatenated_reference(q, cache, lengths, k_new, v_new, kw):
    """float64 (out, lse): per sequence, attention over the cached keys followed by the new ones."""
    outs, lses = [], []
    for b in range(q.shape[0]):
        k, v = cache.keys(b, int(lengths[b]))
        if k_new is not None:
            k, v = np.concatenate([k, k_new[b]], axis=1), np.concatenate([v, v_new[b]], axis=1)
        out, lse = reference.attention(q[b], k, v, **{"causal": True, **kw})
        outs.append(out)
        lses.append(lse)
    return np.stack(outs), np.stack(lses)


def check_kvcache(be, rng, *, batch=3, hq=8, hk=2, lq=1, d=16, dv=12, capacity=700, lengths, n_new=0,
                  page_size=None, kw=(), dtype=np.float64):  # fmt: skip
    kw = dict(kw)
    cache = Cache(rng, batch=batch, hk=hk, d=d, dv=dv, capacity=capacity, page_size=page_size, dtype=dtype)
    q = random_array(rng, (batch, hq, lq, d), dtype)
    lengths = np.asarray(lengths, dtype=np.int32)
    k_new = v_new = None
    if n_new:
        k_new = random_array(rng, (batch, hk, n_new, d), dtype)
        v_new = random_array(rng, (batch, hk, n_new, dv), dtype)
    ref_out, ref_lse = concatenated_reference(q, cache, lengths, k_new, v_new, kw)
    before_k, before_v = cache.k.copy(), cache.v.copy()
    be.require(kvcache_problem(q, cache.k, cache.v, cache_seqlens=lengths, k_new=k_new, v_new=v_new, **cache.kwargs()))
    out, lse = nsa.attention_with_kvcache(
        q, cache.k, cache.v, cache_seqlens=lengths, k_new=k_new, v_new=v_new, return_lse=True, backend=be.name,
        **cache.kwargs(), **kw,
    )  # fmt: skip
    tol = be.tolerance(dtype)
    assert out.shape == (batch, hq, lq, dv) and out.dtype == q.dtype and lse.dtype == lse_dtype(dtype)
    assert rel_err(out, ref_out) < tol
    empty = ~np.isfinite(ref_lse)
    assert np.array_equal(np.isneginf(lse), empty) and np.all(out[empty] == 0)
    np.testing.assert_allclose(lse[~empty], ref_lse[~empty], rtol=0, atol=50 * tol)
    check_written_slots(cache, before_k, before_v, lengths, k_new, v_new)
    return out


def check_written_slots(cache, before_k, before_v, lengths, k_new, v_new):
    """New tokens sit at [cache_seqlens, cache_seqlens + Lnew); every other slot of the cache is untouched."""
    written = np.zeros(cache.k.shape[0:1] + cache.k.shape[2:3], dtype=bool)  # (rows or pages, slots)
    n_new = 0 if k_new is None else k_new.shape[2]
    for b, start in enumerate(lengths):
        for t in range(n_new):
            pos = int(start) + t
            if cache.block_table is None:
                row, slot = b, pos
            else:
                row, slot = cache.block_table[b, pos // cache.page_size], pos % cache.page_size
            written[row, slot] = True
            np.testing.assert_array_equal(cache.k[row, :, slot], k_new[b, :, t])
            np.testing.assert_array_equal(cache.v[row, :, slot], v_new[b, :, t])
    untouched = ~written
    for now, before in ((cache.k, before_k), (cache.v, before_v)):
        np.testing.assert_array_equal(now.transpose(0, 2, 1, 3)[untouched], before.transpose(0, 2, 1, 3)[untouched])


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("page_size", [None, 64, 16], ids=["contiguous", "paged64", "paged16"])
@pytest.mark.parametrize("n_new", [0, 1, 3], ids=["no-new", "new1", "new3"])
def test_equals_attention_on_the_concatenated_keys(rng, kvcache_backend, dtype, mask, page_size, n_new):
    check_kvcache(kvcache_backend, rng, lengths=[0, 611, 77], n_new=n_new, page_size=page_size, kw=mask, dtype=dtype)


@pytest.mark.parametrize("page_size", [None, 32], ids=["contiguous", "paged32"])
@pytest.mark.parametrize(
    ("hq", "hk", "lq"),
    [(8, 2, 5), (8, 2, 40), (3, 1, 130), (2, 2, 1)],
    ids=["gqa-lq5", "gqa-unfolded", "mqa-query-tiles", "mha-decode"],
)
def test_query_blocks_gqa_and_mqa(rng, page_size, hq, hk, lq):
    """Folded GQA groups (G * Lq <= FOLD_ROWS), per-head query tiles beyond it, queries longer than the cache."""
    check_kvcache(
        AutoCase("attention_with_kvcache"), rng, hq=hq, hk=hk, lq=lq, lengths=[3, 300, 129], n_new=2,
        page_size=page_size,
    )  # fmt: skip


@pytest.mark.parametrize("page_size", [None, 256], ids=["contiguous", "paged256"])
def test_long_cache_split_across_threads_and_merged(rng, page_size):
    """One sequence, one key head: flash-decoding splits the keys into chunks and merges them."""
    lengths = np.array([5000])
    _, tasks, first, _ = cpu_kvcache.plan(lengths + 1, 1, 4, 1, 1, 1 << 40, 0, 2)
    assert tasks.shape[0] > 1 and first.tolist() == [0, tasks.shape[0]]
    check_kvcache(
        AutoCase("attention_with_kvcache"), rng, batch=1, hq=4, hk=1, capacity=5200, lengths=lengths, n_new=1,
        page_size=page_size, kw=dict(window=(4321, None)), dtype=np.float32,
    )  # fmt: skip


def test_plan_covers_every_visible_key_once():
    lengths = np.array([0, 5000, 1, 3000])
    tiles, tasks, first, costs = cpu_kvcache.plan(lengths, 4, 8, 2, 3, 2000, 0, 4)
    assert tiles.shape == (8, 5) and np.all(tiles[:, 2] == 4)  # folded GQA groups of 4 heads x 3 queries
    for t, (b, _, _, i0, _) in enumerate(tiles):
        chunks = tasks[first[t] : first[t + 1]]
        assert np.all(chunks[:, 0] == t) and np.all(chunks[1:, 1] == chunks[:-1, 2])
        n = lengths[b]
        assert chunks[0, 1] == max(0, i0 + n - 3 - 2000) and chunks[-1, 2] == n
    assert np.all(costs > 0)
    tiles, tasks, first, _ = cpu_kvcache.plan(lengths, 4, 8, 2, 3, 2000, 0, 4, all_heads=True)
    assert tiles.tolist() == [[b, 0, 8, 0, 3] for b in range(4)]  # small pages: every head of a sequence
    assert tasks[first[1] : first[2], 2][-1] == 5000 and tasks.shape[0] > 4


def test_cache_seqlens_as_an_int_and_empty_caches(rng):
    q = random_array(rng, (2, 4, 1, 8))
    k_cache, v_cache = random_array(rng, (2, 2, 2, 10, 8))
    out, lse = nsa.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=0, return_lse=True)
    assert not out.any() and np.isneginf(lse).all()
    out = nsa.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=10)
    ref = nsa.reference.attention(q, k_cache, v_cache, causal=True)[0]
    assert rel_err(out, ref) < 1e-12


def test_flash_attn_token_major_cache_is_written_in_place(rng):
    """A (B, Lmax, Hk, D) cache viewed heads first: new tokens land in the caller's storage, read without a copy."""
    storage_k = random_array(rng, (2, 50, 2, 8), np.float32)
    storage_v = random_array(rng, (2, 50, 2, 8), np.float32)
    k_cache, v_cache = storage_k.transpose(0, 2, 1, 3), storage_v.transpose(0, 2, 1, 3)
    q = random_array(rng, (2, 4, 2, 8), np.float32)
    k_new, v_new = random_array(rng, (2, 2, 2, 2, 8), np.float32)
    lengths = np.array([7, 30], np.int32)
    out = nsa.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=lengths, k_new=k_new, v_new=v_new)
    np.testing.assert_array_equal(storage_k[1, 30:32], k_new[1].transpose(1, 0, 2))
    ref = [nsa.reference.attention(q[b], k_cache[b, :, : n + 2], v_cache[b, :, : n + 2], causal=True)[0]
           for b, n in enumerate(lengths)]  # fmt: skip
    assert rel_err(out, np.stack(ref)) < 1e-5


def test_kernel_writes_every_output_element(rng, kvcache_backend):
    be = kvcache_backend
    cache = Cache(rng, batch=2, hk=2, d=8, dv=6, capacity=3000, page_size=128, dtype=np.float32)
    q = random_array(rng, (2, 4, 3, 8), np.float32)
    lengths = np.array([2900, 0], np.int32)
    be.require(kvcache_problem(q, cache.k, cache.v, cache_seqlens=lengths, block_table=cache.block_table))
    out, lse = np.full((2, 4, 3, 6), np.nan, np.float32), np.full((2, 4, 3), np.nan, np.float32)
    be.impl.module.forward(q, cache.k, cache.v, lengths, cache.block_table, scale=0.3, left=None, right=0,
                           out=out, lse=lse)  # fmt: skip
    assert not np.isnan(out).any() and not np.isnan(lse).any()


def test_overflow_is_refused_before_anything_is_written(rng):
    for page_size in (None, 8):
        cache = Cache(rng, batch=3, hk=1, d=4, dv=4, capacity=16, page_size=page_size)
        q = random_array(rng, (3, 2, 1, 4))
        k_new, v_new = random_array(rng, (2, 3, 1, 2, 4))
        before = cache.k.copy(), cache.v.copy()
        with pytest.raises(ValueError, match=r"holds 16 keys per sequence but sequence 2 needs cache_seqlens\[2\] "
                                             r"\+ Lnew = 15 \+ 2 = 17; nothing was written"):  # fmt: skip
            nsa.attention_with_kvcache(q, cache.k, cache.v, cache_seqlens=np.array([0, 14, 15]), k_new=k_new,
                                       v_new=v_new, **cache.kwargs())  # fmt: skip
        assert np.array_equal(cache.k, before[0]) and np.array_equal(cache.v, before[1])


def test_argument_errors(rng, fake_cupy):
    q = random_array(rng, (2, 4, 1, 8))
    k_cache, v_cache = random_array(rng, (2, 2, 2, 16, 8))
    k_new, v_new = random_array(rng, (2, 2, 2, 1, 8))
    lengths = np.array([3, 4], np.int32)
    table = np.array([[0], [1]], np.int32)
    cases = [
        (dict(k_new=k_new), ValueError, r"pass k_new and v_new together \(or neither\)"),
        (dict(k_new=k_new, v_new=v_new[:, :, :, :4]), ValueError, r"v_new must have shape \(B, Hk, Lnew, Dv\)"),
        (dict(cache_seqlens=np.array([3])), ValueError, r"cache_seqlens must have shape \(2,\)"),
        (dict(cache_seqlens=np.array([3, -1])), ValueError, r"cache_seqlens must be >= 0, got cache_seqlens\[1\]"),
        (dict(cache_seqlens=np.array([3.0, 1.0])), TypeError, r"cache_seqlens must be an integer array"),
        (dict(block_table=np.array([[0], [5]])), ValueError, r"block_table\[1, 0\] = 5 is not a page of the cache"),
        (dict(block_table=np.array([0, 1])), ValueError, r"block_table must have shape \(2, max_pages\)"),
        (dict(block_table=FakeCupyArray(table)), TypeError, r"block_table is a CuPy array but q is a NumPy array"),
        (dict(q=q[0]), ValueError, r"q must have 4 axes \(B, Hq, Lq, D\), got shape \(4, 1, 8\)"),
        (dict(k_cache=k_cache[:1], v_cache=v_cache[:1]), ValueError, r"a contiguous cache must have one row per "),
        (dict(v_cache=v_cache.astype(np.float32)), TypeError, r"q has dtype float64 but v_cache has dtype float32"),
        (dict(k_cache=FakeCupyArray(k_cache)), TypeError, r"q is a NumPy array but k_cache is a CuPy array"),
        (dict(causal=1), TypeError, r"causal must be True or False, got 1"),
    ]
    for change, error, message in cases:
        kw = {**dict(q=q, k_cache=k_cache, v_cache=v_cache, cache_seqlens=lengths), **change}
        with pytest.raises(error, match=message):
            nsa.attention_with_kvcache(kw.pop("q"), kw.pop("k_cache"), kw.pop("v_cache"), **kw)


def test_read_only_and_shared_slots_are_refused_before_writing(rng):
    q = random_array(rng, (2, 2, 1, 4))
    k_pages, v_pages = random_array(rng, (2, 3, 1, 4, 4))
    k_new, v_new = random_array(rng, (2, 2, 1, 1, 4))
    shared = np.array([[0, 1], [0, 2]], np.int32)  # both sequences append into page 0
    before = k_pages.copy()
    with pytest.raises(ValueError, match=r"sequence 0 appends into page 0 \(block_table\[0, 0\]\), which sequence 1 "):
        nsa.attention_with_kvcache(q, k_pages, v_pages, cache_seqlens=np.array([2, 2]), k_new=k_new, v_new=v_new,
                                   block_table=shared)  # fmt: skip
    assert np.array_equal(k_pages, before)
    frozen = k_pages.copy()
    frozen.flags.writeable = False
    with pytest.raises(ValueError, match=r"k_cache is read-only \(a JAX array, say\)"):
        nsa.attention_with_kvcache(q, frozen, v_pages, cache_seqlens=np.array([2, 2]), k_new=k_new, v_new=v_new,
                                   block_table=np.array([[0, 1], [2, 1]], np.int32))  # fmt: skip
    # reading a read-only cache is fine
    out = nsa.attention_with_kvcache(q, frozen, v_pages, cache_seqlens=np.array([2, 2]), block_table=shared)
    assert np.isfinite(out).all()


def test_gpu_arrays_are_refused_with_every_backends_reason(rng, fake_cupy):
    q = FakeCupyArray(random_array(rng, (2, 4, 1, 8)))
    k_cache, v_cache = (FakeCupyArray(x) for x in random_array(rng, (2, 2, 2, 16, 8)))
    with pytest.raises(nsa.BackendError) as info:
        nsa.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=np.array([3, 4], np.int32))
    message = str(info.value)
    assert "no backend can run attention_with_kvcache for these inputs" in message
    assert "numba: takes NumPy arrays, got CuPy" in message
    assert "reference: not chosen automatically (pass backend='reference' to use it)" in message


def test_float32_error_stays_small_over_a_long_cache(rng):
    """200000 keys summed in float32: the decoding loops round once per key tile, not once per key.

    Measured: about 7e-7 this way; summing key by key gives about 4e-6.
    """
    k_cache, v_cache = (random_array(rng, (1, 1, 200_000, 16), np.float32) for _ in range(2))
    q = random_array(rng, (1, 4, 1, 16), np.float32)
    out = nsa.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=200_000)
    assert rel_err(out, reference.attention(q, k_cache, v_cache, causal=True)[0]) < 2e-6

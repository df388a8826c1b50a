"""Property-based fuzzing of every public function's arguments.

Shapes (empty axes, GQA, mismatches), dtypes (floats, integers, complex, byte orders), strides
(transposed, reversed, fields of structured arrays), windows, scales, layouts and LSH options are
drawn at random, valid or not.  Exactly two outcomes pass: the result equals the float64 reference,
or the call raises ``TypeError``/``ValueError`` from npsparseattn's own checks, before any kernel ran.
Anything else (another exception, an error raised inside NumPy or numba, a wrong or NaN result) fails.
"""

from __future__ import annotations

import importlib.util
import math
import sys
import traceback
from pathlib import Path

import numpy as np
import pytest
from conftest import SoloComm
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import npsparseattn as nsa
from npsparseattn import layouts, reference
from npsparseattn.reference import lsh_hash
from npsparseattn.reference.kvcache import gather

HAS_TORCH = importlib.util.find_spec("torch") is not None

PACKAGE = Path(nsa.__file__).parent
FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
TOL = {"float64": 1e-9, "float32": 2e-5, "float16": 2e-2, ">f8": 1e-9, "<f4": 2e-5}


def _raised_by_our_checks(err: BaseException) -> bool:
    """The innermost frame that raised is in npsparseattn's validation code, not in NumPy or numba."""
    frames = traceback.extract_tb(err.__traceback__)
    return bool(frames) and Path(frames[-1].filename).resolve().is_relative_to(PACKAGE)


def outcome(call):
    """``("ok", result)`` or ``("refused", error)``; any other exception fails the test."""
    try:
        return "ok", call()
    except (TypeError, ValueError) as err:
        assert _raised_by_our_checks(err), "".join(traceback.format_exception(err))
        return "refused", err


def fuzzed(call, what: str):
    """:func:`outcome` of a call in a fuzz example, counted in hypothesis' statistics (``-p hypothesis``)."""
    kind, result = outcome(call)
    event(f"{what}: {kind}" + (f" ({str(result).split(':')[0][:40]})" if kind == "refused" else ""))
    return kind, result


def mostly(valid, invalid):
    """Draws from ``valid`` four times out of five."""
    return st.one_of(valid, valid, valid, valid, invalid)


@st.composite
def arrays(draw, shape, dtype):
    """A random array of ``shape`` and ``dtype`` in a random memory layout."""
    seed = draw(st.integers(0, 2**32 - 1))
    values = np.random.default_rng(seed).standard_normal(shape)
    x = values.astype(np.dtype(dtype)) if dtype != "bool" else values > 0
    layout = draw(st.sampled_from(["c", "transposed", "reversed", "field", "fortran"]))
    if layout == "transposed" and x.ndim >= 3:
        x = np.ascontiguousarray(np.swapaxes(x, -2, -3)).swapaxes(-2, -3)
    elif layout == "reversed" and x.ndim >= 2:
        x = x[..., ::-1, :]
    elif layout == "field":
        packed = np.zeros(x.shape, dtype=[("pad", "u1"), ("value", x.dtype)])
        packed["value"] = x
        x = packed["value"]
    elif layout == "fortran":
        x = np.asfortranarray(x)
    return x


VALID_DTYPES = ["float64", "float32", "float16", ">f8"]
BAD_DTYPES = ["int32", "complex128", "bool"]


def dtypes(valid: bool):
    return (
        st.sampled_from(VALID_DTYPES) if valid else mostly(st.sampled_from(VALID_DTYPES), st.sampled_from(BAD_DTYPES))
    )


def flags(valid: bool):
    return st.booleans() if valid else mostly(st.booleans(), st.sampled_from([0, 1, "yes", None]))


def windows(valid: bool):
    """Window bounds: small, None, or huge ones that mean unbounded; the invalid add negatives and non-pairs."""
    side = st.one_of(st.none(), st.integers(0, 60), st.sampled_from([sys.maxsize, 10**30]))
    if not valid:
        side = mostly(side, st.sampled_from([-1, 2.5, "3"]))
    pairs = st.one_of(st.none(), st.tuples(side, side), st.lists(side, min_size=2, max_size=2))
    return pairs if valid else mostly(pairs, st.sampled_from([{1, 2}, "full", (1, 2, 3), 5]))


def scales(valid: bool):
    good = st.one_of(st.none(), st.floats(-4, 4))
    return good if valid else mostly(good, st.sampled_from([3e38, math.inf, math.nan, "1", True]))


@st.composite
def qkv(draw, valid: bool, one_sequence: bool = False):
    """q, k, v with shapes that fit (``valid``), or that break a rule some of the time.

    ``one_sequence``: ``Lq == Lk`` (self-attention over one sequence, as ring attention takes).
    """
    lead = draw(st.sampled_from([(), (2,), (1, 2), (0, 2), (2, 1)]))
    hk = draw(st.integers(1, 2)) if lead else 1
    hq = hk * draw(st.integers(1, 3)) if lead else 1
    lq = draw(st.integers(0, 40))
    lk = lq if one_sequence else draw(st.integers(0, 40))
    d, dv = draw(st.integers(1, 12)), draw(st.integers(1, 6))
    batch, heads_q, heads_k = lead[:-1], lead[-1:] and (hq,), lead[-1:] and (hk,)
    q_shape, k_shape, v_shape = (*batch, *heads_q, lq, d), (*batch, *heads_k, lk, d), (*batch, *heads_k, lk, dv)
    breakage = "none" if valid else draw(st.sampled_from(["none", "heads", "d", "dv0", "ndim", "length", "mixed"]))
    if breakage == "heads" and lead:
        q_shape = (*batch, hk * 2 + 1, lq, d)
    elif breakage == "d":
        k_shape = k_shape[:-1] + (d + 1,)
    elif breakage == "dv0":
        v_shape = v_shape[:-1] + (0,)
    elif breakage == "ndim":
        q_shape = (lq, d)
    elif breakage == "length":
        v_shape = v_shape[:-2] + (lk + 1, dv)
    dtype = draw(dtypes(valid))
    other = {"float64": ">f8", ">f8": "float64"}.get(dtype, dtype)  # the other byte order is valid
    k_dtype = draw(st.sampled_from([dtype, other] if breakage != "mixed" else ["float32", "float16"]))
    return draw(arrays(q_shape, dtype)), draw(arrays(k_shape, k_dtype)), draw(arrays(v_shape, dtype))


VALIDITY = pytest.mark.parametrize("valid", [True, False], ids=["valid", "anything"])


def expect(valid: bool, kind: str, result) -> bool:
    """Valid arguments must be computed; returns whether there is a result to compare."""
    if valid:
        assert kind == "ok", f"valid arguments were refused: {result}"
    return kind == "ok"


def _tolerance(*xs) -> float:
    return max(TOL.get(x.dtype.str if x.dtype.str in TOL else x.dtype.name, 1e-9) for x in xs)


def _same(actual, expected, tol, *, floor=0.0) -> None:
    a, e = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert a.shape == e.shape
    assert np.array_equal(np.isnan(a), np.isnan(e)) and np.array_equal(np.isinf(a), np.isinf(e))
    finite = np.isfinite(e)
    if finite.any():
        scale = max(float(np.abs(e[finite]).max()), floor, 1e-300)
        assert float(np.abs(a[finite] - e[finite]).max()) <= tol * scale


@VALIDITY
@FUZZ
@given(data=st.data())
def test_attention_and_backward(valid, data):
    q, k, v = data.draw(qkv(valid), label="q, k, v")
    kw = dict(causal=data.draw(flags(valid)), window=data.draw(windows(valid)), scale=data.draw(scales(valid)))
    return_lse = data.draw(flags(valid), label="return_lse")
    kind, result = fuzzed(lambda: nsa.attention(q, k, v, return_lse=return_lse, **kw), "attention")
    if not expect(valid, kind, result):
        return
    out, lse = result if return_lse else (result, None)
    ref_out, ref_lse = reference.attention(q, k, v, **kw)
    tol = _tolerance(q, k, v)
    _same(out, ref_out, tol)
    assert out.dtype.name == q.dtype.name
    if lse is None:
        return
    _same(lse, ref_lse, 50 * tol, floor=1.0)
    dout = np.ones_like(out)
    grads = nsa.attention_backward(dout, q, k, v, out, lse, **kw)
    for g, r in zip(grads, reference.attention_backward(dout, q, k, v, **kw)):
        _same(g, r, 20 * tol, floor=1.0)


BUILDERS = {
    "dense": lambda seq, b, p: layouts.dense(seq, b),
    "causal": lambda seq, b, p: layouts.causal(seq, b),
    "sliding_window": lambda seq, b, p: layouts.sliding_window(seq, b, p),
    "strided": lambda seq, b, p: layouts.strided(seq, b, p),
    "fixed": lambda seq, b, p: layouts.fixed(seq, b, p),
    "longformer": lambda seq, b, p: layouts.longformer(seq, b, p),
    "bigbird": lambda seq, b, p: layouts.bigbird(seq, b, random_blocks=p, seed=1),
}


def builder_params(valid: bool):
    good = st.one_of(st.integers(1, 5), st.sampled_from([10**30, 2**40]))
    return good if valid else mostly(good, st.sampled_from([0, -3, 2.5, "x", None, (3, sys.maxsize)]))


def blocks(valid: bool):
    good = st.one_of(st.integers(1, 12), st.tuples(st.integers(1, 9), st.integers(1, 9)))
    return good if valid else mostly(good, st.sampled_from([0, -1, "8", (3, 5, 7)]))


@VALIDITY
@FUZZ
@given(data=st.data(), builder=st.sampled_from(sorted(BUILDERS)))
def test_block_sparse_attention_and_layout_builders(valid, data, builder):
    q, k, v = data.draw(qkv(valid), label="q, k, v")
    block, param = data.draw(blocks(valid), label="block"), data.draw(builder_params(valid), label="param")
    seq = (q.shape[-2], k.shape[-2])
    kind, layout = fuzzed(lambda: BUILDERS[builder](seq, block, param), "layout")
    if not expect(valid, kind, layout):
        return
    kw = dict(causal=data.draw(flags(valid), label="causal"), window=data.draw(windows(valid), label="window"))
    call = lambda: nsa.block_sparse_attention(q, k, v, layout, return_lse=True, **kw)  # noqa: E731
    kind, result = fuzzed(call, "block_sparse_attention")
    if not expect(valid, kind, result):
        return
    out, lse = result
    ref_out, _ = reference.block_sparse_attention(q, k, v, layout, **kw)
    tol = _tolerance(q, k, v)
    _same(out, ref_out, tol)
    dout = np.ones_like(out)
    grads = nsa.block_sparse_attention_backward(dout, q, k, v, out, lse, layout, **kw)
    for g, r in zip(grads, reference.block_sparse_attention_backward(dout, q, k, v, layout, **kw)):
        _same(g, r, 20 * tol, floor=1.0)


@VALIDITY
@FUZZ
@given(data=st.data(), n_chunks=st.integers(0, 6), chunk=st.sampled_from([1, 4, 8, 5]), after=st.integers(0, 2))
def test_lsh_attention(valid, data, n_chunks, chunk, after):
    pick = data.draw
    good_buckets = st.sampled_from([2, 4, 8, (2, 4)])
    n_buckets = pick(good_buckets if valid else mostly(good_buckets, st.sampled_from([3, 0, (2, 3), 2**40, "4"])))
    n_hashes = pick(st.integers(1, 3) if valid else mostly(st.integers(1, 3), st.sampled_from([0, 10**12])))
    before = pick(st.integers(0, 3) if valid else mostly(st.integers(0, 3), st.sampled_from([-1, 10**6])))
    length = n_chunks * chunk + (0 if valid else pick(st.sampled_from([0, 0, 1]), label="misfit"))
    d = pick(st.integers(1, 8), label="d")
    dtype = pick(st.sampled_from(["float64", "float32"]) if valid else st.sampled_from(["float64", "int64"]))
    qk, v = pick(arrays((2, length, d), dtype), label="qk"), pick(arrays((2, length, 3), dtype), label="v")
    kw = dict(
        n_buckets=n_buckets, n_hashes=n_hashes, chunk_size=chunk, chunks_before=before, chunks_after=after,
        causal=pick(flags(valid)), exclude_self=pick(st.booleans()), seed=3,
    )  # fmt: skip
    kind, result = fuzzed(lambda: nsa.lsh_attention(qk, v, return_lse=True, **kw), "lsh_attention")
    if not expect(valid and 1 + before + after <= 4 * max(n_chunks * n_hashes, 1), kind, result):
        return
    out, _ = result
    ref_out, _ = reference.lsh_attention(qk, v, **kw)
    _same(out, ref_out, _tolerance(qk, v))


@VALIDITY
@FUZZ
@given(data=st.data(), shape=st.sampled_from([(5, 3), (2, 7, 4), (0, 4), (3, 0, 2), (2, 1, 6, 3)]))
def test_lsh_buckets_and_sort(valid, data, shape):
    good = st.sampled_from([2, 6, (2, 4)])
    n_buckets = data.draw(good if valid else mostly(good, st.sampled_from([5, 0, (2, 3)])), label="n_buckets")
    n_hashes = data.draw(st.integers(1, 3) if valid else st.integers(0, 3), label="n_hashes")
    if not valid:
        shape = data.draw(st.sampled_from([shape, shape, (4,), ()]), label="shape")
    x = data.draw(arrays(shape, data.draw(dtypes(valid), label="dtype")), label="x")
    kind, buckets = fuzzed(lambda: nsa.lsh_buckets(x, n_buckets, n_hashes=n_hashes, seed=0), "lsh_buckets")
    if not expect(valid, kind, buckets):
        return
    rotations = nsa.lsh_rotations(x.shape[-1], n_buckets, n_hashes=n_hashes, seed=0)
    expected = lsh_hash.buckets(
        np.asarray(x, np.float64).reshape((math.prod(x.shape[:-2]),) + x.shape[-2:]),
        rotations,
        nsa.lsh.bucket_factors(n_buckets),
    )
    assert np.array_equal(buckets.reshape(expected.shape), expected)
    order, _ = nsa.lsh_sort(buckets)
    rows = math.prod(buckets.shape[:-2])
    for row, b in zip(order.reshape(rows, order.shape[-1]), buckets.reshape(rows, *buckets.shape[-2:])):
        length = b.shape[-1]
        keys = [(int(i) // length, int(b[int(i) // length, int(i) % length]), int(i) % length) for i in row]
        assert keys == sorted(keys)


@VALIDITY
@FUZZ
@given(data=st.data())
def test_ring_attention_on_one_rank(valid, data):
    q, k, v = data.draw(qkv(valid, one_sequence=True), label="q, k, v")
    kw = dict(causal=data.draw(flags(valid)), window=data.draw(windows(valid)))
    sharding = data.draw(st.sampled_from(["zigzag", "contiguous"] + ([] if valid else ["rows"])), label="sharding")
    call = lambda: nsa.ring_attention(q, k, v, SoloComm(), sharding=sharding, **kw)  # noqa: E731
    kind, out = fuzzed(call, "ring_attention")
    if not expect(valid, kind, out):
        return
    _same(out, reference.attention(q, k, v, **kw)[0], _tolerance(q, k, v))


# ----------------------------------------------------------------------------- inference entry points and interop

SMALL_FUZZ = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
HALF_TOL = {"float16": 4e-3}  # out is rounded to float16; the kernels accumulate in float32


def offsets(lengths, dtype):
    return np.concatenate([[0], np.cumsum(lengths)]).astype(dtype)


@VALIDITY
@SMALL_FUZZ
@given(data=st.data())
def test_varlen_and_backward(valid, data):
    pick = data.draw
    n_seqs = pick(st.integers(0, 4), label="n_seqs")
    len_q = pick(st.lists(st.integers(0, 12), min_size=n_seqs, max_size=n_seqs), label="len_q")
    len_k = pick(st.lists(st.integers(0, 12), min_size=n_seqs, max_size=n_seqs), label="len_k")
    hk = pick(st.integers(1, 2), label="hk")
    hq = hk * pick(st.integers(1, 2), label="group")
    d, dv = pick(st.integers(1, 8), label="d"), pick(st.integers(1, 5), label="dv")
    dtype = pick(dtypes(valid), label="dtype")
    index = pick(st.sampled_from(["int32", "int64", "uint64"]), label="index dtype")
    cu_q, cu_k = offsets(len_q, index), offsets(len_k, index)
    if not valid:
        breakage = pick(st.sampled_from(["none", "float", "decreasing", "end", "count"]), label="breakage")
        if breakage == "float":
            cu_q = cu_q.astype(np.float64)
        elif breakage == "decreasing" and n_seqs:
            cu_k = cu_k[::-1].copy()
        elif breakage == "end":
            cu_q = np.append(cu_q, cu_q[-1] + 1)
        elif breakage == "count":
            cu_k = cu_k[:-1]
    q = pick(arrays((hq, sum(len_q), d), dtype), label="q")
    k = pick(arrays((hk, sum(len_k), d), dtype), label="k")
    v = pick(arrays((hk, sum(len_k), dv), dtype), label="v")
    kw = dict(causal=pick(flags(valid)), window=pick(windows(valid)), scale=pick(scales(valid)))
    call = lambda: nsa.attention_varlen(q, k, v, cu_q, cu_k, return_lse=True, **kw)  # noqa: E731
    kind, result = fuzzed(call, "attention_varlen")
    if not expect(valid, kind, result):
        return
    out, lse = result
    tol = _tolerance(q, k, v)
    dout = np.ones_like(out)
    grads = nsa.attention_varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, **kw)
    for s in range(n_seqs):
        rows, keys = slice(int(cu_q[s]), int(cu_q[s + 1])), slice(int(cu_k[s]), int(cu_k[s + 1]))
        ref_out, ref_lse = reference.attention(q[:, rows], k[:, keys], v[:, keys], **kw)
        _same(out[:, rows], ref_out, tol)
        _same(lse[:, rows], ref_lse, 50 * tol, floor=1.0)
        want = reference.attention_backward(dout[:, rows], q[:, rows], k[:, keys], v[:, keys], **kw)
        for g, w, part in zip(grads, want, (rows, keys, keys)):
            _same(g[:, part], w, 20 * tol, floor=1.0)


def kv_rules_hold(table, lengths, n_new, page_size, n_pages):
    """The paged-cache rules, written out independently: pages in use exist and are distinct per sequence, and
    no sequence appends into a page another one uses."""
    used = []
    for b, start in enumerate(lengths):
        pages = list(table[b][: -(-(start + n_new) // page_size)])
        if any(not 0 <= p < n_pages for p in pages) or len(set(pages)) != len(pages):
            return False
        used.append(pages)
    for b, start in enumerate(lengths):
        written = set(used[b][start // page_size :]) if n_new else set()
        if any(written & set(other) for c, other in enumerate(used) if c != b):
            return False
    return True


@settings(SMALL_FUZZ, max_examples=60)
@given(data=st.data())
def test_kvcache_with_random_block_tables(data):
    """Contiguous or paged caches; block tables of distinct pages, then changed in a few places (a page another
    sequence uses, a page twice, a page out of range): computed exactly when the rules hold, refused otherwise,
    and the cache is unchanged by a refusal."""
    pick = data.draw
    batch, hk = pick(st.integers(1, 3), label="batch"), pick(st.integers(1, 2), label="hk")
    hq, lq = hk * pick(st.integers(1, 3), label="group"), pick(st.integers(0, 3), label="lq")
    d, dv, n_new = pick(st.integers(1, 6), label="d"), pick(st.integers(1, 4), label="dv"), pick(st.integers(0, 3))
    dtype = pick(st.sampled_from(["float64", "float32", "float16"]), label="dtype")
    page_size = pick(st.sampled_from([None, 1, 3, 4]), label="page_size")
    if page_size is None:
        capacity, table = pick(st.integers(0, 10), label="Lmax"), None
        shape = (batch, hk, capacity)
    else:
        max_pages = pick(st.integers(0, 4), label="max_pages")
        n_pages = batch * max_pages + pick(st.integers(0, 2), label="spare pages")
        capacity, shape = page_size * max_pages, (max(n_pages, 1), hk, page_size)
        table = np.random.default_rng(pick(st.integers(0, 99))).permutation(shape[0])[: batch * max_pages]
        table = table.reshape(batch, max_pages).astype(np.int32)
        if max_pages:
            for _ in range(pick(st.integers(0, 2), label="changes")):
                b, p = pick(st.integers(0, batch - 1)), pick(st.integers(0, max_pages - 1))
                other = pick(st.integers(0, batch - 1)), pick(st.integers(0, max_pages - 1))
                change = pick(st.sampled_from(["share", "share", "share", "outside"]), label="change")
                table[b, p] = table[other] if change == "share" else pick(st.sampled_from([-1, shape[0]]))
    most = max(capacity - n_new, 0)  # most lengths fit, and most use several pages
    length = st.one_of(st.integers(most // 2, most), st.integers(0, most), st.integers(0, 12))
    lengths = np.array(pick(st.lists(length, min_size=batch, max_size=batch), label="lengths"), np.int32)
    k_cache, v_cache = pick(arrays((*shape, d), dtype), label="k_cache"), pick(arrays((*shape, dv), dtype), label="v")
    q = pick(arrays((batch, hq, lq, d), dtype), label="q")
    k_new = pick(arrays((batch, hk, n_new, d), dtype), label="k_new") if n_new else None
    v_new = pick(arrays((batch, hk, n_new, dv), dtype), label="v_new") if n_new else None
    kw = dict(causal=pick(st.booleans()), window=pick(windows(True)), scale=pick(scales(True)))
    before_k, before_v = k_cache.copy(), v_cache.copy()
    keys = values = None
    fits = bool((lengths + n_new <= capacity).all())
    if fits and (table is None or kv_rules_hold(table, lengths, n_new, page_size, shape[0])):
        rows = [(b, int(n)) for b, n in enumerate(lengths)]
        if table is None:
            keys, values = [k_cache[b, :, :n].copy() for b, n in rows], [v_cache[b, :, :n].copy() for b, n in rows]
        else:
            keys = [gather(k_cache, table[b], n, np) for b, n in rows]
            values = [gather(v_cache, table[b], n, np) for b, n in rows]
    paged = {} if table is None else {"block_table": table}
    call = lambda: nsa.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=lengths, k_new=k_new,  # noqa: E731
                                              v_new=v_new, return_lse=True, **paged, **kw)  # fmt: skip
    kind, result = fuzzed(call, "attention_with_kvcache")
    if keys is None:
        assert kind == "refused", "arguments that break a rule were accepted"
        assert k_cache.tobytes() == before_k.tobytes() and v_cache.tobytes() == before_v.tobytes()
        return
    assert kind == "ok", f"valid arguments were refused: {result}"
    out, _ = result
    tol = HALF_TOL.get(dtype, _tolerance(q))
    for b in range(batch):
        k, v = keys[b], values[b]
        if n_new:
            k, v = np.concatenate([k, k_new[b]], axis=1), np.concatenate([v, v_new[b]], axis=1)
        _same(out[b], reference.attention(q[b], k, v, **kw)[0], tol)


def merged_row(out_a, a, out_b, b):
    """float64 merge of one row, with its limits: a side with lse -inf adds nothing, one with +inf takes over."""
    if a == np.inf or b == np.inf:
        return ((out_a if a == np.inf else 0) + (out_b if b == np.inf else 0)) / (
            int(a == np.inf) + int(b == np.inf)
        ), np.inf
    if a == b == -np.inf:
        return np.zeros_like(out_a), -np.inf
    lse = np.logaddexp(a, b)
    return (out_a * np.exp(a - lse) if a > -np.inf else 0) + (out_b * np.exp(b - lse) if b > -np.inf else 0), lse


MERGE_TOL = {"float64": 1e-12, "float32": 2e-5, "float16": 4e-3}


@SMALL_FUZZ
@given(data=st.data(), lead=st.sampled_from([(), (3,), (2, 4)]), dv=st.integers(1, 5))
def test_merge_states(data, lead, dv):
    """Guarded merges of every mix of finite, empty (-inf) and overflowed (+inf) sides, or a clear refusal."""
    pick = data.draw
    row_lse = st.one_of(st.floats(-50, 50), st.sampled_from([-np.inf, np.inf, 0.0]))
    lse_dtype = pick(st.sampled_from(["float64", "float32", "float16"]), label="lse dtype")
    lse_a, lse_b = (
        np.array(pick(st.lists(row_lse, min_size=math.prod(lead), max_size=math.prod(lead))), lse_dtype).reshape(lead)
        for _ in range(2)
    )
    dtype = pick(st.sampled_from(["float64", "float32", "float16", "int32"]), label="dtype")
    out_a, out_b = (pick(arrays((*lead, dv), dtype), label=name) for name in ("out_a", "out_b"))
    kind, result = fuzzed(lambda: nsa.merge_states(out_a, lse_a, out_b, lse_b), "merge_states")
    if not expect(dtype != "int32" and lse_dtype != "float16", kind, result):
        return
    out, lse = result
    rows = [
        merged_row(
            *(np.asarray(x, np.float64).reshape(-1, *x.shape[len(lead) :])[r] for x in (out_a, lse_a, out_b, lse_b))
        )
        for r in range(math.prod(lead))
    ]
    want_out = np.array([o for o, _ in rows]).reshape(out.shape)
    want_lse = np.array([x for _, x in rows]).reshape(lse.shape)
    _same(lse, want_lse, MERGE_TOL["float64" if dtype == "float64" else "float32"], floor=50.0)
    _same(out, want_out, MERGE_TOL[dtype], floor=1.0)


@pytest.mark.skipif(not HAS_TORCH, reason="PyTorch is not installed (pip install npsparseattn[interop])")
@SMALL_FUZZ
@given(data=st.data())
def test_torch_tensor_views(data):
    """PyTorch views (permuted, sliced with steps, expanded, lazily negated) read with their exact values."""
    import torch

    q, k, v = data.draw(qkv(valid=True), label="q, k, v")
    dtype = np.float32 if q.dtype.name == "float32" else np.float64  # PyTorch takes native byte order only
    q, k, v = (np.ascontiguousarray(x, dtype) for x in (q, k, v))
    views = []
    for name, x in (("q", q), ("k", k), ("v", v)):
        how = data.draw(st.sampled_from(["plain", "permuted", "stepped", "expanded", "negated"]), label=name)
        base = torch.from_numpy(np.ascontiguousarray(x))
        if how == "permuted":
            view = base.movedim(-1, 0).contiguous().movedim(0, -1)  # last axis not unit-stride
        elif how == "stepped":
            view = torch.from_numpy(np.repeat(np.ascontiguousarray(x), 2, axis=-2))[..., ::2, :]
        elif how == "expanded" and x.ndim >= 3 and x.shape[-3] >= 1:
            view = base[..., :1, :, :].expand(base.shape) if x.shape[-3] == 1 else base
        elif how == "negated":
            view = torch.complex(torch.zeros_like(base), -base).conj().imag  # values of x, negation pending
        else:
            view = base
        assert np.array_equal(view.resolve_neg().numpy(), x)
        views.append(view)
    kw = dict(causal=data.draw(st.booleans()), window=data.draw(windows(True)))
    out = nsa.attention(*views, **kw)
    assert isinstance(out, torch.Tensor)
    _same(out.numpy(), reference.attention(q, k, v, **kw)[0], _tolerance(q, k, v))


def test_outcome_helper_rejects_errors_from_outside_the_package():
    """The fuzz harness itself: an error raised inside NumPy is not an accepted refusal."""
    with pytest.raises(AssertionError):
        outcome(lambda: np.reshape(np.ones(4), (3,)))
    assert outcome(lambda: nsa.layouts.dense(-1, 4))[0] == "refused"

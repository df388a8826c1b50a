"""The ``cupy`` backend's exact attention end to end, forward and backward, against the float64 reference.

Every test runs twice: ``emulated`` executes the CUDA C++ of ``kernels/attention.cu``
on the host (``NPSPARSEATTN_CUDA_EMULATE=1``, NumPy arrays) in every CI run;
``gpu`` (marker ``gpu``) runs the same sources compiled by NVRTC on a CUDA GPU
with CuPy arrays and skips where there is none.  The error bound is flash-attn's:
at most twice the error of a naive implementation in the same precision
(:func:`raw_support.naive_attention`) plus a small epsilon.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import SoloComm, random_array
from hypothesis import given, settings
from hypothesis import strategies as st
from raw_support import DTYPE_NAMES, DTYPES, MODES, RawMode, assert_within_twice_naive, naive_attention

import npsparseattn as nsa
from npsparseattn import reference
from npsparseattn.cuda.cupy_raw import driver, sources
from npsparseattn.cuda.cupy_raw import exact as raw_exact
from npsparseattn.cuda.cupy_raw.emulate import host

SHAPES = [
    pytest.param(dict(hq=2, hk=1, lq=77, lk=131, d=32), id="gqa-lq<lk-d32"),
    pytest.param(dict(hq=4, hk=2, lq=130, lk=130, d=64), id="gqa-odd-square-d64"),
    pytest.param(dict(batch=2, hq=2, hk=2, lq=150, lk=60, d=128), id="lq>lk-d128"),
    pytest.param(dict(hq=3, hk=1, lq=1, lk=200, d=96), id="mqa-decode-d96"),
]
MASKS = [
    pytest.param(dict(), id="full"),
    pytest.param(dict(causal=True), id="causal"),
    pytest.param(dict(window=(20, 7)), id="window"),
    pytest.param(dict(window=(33, None), causal=True), id="causal-window"),
    pytest.param(dict(window=(0, 0)), id="diagonal"),
]


@pytest.fixture(params=MODES)
def mode(request, monkeypatch):
    return RawMode(request.param, monkeypatch)


def _inputs(rng, dtype, batch=1, hq=2, hk=1, lq=40, lk=None, d=32):
    lk = lq if lk is None else lk
    shapes = [(batch, hq, lq, d), (batch, hk, lk, d), (batch, hk, lk, d), (batch, hq, lq, d)]
    return [random_array(rng, s).astype(DTYPES[dtype]) for s in shapes]


def _mask(lq, lk, causal=False, window=None):
    left, right = (None, None) if window is None else window
    return reference.visibility_mask(lq, lk, left=left, right=0 if causal else right)


def check(mode, q, k, v, dout, kw):
    """Forward and backward of backend "cupy" against the float64 reference, flash-attn's bound."""
    out, lse = nsa.attention(*mode.put(q, k, v), return_lse=True, backend="cupy", **kw)
    grads = nsa.attention_backward(*mode.put(dout, q, k, v), out, lse, backend="cupy", **kw)
    out, lse, grads = mode.get(out), mode.get(lse), [mode.get(g) for g in grads]
    assert out.dtype == q.dtype and lse.dtype == np.float32
    assert all(g.dtype == x.dtype and g.shape == x.shape for g, x in zip(grads, (q, k, v)))
    q64, k64, v64, do64 = (x.astype(np.float64) for x in (q, k, v, dout))
    ref_out, ref_lse = reference.attention(q64, k64, v64, **kw)
    ref_grads = reference.attention_backward(do64, q64, k64, v64, **kw)
    scale = kw.get("scale", q.shape[-1] ** -0.5)
    naive = naive_attention(q, k, v, dout, _mask(q.shape[-2], k.shape[-2], kw.get("causal", False),
                                                 kw.get("window")), scale, q.dtype)  # fmt: skip
    assert_within_twice_naive([out, *grads], naive, [ref_out, *ref_grads])
    empty = ~np.isfinite(ref_lse)
    np.testing.assert_array_equal(np.isneginf(lse), empty)
    np.testing.assert_allclose(lse[~empty], ref_lse[~empty], rtol=0, atol=1e-5)
    assert np.all(out[empty] == 0)
    return out, lse, grads


@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPE_NAMES)
def test_matches_reference_within_twice_naive(rng, mode, dtype, shape, mask):
    q, k, v, dout = _inputs(rng, dtype, **shape)
    check(mode, q, k, v, dout, mask)


def test_custom_scale_and_2d_inputs(rng, mode):
    q, k, v, dout = _inputs(rng, "float16", hq=1, hk=1, lq=45, lk=61, d=64)
    check(mode, q[0, 0], k[0, 0], v[0, 0], dout[0, 0], dict(scale=-0.3, causal=True))


def test_empty_rows_give_zero_output_neg_inf_lse_and_zero_gradients(rng, mode):
    # bottom-right causal alignment with Lq > Lk: the first Lq - Lk queries see no key
    q, k, v, dout = _inputs(rng, "bfloat16", hq=2, hk=2, lq=90, lk=20, d=64)
    out, lse, (dq, dk, dv) = check(mode, q, k, v, dout, dict(causal=True))
    assert np.all(out[:, :, :70] == 0) and np.all(np.isneginf(lse[:, :, :70]))
    assert np.all(dq[:, :, :70] == 0)
    assert not any(np.isnan(g.astype(np.float32)).any() for g in (dq, dk, dv))


def test_empty_sequences(rng, mode):
    q, k, v, _ = _inputs(rng, "float16", lq=7, lk=0, d=32)
    out, lse = nsa.attention(*mode.put(q, k, v), return_lse=True, backend="cupy")
    assert np.all(mode.get(out) == 0) and np.all(np.isneginf(mode.get(lse)))
    dq, dk, dv = nsa.attention_backward(*mode.put(np.ones_like(q), q, k, v), out, lse, backend="cupy")
    assert np.all(mode.get(dq) == 0) and dk.shape == k.shape
    q, k, v, _ = _inputs(rng, "float16", lq=0, lk=9, d=32)
    out, lse = nsa.attention(*mode.put(q, k, v), return_lse=True, backend="cupy")
    assert out.shape == (1, 2, 0, 32) and lse.shape == (1, 2, 0)
    _, dk, dv = nsa.attention_backward(*mode.put(q, q, k, v), out, lse, backend="cupy")
    assert np.all(mode.get(dk) == 0) and np.all(mode.get(dv) == 0)


@pytest.mark.parametrize("dtype", DTYPE_NAMES)
def test_kernels_write_every_output_element(rng, mode, dtype):
    """Buffers poisoned with NaN come back fully written (the kernel contract's ``out``, ``lse`` and ``grads``)."""
    q, k, v, dout = mode.put(*_inputs(rng, dtype, batch=2, hq=4, hk=2, lq=70, lk=90, d=64))
    kw = dict(scale=0.25, offset=20, left=30, right=0)
    nan = np.float32(np.nan)
    out, lse = mode.put(np.full(dout.shape, nan).astype(DTYPES[dtype]), np.full(dout.shape[:3], nan, np.float32))
    raw_exact.forward(q, k, v, out=out, lse=lse, **kw)
    assert not np.isnan(mode.get(out).astype(np.float32)).any() and not np.isnan(mode.get(lse)).any()
    grads = mode.put(*(np.full(x.shape, nan).astype(DTYPES[dtype]) for x in (q, k, v)))
    returned = raw_exact.backward(dout, q, k, v, out, lse, grads=grads, **kw)
    for g, r in zip(grads, returned):
        assert r is g
        assert not np.isnan(mode.get(g).astype(np.float32)).any()


def test_non_contiguous_inputs_are_copied_not_misread(rng, mode):
    q, k, v, dout = _inputs(rng, "float16", batch=2, hq=4, hk=2, lq=37, lk=53, d=32)
    # the same values laid out (B, L, H, D) and viewed as (B, H, L, D)
    q, k, v, dout = (np.ascontiguousarray(x.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3) for x in (q, k, v, dout))
    assert not q.flags.c_contiguous
    check(mode, q, k, v, dout, dict(causal=True))


def test_ring_attention_of_one_rank_runs_these_kernels(rng, monkeypatch):
    """ring_attention is an alias of attention in the registry: its blocks (two zigzag chunks here) run these
    kernels and are merged by lse."""
    RawMode("emulated", monkeypatch)
    q, k, v, dout = _inputs(rng, "float16", hq=2, hk=1, lq=96, d=64)
    ring = nsa.ring_attention(q, k, v, SoloComm(), causal=True, backend="cupy")
    ref, _ = reference.attention(*(x.astype(np.float64) for x in (q, k, v)), causal=True)
    naive = naive_attention(q, k, v, dout, _mask(96, 96, causal=True), 64**-0.5, q.dtype)
    assert_within_twice_naive([ring], naive[:1], [ref])


@pytest.mark.parametrize(
    "schedule",
    [host.REVERSE, host.GREEDY | host.EAGER_COPIES, host.REVERSE | host.GREEDY | host.EAGER_COPIES],
    ids=["reverse", "greedy-eager", "reverse-greedy-eager"],
)
def test_other_thread_schedules_give_the_same_bits(rng, monkeypatch, schedule):
    """A missing barrier or wait, or a race on shared memory, shows up as different results under another
    legal schedule of the emulator (npsa_host.h): threads last-first, one warp running ahead of the others to
    its next barrier, cp.async copies landing at issue instead of at the wait."""
    RawMode("emulated", monkeypatch)
    # enough key tiles per CTA (and query tiles per key CTA) that a buffer is refilled while in use
    q, k, v, dout = _inputs(rng, "bfloat16", hq=4, hk=2, lq=200, lk=260, d=64)
    kw = dict(window=(150, 20))

    def run():
        out, lse = nsa.attention(q, k, v, return_lse=True, **kw, backend="cupy")
        return [out, lse, *nsa.attention_backward(dout, q, k, v, out, lse, **kw, backend="cupy")]

    first = run()
    monkeypatch.setattr(host, "SCHEDULE", schedule)
    for a, b in zip(first, run()):
        np.testing.assert_array_equal(a, b)


def test_refusals_name_the_reason(rng, monkeypatch):
    RawMode("emulated", monkeypatch)
    q, k, v, _ = _inputs(rng, "float16", d=32)
    with pytest.raises(nsa.BackendError, match=r"float32 inputs go to the numba-cuda backend on a GPU \(numba on"):
        nsa.attention(q.astype(np.float32), k.astype(np.float32), v.astype(np.float32), backend="cupy")
    with pytest.raises(nsa.BackendError, match=r"head dimension 40 has no kernel instance \(instances: 32, 64"):
        nsa.attention(*(np.ones((2, 5, 40), np.float16) for _ in range(3)), backend="cupy")
    with pytest.raises(nsa.BackendError, match=r"D=32 and Dv=64 differ"):
        nsa.attention(q, k, np.ones((1, 1, 40, 64), np.float16), backend="cupy")
    # float16 NumPy arrays go to the CPU kernels first when the backend is not forced
    assert nsa.attention(q, k, v).dtype == np.float16
    monkeypatch.delenv("NPSPARSEATTN_CUDA_EMULATE")
    with pytest.raises(nsa.BackendError, match=r"backend 'cupy' cannot run attention: takes CuPy arrays, got NumPy"):
        nsa.attention(q, k, v, backend="cupy")


def test_the_race_detector_finds_a_missing_barrier_in_one_run(rng, monkeypatch):
    """The forward with the barrier that frees a K/V buffer before its refill removed: the strict emulator stops
    it in the default schedule, where without the race detector it runs to the end with the right result
    (the threads happen to run in lockstep) and only another schedule would show the bug."""
    RawMode("emulated", monkeypatch)
    original = sources.read
    barrier = "    __syncthreads();  // this buffer is free for the tile after next\n"

    def planted(name):
        text = original(name)
        if name == "npsa_attn.cuh":
            assert barrier in text
            text = text.replace(barrier, "\n")
        return text

    name = "npsa_attn_fwd<npsa::f16, 32, false>"
    q, k, v = (random_array(rng, (1, 1, 64 if i == 0 else 256, 32)).astype(np.float16) for i in range(3))
    ints = [np.int32(x) for x in (64, 256, 1, 1, 192, 0, 0)]

    def run(library, schedule=None):
        out, lse = np.full((1, 1, 64, 32), np.nan, np.float16), np.full((1, 1, 64), np.nan, np.float32)
        library.launch(name, (1, 1, 1), (128,), driver.fwd_shared_bytes(32), [q, k, v, out, lse, *ints,
                       np.float32(0.25), None, np.float32(0)], schedule=schedule)  # fmt: skip
        return out, lse

    expected = run(host.library())
    monkeypatch.setattr(sources, "read", planted)
    broken = host.library_of((name,))
    with pytest.raises(host.EmulationError, match=r"shared-memory race \((read/write|cp.async write/read)\)"):
        run(broken)
    for a, b in zip(run(broken, host.RELAXED), expected):
        np.testing.assert_array_equal(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPE_NAMES)
@pytest.mark.parametrize("mask", [dict(), dict(causal=True), dict(window=(300, 0))], ids=["full", "causal", "window"])
def test_gpu_sizes_match_reference_within_twice_naive(rng, monkeypatch, dtype, mask):
    """Sequence lengths of many tiles, every head dimension: only where a GPU is."""
    mode = RawMode("gpu", monkeypatch)
    for d in (64, 128, 32, 96):
        q, k, v, dout = _inputs(rng, dtype, batch=2, hq=4, hk=2, lq=1000, lk=1100, d=d)
        check(mode, q, k, v, dout, mask)


@pytest.mark.gpu
@pytest.mark.parametrize("mask", [dict(), dict(causal=True)], ids=["full", "causal"])
def test_gpu_agrees_with_the_numba_cuda_backend(rng, monkeypatch, mask):
    """Two independent GPU implementations: each within twice the naive error, so within four of each other."""
    mode = RawMode("gpu", monkeypatch)
    if "numba-cuda" not in nsa.available_backends("attention"):
        pytest.skip("the numba-cuda backend is not registered")
    q, k, v, dout = _inputs(rng, "float16", batch=2, hq=4, hk=2, lq=300, lk=333, d=64)
    on_gpu = mode.put(q, k, v, dout)
    results = {}
    for name in ("cupy", "numba-cuda"):
        try:
            out, lse = nsa.attention(*on_gpu[:3], return_lse=True, backend=name, **mask)
        except nsa.BackendError as err:
            pytest.skip(str(err))
        grads = nsa.attention_backward(on_gpu[3], *on_gpu[:3], out, lse, backend=name, **mask)
        results[name] = [mode.get(x) for x in (out, *grads)]
    q64, k64, v64, do64 = (x.astype(np.float64) for x in (q, k, v, dout))
    reference_results = [reference.attention(q64, k64, v64, **mask)[0],
                         *reference.attention_backward(do64, q64, k64, v64, **mask)]  # fmt: skip
    naive = naive_attention(q, k, v, dout, _mask(300, 333, **mask), 64**-0.5, q.dtype)
    labels = ("out", "dq", "dk", "dv")
    for label, ours, theirs, low, ref in zip(labels, results["cupy"], results["numba-cuda"], naive, reference_results):
        naive_err = np.abs(low.astype(np.float64) - ref).max()
        assert np.abs(ours.astype(np.float64) - theirs.astype(np.float64)).max() <= 4 * naive_err + 1e-4, label


def test_kernel_entry_points_refuse_arrays_they_would_misread(rng, monkeypatch):
    RawMode("emulated", monkeypatch)
    q, k, v, dout = _inputs(rng, "float16", lq=40, d=32)
    kw = dict(scale=0.2, offset=0, left=None, right=None)
    with pytest.raises(ValueError, match="k must be C-contiguous for the cupy kernels"):
        raw_exact.forward(q, k[..., ::-1, :], v, **kw)
    with pytest.raises(TypeError, match="v has dtype float32; the cupy kernels need float16"):
        raw_exact.forward(q, k, v.astype(np.float32), **kw)
    out, lse = raw_exact.forward(q, k, v, **kw)
    with pytest.raises(TypeError, match="lse has dtype float64; the cupy kernels need float32"):
        raw_exact.backward(dout, q, k, v, out, lse.astype(np.float64), **kw)


@settings(max_examples=20, deadline=None)
@given(
    lq=st.sampled_from([1, 2, 63, 64, 65, 127, 128, 129, 200]),
    lk=st.sampled_from([1, 15, 63, 64, 65, 128, 129, 190]),
    group=st.sampled_from([1, 3]),
    window=st.sampled_from([None, (0, None), (None, 0), (5, 70), (64, 0)]),
    d=st.sampled_from([32, 64]),
)
def test_tile_boundaries(lq, lk, group, window, d):
    """Lengths at and around the tile sizes (64 keys, 64 or 128 query rows), under several masks."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        mode = RawMode("emulated", monkeypatch)
        q, k, v, dout = _inputs(np.random.default_rng(lq * 1000 + lk), "float16", hq=group, hk=1, lq=lq, lk=lk, d=d)
        check(mode, q, k, v, dout, dict(window=window))


# --------------------------------------------------------------------------- the deterministic backward

DETERMINISTIC_CASES = [
    pytest.param(False, dict(hq=4, hk=2, lq=200, lk=260, d=64), dict(window=(150, 20)), id="dense-gqa-window-d64"),
    pytest.param(False, dict(hq=2, hk=1, lq=90, lk=70, d=128), dict(causal=True), id="dense-causal-lq>lk-d128"),
    pytest.param(False, dict(hq=3, hk=3, lq=65, lk=129, d=96), dict(), id="dense-full-d96"),
    pytest.param(True, dict(hq=2, hk=1, lq=150, lk=190, d=32), dict(causal=True), id="sparse-causal-d32"),
    pytest.param(True, dict(hq=4, hk=2, lq=130, lk=130, d=128), dict(window=(40, 10)), id="sparse-window-d128"),
    # batch 2: the key-side pass of the deterministic backward gets no dQ accumulator in any batch
    pytest.param(False, dict(batch=2, hq=2, hk=1, lq=40, lk=50, d=32), dict(causal=True), id="dense-batch2-d32"),
    pytest.param(True, dict(batch=2, hq=2, hk=1, lq=64, lk=64, d=32), dict(), id="sparse-batch2-d32"),
]


def _deterministic_run(mode, q, k, v, dout, sparse, kw, deterministic):
    """Forward, then backward with or without the deterministic dQ pass, through the backend modules."""
    from npsparseattn import layouts
    from npsparseattn.cuda.cupy_raw import block_sparse as raw_block_sparse

    lq, lk = q.shape[-2], k.shape[-2]
    left, right = kw.get("window") or (None, None)
    mask = dict(scale=q.shape[-1] ** -0.5, offset=lk - lq, left=left, right=0 if kw.get("causal") else right)
    layout = layouts.bigbird((lq, lk), (64, 32), random_blocks=2, seed=3, heads=q.shape[1])
    module, args = (raw_block_sparse, (layout,)) if sparse else (raw_exact, ())
    q, k, v, dout = mode.put(q, k, v, dout)
    out, lse = module.forward(q, k, v, *args, **mask)
    grads = module.backward(dout, q, k, v, out, lse, *args, **mask, deterministic=deterministic)
    return layout, [mode.get(x) for x in (out, *grads)]


@pytest.mark.parametrize(("sparse", "shape", "kw"), DETERMINISTIC_CASES)
def test_deterministic_backward_matches_reference_within_twice_naive(rng, mode, sparse, shape, kw):
    q, k, v, dout = _inputs(rng, "float16", **shape)
    layout, (_, dq, dk, dv) = _deterministic_run(mode, q, k, v, dout, sparse, kw, True)
    q64, k64, v64, do64 = (x.astype(np.float64) for x in (q, k, v, dout))
    lq, lk = q.shape[-2], k.shape[-2]
    visible = _mask(lq, lk, kw.get("causal", False), kw.get("window"))
    if sparse:
        ref = reference.block_sparse_attention_backward(do64, q64, k64, v64, layout, **kw)
        visible = layout.to_token_mask() & visible
    else:
        ref = reference.attention_backward(do64, q64, k64, v64, **kw)
    naive = naive_attention(q, k, v, dout, visible, q.shape[-1] ** -0.5, q.dtype)
    assert_within_twice_naive([dq, dk, dv], naive[1:], ref, labels=("dq", "dk", "dv"))


@pytest.mark.parametrize(
    ("sparse", "shape", "kw"),
    [
        pytest.param(False, dict(hq=2, hk=1, lq=100, lk=200, d=32), dict(window=(120, 20)), id="dense"),
        pytest.param(True, dict(hq=2, hk=1, lq=150, lk=190, d=32), dict(causal=True), id="sparse"),
    ],
)
def test_deterministic_backward_gives_the_same_bits_in_any_order(rng, monkeypatch, sparse, shape, kw):
    """Threads and blocks in other orders (the emulator's schedules, blocks last-first): the deterministic dQ
    keeps its bits; the atomic dQ adds the key blocks' parts in another order and changes in the last bits;
    dK and dV are the same bits in both paths."""
    mode = RawMode("emulated", monkeypatch)
    q, k, v, dout = _inputs(rng, "float16", **shape)
    runs = {}
    for schedule in (0, host.REVERSE | host.REVERSE_BLOCKS, host.GREEDY | host.EAGER_COPIES | host.REVERSE_BLOCKS):
        monkeypatch.setattr(host, "SCHEDULE", schedule)
        for deterministic in (True, False):
            runs[schedule, deterministic] = _deterministic_run(mode, q, k, v, dout, sparse, kw, deterministic)[1]
    first = runs[0, True]
    for (_, deterministic), results in runs.items():
        compared = results if deterministic else results[:1] + results[2:]  # out, (dq), dk, dv
        expected = first if deterministic else first[:1] + first[2:]
        for a, b in zip(compared, expected):
            np.testing.assert_array_equal(a, b)
    assert not np.array_equal(runs[0, False][1], runs[host.REVERSE | host.REVERSE_BLOCKS, False][1])

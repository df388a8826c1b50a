"""The warp-level primitives of the ``cupy`` backend, one at a time, against plain arithmetic.

The kernels of ``kernels/selftest.cu`` run on the host emulation (``emulated``,
every CI run) and, marked ``gpu``, on a CUDA GPU, where the same checks confirm
that the hardware's fragment layouts are the ones the kernels assume.  The
expected values are written from the PTX ISA's fragment tables independently
of the emulator (``_a_fragment`` etc. below), so a misread layout shows up as a
disagreement between two readings (``npsa_test_mma`` gathers its fragments
from global memory by the table, with no ldmatrix), and the products are
checked against NumPy.  What this proves is that the emulator implements the layouts as read
from the ISA and that the tile helpers compose them correctly; that the
hardware agrees is what the ``gpu`` runs of these tests check.
"""

from __future__ import annotations

import numpy as np
import pytest
from raw_support import DTYPES, MODES, KernelRunner, bits, host_library

from npsparseattn.cuda.cupy_raw import limits, sources
from npsparseattn.cuda.cupy_raw.emulate import host
from npsparseattn.cuda.cupy_raw.emulate.host import EmulationError

TAGS = {"float16": "npsa::f16", "bfloat16": "npsa::bf16"}


@pytest.fixture(params=MODES)
def kernels(request, monkeypatch):
    return KernelRunner(request.param, monkeypatch)


def _pair(lo: int, hi: int) -> int:
    return int(lo) | (int(hi) << 16)


@pytest.mark.parametrize("dtype", list(TAGS))
def test_mma_fragments_match_the_matrix_product(rng, kernels, dtype):
    a = rng.standard_normal((16, 16)).astype(DTYPES[dtype])
    b = rng.standard_normal((16, 8)).astype(DTYPES[dtype])
    c = rng.standard_normal((16, 8)).astype(np.float32)
    d = np.full((16, 8), np.nan, np.float32)
    kernels.launch(f"npsa_test_mma<{TAGS[dtype]}>", (1,), (32,), 0, [bits(a), bits(b), c, d])
    expected = a.astype(np.float64) @ b.astype(np.float64) + c
    np.testing.assert_allclose(d, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("trans", [False, True])
def test_ldmatrix_gives_each_lane_the_isa_elements(rng, kernels, trans):
    m = rng.integers(0, 0xFFFF, size=(32, 8), dtype=np.uint16)
    rows = rng.permutation(32).astype(np.int32)
    out = np.zeros((32, 4), np.uint32)
    kernels.launch(f"npsa_test_ldmatrix<{'true' if trans else 'false'}>", (1,), (32,), 32 * 32, [m, rows, out])
    for lane in range(32):
        for mat in range(4):
            matrix = m[rows[8 * mat : 8 * mat + 8]]  # lanes 8*mat .. 8*mat+7 address its rows
            r, c = lane // 4, 2 * (lane % 4)
            if trans:
                expected = _pair(matrix[c, r], matrix[c + 1, r])
            else:
                expected = _pair(matrix[r, c], matrix[r, c + 1])
            assert out[lane, mat] == expected, (lane, mat)


def test_shfl_xor_exchanges_with_the_butterfly_partner(rng, kernels):
    values = rng.standard_normal(32).astype(np.float32)
    out = np.full((32, 5), np.nan, np.float32)
    kernels.launch("npsa_test_shfl", (1,), (32,), 0, [values, out])
    lanes = np.arange(32)
    for k in range(5):
        np.testing.assert_array_equal(out[:, k], values[lanes ^ (1 << k)])


@pytest.mark.parametrize("dtype", list(TAGS))
def test_pack2_rounds_to_nearest_even_low_half_first(rng, kernels, dtype):
    # ties for float16 and bfloat16, overflow to inf, subnormals, infinities, NaN, signed zero
    special = [1 + 2.0**-11, 1 + 3 * 2.0**-11, 1 + 2.0**-8, 1 + 3 * 2.0**-8, 70000.0, -3e38, 1e-7, 6e-8]
    special += [np.inf, -np.inf, np.nan, -0.0, 3.0e38, 1e-40]
    values = np.concatenate([special, rng.standard_normal(64 - len(special)) * 100]).astype(np.float32)
    packed = np.zeros(32, np.uint32)
    back = np.full(64, np.nan, np.float32)
    kernels.launch(f"npsa_test_pack<{TAGS[dtype]}>", (1,), (32,), 0, [values, packed, back])
    with np.errstate(over="ignore"):
        expected = values.astype(DTYPES[dtype])
    exp_bits = bits(expected).astype(np.uint32)
    got_bits = np.stack([packed & 0xFFFF, packed >> 16], axis=1).reshape(-1)
    nan = np.isnan(values)
    np.testing.assert_array_equal(got_bits[~nan], exp_bits[~nan])
    assert np.isnan(back[nan]).all()
    np.testing.assert_array_equal(back[~nan], expected[~nan].astype(np.float32))


@pytest.mark.parametrize("schedule", [0, host.REVERSE, host.GREEDY | host.EAGER_COPIES])
def test_cp_async_groups_complete_in_order_and_zero_fill(rng, kernels, schedule):
    src = rng.integers(0, 0xFFFF, size=(64, 8), dtype=np.uint16)
    dst = np.full((128, 8), 0xAAAA, np.uint16)
    valid = 45
    kernels.launch("npsa_test_cp_async", (1,), (64,), 64 * 16, [src, dst, np.int32(valid)], schedule=schedule)
    landed = src.copy()
    landed[valid:] = 0
    np.testing.assert_array_equal(dst[:32], src[:32])
    np.testing.assert_array_equal(dst[32:64], 0xAAAA)
    np.testing.assert_array_equal(dst[64:], landed[::-1])


@pytest.mark.parametrize("d", sources.HEAD_DIMS)
@pytest.mark.parametrize("dtype", list(TAGS))
def test_tile_helpers_compose_into_matrix_products(rng, kernels, dtype, d):
    dt = DTYPES[dtype]
    a, bt, v = (rng.standard_normal((16, d)).astype(dt) for _ in range(3))
    valid = 13
    c1 = np.full((16, 16), np.nan, np.float32)
    c2, c3 = np.full((16, d), np.nan, np.float32), np.full((16, d), np.nan, np.float32)
    smem = 3 * 16 * (d + 8) * 2
    kernels.launch(f"npsa_test_tiles<{TAGS[dtype]}, {d}>", (1,), (32,), smem, [bits(a), bits(bt), np.int32(valid),
               bits(v), c1, c2, c3])  # fmt: skip
    bt64 = bt.astype(np.float64)
    bt64[valid:] = 0
    v64 = v.astype(np.float64)
    ref1 = a.astype(np.float64) @ bt64.T
    np.testing.assert_allclose(c1, ref1, rtol=1e-5, atol=1e-4)
    ref2 = c1.astype(dt).astype(np.float64) @ v64  # the kernel rounds its own c1 to the element type
    np.testing.assert_allclose(c2, ref2, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(c3, bt64[:, :16].T @ v64, rtol=1e-5, atol=1e-4)


FAULTS = [  # (program, threads, what the emulator says); the programs are npsa_test_fault<MODE> in selftest.cu
    pytest.param(0, 32, "global load: global address .* outside every buffer", id="out-of-bounds-load"),
    pytest.param(1, 32, "ldmatrix: misaligned shared address", id="misaligned-ldmatrix"),
    pytest.param(2, 64, "deadlock: 32 threads wait at __syncthreads, 0 at a warp collective, 32 have exited",
                 id="deadlock"),
    pytest.param(3, 32, "warp divergence: lanes execute", id="warp-divergence"),
    pytest.param(4, 32, r"shared load: reads shared memory its own cp.async has not landed yet \(no cp.async.wait",
                 id="read-before-wait"),
    pytest.param(5, 64, r"shared-memory race \((read/write|write/read)\) at byte \d+: threads \d+ and \d+ in one "
                 r"barrier interval", id="race"),
    pytest.param(6, 32, "shared load: reads uninitialised shared memory at byte \\d+ \\(nothing wrote it",
                 id="uninitialised-read"),
    pytest.param(7, 32, "cp.async source: misaligned global address", id="misaligned-cp-async"),
    pytest.param(8, 64, r"barrier divergence: threads wait at the __syncthreads of .*selftest.cu:\d+ and of "
                 r".*selftest.cu:\d+", id="barrier-divergence"),
    pytest.param(9, 32, "shared load: misaligned shared address", id="misaligned-vector-shared-load"),
]  # fmt: skip


def _fault_buffers(threads):
    src = np.arange(8 * threads + 8, dtype=np.uint16)
    return src, np.zeros(threads, np.uint16)


SCHEDULES = {"in-order": 0, "reverse": host.REVERSE, "greedy-eager": host.GREEDY | host.EAGER_COPIES}
FAULT_RUNS = [  # every planted bug under every schedule (copies that land at issue make mode 4's early read legal)
    pytest.param(*fault.values, schedule, id=f"{fault.id}-{name}")
    for fault in FAULTS
    for name, schedule in SCHEDULES.items()
    if not (fault.values[0] == 4 and schedule & host.EAGER_COPIES)
]


@pytest.mark.parametrize(("mode", "threads", "message", "schedule"), FAULT_RUNS)
def test_emulator_stops_a_kernel_that_breaks_a_rule(mode, threads, message, schedule):
    """Each planted bug is caught under every schedule: the checks do not depend on the order threads ran in."""
    with pytest.raises(EmulationError, match=message):
        host_library().launch(f"npsa_test_fault<{mode}>", (1,), (threads,), 512, [*_fault_buffers(threads)],
                              schedule=schedule)  # fmt: skip


@pytest.mark.parametrize(("mode", "threads"), [(4, 32), (5, 64), (6, 32), (8, 64)],
                         ids=["read-before-wait", "race", "uninitialised-read", "barrier-divergence"])  # fmt: skip
def test_without_the_strict_checks_the_planted_bugs_run_silently(mode, threads):
    """The same programs pass the relaxed emulator (the checks of racecheck/initcheck/synccheck are what
    catches them); the reads before a wait and of uninitialised memory see the NaN fill."""
    src, out = _fault_buffers(threads)
    host_library().launch(f"npsa_test_fault<{mode}>", (1,), (threads,), 512, [src, out], schedule=host.RELAXED)
    if mode in (4, 6):
        np.testing.assert_array_equal(out, 0xFFFF)


def test_shared_memory_over_the_device_limit_is_refused():
    lib = host_library()
    with pytest.raises(ValueError, match=r"npsa_test_shfl: 170000 bytes of dynamic shared memory \(at most 166912"):
        lib.launch("npsa_test_shfl", (1,), (32,), 170000, [np.zeros(32, np.float32), np.zeros(160, np.float32)])
    lib.launch("npsa_test_shfl", (1,), (32,), 170000, [np.zeros(32, np.float32), np.zeros(160, np.float32)],
               limits=limits.SM90)  # fmt: skip


def test_launch_checks_parameter_types():
    lib = host_library()
    with pytest.raises(TypeError, match=r"npsa_test_shfl takes parameters 'pp', got 'pf'"):
        lib.launch("npsa_test_shfl", (1,), (32,), 0, [np.zeros(32, np.float32), np.float32(1)])

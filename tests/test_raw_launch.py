"""The ``cupy`` backend's launch path: what reaches a kernel launch, on the host emulation and (marker ``gpu``)
on a GPU.

* empty problems launch nothing: a grid with a dimension of 0 is an invalid launch on a GPU (and the
  loader and the emulator refuse it), so an empty batch must never produce one;
* base pointers are 16-byte aligned: ``cp.async``, 16-byte vector loads and stores fault on a misaligned
  address, so a misaligned input (a view one element into a buffer, a DLPack tensor with an odd storage
  offset) is copied and a misaligned output is computed in an aligned temporary;
* everything runs on the device that holds the arrays, whatever CuPy's current device is;
* bfloat16 kernels run on uint16 buffers holding the bits (``element="bfloat16"``), so they are tested on
  a CuPy without a bfloat16 dtype, and without ml_dtypes.
"""

from __future__ import annotations

import sys
import types
from typing import ClassVar

import numpy as np
import pytest
from conftest import random_array
from raw_support import DTYPES, MODES, RawMode, from_bf16_bits, to_bf16_bits

import npsparseattn as nsa
from npsparseattn import layouts, reference
from npsparseattn.cuda.cupy_raw import block_sparse as raw_block_sparse
from npsparseattn.cuda.cupy_raw import driver, limits, loader
from npsparseattn.cuda.cupy_raw import exact as raw_exact
from npsparseattn.cuda.cupy_raw.emulate.host import library


@pytest.fixture(params=MODES)
def mode(request, monkeypatch):
    return RawMode(request.param, monkeypatch)


def _qkv(rng, shape, dtype="float16"):
    return [random_array(rng, shape).astype(DTYPES[dtype]) for _ in range(4)]


def _misaligned(x: np.ndarray, offset: int = 1, xp=np):
    """A C-contiguous copy of ``x`` (of the kind of ``xp``) that starts ``offset`` elements into a 16-byte
    aligned buffer."""
    flat = xp.empty(x.size + 16, x.dtype)
    start = (-driver.address(flat) % 16) // x.itemsize + offset
    view = flat[start : start + x.size].reshape(x.shape)
    view[...] = xp.asarray(x)
    assert view.flags.c_contiguous and driver.address(view) % 16 != 0
    return view


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "block-sparse"])
def test_an_empty_batch_launches_nothing(rng, mode, sparse):
    q, k, v, dout = mode.put(*_qkv(rng, (0, 2, 70, 32)))
    args, forward, backward = (), nsa.attention, nsa.attention_backward
    if sparse:
        args, forward, backward = (
            (layouts.causal(70, 32),),
            nsa.block_sparse_attention,
            nsa.block_sparse_attention_backward,
        )
    out, lse = forward(q, k, v, *args, causal=True, return_lse=True, backend="cupy")
    assert out.shape == (0, 2, 70, 32) and lse.shape == (0, 2, 70)
    grads = backward(dout, q, k, v, out, lse, *args, causal=True, backend="cupy")
    assert [g.shape for g in grads] == [(0, 2, 70, 32)] * 3


def test_a_grid_with_a_zero_dimension_is_refused_like_on_a_gpu(monkeypatch):
    RawMode("emulated", monkeypatch)
    with pytest.raises(ValueError, match=r"npsa_test_shfl: grid \(1, 0, 1\) has a dimension below 1"):
        library().launch("npsa_test_shfl", (1, 0, 1), (32,), 0, [np.zeros(32, np.float32)] * 2)


def test_launch_limits_name_what_a_gpu_would_refuse():
    assert limits.launch_problems((4, 2, 1), (128,), 70000) == []
    assert limits.launch_problems((2**31, 70000, 0), (33, 33), 170000, registers=256) == [
        "grid (2147483648, 70000, 0) has a dimension below 1 (launch nothing instead)",
        "grid (2147483648, 70000, 0) exceeds (2147483647, 65535, 65535) blocks",
        "block (33, 33, 1) is not 1 to 1024 threads within (1024, 1024, 64)",
        "170000 bytes of dynamic shared memory (at most 166912 on sm_80)",
        "256 registers per thread (at most 255)",
        "256 registers x 1089 threads = 278784 per block (at most 65536 on sm_80)",
    ]
    assert limits.launch_problems((1,), (128,), 170000, limits=limits.SM90) == []
    assert limits.launch_problems((1,), (1024,), 0, registers=65) == [
        "65 registers x 1024 threads = 66560 per block (at most 65536 on sm_80)"
    ]


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "block-sparse"])
def test_misaligned_inputs_give_the_results_of_aligned_ones(rng, mode, sparse):
    q, k, v, dout = _qkv(rng, (1, 2, 90, 64), "float16")
    layout = layouts.sliding_window(90, 32, (1, 0))
    args, forward, backward = (), nsa.attention, nsa.attention_backward
    if sparse:
        args, forward, backward = (layout,), nsa.block_sparse_attention, nsa.block_sparse_attention_backward

    def run(q, k, v, dout):
        out, lse = forward(q, k, v, *args, causal=True, return_lse=True, backend="cupy")
        grads = backward(dout, q, k, v, out, lse, *args, causal=True, backend="cupy")
        return [mode.get(x) for x in (out, lse, *grads)]

    aligned = run(*mode.put(q, k, v, dout))
    shifted = run(*(_misaligned(x, offset, mode.xp) for x, offset in zip((q, k, v, dout), (1, 3, 5, 7))))
    for a, b in zip(aligned, shifted):
        np.testing.assert_array_equal(a, b)


def test_misaligned_output_buffers_are_written(rng, monkeypatch):
    """``out=``/``lse=``/``grads=`` that start off a 16-byte boundary: computed aside, then copied in."""
    RawMode("emulated", monkeypatch)
    q, k, v, dout = _qkv(rng, (2, 2, 70, 32), "bfloat16")
    kw = dict(scale=0.2, offset=0, left=None, right=0)
    out, lse = raw_exact.forward(q, k, v, **kw)
    grads = raw_exact.backward(dout, q, k, v, out, lse, **kw)
    nan = np.float32(np.nan)
    out_b = _misaligned(np.full(out.shape, nan).astype(out.dtype))
    lse_b = _misaligned(np.full(lse.shape, nan, np.float32))
    returned = raw_exact.forward(q, k, v, **kw, out=out_b, lse=lse_b)
    assert returned[0] is out_b and returned[1] is lse_b
    np.testing.assert_array_equal(out_b, out)
    np.testing.assert_array_equal(lse_b, lse)
    grads_b = tuple(_misaligned(np.full(x.shape, nan).astype(x.dtype), 3) for x in (q, k, v))
    returned = raw_exact.backward(dout, q, k, v, out, lse, **kw, grads=grads_b)
    for r, g, expected in zip(returned, grads_b, grads):
        assert r is g
        np.testing.assert_array_equal(g, expected)


# --------------------------------------------------------------------------- bfloat16 as uint16 bits


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "block-sparse"])
def test_bfloat16_kernels_run_on_uint16_buffers(rng, mode, sparse):
    """On any CuPy (and without ml_dtypes): uint16 buffers holding bfloat16 bits, ``element="bfloat16"``."""
    shapes = [(2, 4, 130, 64), (2, 2, 150, 64), (2, 2, 150, 64), (2, 4, 130, 64)]
    values = [from_bf16_bits(to_bf16_bits(random_array(rng, s, np.float32))) for s in shapes]
    q, k, v, dout = mode.put(*(to_bf16_bits(x) for x in values))
    layout = layouts.bigbird((130, 150), 32, random_blocks=1, seed=1)
    module, args = (raw_block_sparse, (layout,)) if sparse else (raw_exact, ())
    kw = dict(scale=0.125, offset=20, left=70, right=0)
    out, lse = module.forward(q, k, v, *args, **kw, element="bfloat16")
    grads = module.backward(dout, q, k, v, out, lse, *args, **kw, element="bfloat16")
    assert out.dtype == np.uint16 and [g.dtype for g in grads] == [np.uint16] * 3
    q64, k64, v64, do64 = (x.astype(np.float64) for x in values)
    mask = dict(window=(70, 0), scale=0.125)
    if sparse:
        ref = reference.block_sparse_attention(q64, k64, v64, layout, **mask)
        ref_grads = reference.block_sparse_attention_backward(do64, q64, k64, v64, layout, **mask)
    else:
        ref = reference.attention(q64, k64, v64, **mask)
        ref_grads = reference.attention_backward(do64, q64, k64, v64, **mask)
    tol = raw_exact.TOLERANCE["bfloat16"]
    for got, want in zip((out, *grads), (ref[0], *ref_grads)):
        got = from_bf16_bits(mode.get(got)).astype(np.float64)
        assert np.abs(got - want).max() <= tol * np.abs(want).max()
    lse, ref_lse = mode.get(lse), ref[1]
    np.testing.assert_allclose(lse[np.isfinite(ref_lse)], ref_lse[np.isfinite(ref_lse)], atol=1e-4, rtol=0)


def test_uint16_buffers_give_the_bits_of_bfloat16_arrays(rng, monkeypatch):
    """The public path on bfloat16 arrays (ml_dtypes) and the kernels on their uint16 bits: the same bits."""
    RawMode("emulated", monkeypatch)
    q, k, v, dout = _qkv(rng, (1, 2, 100, 32), "bfloat16")
    x = random_array(rng, 1000, np.float32) * np.float32(1e3) ** rng.integers(-3, 3, 1000)
    np.testing.assert_array_equal(to_bf16_bits(x), x.astype(DTYPES["bfloat16"]).view(np.uint16))
    out, lse = nsa.attention(q, k, v, causal=True, return_lse=True, backend="cupy")
    grads = nsa.attention_backward(dout, q, k, v, out, lse, causal=True, backend="cupy")
    kw = dict(scale=32**-0.5, offset=0, left=None, right=0)
    bits = [x.view(np.uint16) for x in (q, k, v, dout)]
    out_b, lse_b = raw_exact.forward(*bits[:3], **kw, element="bfloat16")
    grads_b = raw_exact.backward(bits[3], *bits[:3], out_b, lse_b, **kw, element="bfloat16")
    np.testing.assert_array_equal(lse_b, lse)
    for a, b in zip((out, *grads), (out_b, *grads_b)):
        np.testing.assert_array_equal(a.view(np.uint16), b)


def test_uint16_buffers_must_say_what_they_hold(rng, monkeypatch):
    RawMode("emulated", monkeypatch)
    q = np.zeros((1, 1, 8, 32), np.uint16)
    kw = dict(scale=1.0, offset=0, left=None, right=None)
    with pytest.raises(TypeError, match=r"uint16 buffers need element='bfloat16' or 'float16' \(the bits they hold\)"):
        raw_exact.forward(q, q, q, **kw)
    with pytest.raises(TypeError, match=r"element='bfloat16' is for uint16 buffers; these arrays are float16"):
        raw_exact.forward(*(x.view(np.float16) for x in (q, q, q)), **kw, element="bfloat16")


# --------------------------------------------------------------------------- the device of the arrays


class FakeDevice:
    """``cupy.cuda.Device``: a context manager that makes its id current."""

    stack: ClassVar[list[int]] = [0]

    def __init__(self, device_id=None):
        self.id = FakeDevice.stack[-1] if device_id is None else device_id

    def __enter__(self):
        FakeDevice.stack.append(self.id)
        return self

    def __exit__(self, *exc):
        FakeDevice.stack.pop()


class FakeArray:
    """A CuPy array stand-in on one device, backed by a NumPy array; allocations go to the current device."""

    def __init__(self, host: np.ndarray, device_id: int):
        self.host, self.device = host, FakeDevice(device_id)
        self.shape, self.dtype, self.size, self.flags = host.shape, host.dtype, host.size, host.flags
        self.data = types.SimpleNamespace(ptr=host.ctypes.data)

    def __setitem__(self, key, value):
        self.host[key] = value.host if isinstance(value, FakeArray) else value

    def view(self, dtype):
        return FakeArray(self.host.view(dtype), self.device.id)


@pytest.fixture
def fake_gpus(monkeypatch):
    """A ``cupy`` of two devices whose kernels run on the host emulation; records every allocation and launch
    with the device that was current."""
    RawMode("emulated", monkeypatch)
    events = []
    module = types.ModuleType("cupy")
    module.ndarray = FakeArray
    module.cuda = types.SimpleNamespace(Device=FakeDevice)

    def allocate(host):
        events.append(("alloc", FakeDevice.stack[-1]))
        return FakeArray(host, FakeDevice.stack[-1])

    module.empty = lambda shape, dtype: allocate(np.empty(shape, dtype))
    module.asarray = lambda x: allocate(np.array(x))

    class Launcher:
        def launch(self, name, grid, block, shared, args):
            devices = {a.device.id for a in args if isinstance(a, FakeArray)}
            if devices:  # a launch on CuPy arrays: all of them on the current device
                events.append(("launch", FakeDevice.stack[-1]))
                assert devices == {FakeDevice.stack[-1]}, (name, devices, FakeDevice.stack[-1])
            library().launch(name, grid, block, shared, [a.host if isinstance(a, FakeArray) else a for a in args])

    monkeypatch.setitem(sys.modules, "cupy", module)
    monkeypatch.setattr(loader, "launcher", Launcher)
    monkeypatch.setattr(FakeDevice, "stack", [0])
    monkeypatch.setattr(driver, "_xp", lambda x: np if isinstance(x, np.ndarray) else module)
    return events


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "block-sparse"])
def test_allocations_and_launches_happen_on_the_device_of_the_arrays(rng, fake_gpus, sparse):
    q, k, v, dout = _qkv(rng, (1, 2, 80, 32), "float16")
    layout = layouts.bigbird(80, 16, random_blocks=1, seed=0)
    module = raw_block_sparse if sparse else raw_exact
    args = (layout,) if sparse else ()
    kw = dict(scale=0.3, offset=0, left=None, right=0)
    out, lse = module.forward(q, k, v, *args, **kw)
    grads = module.backward(dout, q, k, v, out, lse, *args, **kw)
    on_1 = [FakeArray(x.copy(), 1) for x in (q, k, v, dout)]
    out_1, lse_1 = module.forward(*on_1[:3], *args, **kw)  # CuPy's current device is 0 throughout
    grads_1 = module.backward(on_1[3], *on_1[:3], out_1, lse_1, *args, **kw)
    assert FakeDevice.stack == [0]
    assert {e for e in fake_gpus} == {("alloc", 1), ("launch", 1)}
    for a, b in zip((out, lse, *grads), (out_1, lse_1, *grads_1)):
        assert b.device.id == 1
        np.testing.assert_array_equal(a, b.host)
